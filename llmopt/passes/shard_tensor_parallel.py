"""shard_tensor_parallel: one rank's share of the graph, Megatron-style, with functional collectives.

With ``options={"tensor_parallel": "auto"}`` (or a process group / 1-D device mesh) every
rank compiles the same model and this pass, right after ``merge_parallel_linears``, keeps
that rank's share of the work (Megatron-LM, Shoeybi et al. 2019; gpt-fast's ``tp.py``;
the pair search follows TensorRT-LLM AutoDeploy's sharding transform):

    x ─ col linear (merged QKV / gate-up / c_attn / c_fc) ─ region ─ row linear (o_proj / down_proj) ─ + residual
          rows of this rank's heads / features                      columns of the same features,
                                                                    then all_reduce(sum) over the group

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
``all_gather`` of the logits) when the vocabulary divides by ``W``; the embedding stays
replicated (a vocab-parallel lookup needs a masked gather plus an all-reduce of the whole
hidden state, for a table that is read, not multiplied). Bias of a row linear is added
once, after the all-reduce. The collectives are ``torch.distributed``'s functional ones
(``compat.functional_collectives``), which the aten executor runs as they are and
Inductor schedules.

Every rank must feed the same tokens: the graph broadcasts rank 0's token ids and asserts
that this rank's are equal (a rank sampling on its own would otherwise make the
all-reduces mix different sequences, silently).

The all-reduce is followed by the residual add + RMSNorm, which ``fuse_residual_norm``
fuses into one op; the all-reduce itself stays a separate collective just before it (a
fused all-reduce + add + norm needs a custom NCCL/NVSHMEM kernel, which functional
collectives do not offer), and the report says so.

Limits: the KV cache is still allocated with all heads by its owner (the graph reads and
writes this rank's heads of it); the user's module keeps its full parameters (the graph
holds only this rank's shards; the merged full weights are released).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.fx as fx

from .. import compat
from ..distributed import TensorParallelError, resolve_tensor_parallel
from ..graph import add_constant, constant_value, is_constant, real_tensors, tensor_meta

aten = torch.ops.aten

VIEW_SIZE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
SDPA_OPS = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "scaled_dot_product_attention",
    )
    if hasattr(aten, name)
}
# Ops that act on each head independently whatever the sharded dimension (elementwise,
# layout), and ops checked per call in _check_dims (a dimension argument must not be the
# sharded one).
HEAD_LOCAL_OPS = {
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.expand.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.silu.default, aten.gelu.default, aten.tanh.default, aten.pow.Tensor_Scalar,
    aten.sigmoid.default, aten.relu.default, aten.exp.default, aten.where.self,
    aten._to_copy.default, aten.rsqrt.default, aten.add.Scalar, aten.mul.Scalar,
    aten.bmm.default, aten.index_copy.default, aten.index_put.default, operator.getitem,
    aten.slice.Tensor, aten.select.int, aten.cat.default, aten._softmax.default, aten.split.Tensor,
    aten.split_with_sizes.default, *VIEW_SIZE_OPS, *SDPA_OPS,
}


class NotShardable(Exception):
    """A candidate pair cannot be sharded (recorded as a near-miss)."""


@dataclass
class Segment:
    col: fx.Node
    node: fx.Node  # the node that carries the segment: a slice / getitem of col, or col itself
    start: int
    width: int
    heads: int
    unit: int  # head_dim for attention, 1 for an MLP
    keep: tuple[int, int] = (0, 0)  # this rank's heads [lo, hi)
    stream: str = "mlp"


@dataclass
class Pair:
    row: fx.Node
    cols: list[fx.Node]
    region: list[fx.Node]
    segments: list[Segment]
    write_backs: list[fx.Node] = field(default_factory=list)
    kind: str = "mlp"
    q_heads: int = 0
    kv_heads: int = 0


def run(gm: fx.GraphModule, ctx) -> int:
    tp = resolve_tensor_parallel(ctx.options.tensor_parallel)
    if tp is None:
        return 0
    if tp.world_size == 1:
        ctx.report.notes.append("shard_tensor_parallel: world size 1, nothing to shard")
        return 0
    all_reduce, all_gather, wait = compat.functional_collectives()
    pairs, claimed = [], set()
    for node in list(gm.graph.nodes):
        if not _is_const_linear(gm, node):
            continue
        try:
            pair = _find_pair(gm, node, claimed)
        except NotShardable as exc:
            if str(exc):
                ctx.near_miss(node, f"not row-parallel: {exc}")
            continue
        if pair is None:
            continue
        _assign_heads(pair, tp.world_size, tp.rank)
        pairs.append(pair)
        claimed.update(pair.cols)
        claimed.add(node)
    old_weights = set()
    sharded = collectives = 0
    for pair in pairs:
        old_weights.update(n.args[1].target for n in (*pair.cols, pair.row))
        _shard_pair(gm, pair, tp, ctx, all_reduce, wait)
        sharded += len(pair.cols) + 1
        collectives += 1
    head = _lm_head(gm, claimed)
    if head is not None:
        vocab = int(tensor_meta(head.args[1]).shape[0])
        if vocab % tp.world_size:
            ctx.near_miss(head, f"LM head replicated: vocabulary {vocab} is not divisible by {tp.world_size} ranks")
        else:
            old_weights.add(head.args[1].target)
            _shard_lm_head(gm, head, tp, ctx, all_gather, wait)
            sharded += 1
            collectives += 1
    checked = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.embedding.default:
            ctx.rewrite(node, "embedding replicated (a vocab-parallel lookup would add an all-reduce of the hidden state)")
            ids = node.args[1]
            if pairs and isinstance(ids, fx.Node) and ids.op == "placeholder" and ids not in checked:
                _check_same_ids(gm, ids, tp, wait)
                checked.add(ids)
                collectives += 1
                ctx.rewrite(node, "token ids compared with rank 0's (broadcast) before the lookup: ranks fed "
                                  "different tokens fail loudly instead of mixing their activations")
    gm.graph.eliminate_dead_code()
    _release(gm, old_weights)
    ctx.report.notes.append(
        f"shard_tensor_parallel: rank {tp.rank} of {tp.world_size} ({tp.backend}): {sharded} linear(s) sharded "
        f"in {len(pairs)} column/row pair(s), {collectives} collective(s) inserted"
    )
    if pairs:
        ctx.report.notes.append(
            "shard_tensor_parallel: each all_reduce stays a separate collective right before the residual "
            "add + norm (fuse_residual_norm fuses those two; fusing the all-reduce into them needs a custom "
            "NCCL kernel that torch's functional collectives do not provide)"
        )
    return sharded


# ------------------------------------------------------------------------------ analysis


def _is_const_linear(gm, node) -> bool:
    return (
        node.op == "call_function"
        and node.target == aten.linear.default
        and is_constant(gm, node.args[1])
        and (len(node.args) < 3 or node.args[2] is None or is_constant(gm, node.args[2]))
        and tensor_meta(node.args[1]) is not None
        and tensor_meta(node.args[1]).dim() == 2
    )


def _find_pair(gm, row: fx.Node, claimed: set) -> Pair | None:
    back, cols, stack = set(), [], [row.args[0]]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in back:
            continue
        back.add(n)
        if _is_const_linear(gm, n):
            cols.append(n)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n.all_input_nodes)
    if not cols:
        return None
    if len({c.args[0] for c in cols}) != 1:
        raise NotShardable("")  # e.g. the LM head, whose input mixes several layers
    if any(c in claimed for c in cols) or row in claimed:
        raise NotShardable("")  # the column is another pair's row: this is a residual boundary
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region_set = set(cols)
    for n in sorted(back, key=order.__getitem__):
        if n not in region_set and any(i in region_set for i in n.all_input_nodes):
            region_set.add(n)
    region = [n for n in sorted(region_set, key=order.__getitem__) if n not in cols]
    if row.args[0] not in region_set:
        return None
    write_backs = []
    for n in region:
        if n.op != "call_function" or n.target not in HEAD_LOCAL_OPS:
            raise NotShardable(f"{_name(n)} ({n.target}) between the column and row linears is not known to be head-local")
        for user in n.users:
            if user in region_set or user is row:
                continue
            if user.target == aten.copy_.default and user.args[1] is n and user.args[0].op == "placeholder":
                write_backs.append(user)  # a functionalized cache update written back
                continue
            raise NotShardable(f"{_name(n)} is also used outside the layer by {_name(user)}")
    segments = []
    for col in cols:
        segments.extend(_segments(col, region_set))
    return Pair(row, cols, region, segments, write_backs)


def _segments(col: fx.Node, region_set: set) -> list[Segment]:
    width = int(tensor_meta(col).shape[-1])
    last = tensor_meta(col).dim() - 1
    users = list(col.users)
    segs = []
    if users and all(u.target == aten.slice.Tensor and u.args[1] in (-1, last) for u in users):
        for u in users:
            start, end = int(u.args[2]), min(int(u.args[3]), width)
            if len(u.args) > 4 and u.args[4] != 1:
                raise NotShardable(f"{_name(u)} slices with a step")
            segs.append((u, start, end - start))
    elif len(users) == 1 and users[0].target in (aten.split.Tensor, aten.split_with_sizes.default) and users[0].args[2] in (-1, last):
        split = users[0]
        sizes = split.args[1]
        sizes = [sizes] * (width // sizes) if isinstance(sizes, int) else list(sizes)
        if sum(sizes) != width:
            raise NotShardable(f"{_name(split)} does not split the whole output")
        getitems = {u.args[1]: u for u in split.users}
        start = 0
        for i, size in enumerate(sizes):
            if i not in getitems:
                raise NotShardable(f"part {i} of {_name(split)} is unused")
            segs.append((getitems[i], start, size))
            start += size
    else:
        segs.append((col, 0, width))
    segs.sort(key=lambda s: s[1])
    if [s[1] for s in segs] != [sum(x[2] for x in segs[:i]) for i in range(len(segs))] or sum(s[2] for s in segs) != width:
        raise NotShardable(f"the slices of {_name(col)} do not tile its output")
    out = []
    for node, start, size in segs:
        heads, unit = _heads_of(node, size)
        out.append(Segment(col, node, start, size, heads, unit))
    return out


def _heads_of(node: fx.Node, width: int) -> tuple[int, int]:
    """(heads, head_dim) when the segment is viewed as [..., heads, head_dim], else (width, 1)."""
    for user in node.users:
        if user.target in VIEW_SIZE_OPS:
            shape = tensor_meta(user).shape
            in_shape = tensor_meta(node).shape
            if len(shape) == len(in_shape) + 1 and _int(shape[-2]) * _int(shape[-1]) == width:
                return _int(shape[-2]), _int(shape[-1])
    return width, 1


def _assign_heads(pair: Pair, world: int, rank: int) -> None:
    attn = [s for s in pair.segments if s.unit > 1]
    mlp = [s for s in pair.segments if s.unit == 1]
    if attn and mlp:
        raise NotShardable("attention and MLP outputs mixed in one column linear")
    if mlp:
        for s in mlp:
            if s.width % world:
                raise TensorParallelError(
                    f"llmopt tensor parallelism: {_layer(pair.row)} has {s.width} input features, not divisible by "
                    f"the world size {world}; valid world sizes: {_divisors(s.width)}"
                )
            per = s.width // world
            s.keep, s.stream = (rank * per, (rank + 1) * per), "mlp"
        return
    pair.kind = "attention"
    hq = max(s.heads for s in attn)
    hkv = min(s.heads for s in attn)
    pair.q_heads, pair.kv_heads = hq, hkv
    kv_ok = hkv % world == 0 or (world % hkv == 0 and world <= hq)
    if hq % world or not kv_ok or any(hq % s.heads for s in attn):
        valid = [w for w in _divisors(hq) if hkv % w == 0 or w % hkv == 0]
        raise TensorParallelError(
            f"llmopt tensor parallelism: the attention of {_layer(pair.row)} has {hq} query heads and {hkv} key/value "
            f"heads, which cannot be split over the world size {world}; valid world sizes: {valid}"
        )
    per_q = hq // world
    for s in attn:
        if s.heads == hq:
            s.keep, s.stream = (rank * per_q, (rank + 1) * per_q), "q"
        elif s.heads % world == 0:
            per = s.heads // world
            s.keep, s.stream = (rank * per, (rank + 1) * per), "kv"
        else:  # fewer KV heads than ranks: keep the one KV head this rank's Q heads read
            h = rank * s.heads // world
            s.keep, s.stream = (h, h + 1), "kv"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------ rewrite


def _shard_pair(gm, pair: Pair, tp, ctx, all_reduce, wait) -> None:
    world, rank = tp.world_size, tp.rank
    full = {n: tensor_meta(n) for n in [*pair.cols, *pair.region]}
    frac: dict[fx.Node, tuple[Fraction, Fraction]] = {}
    new_segments = {}
    for col in pair.cols:
        segs = [s for s in pair.segments if s.col is col]
        w = constant_value(gm, col.args[1])
        b = constant_value(gm, col.args[2]) if len(col.args) > 2 and col.args[2] is not None else None
        rows = [slice(s.start + s.keep[0] * s.unit, s.start + s.keep[1] * s.unit) for s in segs]
        with real_tensors():
            w_local = torch.cat([w[r] for r in rows]).contiguous()
            b_local = torch.cat([b[r] for r in rows]).contiguous() if b is not None else None
        w_node = add_constant(gm, "tp_col_weight", w_local, col)
        args = [col.args[0], w_node]
        if b_local is not None:
            args.append(add_constant(gm, "tp_col_bias", b_local, col))
        col.args = tuple(args)
        col.meta["val"] = aten.linear.default(*[tensor_meta(a) for a in args])
        start = 0
        for s in segs:
            width = (s.keep[1] - s.keep[0]) * s.unit
            new_segments[s.node] = (start, width)
            frac[s.node] = (Fraction(s.keep[0], s.heads), Fraction(s.keep[1], s.heads))
            start += width
        detail = ", ".join(
            f"{s.stream} {'heads' if s.unit > 1 else 'features'} {s.keep[0]}..{s.keep[1] - 1} of {s.heads}" for s in segs
        )
        ctx.rewrite(col, f"column-parallel: {int(w.shape[0])} → {int(w_local.shape[0])} output rows ({detail})")
    q_frac = next((frac[s.node] for s in pair.segments if s.stream == "q"), None)
    kv_local = next((s.keep[1] - s.keep[0] for s in pair.segments if s.stream == "kv"), 0)
    q_local = pair.q_heads // world if pair.q_heads else 0
    slice_cache: dict = {}
    for n in pair.region:
        if n in new_segments:
            start, width = new_segments[n]
            if n.target == aten.slice.Tensor:
                n.args = (n.args[0], n.args[1], start, start + width)
            n.meta["val"] = _evaluate(n)
            continue
        if n.target in (aten.split.Tensor, aten.split_with_sizes.default) and n.args[0] in pair.cols:
            sizes = [new_segments[g][1] for g in sorted(n.users, key=lambda g: g.args[1])]
            n.target = aten.split_with_sizes.default
            n.args = (n.args[0], sizes, n.args[2])
            n.meta["val"] = _evaluate(n)
            continue
        ins = [a for a in n.all_input_nodes if a in full]
        src = next((a for a in ins if a in frac), None)
        if src is not None:
            frac[n] = frac[src]
        if n.target in VIEW_SIZE_OPS:
            n.args = (n.args[0], _local_view_shape(n, full[n.args[0]], tensor_meta(n.args[0]), full[n]), *n.args[2:])
        elif n.target == aten.expand.default:
            sizes, regrouped = _local_expand(n, full, pair, q_local, kv_local)
            n.args = (n.args[0], sizes, *n.args[2:])
            if regrouped and q_frac is not None:
                frac[n] = q_frac
        _slice_side_inputs(gm, n, full, frac, slice_cache)
        _check_dims(n, full)
        n.meta["val"] = _evaluate(n)
    for wb in pair.write_backs:
        dest, value = wb.args[0], wb.args[1]
        key = next((k for k in slice_cache if k[0] is dest), None)
        if tuple(tensor_meta(value).shape) != tuple(tensor_meta(dest).shape):
            if key is None:
                raise NotShardable(f"cannot write {_name(value)} back into {_name(dest)}")
            wb.args = (slice_cache[key], value)
    # Row linear: the columns of this rank's features, no bias, all_reduce, then the bias.
    row = pair.row
    x = row.args[0]
    w = constant_value(gm, row.args[1])
    k_full, k_local = int(w.shape[1]), int(tensor_meta(x).shape[-1])
    lo, hi = frac.get(x, (Fraction(rank, world), Fraction(rank + 1, world)))
    if k_local * world != k_full or (lo, hi) != (Fraction(rank, world), Fraction(rank + 1, world)):
        raise NotShardable(f"{_name(row)} receives {k_local} of {k_full} features, not this rank's block")
    with real_tensors():
        w_local = w[:, rank * k_local:(rank + 1) * k_local].contiguous()
    w_node = add_constant(gm, "tp_row_weight", w_local, row)
    bias = row.args[2] if len(row.args) > 2 else None
    row.args = (x, w_node, None)
    row.meta["val"] = aten.linear.default(tensor_meta(x), tensor_meta(w_node))
    with gm.graph.inserting_after(row):
        reduced = gm.graph.call_function(all_reduce, (row, "sum", tp.group_name))
    with gm.graph.inserting_after(reduced):
        done = gm.graph.call_function(wait, (reduced,))
    last = done
    if bias is not None:
        with gm.graph.inserting_after(done):
            last = gm.graph.call_function(aten.add.Tensor, (done, bias))
    for n in (reduced, done, last):
        n.meta = {k: v for k, v in row.meta.items() if k != "val"}
        n.meta["val"] = _evaluate(n)
    row.replace_all_uses_with(last, delete_user_cb=lambda u: u is not reduced)
    ctx.rewrite(row, f"row-parallel: {k_full} → {k_local} input columns, then all_reduce(sum) over {world} ranks"
                + (" and the bias added once" if bias is not None else ""))


def _evaluate(n: fx.Node):
    def meta(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(n.args, meta)
    kwargs = fx.node.map_aggregate(n.kwargs, meta)
    return n.target(*args, **kwargs)


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError) as exc:
        raise NotShardable(f"symbolic size {v} in a sharded region") from exc


def _local_view_shape(n, in_full, in_local, out_full) -> list:
    """The view's size argument for the local input: each block of input dims whose
    product equals a block of output dims keeps its ratio on the block's outer dim.
    Symbolic sizes (a dynamic sequence length) may only stand in blocks of their own."""
    a, la, b = list(in_full.shape), list(in_local.shape), list(out_full.shape)
    out = list(b)
    i = j = 0
    while i < len(a) and j < len(b):
        if _same(a[i], b[j]):
            if not _same(a[i], la[i]):
                out[j] = la[i]
            i, j = i + 1, j + 1
            continue
        pa, pb, pl, dims = _int(a[i]), _int(b[j]), _int(la[i]), [j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, pl, i = pa * _int(a[i]), pl * _int(la[i]), i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * _int(b[j]), j + 1
                dims.append(j - 1)
            else:
                raise NotShardable(f"{_name(n)}: cannot map the view's dimensions")
        if pl != pa:
            factor = Fraction(pa, pl)
            d = next((d for d in dims if _int(b[d]) > 1), None)
            if d is None or (Fraction(_int(b[d])) / factor).denominator != 1:
                raise NotShardable(f"{_name(n)}: the sharded dimension does not map onto the view")
            out[d] = int(Fraction(_int(b[d])) / factor)
    sizes = list(n.args[1])
    for d, (old, new) in enumerate(zip(b, out)):
        if not _same(old, new):
            if isinstance(sizes[d], int) and sizes[d] != -1:
                sizes[d] = _int(new)
            elif isinstance(sizes[d], fx.Node):
                raise NotShardable(f"{_name(n)}: symbolic size at the sharded dimension")
    return sizes


def _same(x, y) -> bool:
    return compat.statically_true(x == y)


def _local_expand(n, full, pair: Pair, q_local: int, kv_local: int) -> tuple[list, bool]:
    src_full, src_local = full[n.args[0]], tensor_meta(n.args[0])
    sizes = list(n.args[1])
    off = len(sizes) - src_full.dim()
    for d in range(src_full.dim()):
        if not _same(src_full.shape[d], 1) and not _same(src_full.shape[d], src_local.shape[d]) and sizes[d + off] != -1:
            sizes[d + off] = _int(src_local.shape[d])
    # repeat_kv: [B, Hkv, 1, S, D] expanded to [B, Hkv, Hq/Hkv, S, D]; locally the group
    # size is (local Q heads) / (local KV heads), which differs when KV is replicated.
    regrouped = False
    if pair.kind == "attention" and pair.kv_heads and kv_local:
        groups = pair.q_heads // pair.kv_heads
        for d in range(1, src_full.dim()):
            if _same(src_full.shape[d], 1) and isinstance(sizes[d + off], int) and sizes[d + off] == groups \
                    and _same(src_local.shape[d - 1], kv_local):
                sizes[d + off] = q_local // kv_local
                regrouped = True
    return sizes, regrouped


def _slice_side_inputs(gm, n, full, frac, cache) -> None:
    """Point tensor inputs from outside the region that carry the full sharded dimension
    (a KV cache, a per-head mask) at this rank's part of it."""
    region_in = [a for a in n.all_input_nodes if a in full]
    if not region_in:
        return
    ref = next((a for a in region_in if a in frac and _shard_dim(a, full) is not None), None)
    if ref is None:
        return
    d = _shard_dim(ref, full)
    size_full = _int(full[ref].shape[d])
    lo, hi = frac[ref]
    rank_ndim = full[ref].dim()

    def fix(a):
        if not isinstance(a, fx.Node) or a in full or not isinstance(tensor_meta(a), torch.Tensor):
            return a
        t = tensor_meta(a)
        ad = d - (rank_ndim - t.dim())
        if ad < 0 or not _same(t.shape[ad], size_full) or size_full == 1:
            return a
        start, end = lo * size_full, hi * size_full
        if start.denominator != 1 or end.denominator != 1:
            raise NotShardable(f"{_name(n)}: {_name(a)} cannot be cut at this rank's heads")
        key = (a, ad, int(start), int(end))
        if key not in cache:
            with gm.graph.inserting_after(a):
                view = gm.graph.call_function(aten.slice.Tensor, (a, ad, int(start), int(end)))
            view.meta["val"] = _evaluate(view)
            cache[key] = view
        return cache[key]

    n.args = fx.node.map_aggregate(n.args, fix)
    n.kwargs = fx.node.map_aggregate(n.kwargs, fix)


