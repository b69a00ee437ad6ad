"""fuse_gated_activation: ``act(gate) * up`` becomes one ``llmopt.gated_activation`` op.

The MLP of a GLU model (SwiGLU in Llama/Mistral/Qwen, GeGLU in Gemma) computes
``down(act(gate(x)) * up(x))``; eager runs the activation and the product as two kernels
with an intermediate as wide as the MLP. What this pass replaces, as eager code:

    out = F.silu(gate) * up                       # either operand order
    out = F.gelu(gate) * up                       # "gelu"
    out = F.gelu(gate, approximate="tanh") * up   # "gelu_tanh"
      →  out = llmopt.gated_activation(gate, up, activation)

When ``merge_parallel_linears`` has merged the gate and up projections, ``gate`` and ``up``
are ``aten.slice`` views of one matmul output: they are passed as they are and the kernel
reads both halves through their strides (no copy).

It first collapses the spelled-out tanh GELU into ``aten.gelu(x, approximate="tanh")``.
``transformers``' ``gelu_new`` (GPT-2, GPT-J, Phi: ``NewGELUActivation``) and
``gelu_fast`` trace to eight ATen ops,

    0.5 * x * (1.0 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))

which is one op in every backend (and then the ``act`` of a GeGLU written that way). The
argument of the tanh is read as a polynomial in ``x``, so any arrangement of the products
matches; its coefficients and the outer factor are compared with the math values
(sqrt(2/pi), 0.044715, 1/2) to a relative 1e-6, never assumed. Each collapse counts as
one rewrite (GPT-2 and Phi have no gate: one rewrite per layer, from the collapse).

Preconditions, near-misses when they fail: the activation's output (and every intermediate
of a spelled-out GELU) has no other user; ``gate`` and ``up`` have the product's shape (no
broadcasting) and dtype.

Sources: Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202); Hendrycks &
Gimpel 2016 (arXiv:1606.08415) for the tanh approximation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from ..codegen import gated_activation  # noqa: F401  registers llmopt::gated_activation
from ..graph import other_operand, same_shape, tensor_meta
from .near_miss import NearMiss, rewrite_each

aten = torch.ops.aten

_MULS = (aten.mul.Tensor, aten.mul.Scalar)
_DIVS = (aten.div.Tensor, aten.div.Scalar)
_ADDS = (aten.add.Tensor, aten.add.Scalar)
_SUBS = (aten.sub.Tensor, aten.sub.Scalar)
# Relative tolerance on the GELU constants: float32-rounded or truncated spellings
# (gelu_fast's 0.7978845608) pass, a different function does not.
_CONST_RTOL = 1e-6
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def run(gm: fx.GraphModule, ctx) -> int:
    # Collapse first: a GeGLU spelled with gelu_new is then an ordinary act(gate) * up.
    count = rewrite_each(gm, ctx, {aten.tanh.default: collapse_tanh_gelu})
    return count + rewrite_each(gm, ctx, {aten.mul.Tensor: fuse_gated})


# --------------------------------------------------------------------------- act(gate) * up
def activation_of(node: Any) -> tuple[str, fx.Node] | None:
    """``(name, gate)`` when ``node`` is ``act(gate)`` for an activation the op implements."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.silu.default:
        return "silu", node.args[0]
    if node.target == aten.gelu.default:
        approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
        return (name, node.args[0]) if name is not None else None
    return None


