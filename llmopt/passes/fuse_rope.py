"""fuse_rope: the rotary embedding of Q and K of a layer becomes one ``llmopt.rope`` op.

The function it replaces (Hugging Face ``apply_rotary_pos_emb``)::

    def apply_rotary_pos_emb(q, k, cos, sin):          # cos/sin [B|1, S, rd], unsqueezed at dim 1
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    rotate_half(x)      = cat(-x[..., rd/2:], x[..., :rd/2])           # Llama, Mistral, Qwen, NeoX, Phi
    rotate_every_two(x) = stack(-x[..., 1::2], x[..., ::2]).flatten(-2)  # GPT-J: interleaved

Per tensor that is a slice, a negation, a concatenation, two multiplies and an add — six
passes over memory — and the same again for K; the op reads q, k, cos and sin once and
writes both outputs once (``codegen/rope.py``).

Spellings recognized (after ``normalize``), for q and for k with the *same* cos/sin:

- ``x * cos + rotate_half(x) * sin`` in either operand order (``interleaved=False``);
- the same with ``rotate_every_two`` (``interleaved=True``; GPT-J repeats cos/sin per pair);
- partial rotary (Phi, GPT-NeoX, GPT-J): ``x = t[..., :rd]`` rotated, then
  ``cat((x_rot, t[..., rd:]), -1)`` — the ``cat`` is folded (``rotary_dim=rd``, the op copies
  the rest);
- an fp32 upcast around it (``x = t.float()`` … ``.to(t.dtype)``), which the op does anyway;
- the complex spelling of Meta's Llama / gpt-fast:
  ``view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) * freqs_cis).flatten(3)``.
  Complex multiplication by ``freqs_cis = cos θ + i sin θ`` is the interleaved rotation
  with ``cos = repeat_interleave(freqs.real, 2)``, ``sin = repeat_interleave(freqs.imag, 2)``;
  the pass inserts those four small nodes once per ``freqs_cis`` (shared by every layer).

Layouts: ``[B, H, S, D]`` (cos/sin broadcast over dim 1, HF) and ``[B, S, H, D]`` (broadcast
over dim 2: GPT-J, Meta, gpt-fast — passed to the op through a ``transpose`` view and
transposed back).

Pairing: the op rotates two tensors with one cos/sin, so the matches of one layer
(same module path, same cos/sin, same rotary dim and layout) are paired in graph order;
a rotation left without a partner (q without k) is a near-miss. Shapes and dtypes are
checked on ``meta["val"]`` (the output must keep the input's dtype; batch, sequence and
head dim of q and k must agree).

Source: Su et al. 2021, "RoFormer" (arXiv:2104.09864); the spellings of Hugging Face
transformers (Llama, GPT-J, Phi), Meta's llama reference and gpt-fast.
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..codegen import rope as _rope  # noqa: F401  registers llmopt::rope
from ..graph import (
    RESHAPE_OPS, call_with_meta, is_call, is_cast, propagate_layout, same_shape, single_user, statically_equal,
    tensor_meta,
)
from ..report import layer_of

aten = torch.ops.aten

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Rotation:
    """One rotated tensor: ``out`` holds ``rope(x)`` over its first ``rotary_dim`` dims."""

    x: fx.Node
    cos: fx.Node  # as used in the graph: broadcasts against x's rotated part
    sin: fx.Node
    rotary_dim: int
    interleaved: bool
    layout: str  # "bhsd" (cos/sin broadcast over dim 1) or "bshd" (over dim 2)
    out: fx.Node
    spelling: str
    freqs: fx.Node | None = None  # complex spelling: cos/sin are derived from this
    inner: list = field(default_factory=list)  # matched intermediates (single-user checked)

    def key(self) -> tuple:
        """Rotations that may share one op: same layer, same cos/sin (looking through the
        broadcast ``unsqueeze``), same rotary dim, spelling and layout."""
        tables = (self.freqs,) if self.freqs is not None else (_unsqueezed(self.cos), _unsqueezed(self.sin))
        shape = tensor_meta(self.freqs if self.freqs is not None else self.cos).shape
        # Symbolic sizes (dynamic shapes) are unhashable: key them by their expression.
        shape = tuple(s if isinstance(s, int) else str(s) for s in shape)
        return (layer_of(self.out), tables, shape, self.rotary_dim, self.interleaved, self.layout)


def run(gm: fx.GraphModule, ctx) -> int:
    rotations: list[Rotation] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = None
        if node.target == aten.add.Tensor:
            found = match_real(node)
        elif node.target == aten.view_as_real.default:
            found = match_complex(node)
        if found is None:
            continue
        if isinstance(found, str):
            ctx.near_miss(node, found)
            continue
        rotations.append(found)

    count = 0
    derived: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for first, second in _pairs(rotations, ctx):
        reason = fuse(gm, first, second, derived)
        if reason:
            ctx.near_miss(first.out, reason)
            continue
        ctx.rewrite(first.out, f"{first.spelling} on q and k → llmopt.rope (rotary_dim={first.rotary_dim}, "
                               f"interleaved={first.interleaved}, layout {first.layout})")
        count += 1
    gm.graph.eliminate_dead_code()
    return count


# ------------------------------------------------------------------------------ matching
def match_real(add: fx.Node) -> Rotation | str | None:
    """``x * cos + rotate(x) * sin`` (any operand order) rooted at ``add``."""
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    a, b = add.args
    for m1, m2 in ((a, b), (b, a)):
        if not (is_call(m1, aten.mul.Tensor) and is_call(m2, aten.mul.Tensor)):
            continue
        for r, sin in _operand_orders(m2):
            rotated = _rotated(r)
            if rotated is None:
                continue
            x, interleaved = rotated
            for x1, cos in _operand_orders(m1):
                if x1 is x:
                    spelling = "rotate_every_two" if interleaved else "rotate_half"
                    inner = [m1, m2, *_rotation_nodes(r)]
                    return _finish(x, cos, sin, interleaved, add, spelling, inner)
    return None


def match_complex(view_as_real: fx.Node) -> Rotation | str | None:
    """``view_as_real(view_as_complex(x.reshape(..., -1, 2)) * freqs).flatten(3)``."""
    mul = view_as_real.args[0]
    if not is_call(mul, aten.mul.Tensor):
        return None
    for xc, freqs in _operand_orders(mul):
        if not is_call(xc, aten.view_as_complex.default):
            continue
        pairs = xc.args[0]
        if not (isinstance(pairs, fx.Node) and pairs.target in RESHAPE_OPS):
            return None
        x = pairs.args[0]
        xv, pv, fv = tensor_meta(x), tensor_meta(pairs), tensor_meta(freqs)
        if xv is None or pv is None or fv is None or xv.dim() != 4 or pv.dim() != 5 or not fv.is_complex():
            return None
        if not (statically_equal(pv.shape[-1], 2) and all(statically_equal(p, s) for p, s in zip(pv.shape[:3], xv.shape[:3]))):
            return None
        flat = single_user(view_as_real)
        if flat is None or flat.target not in (*RESHAPE_OPS, aten.flatten.using_ints):
            return "complex RoPE: view_as_real is not flattened back to the head dim"
        if not same_shape(tensor_meta(flat), tuple(xv.shape)):
            return "complex RoPE: flattened output does not have the input's shape"
        return _finish(x, None, None, True, flat, "complex multiplication", [mul, xc, pairs, view_as_real], freqs=freqs)
    return None


def _finish(x, cos, sin, interleaved, out, spelling, inner, freqs=None) -> Rotation | str | None:
    """Fold the fp32 upcast and the partial-rotary cat, then check shapes and dtypes."""
    xv = tensor_meta(x)
    if xv is None or xv.dim() != 4:
        return None
    # Upcast: x = t.float() ... out.to(t.dtype).
    if is_cast(x):
        cast = single_user(out)
        t = x.args[0]
        tv = tensor_meta(t)
        if cast is not None and is_cast(cast) and tv is not None \
                and tensor_meta(cast).dtype == tv.dtype:
            inner = inner + [out]
            x, out, xv = t, cast, tv
    rotary_dim = xv.shape[-1]
    # Partial rotary: x = t[..., :rd]; out = cat((rope(x), t[..., rd:]), -1).
    sl = _slice(x)
    if sl is not None and sl[1] == 3 and sl[2] == 0 and sl[4] == 1:
        t = sl[0]
        tv = tensor_meta(t)
        cat = single_user(out)
        if cat is not None and is_call(cat, aten.cat.default) and len(cat.args[0]) == 2 and cat.args[0][0] is out \
                and _last_dim(cat, 4):
            rest = _slice(cat.args[0][1])
            if rest is not None and rest[0] is t and rest[1] == 3 and rest[2] == rotary_dim and rest[4] == 1 \
                    and statically_equal(tv.shape[3], rest[3]):
                inner = inner + [out]
                x, out, xv = t, cat, tv
    ov = tensor_meta(out)
    if not isinstance(rotary_dim, int) or rotary_dim % 2:
        return "rotary dim is not a static even number"
    if xv.dtype not in FLOAT_DTYPES:
        return None
    if ov is None or ov.dtype != xv.dtype or not same_shape(ov, tuple(xv.shape)):
        return f"RoPE output {getattr(ov, 'dtype', None)} differs from its input's dtype {xv.dtype} (upcast without a cast back)"
    for n in inner:
        if len(n.users) != 1:
            return f"RoPE intermediate {n.name} has another user"
    probe = cos if freqs is None else freqs
    layout = _layout(tensor_meta(probe), xv, rotary_dim, complex_freqs=freqs is not None)
    if layout is None:
        return f"cos/sin of shape {tuple(tensor_meta(probe).shape)} do not broadcast over heads of q/k {tuple(xv.shape)}"
    if freqs is None:
        cv, sv = tensor_meta(cos), tensor_meta(sin)
        if not (cv.is_floating_point() and sv.is_floating_point() and same_shape(cv, tuple(sv.shape))):
            return "cos and sin differ in shape or are not floating point"
    return Rotation(x, cos, sin, rotary_dim, interleaved, layout, out, spelling, freqs, inner)


def _layout(cv, xv, rotary_dim, complex_freqs: bool) -> str | None:
    """``"bhsd"`` when cos/sin broadcast over dim 1 of x, ``"bshd"`` over dim 2."""
    if cv is None or cv.dim() > 4:
        return None
    c = (1,) * (4 - cv.dim()) + tuple(cv.shape)
    last = rotary_dim // 2 if complex_freqs else rotary_dim
    if not statically_equal(c[3], last) or not (statically_equal(c[0], 1) or statically_equal(c[0], xv.shape[0])):
        return None
    if statically_equal(c[1], 1) and statically_equal(c[2], xv.shape[2]):
        return "bhsd"
    if statically_equal(c[2], 1) and statically_equal(c[1], xv.shape[1]):
        return "bshd"
    return None


def _rotated(r: fx.Node) -> tuple[fx.Node, bool] | None:
    """(x, interleaved) when ``r`` is ``rotate_half(x)`` or ``rotate_every_two(x)``."""
    if is_call(r, aten.cat.default):
        parts = r.args[0]
        if len(parts) != 2 or not _last_dim(r, tensor_meta(r).dim()):
            return None
        slices = _negated_slice_pair(*parts)
        if slices is None:
            return None
        second, lo = slices
        x = lo[0]
        d = tensor_meta(x).shape[-1]
        last = tensor_meta(x).dim() - 1
        if not (isinstance(d, int) and d % 2 == 0):
            return None
        half = d // 2
        if lo[1:] == (last, 0, half, 1) and second[1:] == (last, half, d, 1):
            return x, False
        return None
    if r.target in (*RESHAPE_OPS, aten.flatten.using_ints):
        st = r.args[0]
        if not is_call(st, aten.stack.default) or len(st.args[0]) != 2:
            return None
        sv = tensor_meta(st)
        dim = st.args[1] if len(st.args) > 1 else 0
        if dim % sv.dim() != sv.dim() - 1:
            return None
        slices = _negated_slice_pair(*st.args[0])
        if slices is None:
            return None
        odd, ev = slices
        x = ev[0]
        xv = tensor_meta(x)
        d, last = xv.shape[-1], xv.dim() - 1
        if ev[1:] == (last, 0, d, 2) and odd[1:] == (last, 1, d, 2) and same_shape(tensor_meta(r), tuple(xv.shape)):
            return x, True
    return None


def _negated_slice_pair(neg: Any, other: Any) -> tuple[tuple, tuple] | None:
    """(:func:`_slice` of the input of ``neg``, :func:`_slice` of ``other``) when ``neg`` is
    ``-(a slice)`` and both slice the same tensor: the two halves of a rotation."""
    if not is_call(neg, aten.neg.default):
        return None
    negated, kept = _slice(neg.args[0]), _slice(other)
    if negated is None or kept is None or negated[0] is not kept[0]:
        return None
    return negated, kept


def _rotation_nodes(r: fx.Node) -> list[fx.Node]:
    """The intermediates of a rotate_half / rotate_every_two (for the single-user check)."""
    if is_call(r, aten.cat.default):
        neg, first = r.args[0]
        return [r, neg, neg.args[0], first]
    st = r.args[0]
    neg, even = st.args[0]
    return [r, st, neg, neg.args[0], even]


# ------------------------------------------------------------------------------ pairing
def _pairs(rotations: list[Rotation], ctx) -> list[tuple[Rotation, Rotation]]:
    groups: dict[tuple, list[Rotation]] = collections.defaultdict(list)
    for r in rotations:
        groups[r.key()].append(r)
    pairs = []
    for members in groups.values():
        pending: list[Rotation] = []
        for r in members:  # graph order: q then k of a layer, layer after layer
            partner = next((p for p in pending if _compatible(p, r)), None)
            if partner is None:
                pending.append(r)
            else:
                pending.remove(partner)
                pairs.append((partner, r))
        for r in pending:
            ctx.near_miss(r.out, "rotary embedding without a partner (q without k, or cos/sin not shared); left as is")
    return pairs


def _compatible(a: Rotation, b: Rotation) -> bool:
    av, bv = tensor_meta(a.x), tensor_meta(b.x)
    seq = 2 if a.layout == "bhsd" else 1
    return (
        av.dtype == bv.dtype and av.device == bv.device
        and all(statically_equal(av.shape[d], bv.shape[d]) for d in (0, seq, 3))
    )


# ------------------------------------------------------------------------------ rewrite
def fuse(gm: fx.GraphModule, q: Rotation, k: Rotation, derived: dict) -> str | None:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    inputs = [q.x, k.x] + ([q.freqs] if q.freqs is not None else [q.cos, q.sin])
    anchor = max(inputs, key=order.__getitem__)
    first_use = min((order[u] for r in (q, k) for u in r.out.users), default=len(order))
    if first_use <= order[anchor]:
        return "q or k is used before the other is computed; cannot rotate both in one op"
    if q.freqs is not None:
        cos, sin = _cos_sin_from_freqs(g, q.freqs, derived)
        # The op goes after cos/sin too: they sit right after freqs, so after the anchor
        # when freqs is the anchor (and anchor.next may be one of them).
        order = {n: i for i, n in enumerate(g.nodes)}
        anchor = max([anchor, cos, sin], key=order.__getitem__)
    else:
        cos, sin = q.cos, q.sin
    with g.inserting_before(anchor.next):
        cos3, sin3 = _as_3d(g, cos, q.layout), _as_3d(g, sin, q.layout)
        if q.layout == "bhsd":
            q_in, k_in = q.x, k.x
        else:
            q_in, k_in = (call_with_meta(g, aten.transpose.int, (r.x, 1, 2)) for r in (q, k))
        rope = call_with_meta(g, torch.ops.llmopt.rope.default, (q_in, k_in, cos3, sin3, q.rotary_dim, q.interleaved))
        rope.meta.update({key: v for key, v in q.out.meta.items() if key != "val"})
        outs = []
        for i, r in enumerate((q, k)):
            o = call_with_meta(g, operator.getitem, (rope, i))
            if r.layout == "bshd":
                o = call_with_meta(g, aten.transpose.int, (o, 1, 2))
            outs.append(o)
    for r, o in zip((q, k), outs):
        r.out.replace_all_uses_with(o)
    propagate_layout(g, {q.out: outs[0], k.out: outs[1]})
    return None


def _cos_sin_from_freqs(g: fx.Graph, freqs: fx.Node, derived: dict) -> tuple[fx.Node, fx.Node]:
    """cos/sin per dim for the interleaved rotation, from complex ``freqs`` (once per freqs).

    The nodes go right after ``freqs``, not at the op of the pair that first needs them:
    pairs are fused in pairing order, which need not be graph order (a pair whose
    rotations come first may read tensors computed later than another pair's), and every
    pair that shares ``freqs`` must see them defined.
    """
    if freqs in derived:
        return derived[freqs]
    at = freqs.next
    while at.op == "placeholder":  # keep the placeholders first
        at = at.next
    with g.inserting_before(at):
        real = call_with_meta(g, aten.view_as_real.default, (freqs,))
        out = []
        for part in (0, 1):
            half = call_with_meta(g, aten.select.int, (real, -1, part))
            pair = call_with_meta(g, aten.stack.default, ([half, half], -1))  # repeat_interleave(·, 2, -1)
            out.append(call_with_meta(g, aten.flatten.using_ints, (pair, -2, -1)))
    derived[freqs] = (out[0], out[1])
    return derived[freqs]


def _as_3d(g: fx.Graph, c: fx.Node, layout: str) -> fx.Node:
    """cos/sin as the op takes them, ``[B|1, S, rd]``: drop the broadcast head dim."""
    cv = tensor_meta(c)
    head = 1 if layout == "bhsd" else 2
    if cv.dim() == 4 and c.target == aten.unsqueeze.default and c.args[1] % 4 == head:
        src = tensor_meta(c.args[0])
        if src is not None and src.dim() == 3:
            return c.args[0]
    while cv.dim() < 4:
        c = call_with_meta(g, aten.unsqueeze.default, (c, 0))
        cv = tensor_meta(c)
    return call_with_meta(g, aten.squeeze.dim, (c, head))


# ------------------------------------------------------------------------------ helpers


def _unsqueezed(node: fx.Node) -> fx.Node:
    while is_call(node, aten.unsqueeze.default):
        node = node.args[0]
    return node


def _operand_orders(mul: fx.Node):
    a, b = mul.args[:2]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        yield a, b
        yield b, a


def _slice(node: Any) -> tuple | None:
    """(src, dim, start, end, step) of ``aten.slice``, dim normalized, end clipped."""
    if not is_call(node, aten.slice.Tensor):
        return None
    src = node.args[0]
    sv = tensor_meta(src)
    if sv is None:
        return None
    dim = (node.args[1] if len(node.args) > 1 else 0) % sv.dim()
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    size = sv.shape[dim]
    if start is None:
        start = 0
    if not (isinstance(start, int) and isinstance(step, int) and isinstance(size, int)):
        return None
    if end is None or (isinstance(end, int) and end >= size):
        end = size
    if not isinstance(end, int) or start < 0 or end < 0:
        return None
    return src, dim, start, end, step


def _last_dim(node: fx.Node, ndim: int) -> bool:
    dim = node.args[1] if len(node.args) > 1 else 0
    return isinstance(dim, int) and dim % ndim == ndim - 1
