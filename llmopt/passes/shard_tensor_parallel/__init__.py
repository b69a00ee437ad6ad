"""shard_tensor_parallel: one rank's share of the graph, Megatron-style, with functional collectives.

With ``options={"tensor_parallel": "auto"}`` (or a process group / 1-D device mesh) every
rank compiles the same model and this pass, right after ``merge_parallel_linears``, keeps
that rank's share of the work (Megatron-LM, Shoeybi et al. 2019; gpt-fast's ``tp.py``;
the pair search follows TensorRT-LLM AutoDeploy's sharding transform):

    x ─ col linear (merged QKV / gate-up / c_attn / c_fc) ─ region ─ row linear (o_proj / down_proj) ─ + residual
          rows of this rank's heads / features                      columns of the same features,
                                                                    then all_reduce(sum) over the group

Parts: :mod:`.pairs` (planning: which pairs, which heads), :mod:`.region` (re-shaping the
nodes between the linears for the local sizes), :mod:`.rewrite` (one pair: columns, region,
row), :mod:`.collectives` (all-reduce, vocab-parallel LM head, the token check); this
module runs them in order and reports.

A *pair* is found from its row linear: walking back from its input without crossing
another linear reaches the column linears (all reading one input) and the *region*
between them (views, RoPE, attention, activation, cache writes). Each column output is cut
into its segments (the slices ``merge_parallel_linears`` left, or a ``split``); a segment
viewed as ``[..., heads, head_dim]`` is split per head, the one with most heads being Q:
rank ``r`` keeps Q heads ``[r·Hq/W, (r+1)·Hq/W)``; K/V heads are split the same way when
``Hkv >= W`` and otherwise each rank keeps the single KV head its Q heads read (KV
replicated across ``W/Hkv`` ranks). An MLP segment is split in ``W`` contiguous blocks.

The region is then re-shaped for the local sizes: its nodes are visited in order, the
sizes baked into views/reshapes/expands are rewritten (a dimension shrinks where the
product of the dimensions before it matches, i.e. the head-major outer dimension), and
each node's fake value is recomputed from its new inputs; a side input that carries the
full head dimension (the KV cache written by ``index_copy``, a per-head mask) is read
through a view of this rank's heads. Only ops known to be head-local are allowed in a
region; a reduction, ``cat`` or slice over the sharded dimension stops the pass, which
then leaves the graph unsharded (every rank computes the whole model: slower, still
correct).

The LM head is vocab-parallel (rows of this rank's vocabulary slice, then an
``all_gather`` of the logits) when the vocabulary divides by ``W``. The embedding is chosen
by size: a table of at least ``collectives.EMBEDDING_SHARD_MIN_BYTES`` (32 MiB) is
vocab-parallel (a masked lookup of this rank's rows, then an ``all_reduce`` of the hidden
state); a smaller one stays replicated, where the saved memory is not worth a collective
per step. Bias of a row linear is added
once, after the all-reduce. The collectives are ``torch.distributed``'s functional ones
(``compat.functional_collectives``), which the aten executor runs as they are and
Inductor schedules.

Mixture-of-experts blocks (``llmopt::fused_experts`` from ``fuse_moe``) are sharded by
:mod:`.experts`: every expert's gate/up rows and down columns along the intermediate
dimension (the MLP split, for all experts at once), the router replicated, one
``all_reduce`` after the weighted combine.

Every rank must feed the same tokens: the graph broadcasts rank 0's token ids and asserts
that this rank's are equal (a rank sampling on its own would otherwise make the
all-reduces mix different sequences, silently).

The all-reduce is followed by the residual add + RMSNorm, which ``fuse_residual_norm``
fuses into one op; the all-reduce itself stays a separate collective just before it (a
fused all-reduce + add + norm needs a custom NCCL/NVSHMEM kernel, which functional
collectives do not offer), and the report says so.

A per-rank KV cache (``StaticKVCache(..., tensor_parallel=...)``, runtime/rank_heads.py)
holds only this rank's K/V heads and marks its write and read with ``tp_local_heads`` /
``tp_full_heads``; the pass turns both into the identity once the region is sharded
(``rewrite._rank_cache_marker``), after checking that the cache's heads are this rank's.
A cache of all heads still works: the graph then reads and writes its heads of it.

The Engine's paged attention (``paged_kv_append`` / ``paged_attention_*``) is head-local
too (:mod:`.paged`): the Engine's pools hold this rank's heads only (marked like the static
cache's), a pool or workspace of all heads is read and written at this rank's heads.
Weights (docs/tensor_parallel.md): the graph holds only this rank's shards, computed
through ``weight_release.derived``, so the full weights are released after compiling and a
recompile takes the shards from the cache (docs/frozen_weights.md).
"""
from __future__ import annotations

