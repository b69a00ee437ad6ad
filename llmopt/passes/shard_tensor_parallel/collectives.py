"""The collectives of ``shard_tensor_parallel``: row-parallel all-reduce, vocab-parallel LM head, token check.

Functional collectives (``compat.functional_collectives``: ``all_reduce``,
``all_gather_into_tensor``, ``wait_tensor``, which Dynamo traces and the aten executor runs
as they are) are inserted as graph nodes, each with valid fake metadata. A row linear's
bias is added once, after the all-reduce. The LM head gathers along dim 0 with the
vocabulary moved there and back, so no size is baked in (a dynamic sequence length stays
dynamic). Every rank must feed the same tokens: :func:`check_same_ids` broadcasts rank 0's
ids and asserts equality, one tiny collective a step.
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.fx as fx

from ... import compat
from ...graph import add_constant, real_tensors, tensor_meta
from ...weight_release import derived
from .pairs import NotShardable, aten, is_const_linear, node_name
from .region import evaluate


# Why a full weight is derived (frozen_weights) and released (weight_release): the graph
# reads this rank's shard of it, which a recompile takes from the cache.
SHARDED = "it was sharded for tensor parallelism"
# A block of rows is already contiguous, so ``.contiguous()`` would return a view that keeps
# the whole weight alive: row shards are cloned.


def shard_row(gm, row: fx.Node, frac: dict, tp, ctx, all_reduce, wait) -> None:
    """Row linear: the input columns of this rank's features, no bias, all_reduce(sum), then the bias."""
    world, rank = tp.world_size, tp.rank
    x = row.args[0]
    w = tensor_meta(row.args[1])
    k_full, k_local = int(w.shape[1]), int(tensor_meta(x).shape[-1])
    lo, hi = frac.get(x, (Fraction(rank, world), Fraction(rank + 1, world)))
    if k_local * world != k_full or (lo, hi) != (Fraction(rank, world), Fraction(rank + 1, world)):
        raise NotShardable(f"{node_name(row)} receives {k_local} of {k_full} features, not this rank's block")
    with real_tensors():
        w_local = derived(gm, row.args[1], ("tp_cols", rank, world),
                          lambda v: v[:, rank * k_local:(rank + 1) * k_local].contiguous(), SHARDED)
    w_node = add_constant(gm, "tp_row_weight", w_local, row)
    bias = row.args[2] if len(row.args) > 2 else None
    row.args = (x, w_node, None)
    row.meta["val"] = aten.linear.default(tensor_meta(x), tensor_meta(w_node))
    reduce_after(gm, row, tp, all_reduce, wait, bias)
    ctx.rewrite(row, f"row-parallel: {k_full} → {k_local} input columns, then all_reduce(sum) over {world} ranks"
                + (" and the bias added once" if bias is not None else ""))



def reduce_after(gm, node: fx.Node, tp, all_reduce, wait, bias: fx.Node | None = None) -> fx.Node:
    """Make every user of ``node`` (this rank's partial sum) read ``all_reduce(sum)`` of it
    (plus ``bias``, added once after the sum); returns the last node inserted."""
    with gm.graph.inserting_after(node):
        reduced = gm.graph.call_function(all_reduce, (node, "sum", tp.group_name))
    with gm.graph.inserting_after(reduced):
        done = gm.graph.call_function(wait, (reduced,))
    last = done
    if bias is not None:
        with gm.graph.inserting_after(done):
            last = gm.graph.call_function(aten.add.Tensor, (done, bias))
    for n in (reduced, done, last):
        n.meta = {k: v for k, v in node.meta.items() if k != "val"}
        n.meta["val"] = evaluate(n)
    node.replace_all_uses_with(last, delete_user_cb=lambda u: u is not reduced)
    return last



def find_lm_head(gm, claimed) -> fx.Node | None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for n in gm.graph.nodes:
        if is_const_linear(gm, n) and n not in claimed and list(n.users) == [out]:
            return n
    return None



def shard_lm_head(gm, head, tp, ctx, all_gather, wait) -> None:
    world, rank = tp.world_size, tp.rank
    w = tensor_meta(head.args[1])
    per = int(w.shape[0]) // world
    with real_tensors():
        w_local, b_local = (
            derived(gm, n, ("tp_vocab", rank, world), lambda v: v[rank * per:(rank + 1) * per].clone(), SHARDED)
            if n is not None else None
            for n in (head.args[1], head.args[2] if len(head.args) > 2 else None))
    args = [head.args[0], add_constant(gm, "tp_vocab_weight", w_local, head)]
    if b_local is not None:
        args.append(add_constant(gm, "tp_vocab_bias", b_local, head))
    head.args = tuple(args)
    head.meta["val"] = aten.linear.default(*[tensor_meta(a) for a in args])
    # Gather along dim 0 with the vocabulary moved there, then back: no size is baked in, so
    # a dynamic sequence length stays dynamic.
    ndim = tensor_meta(head).dim()
    g = gm.graph
    steps = [
        (aten.permute.default, lambda x: (x, [ndim - 1, *range(ndim - 1)]), {}),
        (aten.clone.default, lambda x: (x,), {"memory_format": torch.contiguous_format}),
        (all_gather, lambda x: (x, world, tp.group_name), {}),
        (wait, lambda x: (x,), {}),
        (aten.permute.default, lambda x: (x, [*range(1, ndim), 0]), {}),
        (aten.clone.default, lambda x: (x,), {"memory_format": torch.contiguous_format}),
    ]
    prev, first = head, None
    for target, make_args, kwargs in steps:
        with g.inserting_after(prev):
            node = g.call_function(target, make_args(prev), kwargs)
        node.meta = {k: v for k, v in head.meta.items() if k != "val"}
        node.meta["val"] = evaluate(node)
        first = first or node
        prev = node
    head.replace_all_uses_with(prev, delete_user_cb=lambda u: u is not first)
    ctx.rewrite(head, f"vocab-parallel LM head: {int(w.shape[0])} → {per} rows, then all_gather over {world} ranks")



