"""The operands of attention: q/k/v as the op takes them, and the scalars around them.

- ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D)``),
  ``repeat_interleave(n, dim=1)`` (same ATen) and K/V broadcast over heads by ``matmul``
  (``expand`` of a 1-head tensor) are looked through: the op gets the un-repeated K/V and
  reads the shared head (query head ``h`` uses KV head ``h // n``, which is exactly what
  the repeat computed), so no copy of K/V is left.
- The reshapes/clones/transposes that eager attention puts around its ``bmm`` are looked
  through to the ``[B, H, S, D]`` tensors.
- ``check_qkv`` states the op's contract on q/k/v (dtypes, shapes, static GQA grouping).
- ``scalar_value`` reads a scale or a mask fill, a Python number or a 0-d constant node.

Source: Hugging Face transformers' ``repeat_kv``; Ainslie et al. 2023 (GQA).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ...graph import RESHAPE_OPS, constant_value, real_tensors, same_shape, statically_equal, tensor_meta

aten = torch.ops.aten


def source_4d(node: Any, shape: tuple) -> fx.Node | None:
    """The 4-D tensor of ``shape`` that ``node`` is a row-major reshape of (through
    view/_unsafe_view/reshape/contiguous clone), or None."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        v = tensor_meta(node)
        if v is not None and v.dim() == 4 and same_shape(v, shape):
            return node
        if node.target in RESHAPE_OPS or (node.target == aten.clone.default and _plain_clone(node)):
            node = node.args[0]
            continue
        return None
    return None


def _plain_clone(node: fx.Node) -> bool:
    return set(node.kwargs) <= {"memory_format"} and node.kwargs.get("memory_format") in (None, torch.contiguous_format)


def strip_clones(node: fx.Node) -> fx.Node:
    while node.target == aten.clone.default and _plain_clone(node):
        node = node.args[0]
    return node


def untranspose(node: fx.Node) -> fx.Node | None:
    """``k`` for ``k.transpose(-1, -2)`` (optionally broadcast over heads by expand)."""
    node = strip_clones(node)
    expand = None
    if node.target == aten.expand.default:
        expand, node = node, node.args[0]
    if node.target == aten.transpose.int:
        dims = sorted(d % 4 for d in node.args[1:3])
        if dims != [2, 3]:
            return None
    elif node.target == aten.permute.default:
        if [d % 4 for d in node.args[1]] != [0, 1, 3, 2]:
            return None
    else:
        return None
    k = node.args[0]
    if expand is None:
        return k
    # Rebuild the broadcast on the un-transposed side: handled by _unrepeat (Hkv = 1).
    ev, kv = tensor_meta(expand), tensor_meta(k)
    if not (statically_equal(kv.shape[0], ev.shape[0]) and statically_equal(kv.shape[1], 1)):
        return None
    return _Broadcast(k, ev.shape[1])


class _Broadcast:
    """K/V of one head broadcast over ``heads`` by matmul (no node of its own)."""

    def __init__(self, base: fx.Node, heads):
        self.base, self.heads = base, heads


def _unrepeat(node) -> tuple[fx.Node, int]:
    """(un-repeated K/V, repeat factor) for repeat_kv / repeat_interleave / head broadcast."""
    if isinstance(node, _Broadcast):
        return node.base, node.heads
    node = strip_clones(node)
    if node.target == aten.expand.default:
        base, v, bv = node.args[0], tensor_meta(node), tensor_meta(node.args[0])
        others_kept = all(statically_equal(a, c) for i, (a, c) in enumerate(zip(bv.shape, v.shape)) if i != 1)
        if bv.dim() == 4 and statically_equal(bv.shape[1], 1) and others_kept:
            return base, v.shape[1]
        return node, 1
    if node.target not in RESHAPE_OPS:
        return node, 1
    src = strip_clones(node.args[0])
    if src.target != aten.expand.default:
        return node, 1
    unsq = src.args[0]
    if unsq.target != aten.unsqueeze.default or unsq.args[1] % 5 != 2:
        return node, 1
    base = unsq.args[0]
    b4, e5, out = tensor_meta(base), tensor_meta(src), tensor_meta(node)
    if b4 is None or b4.dim() != 4 or e5.dim() != 5 or out.dim() != 4:
        return node, 1
    bsz, hkv, s, d = b4.shape
    n = e5.shape[2]
    # [B, Hkv, 1, S, D] expanded only along the new dim, then merged into Hkv * n heads:
    # query head h reads KV head h // n.
    if not (same_shape(e5, (bsz, hkv, n, s, d)) and same_shape(out, (bsz, hkv * n, s, d))):
        return node, 1
    return base, n


def unrepeat_pair(k, v) -> tuple[fx.Node, fx.Node, int] | str:
    """Un-repeated (K, V) and the repeat factor removed; both or neither are un-repeated,
    since the op needs K and V of one shape."""
    kb, kn = _unrepeat(k)
    vb, vn = _unrepeat(v)
    if kn == vn and same_shape(tensor_meta(kb), tuple(tensor_meta(vb).shape)):
        return kb, vb, (kn if isinstance(kn, int) else 1)
    if isinstance(k, _Broadcast) or isinstance(v, _Broadcast):
        return "K and V are broadcast over heads differently"
    return k, v, 1


def check_qkv(qv, kv, vv) -> str | None:
    if qv is None or kv is None or vv is None:
        return "q/k/v have no tensor metadata"
    if not qv.is_floating_point() or qv.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"attention in {qv.dtype}"
    if kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return f"q/k/v dtypes differ ({qv.dtype}, {kv.dtype}, {vv.dtype})"
    if kv.dim() != 4 or vv.dim() != 4:
        return "k/v are not 4-D"
    if not same_shape(kv, tuple(vv.shape)):
        return f"k {tuple(kv.shape)} and v {tuple(vv.shape)} differ (the op needs equal K and V shapes)"
    if not (statically_equal(qv.shape[0], kv.shape[0]) and statically_equal(qv.shape[3], kv.shape[3])):
        return f"q {tuple(qv.shape)} and k {tuple(kv.shape)} disagree on batch or head dim"
    hq, hkv = qv.shape[1], kv.shape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int)):
        return f"symbolic head counts ({hq} query, {hkv} KV heads): the GQA grouping is not static"
    if hkv == 0 or hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} KV heads"
    if qv.device != kv.device or qv.device != vv.device:
        return "q/k/v on different devices"
    return None


def score_shape(qv, kv) -> tuple:
    return (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])


def scalar_value(a: Any) -> float | None:
    """A Python number, or the value of a 0-d constant tensor node (full/scalar_tensor/
    a frozen 0-d buffer); None otherwise."""
    if isinstance(a, bool):
        return None
    if isinstance(a, (int, float)):
        return float(a)
    if not isinstance(a, fx.Node):
        return None
    t = a.target
    if t in (aten.full.default,) and list(a.args[0]) == []:
        return scalar_value(a.args[1])
    if t == aten.scalar_tensor.default:
        return scalar_value(a.args[0])
    if t in (aten.zeros.default, aten.ones.default) and list(a.args[0]) == []:
        return 0.0 if t == aten.zeros.default else 1.0
    if t in (aten.lift_fresh_copy.default, aten.clone.default, aten._to_copy.default):
        # Casting a scalar: keep the value (finfo.min of the score dtype stays itself).
        return scalar_value(a.args[0])
    if a.op == "get_attr":
        v = tensor_meta(a)
        if v is not None and v.numel() == 1:
            gm = a.graph.owning_module
            with real_tensors():
                return float(constant_value(gm, a).reshape(()).item())
    return None
