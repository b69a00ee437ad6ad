"""fuse_residual_norm: ``h = x + residual; y = norm(h)`` becomes one op returning ``(y, h)``.

A pre-norm decoder layer adds a sublayer's output to the residual stream and normalizes
the sum, twice per layer; eager runs the add and then five to eight elementwise and
reduction kernels over the same activation. The fused ops of ``codegen/residual_norm.py``
read ``x`` and ``residual`` once and write ``y`` and ``h`` once. What this pass replaces,
as eager code (scalars read from the graph, never assumed):

    h = x + residual                          # optional: the first norm of a model has none
    # RMSNorm, HF Llama/Mistral/Qwen:          # Gemma: weight before the cast, (offset + w)
    hf = h.to(torch.float32)                  # absent in fp32 models (normalize drops it)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)   # or x*x, or / sqrt(.)
    y = weight * hf.to(h.dtype)               # or (hf * (offset + weight.float())).to(h.dtype)
    # LayerNorm: y = native_layer_norm(h, [N], weight|None, bias|None, eps)[0]

    →  y, h = llmopt.add_rms_norm(x, residual, weight, eps, offset)    (or add_layer_norm,
                                                                        rms_norm, layer_norm)

Every other user of ``h`` (the residual stream of a pre-norm model) reads the op's ``h``;
a post-norm model (BERT) leaves it unused.

Preconditions, each recorded as a near-miss when it fails (the graph is left alone):
weight/bias are frozen ``[N]`` constants; the mean is over the last dim with ``keepdim``;
``eps`` is added inside the rsqrt; every intermediate of the pattern (upcast, square,
mean, rsqrt, products, casts) has no user outside it; the norm's output has ``h``'s dtype
and shape (an fp32 weight times a bf16 row promotes to fp32, which the fused op, returning
``h.dtype``, would silently change). The residual add is fused only when it does not
broadcast and both operands have ``h``'s dtype; otherwise the norm alone is fused and the
rewrite says why. A norm computed in bf16 without the upcast is fused too: the op
accumulates in fp32, which is more precise than eager and within the tolerance table.

Sources: RMSNorm, Zhang & Sennrich 2019 (arXiv:1910.07467); the spellings are those of
``transformers``' ``LlamaRMSNorm``, ``GemmaRMSNorm`` and ``nn.LayerNorm``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..codegen import residual_norm  # noqa: F401  registers llmopt::{add_,}{rms,layer}_norm
from ..graph import (
    add_constant, constant_value, is_cast, is_constant, other_operand, real_tensors, same_shape, statically_equal,
    tensor_meta,
)
from .near_miss import NearMiss, rewrite_each

aten = torch.ops.aten

_ADDS = (aten.add.Tensor, aten.add.Scalar)
_MULS = (aten.mul.Tensor, aten.mul.Scalar)
_UPCAST_SOURCES = (torch.float16, torch.bfloat16)
_FUSED_RMS_NORM = getattr(getattr(aten, "_fused_rms_norm", None), "default", None)  # torch >= 2.8
# The nodes a normalization is found from: a mean of squares or a library norm.
_ANCHORS = (aten.mean.dim, aten.native_layer_norm.default, aten.layer_norm.default) + (
    (_FUSED_RMS_NORM,) if _FUSED_RMS_NORM is not None else ()
)


@dataclass
class NormMatch:
    """One normalization found in the graph, ready to be replaced."""

    kind: str  # "rms" | "layer"
    h: fx.Node  # the tensor being normalized
    y: fx.Node  # the node whose value is the norm's output
    first: fx.Node  # earliest node of the pattern: where the op goes when there is no residual
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    weight_offset: float = 0.0
    spelling: str = ""


def run(gm: fx.GraphModule, ctx) -> int:
    return rewrite_each(gm, ctx, dict.fromkeys(_ANCHORS, fuse_at))


def fuse_at(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str] | None:
    """Fuse the normalization anchored at ``node``: (the fused op, detail), or None."""
    match = match_norm(gm, node)
    return None if match is None else fuse(gm, match)


# --------------------------------------------------------------------------- matching
def match_norm(gm: fx.GraphModule, node: fx.Node) -> NormMatch | None:
    """The normalization anchored at ``node`` (a mean of squares or a library norm), or None.

    Raises NearMiss when ``node`` is clearly a normalization that must not be fused.
    """
    if node.target == aten.mean.dim:
        return _match_rms_norm(gm, node)
    if node.target in (aten.native_layer_norm.default, aten.layer_norm.default):
        return _match_library_norm(gm, node, "layer")
    if _FUSED_RMS_NORM is not None and node.target == _FUSED_RMS_NORM:
        return _match_library_norm(gm, node, "rms")
    return None


def _match_rms_norm(gm: fx.GraphModule, mean: fx.Node) -> NormMatch | None:
    """``hf * rsqrt(mean(hf^2, -1, keepdim) + eps)`` then an optional cast and weight."""
    sq = mean.args[0]
    xf = _squared(sq)
    if xf is None:
        return None  # a mean of something that is not a square: not a norm
    hv = tensor_meta(xf)
    if hv is None or hv.dim() == 0:
        return None
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if dims is None or len(dims) != 1 or dims[0] % hv.dim() != hv.dim() - 1:
        raise NearMiss(mean, f"mean of squares over dims {list(dims or [])}, not the last dim only: not an RMSNorm")
    if not keepdim:
        raise NearMiss(mean, "mean of squares without keepdim=True: not the RMSNorm spelling")
    if mean.kwargs.get("dtype") is not None:
        raise NearMiss(mean, f"mean of squares accumulates in {mean.kwargs['dtype']}: unsupported spelling")
    _next_in_pattern(sq, "square")
    add_eps = _next_in_pattern(mean, "mean of squares")
    eps = _scalar_addend(gm, add_eps, mean) if add_eps is not None else None
    if eps is None:
        raise NearMiss(mean, f"mean(x²) is not followed by `+ eps` inside the rsqrt (its user: {_describe(add_eps)})")
    root = _next_in_pattern(add_eps, "mean + eps")
    if root is None or root.target not in (aten.rsqrt.default, aten.sqrt.default):
        raise NearMiss(add_eps, f"mean(x²) + eps does not feed an rsqrt or sqrt (its user: {_describe(root)})")
    normalized = _next_in_pattern(root, root.target.__name__.split(".")[0])
    if root.target == aten.rsqrt.default:
        ok = normalized is not None and normalized.target in _MULS
        scaled = other_operand(normalized, root) if ok else None
    else:
        ok = normalized is not None and normalized.target == aten.div.Tensor and normalized.args[1] is root
        scaled = normalized.args[0] if ok else None

    h, upcast = xf, False
    if is_cast(xf) and tensor_meta(xf).dtype == torch.float32 and tensor_meta(xf.args[0]).dtype in _UPCAST_SOURCES:
        h, upcast = xf.args[0], True
    # T5 scales the un-cast h (bf16 * fp32 rsqrt promotes: the same fp32 product as hf * rsqrt).
    if not ok or (scaled is not xf and not (upcast and scaled is h)):
        raise NearMiss(root, f"{_describe(root)} does not scale the x whose mean square it is (its user: {_describe(normalized)})")
    if upcast:
        extra = [u for u in xf.users if u not in (sq, normalized)]
        if extra:
            raise NearMiss(xf, f"intermediate {xf.name} (fp32 upcast) has another user: {extra[0].name}")

    y, weight, offset, tail = _match_tail(gm, normalized, h)
    _check_output(y, h)
    steps = (["fp32 upcast"] if upcast else []) + tail
    return NormMatch(
        kind="rms",
        h=h,
        y=y,
        first=xf if upcast else sq,
        weight=weight,
        bias=None,
        eps=eps,
        weight_offset=offset,
        spelling=", ".join(steps) or "no weight",
    )


def _match_tail(gm: fx.GraphModule, normalized: fx.Node, h: fx.Node):
    """Follow the normalized row through at most one cast and one weight multiply.

    Returns (y, weight node | None, weight offset, description of the steps).
    """
    hidden = tensor_meta(h).shape[-1]
    cur, weight, offset, cast, steps = normalized, None, 0.0, False, []
    while True:
        nxt = None
        for user in cur.users:
            if not cast and is_cast(user) and user.args[0] is cur:
                nxt = ("cast", user, None)
            elif weight is None and user.target in _MULS and _weight_like(other_operand(user, cur), hidden):
                nxt = ("weight", user, other_operand(user, cur))
            if nxt is not None:
                break
        if nxt is None:
            return cur, weight, offset, steps
        if len(cur.users) > 1:
            other = next(u for u in cur.users if u is not nxt[1])
            raise NearMiss(cur, f"intermediate {cur.name} of the norm has another user: {other.name}")
        kind, cur, operand = nxt
        if kind == "cast":
            cast = True
            steps.append(f"cast to {str(tensor_meta(cur).dtype).replace('torch.', '')}")
        else:
            weight, offset = _weight_and_offset(gm, operand, cur)
            steps.append("weight" if offset == 0.0 else f"weight + {offset:g}")


def _match_library_norm(gm: fx.GraphModule, node: fx.Node, kind: str) -> NormMatch | None:
    """``native_layer_norm`` / ``layer_norm`` / ``_fused_rms_norm`` over the last dim."""
    h = node.args[0]
    hv = tensor_meta(h)
    if hv is None or hv.dim() == 0:
        return None
    shape = list(node.args[1])
    if len(shape) != 1 or not statically_equal(shape[0], hv.shape[-1]):
        raise NearMiss(node, f"normalizes over the last {len(shape)} dims {shape}; the fused op normalizes the last dim only")

    def arg(i, default=None):
        return node.args[i] if len(node.args) > i else default

    if kind == "layer":
        weight, bias = arg(2), arg(3)
        eps = arg(4, node.kwargs.get("eps", 1e-5))
    else:
        weight, bias = arg(2), None
        eps = arg(3)
        if eps is None:
            eps = torch.finfo(hv.dtype).eps  # _fused_rms_norm's documented default
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not is_constant(gm, p):
            raise NearMiss(node, f"{name} {p.name} is not a frozen constant")
        pv = tensor_meta(p)
        if pv is None or pv.dim() != 1 or not statically_equal(pv.shape[0], hv.shape[-1]):
            raise NearMiss(node, f"{name} {p.name} is not a [{hv.shape[-1]}] vector")

    if node.target == aten.layer_norm.default:
        y = node
    else:
        ys = []
        for user in node.users:
            if user.target is not operator.getitem:
                raise NearMiss(node, f"output tuple used by {user.name} directly")
            if user.args[1] == 0:
                ys.append(user)
            elif user.users:
                raise NearMiss(node, f"statistics output {user.args[1]} (mean/rstd) is used by {next(iter(user.users)).name}")
        if len(ys) != 1:
            return None  # output unused (dead) or duplicated getitems: nothing worth fusing
        y = ys[0]
    _check_output(y, h)
    parts = [p for p, v in (("weight", weight), ("bias", bias)) if v is not None]
    return NormMatch(
        kind=kind,
        h=h,
        y=y,
        first=node,
        weight=weight,
        bias=bias,
        eps=float(eps),
        spelling=f"{node.target.__name__.split('.')[0]}" + (f" with {' and '.join(parts)}" if parts else " without affine"),
    )


# --------------------------------------------------------------------------- pattern pieces
def _squared(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``x ** 2`` or ``x * x``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.pow.Tensor_Scalar and isinstance(node.args[0], fx.Node) and node.args[1] == 2:
        return node.args[0]
    if node.target == aten.mul.Tensor and isinstance(node.args[0], fx.Node) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _next_in_pattern(node: fx.Node, what: str) -> fx.Node | None:
    """The one user of the intermediate ``node`` (None when unused); another user is a near-miss."""
    users = list(node.users)
    if len(users) > 1:
        raise NearMiss(node, f"intermediate {node.name} ({what}) has another user: {users[1].name}")
    return users[0] if users else None


def _describe(node: fx.Node | None) -> str:
    if node is None:
        return "none"
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}"


def _scalar_addend(gm: fx.GraphModule, add: fx.Node, tensor: fx.Node) -> float | None:
    """``c`` when ``add`` is ``tensor + c`` with ``c`` a number (or a frozen one-element constant)."""
    if add.target not in _ADDS or add.kwargs.get("alpha", 1) != 1:
        return None
    other = other_operand(add, tensor)
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return float(other)
    if is_constant(gm, other) and tensor_meta(other) is not None and tensor_meta(other).numel() == 1:
        with real_tensors():
            return float(constant_value(gm, other).item())
    return None


def _weight_like(operand: Any, hidden) -> bool:
    """An operand that plays the weight's role: a ``[N]`` vector (after casts/offsets)."""
    v = tensor_meta(operand)
    return v is not None and v.dim() == 1 and statically_equal(v.shape[0], hidden)


