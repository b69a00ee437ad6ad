"""Re-shaping a pair's region for this rank's sizes (``shard_tensor_parallel``).

After the column linears keep this rank's rows, every node between them and the row
linear is visited in order: the sizes baked into views/reshapes/expands are rewritten (a
dimension shrinks where the product of the dimensions before it matches, i.e. the
head-major outer dimension), each node's fake value is recomputed from its new inputs
(:func:`evaluate`), and a side input that carries the full head dimension (a KV cache
written by ``index_copy``, a per-head mask) is read through a view of this rank's heads.
A reduction, ``cat`` or slice over the sharded dimension raises ``NotShardable``.
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.fx as fx

from ... import compat
from ...graph import tensor_meta
from .pairs import NotShardable, Pair, aten, as_int, node_name


def evaluate(n: fx.Node):
    def meta(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(n.args, meta)
    kwargs = fx.node.map_aggregate(n.kwargs, meta)
    return n.target(*args, **kwargs)



def local_view_shape(n, in_full, in_local, out_full) -> list:
    """The view's size argument for the local input: each block of input dims whose
    product equals a block of output dims keeps its ratio on the block's outer dim.
    Symbolic sizes (a dynamic sequence length) may only stand in blocks of their own."""
    a, la, b = list(in_full.shape), list(in_local.shape), list(out_full.shape)
    out = list(b)
    i = j = 0
    while i < len(a) and j < len(b):
        if same_size(a[i], b[j]):
            if not same_size(a[i], la[i]):
                out[j] = la[i]
            i, j = i + 1, j + 1
            continue
        pa, pb, pl, dims = as_int(a[i]), as_int(b[j]), as_int(la[i]), [j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, pl, i = pa * as_int(a[i]), pl * as_int(la[i]), i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * as_int(b[j]), j + 1
                dims.append(j - 1)
            else:
                raise NotShardable(f"{node_name(n)}: cannot map the view's dimensions")
        if pl != pa:
            factor = Fraction(pa, pl)
            d = next((d for d in dims if as_int(b[d]) > 1), None)
            if d is None or (Fraction(as_int(b[d])) / factor).denominator != 1:
                raise NotShardable(f"{node_name(n)}: the sharded dimension does not map onto the view")
            out[d] = int(Fraction(as_int(b[d])) / factor)
    sizes = list(n.args[1])
    for d, (old, new) in enumerate(zip(b, out)):
        if not same_size(old, new):
            if isinstance(sizes[d], int) and sizes[d] != -1:
                sizes[d] = as_int(new)
            elif isinstance(sizes[d], fx.Node):
                raise NotShardable(f"{node_name(n)}: symbolic size at the sharded dimension")
    return sizes



def same_size(x, y) -> bool:
    return compat.statically_true(x == y)



def local_expand(n, full, pair: Pair, q_local: int, kv_local: int) -> tuple[list, bool]:
    src_full, src_local = full[n.args[0]], tensor_meta(n.args[0])
    sizes = list(n.args[1])
    off = len(sizes) - src_full.dim()
    for d in range(src_full.dim()):
        if not same_size(src_full.shape[d], 1) and not same_size(src_full.shape[d], src_local.shape[d]) and sizes[d + off] != -1:
            sizes[d + off] = as_int(src_local.shape[d])
    # repeat_kv: [B, Hkv, 1, S, D] expanded to [B, Hkv, Hq/Hkv, S, D]; locally the group
    # size is (local Q heads) / (local KV heads), which differs when KV is replicated.
    regrouped = False
    if pair.kind == "attention" and pair.kv_heads and kv_local:
        groups = pair.q_heads // pair.kv_heads
        for d in range(1, src_full.dim()):
            if same_size(src_full.shape[d], 1) and isinstance(sizes[d + off], int) and sizes[d + off] == groups \
                    and same_size(src_local.shape[d - 1], kv_local):
                sizes[d + off] = q_local // kv_local
                regrouped = True
    return sizes, regrouped



def slice_side_inputs(gm, n, full, frac, cache) -> None:
    """Point tensor inputs from outside the region that carry the full sharded dimension
    (a KV cache, a per-head mask) at this rank's part of it."""
    region_in = [a for a in n.all_input_nodes if a in full]
    if not region_in:
        return
    ref = next((a for a in region_in if a in frac and shard_dim(a, full) is not None), None)
    if ref is None:
        return
    d = shard_dim(ref, full)
    size_full = as_int(full[ref].shape[d])
    lo, hi = frac[ref]
    rank_ndim = full[ref].dim()

    def fix(a):
        if not isinstance(a, fx.Node) or a in full or not isinstance(tensor_meta(a), torch.Tensor):
            return a
        t = tensor_meta(a)
        ad = d - (rank_ndim - t.dim())
        if ad < 0 or not same_size(t.shape[ad], size_full) or size_full == 1:
            return a
        start, end = lo * size_full, hi * size_full
        if start.denominator != 1 or end.denominator != 1:
            raise NotShardable(f"{node_name(n)}: {node_name(a)} cannot be cut at this rank's heads")
        key = (a, ad, int(start), int(end))
        if key not in cache:
            with gm.graph.inserting_after(a):
                view = gm.graph.call_function(aten.slice.Tensor, (a, ad, int(start), int(end)))
            view.meta["val"] = evaluate(view)
            cache[key] = view
        return cache[key]

    n.args = fx.node.map_aggregate(n.args, fix)
    n.kwargs = fx.node.map_aggregate(n.kwargs, fix)



def shard_dim(n, full) -> int | None:
    old, new = full[n], tensor_meta(n)
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return None
    for d, (a, b) in enumerate(zip(old.shape, new.shape)):
        if not same_size(a, b):
            return d
    return None



def check_dims(n, full) -> None:
    """Reductions, cat, slices and softmax must not run over the sharded dimension."""
    t = n.target
    if t not in (aten.cat.default, aten.slice.Tensor, aten.select.int, aten._softmax.default, aten.mean.dim,
                 aten.sum.dim_IntList, aten.amax.default, aten.bmm.default, aten.split.Tensor,
                 aten.split_with_sizes.default):
        return
    src = n.args[0][0] if t == aten.cat.default else n.args[0]
    if src not in full:
        return
    d = shard_dim(src, full)
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
        raise NotShardable(f"{node_name(n)} ({t}) works across the sharded dimension {d}")