def fuse_gated(gm: fx.GraphModule, mul: fx.Node) -> tuple[fx.Node, str] | None:
    """Replace ``mul = act(gate) * up`` by ``gated_activation(gate, up, act)``; (new node, detail)."""
    a, b = mul.args[0], mul.args[1]
    for act_node, up in ((a, b), (b, a)):
        found = activation_of(act_node)
        if found is None or not isinstance(up, fx.Node) or act_node is up:
            continue
        name, gate = found
        if len(act_node.users) > 1:
            other = next(u for u in act_node.users if u is not mul)
            raise NearMiss(mul, f"activation output {act_node.name} has another user: {other.name}")
        gv, uv, mv = tensor_meta(gate), tensor_meta(up), tensor_meta(mul)
        if gv is None or uv is None or mv is None:
            raise NearMiss(mul, "no tensor metadata on gate/up")
        if not (same_shape(gv, mv.shape) and same_shape(uv, mv.shape)):
            raise NearMiss(mul, f"gate {tuple(gv.shape)} and up {tuple(uv.shape)} broadcast to {tuple(mv.shape)}")
        if not (gv.dtype == uv.dtype == mv.dtype) or gv.device != uv.device:
            raise NearMiss(mul, f"gate ({gv.dtype}) and up ({uv.dtype}) differ in dtype/device from the product ({mv.dtype})")
        target = torch.ops.llmopt.gated_activation.default
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(target, (gate, up, name))
        fused.meta = {k: v for k, v in mul.meta.items() if k != "val"}
        fused.meta["val"] = target(gv, uv, name)
        mul.replace_all_uses_with(fused)
        detail = f"{name}(gate) * up → gated_activation({name!r})"
        if _halves_of_one_output(gate, up):
            detail += f", reading both halves of {gate.args[0].name} in place"
        return fused, detail
    return None


def _halves_of_one_output(gate: fx.Node, up: fx.Node) -> bool:
    """gate and up are last-dim slices of the same tensor (a merged gate/up matmul)."""

    def last_dim_slice(n):
        v = tensor_meta(n.args[0]) if n.target == aten.slice.Tensor else None
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return v is not None and dim % v.dim() == v.dim() - 1

    return last_dim_slice(gate) and last_dim_slice(up) and gate.args[0] is up.args[0]


# --------------------------------------------------------------------------- spelled-out tanh GELU
def collapse_tanh_gelu(gm: fx.GraphModule, tanh: fx.Node) -> tuple[fx.Node, str] | None:
    """Replace ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` by ``aten.gelu(x, "tanh")``.

    Returns (the gelu node, detail), None when ``tanh`` is not part of a GELU.
    """
    one_plus = next(iter(tanh.users)) if len(tanh.users) == 1 else None
    if one_plus is None or one_plus.target not in _ADDS or not _is_number(other_operand(one_plus, tanh), 1.0):
        return None  # not GELU's (1 + tanh(.)): some other use of tanh
    if one_plus.kwargs.get("alpha", 1) != 1:
        return None
    root, x, inner = _outer_product(one_plus)
    if root is None:
        return None  # (1 + tanh) is not multiplied by x / 2: not a GELU
    xv = tensor_meta(x)
    if xv is None or not xv.is_floating_point():
        return None
    z = tanh.args[0]
    poly, visited = _polynomial(z, x)
    if poly is None:
        raise NearMiss(tanh, f"looks like a tanh GELU of {x.name}, but the tanh argument is not a polynomial in {x.name}")
    c1, c3 = poly.get(1, 0.0), poly.get(3, 0.0)
    others = {k: c for k, c in poly.items() if k not in (1, 3) and c != 0.0}
    if others or not _close(c1, _SQRT_2_OVER_PI) or not _close(c3 / c1, _GELU_CUBIC):
        raise NearMiss(
            tanh,
            f"tanh GELU constants differ from the math values: tanh argument {_show(poly)} in {x.name}, "
            f"expected {_SQRT_2_OVER_PI:.10g}·(x + {_GELU_CUBIC}·x³)",
        )
    internal = [*visited, tanh, one_plus, *inner]
    pattern = set(internal) | {root}
    for node in internal:
        other = next((u for u in node.users if u not in pattern), None)
        if other is not None:
            raise NearMiss(tanh, f"intermediate {node.name} of the tanh GELU has another user: {other.name}")
    if tensor_meta(root) is None or tensor_meta(root).dtype != xv.dtype or not same_shape(xv, tensor_meta(root).shape):
        raise NearMiss(tanh, "tanh GELU output has another dtype or shape than its input")
    with gm.graph.inserting_before(root):
        gelu = gm.graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
    gelu.meta = {k: v for k, v in root.meta.items() if k != "val"}
    gelu.meta["val"] = aten.gelu.default(xv, approximate="tanh")
    root.replace_all_uses_with(gelu)
    return gelu, f"spelled-out tanh GELU ({len(set(internal)) + 1} ops) → aten.gelu(approximate='tanh')"