def _weight_and_offset(gm: fx.GraphModule, operand: fx.Node, mul: fx.Node) -> tuple[fx.Node, float]:
    """The frozen weight behind ``operand`` and the offset added to it (Gemma's ``1 + w``).

    Accepts ``w``, ``w.float()``, ``w + c``, ``c + w.float()``; an upcast is exact, and the
    fused op computes ``w.float() + offset`` in fp32, at least as precise as eager.
    """
    cur, offset, seen_add = operand, 0.0, False
    while not is_constant(gm, cur):
        if is_cast(cur):
            src, dst = tensor_meta(cur.args[0]).dtype, tensor_meta(cur).dtype
            if not dst.is_floating_point or torch.finfo(dst).bits < torch.finfo(src).bits:
                raise NearMiss(mul, f"norm weight is cast down to {dst} before the multiply; the fused op would skip that rounding")
            cur = cur.args[0]
            continue
        if isinstance(cur, fx.Node) and not seen_add and cur.target in _ADDS:
            base = next((a for a in cur.args[:2] if isinstance(a, fx.Node)), None)
            c = _scalar_addend(gm, cur, base) if base is not None else None
            if c is not None:
                offset, seen_add, cur = c, True, base
                continue
        name = cur.name if isinstance(cur, fx.Node) else repr(cur)
        raise NearMiss(mul, f"norm weight {name} is not a frozen constant")
    value = tensor_meta(cur)
    if value is None or value.dim() != 1 or not value.is_floating_point():
        raise NearMiss(mul, f"norm weight {cur.name} is not a floating-point [N] vector")
    return cur, offset


