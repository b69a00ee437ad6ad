"""Explicit ("eager") attention, matched around its softmax.

The spelling (Hugging Face ``eager_attention_forward``, GPT-2, Gemma 2, gpt-fast)::

    s = q @ k.transpose(-1, -2)          # ATen: view/_unsafe_view + bmm + view
    s = s * scale                        # mul/div by constants, any number of them
    s = softcap * tanh(s / softcap)      # optional (Gemma 2)
    s = s + mask                         # and/or where(cond, s, fill) / masked_fill(~cond, fill)
    p = softmax(s, -1)                   # possibly in fp32 between two casts
    out = p @ v                          # ATen: view + bmm + view to [B, H, Sq, D]

It is matched from the softmax backwards to the first bmm and forwards to the second;
every intermediate must have no other user (attention weights returned to the caller
leave the attention alone, with a near-miss). K/V repeats are looked through by
:mod:`.operands`, the mask terms are proven by :class:`~.masks.MaskAnalysis`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ...graph import RESHAPE_OPS, is_cast, same_shape, single_user, tensor_meta
from .emit import Lowering
from .masks import MaskAnalysis
from .operands import check_qkv, scalar_value, score_shape, source_4d, strip_clones, unrepeat_pair, untranspose

aten = torch.ops.aten

SOFTMAX_OPS = (aten._softmax.default, aten.softmax.int)


def match_eager(gm: fx.GraphModule, softmax: fx.Node, analysis: MaskAnalysis) -> Lowering | str | None:
    """Match ``matmul → scale → (softcap) → mask → softmax → matmul`` around ``softmax``.

    Returns None when the softmax is not attention at all (no score matmul behind it).
    """
    sv = tensor_meta(softmax)
    if sv is None or sv.dim() != 4:
        return None
    dim = softmax.args[1]
    if dim not in (-1, 3):
        return None
    scores = _walk_scores(softmax.args[0], sv)
    if scores is None:
        return None
    if isinstance(scores, str):
        return scores
    root, scale, softcap, mask_terms, chain = scores
    bmm1 = root.args[0]
    b, h, sq, skv = sv.shape
    a3, kt3 = bmm1.args[:2]
    av = tensor_meta(a3)
    d = av.shape[-1]
    q = source_4d(a3, (b, h, sq, d))
    kt = source_4d(kt3, (b, h, d, skv))
    if q is None or kt is None:
        return "score matmul operands are not [B, H, S, D] tensors reshaped for bmm"
    q = strip_clones(q)
    k_full = untranspose(kt)
    if k_full is None:
        return "key operand of the score matmul is not a transposed [B, H, S, D] tensor"

    # Every intermediate from the score matmul to the softmax is the attention's alone.
    for n in chain + [root, bmm1, softmax]:
        if len(n.users) != 1:
            user = next(u for u in n.users)
            return f"attention intermediate {n.name} has {len(n.users)} users (e.g. {user.name}); left alone"
    found = _probabilities_times_v(softmax, (b, h, sq, skv))
    if isinstance(found, str):
        return found
    v, out = found
    pair = unrepeat_pair(k_full, strip_clones(v))
    if isinstance(pair, str):
        return pair
    k_base, v_base, removed = pair
    qv, kv, vv = tensor_meta(q), tensor_meta(k_base), tensor_meta(v_base)
    reason = check_qkv(qv, kv, vv)
    if reason:
        return reason
    if tensor_meta(out).dtype != qv.dtype:
        return f"attention output dtype {tensor_meta(out).dtype} differs from q's {qv.dtype}"
    plan = analysis.combine_eager(mask_terms, score_shape(qv, kv))
    if isinstance(plan, str):
        return plan
    return Lowering("eager attention", q, k_base, v_base, scale, plan, out, softcap=softcap, repeats_removed=removed)


def _probabilities_times_v(softmax: fx.Node, scores_shape: tuple) -> tuple[fx.Node, fx.Node] | str:
    """``(v, out)`` for the product of the probabilities with V, or a near-miss reason::

        p = softmax(s, -1).to(q.dtype)        # the cast is optional
        out = p @ v                           # ATen: view/clone + bmm + view to [B, H, Sq, Dv]
    """
    b, h, sq, skv = scores_shape
    p = single_user(softmax, lambda u: is_cast(u, floating=True)) or softmax
    if len(p.users) != 1:
        return f"attention probabilities {p.name} have {len(p.users)} users (e.g. returned as attention weights); left alone"
    p3 = p
    while True:
        nxt = single_user(p3, lambda u: u.target in RESHAPE_OPS or u.target == aten.clone.default)
        if nxt is None:
            break
        p3 = nxt
    if len(p3.users) != 1:
        # e.g. a clone of the probabilities that the module also returns (output_attentions)
        return f"attention probabilities {p3.name} have {len(p3.users)} users (e.g. returned as attention weights); left alone"
    bmm2 = single_user(p3, lambda u: u.target == aten.bmm.default and u.args[0] is p3)
    if bmm2 is None:
        return "softmax output does not feed a matmul with V"
    v3 = bmm2.args[1]
    dv = tensor_meta(v3).shape[-1]
    v = source_4d(v3, (b, h, skv, dv))
    if v is None:
        return "value operand of the output matmul is not a [B, H, S, D] tensor reshaped for bmm"
    out = bmm2
    while True:
        nxt = single_user(out, lambda u: u.target in RESHAPE_OPS)
        if nxt is None:
            return "output of the attention matmul is not reshaped back to [B, H, S, D]"
        out = nxt
        ov = tensor_meta(out)
        if ov is not None and ov.dim() == 4:
            break
    if not same_shape(tensor_meta(out), (b, h, sq, dv)):
        return "output of the attention matmul is not [B, H, Sq, D]"
    return v, out


@dataclass
class _Scores:
    """What the walk back from the softmax has read so far."""

    sv: Any  # the softmax's fake value: the scores' shape
    chain: list = field(default_factory=list)  # the nodes walked through (single-user checked)
    masks: list = field(default_factory=list)  # ("add", mask) / ("where", cond, fill), last applied first
    scale: float = 1.0
    softcap: float = 0.0
    stage: int = 0  # 0: mask terms allowed; 1: soft-capping seen; 2: scaling seen
    reach: dict = field(default_factory=dict)  # memo of _reaches_scores


def _walk_scores(node: fx.Node, sv) -> tuple | str | None:
    """From the softmax input back to ``view(bmm(q, k^T))``: collects scale, softcap and the
    mask terms (in the order they are applied). None when no score matmul is reached.

    Each op on the way is read by the step for its spelling (``_STEPS``): a step returns
    the node the scores came from, None when this is not attention, or a near-miss reason.
    """
    w = _Scores(sv)
    for _ in range(32):
        if _is_scores_root(node, sv):
            w.masks.reverse()
            return node, w.scale, w.softcap, w.masks, w.chain
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        step = _STEPS.get(node.target)
        if step is None:
            return None
        w.chain.append(node)
        node = step(node, w)
        if node is None or isinstance(node, str):
            return node
    return None


def _cast_step(node: fx.Node, w: _Scores):
    """``s = s.float()`` / ``s.to(dtype)``: a floating cast (softmax computed in fp32)."""
    return node.args[0] if is_cast(node, floating=True) else None


def _add_mask_step(node: fx.Node, w: _Scores):
    """``s = s + mask`` (an additive mask; either operand order)."""
    a, b = node.args[:2]
    if node.kwargs.get("alpha", 1) != 1:
        return None
    side, other = _scores_side(a, b, w.sv, w.reach)
    if side is None:
        return None
    if w.stage:
        return "a mask is added before the scaling or soft-capping of the scores"
    w.masks.append(("add", other))
    return side


def _where_step(node: fx.Node, w: _Scores):
    """``s = torch.where(cond, s, fill)`` (or ``where(cond, fill, s)``: attend where not cond)."""
    cond, a, b = node.args[:3]
    side, fill = _scores_and_scalar(a, b, w)
    if side is None:
        return None
    if fill is None:
        return "where() fills masked scores with a tensor, not a scalar"
    if w.stage:
        return "a mask is applied before the scaling or soft-capping of the scores"
    w.masks.append(("where", ("node", cond) if side is a else ("not", cond), fill))
    return side


def _masked_fill_step(node: fx.Node, w: _Scores):
    """``s = s.masked_fill(masked, fill)``: attend where not ``masked``."""
    s, m, value = node.args[:3]
    fill = scalar_value(value)
    if fill is None or not _reaches_scores(s, w.sv, w.reach):
        return None
    if w.stage:
        return "a mask is applied before the scaling or soft-capping of the scores"
    w.masks.append(("where", ("not", m), fill))
    return s


def _scale_step(node: fx.Node, w: _Scores):
    """``s = s * scale`` / ``s = s / sqrt(d)`` by constants, or the outer product of
    soft-capping, ``s = softcap * tanh(s / softcap)`` (Gemma 2)."""
    t = node.target
    a, b = node.args[:2]
    if t in _DIVS:
        side, c = a, scalar_value(b)
        if not _reaches_scores(a, w.sv, w.reach):
            return None
    else:
        side, c = _scores_and_scalar(a, b, w)
        if side is None:
            return None
    if c is None:
        return "scores are scaled by a tensor, not a constant"
    capped = _softcap_input(side, c) if t in _MULS else None
    if capped is not None:
        if w.stage:
            return "soft-capping after scaling twice or in an unexpected order"
        w.chain.extend([side, side.args[0]])
        w.softcap, w.stage = float(c), 1
        return capped
    w.scale = w.scale * c if t in _MULS else w.scale / c
    w.stage = 2
    return side


def _scores_and_scalar(a: Any, b: Any, w: _Scores) -> tuple[Any, float | None]:
    """(the operand the scores come from, the other one's scalar value or None), or
    (None, None) when not exactly one operand comes from the scores."""
    side, other = _scores_side(a, b, w.sv, w.reach)
    return (None, None) if side is None else (side, scalar_value(other))


_MULS = (aten.mul.Tensor, aten.mul.Scalar)
_DIVS = (aten.div.Tensor, aten.div.Scalar)
_STEPS = {
    aten._to_copy.default: _cast_step,
    aten.add.Tensor: _add_mask_step,
    aten.where.self: _where_step,
    aten.masked_fill.Scalar: _masked_fill_step,
    aten.masked_fill.Tensor: _masked_fill_step,
    **dict.fromkeys(_MULS + _DIVS, _scale_step),
}


def _softcap_input(node: fx.Node, c: float) -> fx.Node | None:
    """``x`` when ``node`` is ``tanh(x / c)`` (Gemma 2's soft-capping is ``c * tanh(s / c)``)."""
    if not isinstance(node, fx.Node) or node.target != aten.tanh.default:
        return None
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or inner.target not in (aten.div.Tensor, aten.div.Scalar):
        return None
    cap = scalar_value(inner.args[1])
    if cap is None or cap != c or c <= 0:
        return None
    return inner.args[0]


def _is_scores_root(node: Any, sv) -> bool:
    """``view(bmm(a, b), [B, H, Sq, Skv])`` with the softmax's shape."""
    if not isinstance(node, fx.Node) or node.target not in RESHAPE_OPS:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.target != aten.bmm.default:
        return False
    return same_shape(tensor_meta(node), tuple(sv.shape))


_SCORE_OPS = {
    aten._to_copy.default, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
    aten.div.Scalar, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tanh.default,
}


def _reaches_scores(node: Any, sv, memo: dict, depth: int = 0) -> bool:
    if not isinstance(node, fx.Node) or depth > 12:
        return False
    if node in memo:
        return memo[node]
    if _is_scores_root(node, sv):
        memo[node] = True
        return True
    ok = node.op == "call_function" and node.target in _SCORE_OPS and any(
        _reaches_scores(a, sv, memo, depth + 1) for a in node.args if isinstance(a, fx.Node)
    )
    memo[node] = ok
    return ok


def _scores_side(a: Any, b: Any, sv, memo: dict):
    ra, rb = _reaches_scores(a, sv, memo), _reaches_scores(b, sv, memo)
    if ra and not rb:
        return a, b
    if rb and not ra:
        return b, a
    return None, None