def check_same_ids(gm, ids: fx.Node, tp, wait) -> None:
    """Every rank must feed the same tokens (a rank that sampled its own, unseeded, would
    make the all-reduces sum activations of different sequences: a silent wrong answer).
    Broadcast rank 0's ids and assert they equal this rank's: one tiny collective a step."""
    g = gm.graph
    anchor = next(n for n in g.nodes if n.op != "placeholder")
    message = (f"llmopt tensor parallelism: rank {tp.rank} was given different token ids than rank 0; every "
               "rank must run the same requests with the same sampling (greedy, or the same seed per request)")
    steps = [
        (compat.functional_broadcast(), lambda x: (x, 0, tp.group_name)),
        (wait, lambda x: (x,)),
        (aten.eq.Tensor, lambda x: (x, ids)),
        (aten.all.default, lambda x: (x,)),
        (aten._assert_async.msg, lambda x: (x, message)),
    ]
    prev = ids
    for target, make_args in steps:
        with g.inserting_before(anchor):
            node = g.call_function(target, make_args(prev))
        node.meta["val"] = evaluate(node) if target is not aten._assert_async.msg else None
        prev = node



# An embedding table at least this large is vocab-parallel; a smaller one stays replicated.
# Sharding saves (1 - 1/W) of the table per rank but adds an all-reduce of the whole hidden
# state ([tokens, hidden]) per step: worth it for the 0.5-2 GiB tables of 32k-256k
# vocabularies (Llama 3 8B: 128256 x 4096 x 2 bytes = 1 GiB), not for a small model's few MiB.
EMBEDDING_SHARD_MIN_BYTES = 32 * 2**20


def shard_embedding(gm, node: fx.Node, tp, ctx, all_reduce, wait) -> bool:
    """Vocab-parallel lookup (Megatron-LM's ``VocabParallelEmbedding``): this rank keeps rows
    ``[r·V/W, (r+1)·V/W)``, looks up the ids that fall in them (others read row 0 and are
    zeroed), and an ``all_reduce(sum)`` assembles every token's row. Returns False (and
    records why) when the table stays replicated: small, or ``V`` not divisible by ``W``."""
    world, rank = tp.world_size, tp.rank
    table = tensor_meta(node.args[0])
    vocab, size = int(table.shape[0]), table.numel() * table.element_size()
    if size < EMBEDDING_SHARD_MIN_BYTES:
        ctx.rewrite(node, f"embedding replicated: {size / 2**20:.1f} MiB is below the "
                          f"{EMBEDDING_SHARD_MIN_BYTES / 2**20:.0f} MiB worth an all-reduce of the hidden state per step")
        return False
    if vocab % world:
        ctx.near_miss(node, f"embedding replicated: vocabulary {vocab} is not divisible by {world} ranks")
        return False
    per = vocab // world
    lo, hi = rank * per, (rank + 1) * per
    with real_tensors():
        w_local = derived(gm, node.args[0], ("tp_vocab", rank, world), lambda v: v[lo:hi].clone(), SHARDED)
    ids, g = node.args[1], gm.graph

    def call(target, *args):
        new = g.call_function(target, args)
        new.meta["val"] = evaluate(new)
        return new

    with g.inserting_before(node):
        outside = call(aten.bitwise_or.Tensor, call(aten.lt.Scalar, ids, lo), call(aten.ge.Scalar, ids, hi))
        local_ids = call(aten.where.ScalarSelf, outside, 0, call(aten.sub.Scalar, ids, lo))
    node.args = (add_constant(gm, "tp_vocab_embedding", w_local, node), local_ids, *node.args[2:])
    node.meta["val"] = evaluate(node)
    with g.inserting_before(node.next):
        zeroed = call(aten.where.ScalarSelf, call(aten.unsqueeze.default, outside, -1), 0.0, node)
        done = call(wait, call(all_reduce, zeroed, "sum", tp.group_name))
    node.replace_all_uses_with(done, delete_user_cb=lambda u: u is not zeroed)
    ctx.rewrite(node, f"vocab-parallel embedding: {vocab} → {per} rows, then all_reduce(sum) over {world} ranks")
    return True