def _check_output(y: fx.Node, h: fx.Node) -> None:
    yv, hv = tensor_meta(y), tensor_meta(h)
    if yv is None or hv is None:
        raise NearMiss(y, "no tensor metadata on the norm's input or output")
    if yv.dtype != hv.dtype:
        raise NearMiss(
            y,
            f"norm output is {str(yv.dtype).replace('torch.', '')} but its input is "
            f"{str(hv.dtype).replace('torch.', '')} (dtype promotion by the weight); the fused op returns the input dtype",
        )
    if not same_shape(yv, hv.shape):
        raise NearMiss(y, f"norm output shape {tuple(yv.shape)} differs from its input's {tuple(hv.shape)}")


def residual_operands(h: fx.Node) -> tuple[tuple[fx.Node, fx.Node] | None, str]:
    """``(x, residual)`` when ``h = x + residual`` can be fused (same shape and dtype), else
    ``(None, why)``."""
    if h.op != "call_function" or h.target != aten.add.Tensor or h.kwargs.get("alpha", 1) != 1:
        return None, ""
    x, r = h.args[0], h.args[1]
    if not isinstance(x, fx.Node) or not isinstance(r, fx.Node):
        return None, "the add before it has a scalar operand"
    xv, rv, hv = tensor_meta(x), tensor_meta(r), tensor_meta(h)
    if xv is None or rv is None or hv is None:
        return None, "the add before it has no tensor metadata"
    if not (same_shape(xv, hv.shape) and same_shape(rv, hv.shape)):
        return None, f"the add before it broadcasts {tuple(xv.shape)} + {tuple(rv.shape)}"
    if not (xv.dtype == rv.dtype == hv.dtype) or xv.device != rv.device:
        return None, f"the add before it mixes {xv.dtype}/{xv.device} and {rv.dtype}/{rv.device}"
    return (x, r), ""


