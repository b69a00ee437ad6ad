"""Sharding one column/row pair (``shard_tensor_parallel``): columns, region, row.

The column linears keep the rows of this rank's heads / features (:func:`shard_pair`), the
region is re-shaped for the local sizes (:mod:`.region`), write-backs of a functionalized
cache update go to this rank's part of the cache, and the row linear keeps the matching
input columns followed by the all-reduce (:func:`.collectives.shard_row`).
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.fx as fx

from ...graph import add_constant, real_tensors, tensor_meta
from ...weight_release import derived
from .collectives import SHARDED, shard_row
from .paged import shard_paged_bases
from .pairs import RANK_CACHE_OPS, TP_LOCAL_HEADS, VIEW_SIZE_OPS, NotShardable, Pair, aten, is_paged_call, node_name
from .region import check_dims, evaluate, local_expand, local_view_shape, shard_dim, slice_side_inputs


def shard_pair(gm, pair: Pair, tp, ctx, all_reduce, wait) -> None:
    world = tp.world_size
    full = {n: tensor_meta(n) for n in [*pair.cols, *pair.region]}
    frac: dict[fx.Node, tuple[Fraction, Fraction]] = {}
    new_segments = {}
    for col in pair.cols:
        segs = [s for s in pair.segments if s.col is col]
        w = tensor_meta(col.args[1])
        rows = [slice(s.start + s.keep[0] * s.unit, s.start + s.keep[1] * s.unit) for s in segs]
        with real_tensors():  # shards are derived: cached for recompiles, the full weight released
            key = ("tp_rows", tp.rank, world, tuple((r.start, r.stop) for r in rows))
            w_local, b_local = (
                derived(gm, n, key, lambda v: torch.cat([v[r] for r in rows]).contiguous(), SHARDED)
                if n is not None else None
                for n in (col.args[1], col.args[2] if len(col.args) > 2 else None))
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
    markers = []
    for n in pair.region:
        if n in new_segments:
            start, width = new_segments[n]
            if n.target == aten.slice.Tensor:
                n.args = (n.args[0], n.args[1], start, start + width)
            n.meta["val"] = evaluate(n)
            continue
        if n.target in (aten.split.Tensor, aten.split_with_sizes.default) and n.args[0] in pair.cols:
            sizes = [new_segments[g][1] for g in sorted(n.users, key=lambda g: g.args[1])]
            n.target = aten.split_with_sizes.default
            n.args = (n.args[0], sizes, n.args[2])
            n.meta["val"] = evaluate(n)
            continue
        ins = [a for a in n.all_input_nodes if a in full]
        src = next((a for a in ins if a in frac), None)
        if src is not None:
            frac[n] = frac[src]
        if n.target in VIEW_SIZE_OPS:
            n.args = (n.args[0], local_view_shape(n, full[n.args[0]], tensor_meta(n.args[0]), full[n]), *n.args[2:])
        elif n.target == aten.expand.default:
            sizes, regrouped = local_expand(n, full, pair, q_local, kv_local)
            n.args = (n.args[0], sizes, *n.args[2:])
            if regrouped and q_frac is not None:
                frac[n] = q_frac
        elif n.target in RANK_CACHE_OPS:
            frac[n] = _rank_cache_marker(n, full, frac, pair)
            markers.append(n)
        if is_paged_call(n):  # pools / workspace: a slice at dim 1, not the trailing-dims rule
            shard_paged_bases(gm, n, full, frac, slice_cache)
        else:
            slice_side_inputs(gm, n, full, frac, slice_cache)
        check_dims(n, full)
        n.meta["val"] = evaluate(n)
    for m in markers:  # identities now (see _rank_cache_marker): gone, so later passes see plain cache ops
        m.replace_all_uses_with(m.args[0])
        gm.graph.erase_node(m)
    for wb in pair.write_backs:
        dest, value = wb.args[0], wb.args[1]
        key = next((k for k in slice_cache if k[0] is dest), None)
        if tuple(tensor_meta(value).shape) != tuple(tensor_meta(dest).shape):
            if key is None:
                raise NotShardable(f"cannot write {node_name(value)} back into {node_name(dest)}")
            wb.args = (slice_cache[key], value)
    for n in pair.fresh_outputs:
        _return_full_cache(gm, n, slice_cache)
    shard_row(gm, pair.row, frac, tp, ctx, all_reduce, wait)


def _return_full_cache(gm, n: fx.Node, slice_cache: dict) -> None:
    """A cache allocated in this graph and returned (Hugging Face's lazy StaticCache in the
    prefill graph) now holds this rank's heads only; return it with all heads again (the
    rank's written, the others still as allocated), because the next graph is traced from
    the unsharded model, which writes all heads into it. The decode graph then reads and
    writes this rank's heads of it (``slice_side_inputs``)."""
    alloc = n.args[0]
    key = next((k for k in slice_cache if slice_cache[k] is alloc), None)
    if key is None:
        return  # the allocation was not cut: the write keeps its full shape
    full_alloc, dim, start, end = key
    with gm.graph.inserting_after(n):
        full = gm.graph.call_function(aten.slice_scatter.default, (full_alloc, n, dim, start, end))
    full.meta["val"] = evaluate(full)
    out = next(u for u in n.users if u.op == "output")
    out.args = fx.node.map_aggregate(out.args, lambda a: full if a is n else a)


def _rank_cache_marker(n: fx.Node, full: dict, frac: dict, pair: Pair) -> tuple[Fraction, Fraction]:
    """A per-rank cache's marker (runtime/rank_heads.py) becomes the identity once this rank
    computes exactly the cache's heads; returns the head fraction of its output. Raises
    NotShardable when the cache holds other heads than this rank's share."""
    x, dim = n.args[0], n.args[1]
    if n.target == TP_LOCAL_HEADS:
        start, end = n.args[2], n.args[3]
        total = int(full[x].shape[dim])
        want = (Fraction(start, total), Fraction(end, total))
        d = shard_dim(x, full)
        ok = frac.get(x) == want and (d is None or d == dim % full[x].dim())
    else:
        total, start = n.args[2], n.args[3]
        end = start + int(tensor_meta(x).shape[dim])
        want = (Fraction(start, total), Fraction(end, total))
        ok = any(s.unit > 1 and s.heads == total and s.keep == (start, end) for s in pair.segments)
    if not ok:
        raise NotShardable(f"{node_name(n)}: the KV cache holds heads {start}..{end - 1} of {total}, which are not "
                           "the heads this rank computes")
    n.target, n.args = aten.alias.default, (x,)
    return want