def _shard_dim(n, full) -> int | None:
    old, new = full[n], tensor_meta(n)
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return None
    for d, (a, b) in enumerate(zip(old.shape, new.shape)):
        if not _same(a, b):
            return d
    return None


def _check_dims(n, full) -> None:
    """Reductions, cat, slices and softmax must not run over the sharded dimension."""
    t = n.target
    if t not in (aten.cat.default, aten.slice.Tensor, aten.select.int, aten._softmax.default, aten.mean.dim,
                 aten.sum.dim_IntList, aten.amax.default, aten.bmm.default, aten.split.Tensor,
                 aten.split_with_sizes.default):
        return
    src = n.args[0][0] if t == aten.cat.default else n.args[0]
    if src not in full:
        return
    d = _shard_dim(src, full)
    if d is None:
        return
    ndim = full[src].dim()
    if t == aten.bmm.default:
        bad = d != 0
    elif t in (aten.split.Tensor, aten.split_with_sizes.default):
        bad = int(n.args[2] if len(n.args) > 2 else 0) % ndim == d
    else:
        dims = n.args[1] if len(n.args) > 1 else -1
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        bad = any(int(x) % ndim == d for x in dims)
    if bad:
        raise NotShardable(f"{_name(n)} ({t}) works across the sharded dimension {d}")