import torch.fx as fx

from ... import compat
from ...graph import is_constant, tensor_meta
from ...runtime.distributed import resolve_tensor_parallel
from .collectives import check_same_ids, find_lm_head, shard_embedding, shard_lm_head
from .experts import FUSED_EXPERTS, shard_experts
from .paged import untangle_workspaces
from .pairs import NotShardable, aten, assign_heads, find_pair, is_const_linear
from .rewrite import shard_pair

__all__ = ["run"]


def run(gm: fx.GraphModule, ctx) -> int:
    tp = resolve_tensor_parallel(ctx.options.tensor_parallel)
    if tp is None:
        return 0
    if tp.world_size == 1:
        ctx.report.notes.append("shard_tensor_parallel: world size 1, nothing to shard")
        return 0
    all_reduce, all_gather, wait = compat.functional_collectives()
    if untangle_workspaces(gm):  # the Engine's decode graph: its scratch workspace no longer crosses layers
        gm.graph.eliminate_dead_code()
    pairs, claimed = [], set()
    for node in list(gm.graph.nodes):
        if not is_const_linear(gm, node):
            continue
        try:
            pair = find_pair(gm, node, claimed)
        except NotShardable as exc:
            if str(exc):
                ctx.near_miss(node, f"not row-parallel: {exc}")
            continue
        if pair is None:
            continue
        assign_heads(pair, tp.world_size, tp.rank)
        pairs.append(pair)
        claimed.update(pair.cols)
        claimed.add(node)
    old_weights = set()
    sharded = collectives = 0
    for pair in pairs:
        old_weights.update(n.args[1].target for n in (*pair.cols, pair.row))
        shard_pair(gm, pair, tp, ctx, all_reduce, wait)
        sharded += len(pair.cols) + 1
        collectives += 1
    experts = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == FUSED_EXPERTS:
            stacks = shard_experts(gm, node, tp, ctx, all_reduce, wait)
            if stacks:
                old_weights.update(stacks)
                experts += 1
                sharded += len(stacks)
                collectives += 1
    head = find_lm_head(gm, claimed)
    if head is not None:
        vocab = int(tensor_meta(head.args[1]).shape[0])
        if vocab % tp.world_size:
            ctx.near_miss(head, f"LM head replicated: vocabulary {vocab} is not divisible by {tp.world_size} ranks")
        else:
            old_weights.add(head.args[1].target)
            shard_lm_head(gm, head, tp, ctx, all_gather, wait)
            sharded += 1
            collectives += 1
    checked = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.embedding.default:
            ids, table = node.args[1], node.args[0]
            if is_constant(gm, table) and shard_embedding(gm, node, tp, ctx, all_reduce, wait):
                old_weights.add(table.target)
                sharded += 1
                collectives += 1
            if (pairs or experts) and isinstance(ids, fx.Node) and ids.op == "placeholder" and ids not in checked:
                check_same_ids(gm, ids, tp, wait)
                checked.add(ids)
                collectives += 1
                ctx.rewrite(node, "token ids compared with rank 0's (broadcast) before the lookup: ranks fed "
                                  "different tokens fail loudly instead of mixing their activations")
    gm.graph.eliminate_dead_code()
    _release(gm, old_weights)
    ctx.report.notes.append(
        f"shard_tensor_parallel: rank {tp.rank} of {tp.world_size} ({tp.backend}): {sharded} weight(s) sharded "
        f"in {len(pairs)} column/row pair(s) and {experts} expert block(s), {collectives} collective(s) inserted"
    )
    if pairs or experts:
        ctx.report.notes.append(
            "shard_tensor_parallel: each all_reduce stays a separate collective right before the residual "
            "add + norm (fuse_residual_norm fuses those two; fusing the all-reduce into them needs a custom "
            "NCCL kernel that torch's functional collectives do not provide)"
        )
    return sharded



def _release(gm, targets) -> None:
    """Drop the graph module's reference to full weights no node reads any more (merged
    QKV/gate-up weights then die; frozen parameters still belong to the user's module)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for t in targets:
        if t not in used and t in gm._buffers:
            delattr(gm, t)