# --------------------------------------------------------------------------- rewriting
def fuse(gm: fx.GraphModule, m: NormMatch) -> tuple[fx.Node, str]:
    """Replace the norm ``m`` (and the residual add before it, when fusable) by one op;
    returns (the op, what was fused for the report)."""
    g = gm.graph
    pair, why_not = residual_operands(m.h)
    anchor = m.h if pair is not None else m.first
    weight = m.weight
    if m.kind == "rms" and weight is None:
        hidden = tensor_meta(m.h).shape[-1]
        with real_tensors():
            ones = torch.ones(int(hidden), dtype=torch.float32, device=tensor_meta(m.h).device)
        # A get_attr placed before the op's insertion point (after the add, or at m.first).
        weight = add_constant(gm, "rms_norm_unit_weight", ones, anchor)
    ops = torch.ops.llmopt
    if m.kind == "rms":
        target = ops.add_rms_norm.default if pair else ops.rms_norm.default
        args = (*pair, weight, m.eps, m.weight_offset) if pair else (m.h, weight, m.eps, m.weight_offset)
    else:
        target = ops.add_layer_norm.default if pair else ops.layer_norm.default
        args = (*pair, weight, m.bias, m.eps) if pair else (m.h, weight, m.bias, m.eps)
    where = g.inserting_after(anchor) if pair is not None else g.inserting_before(anchor)
    with where:
        fused = g.call_function(target, args)
    fused.meta = {k: v for k, v in m.y.meta.items() if k != "val"}
    fused.meta["val"] = target(*[tensor_meta(a) if isinstance(a, fx.Node) else a for a in args])
    if pair is not None:
        with g.inserting_after(fused):
            new_h = g.call_function(operator.getitem, (fused, 1))
            new_y = g.call_function(operator.getitem, (fused, 0))
        for node, value in ((new_y, fused.meta["val"][0]), (new_h, fused.meta["val"][1])):
            node.meta = dict(fused.meta)
            node.meta["val"] = value
        m.y.replace_all_uses_with(new_y)
        m.h.replace_all_uses_with(new_h)  # the residual stream reads the op's h
    else:
        m.y.replace_all_uses_with(fused)
    name = target.__name__.split(".")[0]
    detail = f"{name} ({m.spelling}; eps={m.eps:g}"
    if m.weight_offset:
        detail += f", weight offset {m.weight_offset:g}"
    detail += ")"
    if pair is not None:
        detail += f": fused with the residual add {m.h.name}"
    elif why_not:
        detail += f": not fused with {m.h.name}: {why_not}"
    return fused, detail