def _lm_head(gm, claimed) -> fx.Node | None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for n in gm.graph.nodes:
        if _is_const_linear(gm, n) and n not in claimed and list(n.users) == [out]:
            return n
    return None


def _shard_lm_head(gm, head, tp, ctx, all_gather, wait) -> None:
    world, rank = tp.world_size, tp.rank
    w = constant_value(gm, head.args[1])
    b = constant_value(gm, head.args[2]) if len(head.args) > 2 and head.args[2] is not None else None
    per = int(w.shape[0]) // world
    with real_tensors():
        w_local = w[rank * per:(rank + 1) * per].contiguous()
        b_local = b[rank * per:(rank + 1) * per].contiguous() if b is not None else None
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
        node.meta["val"] = _evaluate(node)
        first = first or node
        prev = node
    head.replace_all_uses_with(prev, delete_user_cb=lambda u: u is not first)
    ctx.rewrite(head, f"vocab-parallel LM head: {int(w.shape[0])} → {per} rows, then all_gather over {world} ranks")


def _check_same_ids(gm, ids: fx.Node, tp, wait) -> None:
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
        node.meta["val"] = _evaluate(node) if target is not aten._assert_async.msg else None
        prev = node


def _release(gm, targets) -> None:
    """Drop the graph module's reference to full weights no node reads any more (merged
    QKV/gate-up weights then die; frozen parameters still belong to the user's module)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for t in targets:
        if t not in used and t in gm._buffers:
            delattr(gm, t)


def _name(node) -> str:
    from ..report import layer_of

    layer = layer_of(node)
    return f"{node.name} ({layer})" if layer else node.name


def _layer(node) -> str:
    from ..report import layer_of

    return layer_of(node) or node.name