def _outer_product(one_plus: fx.Node):
    """The lowest product over ``one_plus`` equal to ``0.5 * x * one_plus``: (root, x, absorbed muls)."""
    cur = one_plus
    while len(cur.users) == 1:
        parent = next(iter(cur.users))
        if parent.target not in _MULS + _DIVS:
            break
        coef, leaves, absorbed = _flatten_product(parent, root=True)
        if coef is not None and len(leaves) == 2 and one_plus in leaves and _close(coef, 0.5):
            x = next((n for n in leaves if n is not one_plus), None)
            if x is not None:
                return parent, x, absorbed
        cur = parent
    return None, None, []


def _flatten_product(node: Any, root: bool = False):
    """(scalar coefficient, factor nodes, absorbed single-user muls) of a product tree."""
    if _is_scalar(node):
        return float(node), [], []
    if not isinstance(node, fx.Node):
        return None, [], []
    if node.target in _MULS + _DIVS and (root or len(node.users) == 1):
        ca, la, aa = _flatten_product(node.args[0])
        if node.target in _DIVS:
            if not _is_scalar(node.args[1]) or float(node.args[1]) == 0.0 or ca is None:
                return None, [], []
            return ca / float(node.args[1]), la, ([] if root else [node]) + aa
        cb, lb, ab = _flatten_product(node.args[1])
        if ca is None or cb is None:
            return None, [], []
        return ca * cb, la + lb, ([] if root else [node]) + aa + ab
    return 1.0, [node], []


def _polynomial(node: Any, x: fx.Node, depth: int = 0):
    """``node`` as {power: coefficient} in ``x`` (and the op nodes visited), or (None, [])."""
    if depth > 16:
        return None, []
    if node is x:
        return {1: 1.0}, []
    if _is_scalar(node):
        return {0: float(node)}, []
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None, []
    t, args = node.target, node.args
    if t in _ADDS + _SUBS and node.kwargs.get("alpha", 1) == 1 and len(args) == 2:
        (pa, va), (pb, vb) = _polynomial(args[0], x, depth + 1), _polynomial(args[1], x, depth + 1)
        if pa is None or pb is None:
            return None, []
        sign = -1.0 if t in _SUBS else 1.0
        out = dict(pa)
        for k, c in pb.items():
            out[k] = out.get(k, 0.0) + sign * c
        return out, [node, *va, *vb]
    if t in _MULS and len(args) == 2:
        (pa, va), (pb, vb) = _polynomial(args[0], x, depth + 1), _polynomial(args[1], x, depth + 1)
        if pa is None or pb is None:
            return None, []
        out: dict[int, float] = {}
        for ka, ca in pa.items():
            for kb, cb in pb.items():
                out[ka + kb] = out.get(ka + kb, 0.0) + ca * cb
        return out, [node, *va, *vb]
    if t in _DIVS and len(args) == 2 and _is_scalar(args[1]) and float(args[1]) != 0.0:
        pa, va = _polynomial(args[0], x, depth + 1)
        if pa is None:
            return None, []
        return {k: c / float(args[1]) for k, c in pa.items()}, [node, *va]
    if t == aten.pow.Tensor_Scalar and _is_scalar(args[1]) and float(args[1]).is_integer() and 1 <= args[1] <= 4:
        pa, va = _polynomial(args[0], x, depth + 1)
        if pa is None:
            return None, []
        out = {0: 1.0}
        for _ in range(int(args[1])):
            nxt: dict[int, float] = {}
            for ka, ca in out.items():
                for kb, cb in pa.items():
                    nxt[ka + kb] = nxt.get(ka + kb, 0.0) + ca * cb
            out = nxt
        return out, [node, *va]
    return None, []


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_number(v: Any, value: float) -> bool:
    return _is_scalar(v) and _close(float(v), value)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_CONST_RTOL, abs_tol=0.0)


def _show(poly: dict[int, float]) -> str:
    return " + ".join(f"{c:.6g}·x^{k}" for k, c in sorted(poly.items()) if c != 0.0) or "0"
