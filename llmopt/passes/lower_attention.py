"""lower_attention: every spelling of attention becomes one ``llmopt.attention_prefill`` op.

The function it replaces, for each batch ``b``, query head ``h`` and query row ``i``::

    def attention(q, k, v, mask, scale, softcap):      # q [B,Hq,Sq,D], k/v [B,Hkv,Skv,D]
        k, v = repeat_kv(k, Hq // Hkv), repeat_kv(v, Hq // Hkv)
        s = (q @ k.transpose(-1, -2)) * scale
        if softcap: s = softcap * tanh(s / softcap)
        s = s + mask                                     # or where(cond, s, fill) / masked_fill
        return softmax(s, -1) @ v

Spellings recognized (after ``normalize``):

- SDPA as ATen lowers it: ``_scaled_dot_product_flash_attention_for_cpu`` (CPU),
  ``_scaled_dot_product_{efficient,flash,cudnn}_attention`` (CUDA) and
  ``scaled_dot_product_attention`` — matched through their schemas (argument names), so
  ``is_causal``, ``attn_mask``/``attn_bias``, ``scale`` (None → 1/sqrt(D)) and GQA heads
  are read the same way for all. Their extra outputs (logsumexp, philox state) must be
  unused.
- Explicit ("eager") attention: ``matmul(q, k^T)`` (in ATen: view/_unsafe_view + bmm +
  view) → mul/div by constants → optional soft-capping (div, tanh, mul) → ``+ mask`` and/or
  ``where(cond, s, fill)`` / ``masked_fill`` → ``_softmax`` (possibly in fp32 between two
  casts) → ``matmul(p, v)``. Matched from the softmax, backwards to the first bmm and
  forwards to the second; every intermediate must have no other user (attention weights
  returned to the caller leave the attention alone, with a near-miss).
- GQA/MQA: ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D)``),
  ``repeat_interleave(n, dim=1)`` (same ATen), and K/V broadcast over heads by ``matmul``
  (``expand`` of a 1-head tensor) are removed: the op gets the un-repeated K/V and reads
  the shared head (query head ``h`` uses KV head ``h // n``, which is exactly what the
  repeat computed). No copy of K/V is left.

Masks. The pass never assumes causality; it *proves* what it drops:

- The mask condition is split into its AND factors (``bitwise_and``/``logical_and``,
  broadcast ``expand`` looked through). Factors that depend only on constants (``arange``
  comparisons of Hugging Face ``masking_utils``, a frozen ``tril`` buffer sliced as in
  GPT-2's ``bias[:, :, k-q:k, :k]``) are *evaluated* with real tensors at compile time and
  the result is compared element by element with the kernel's own position rule
  ``j <= i + off`` (``off`` becomes ``q_offsets`` when not 0) and ``i + off - j < window``;
  an all-true factor disappears. Factors that depend on graph inputs (a padding
  ``attention_mask``, a static cache's mask) stay a mask passed to the kernel.
- "Hard" masks (bool, ``where(cond, 0, -inf)``, ``masked_fill(-inf)``) keep exact
  semantics with any split, so proven factors become ``causal``/``window`` and the rest
  a bool mask. "Soft" masks (a finite fill such as ``finfo.min``, as HF eager uses) give
  a row whose keys are all masked a uniform softmax; the pass drops one only when no
  factor depends on inputs and every row provably keeps a key, else it passes the
  additive mask as is (correct; the kernel treats finite values as a bias).
- Any other additive float mask is passed through unchanged.

The op returns a contiguous ``[B, Hq, Sq, D]`` tensor. SDPA's output on CPU is laid out as
``[B, Sq, Hq, D]`` and Hugging Face then does ``transpose(1, 2).view(B, Sq, -1)``, which the
new strides make impossible: :func:`propagate_layout` re-derives the metadata downstream
and puts one copy in front of such a view (for decode, ``Sq == 1``, both layouts coincide
and no copy is needed).

Sources: the attention of Vaswani et al. 2017; the graph forms are those of PyTorch's
SDPA decompositions and Hugging Face transformers' ``sdpa_attention_forward``,
``eager_attention_forward``, ``repeat_kv`` and ``masking_utils``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import compat
from ..codegen import attention_prefill as _attention_prefill  # noqa: F401  registers llmopt::attention_prefill
from ..graph import add_constant, constant_value, real_tensors, tensor_meta

aten = torch.ops.aten


def _overloads(*names: str) -> tuple:
    """``aten.<name>.default`` for the names this torch version has."""
    out = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            out.append(packet.default)
    return tuple(out)


SDPA_OPS = _overloads(
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention",
)
SOFTMAX_OPS = (aten._softmax.default, aten.softmax.int)
RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
AND_OPS = (aten.bitwise_and.Tensor, aten.logical_and.default)
NOT_OPS = (aten.bitwise_not.default, aten.logical_not.default)
# A constant mask is evaluated at compile time only up to this many elements.
MAX_CONSTANT_NUMEL = 1 << 22


def run(gm: fx.GraphModule, ctx) -> int:
    analysis = MaskAnalysis(gm)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            lowering = match_sdpa(gm, node, analysis)
        elif node.target in SOFTMAX_OPS:
            lowering = match_eager(gm, node, analysis)
        else:
            continue
        if lowering is None:
            continue
        if isinstance(lowering, str):
            ctx.near_miss(node, lowering)
            continue
        reason = emit(gm, lowering)
        if reason:
            ctx.near_miss(node, reason)
            continue
        ctx.rewrite(lowering.replace, lowering.describe())
        count += 1
    # The replaced chains (and repeat_kv copies nobody else reads) are now dead.
    gm.graph.eliminate_dead_code()
    return count


# ------------------------------------------------------------------------------ the plan
@dataclass
class MaskPlan:
    """How the kernel's mask arguments are built from the graph's mask.

    ``expr`` is a small tree over existing nodes, materialized only when the rewrite is
    emitted: ``("node", n)``, ``("not", n)``, ``("and", [expr, ...])``,
    ``("where_float", cond_expr, fill)`` (an additive mask: 0 where ``cond``, ``fill``
    elsewhere) or ``("where_bias", cond_expr, bias_node, fill)``.
    """

    expr: Any = None
    causal: bool = False
    window: int = 0
    q_offset: int = 0
    what: str = "no mask"


@dataclass
class Lowering:
    spelling: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    mask: MaskPlan
    replace: fx.Node  # the node whose value the op's output becomes
    softcap: float = 0.0
    repeats_removed: int = 1

    def describe(self) -> str:
        parts = [f"{self.spelling} → llmopt.attention_prefill", f"scale={self.scale:.6g}", self.mask.what]
        if self.mask.q_offset:
            parts.append(f"q_offset={self.mask.q_offset}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        hq, hkv = tensor_meta(self.q).shape[1], tensor_meta(self.k).shape[1]
        if hq != hkv:
            parts.append(f"GQA {hq}/{hkv} heads" + (" (repeat removed)" if self.repeats_removed != 1 else ""))
        return ", ".join(parts)


# ------------------------------------------------------------------------------ SDPA
def _bind(node: fx.Node) -> dict:
    """Arguments of an ATen call by schema name (defaults filled in)."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def match_sdpa(gm: fx.GraphModule, node: fx.Node, analysis: "MaskAnalysis") -> Lowering | str | None:
    args = _bind(node)
    q, k, v = args["query"], args["key"], args["value"]
    qv, kv, vv = tensor_meta(q), tensor_meta(k), tensor_meta(v)
    if qv is None or kv is None or vv is None:
        return "q/k/v have no tensor metadata"
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return f"attention on {qv.dim()}-D tensors (the op takes [B, H, S, D])"
    if args.get("dropout_p") not in (0.0, 0, None):
        return f"dropout_p={args['dropout_p']} (training-mode attention)"
    # Tuple-returning variants: only output 0 may be used.
    if isinstance(node.meta.get("val"), (tuple, list)):
        replace = None
        for user in node.users:
            if user.target is not operator.getitem:
                return f"output used by {user.name} as a tuple"
            if user.args[1] == 0:
                replace = user
            elif user.users:
                return f"output {user.args[1]} of {node.target.__name__} (logsumexp/RNG state) is used"
        if replace is None:
            return None
    else:
        replace = node
    reason = _check_qkv(qv, kv, vv)
    if reason:
        return reason
    scale = args.get("scale")
    if scale is None:
        if not isinstance(qv.shape[-1], int):
            return "symbolic head dim: the default scale 1/sqrt(D) is not a compile-time constant"
        scale = 1.0 / math.sqrt(qv.shape[-1])
    if not isinstance(scale, (int, float)):
        return f"scale {scale} is not a compile-time constant"
    causal = bool(args.get("is_causal") or False)
    raw_mask = args.get("attn_mask", args.get("attn_bias"))
    target = _score_shape(qv, kv)
    if raw_mask is None:
        plan = MaskPlan(causal=causal, what="is_causal" if causal else "no mask")
    elif causal:
        # Both a mask and is_causal: the mask is passed through with the flag.
        plan = MaskPlan(expr=("node", raw_mask), causal=True, what="mask: passed through with is_causal")
    else:
        plan = analysis.additive_or_bool(raw_mask, target)
        if isinstance(plan, str):
            return plan
    pair = _unrepeat_pair(k, v)
    if isinstance(pair, str):
        return pair
    k_base, v_base, removed = pair
    name = node.target.__name__.split(".")[0]
    return Lowering(f"sdpa ({name})", q, k_base, v_base, float(scale), plan, replace, repeats_removed=removed)


# ------------------------------------------------------------------------------ eager
def match_eager(gm: fx.GraphModule, softmax: fx.Node, analysis: "MaskAnalysis") -> Lowering | str | None:
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
    q = _source_4d(a3, (b, h, sq, d))
    kt = _source_4d(kt3, (b, h, d, skv))
    if q is None or kt is None:
        return "score matmul operands are not [B, H, S, D] tensors reshaped for bmm"
    q = _strip_clones(q)
    k_full = _untranspose(kt)
    if k_full is None:
        return "key operand of the score matmul is not a transposed [B, H, S, D] tensor"

    # Forwards: softmax → (cast) → reshape → bmm(p, v) → reshape to [B, H, Sq, Dv].
    for n in chain + [root, bmm1, softmax]:
        if len(n.users) != 1:
            user = next(u for u in n.users)
            return f"attention intermediate {n.name} has {len(n.users)} users (e.g. {user.name}); left alone"
    p = softmax
    p = _single_user(p, lambda u: u.target == aten._to_copy.default and _is_cast(u)) or p
    if len(p.users) != 1:
        return f"attention probabilities {p.name} have {len(p.users)} users (e.g. returned as attention weights); left alone"
    p3 = p
    while True:
        nxt = _single_user(p3, lambda u: u.target in RESHAPES or u.target == aten.clone.default)
        if nxt is None:
            break
        p3 = nxt
    if len(p3.users) != 1:
        # e.g. a clone of the probabilities that the module also returns (output_attentions)
        return f"attention probabilities {p3.name} have {len(p3.users)} users (e.g. returned as attention weights); left alone"
    bmm2 = _single_user(p3, lambda u: u.target == aten.bmm.default and u.args[0] is p3)
    if bmm2 is None:
        return "softmax output does not feed a matmul with V"
    v3 = bmm2.args[1]
    v3v = tensor_meta(v3)
    dv = v3v.shape[-1]
    v = _source_4d(v3, (b, h, skv, dv))
    if v is None:
        return "value operand of the output matmul is not a [B, H, S, D] tensor reshaped for bmm"
    out = bmm2
    while True:
        nxt = _single_user(out, lambda u: u.target in RESHAPES)
        if nxt is None:
            return "output of the attention matmul is not reshaped back to [B, H, S, D]"
        out = nxt
        ov = tensor_meta(out)
        if ov is not None and ov.dim() == 4:
            break
    if not _same_shape(tensor_meta(out), (b, h, sq, dv)):
        return "output of the attention matmul is not [B, H, Sq, D]"

    pair = _unrepeat_pair(k_full, _strip_clones(v))
    if isinstance(pair, str):
        return pair
    k_base, v_base, removed = pair
    qv, kv, vv = tensor_meta(q), tensor_meta(k_base), tensor_meta(v_base)
    reason = _check_qkv(qv, kv, vv)
    if reason:
        return reason
    if tensor_meta(out).dtype != qv.dtype:
        return f"attention output dtype {tensor_meta(out).dtype} differs from q's {qv.dtype}"
    plan = analysis.combine_eager(mask_terms, _score_shape(qv, kv))
    if isinstance(plan, str):
        return plan
    return Lowering("eager attention", q, k_base, v_base, scale, plan, out, softcap=softcap, repeats_removed=removed)


def _walk_scores(node: fx.Node, sv) -> tuple | str | None:
    """From the softmax input back to ``view(bmm(q, k^T))``: collects scale, softcap and the
    mask terms (in the order they are applied). None when no score matmul is reached."""
    chain: list[fx.Node] = []
    masks: list[tuple] = []
    scale, softcap = 1.0, 0.0
    stage = 0  # 0: mask terms allowed; 1: soft-capping seen; 2: scaling seen
    reach: dict = {}
    for _ in range(32):
        if _is_scores_root(node, sv):
            masks.reverse()
            return node, scale, softcap, masks, chain
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        chain.append(node)
        t = node.target
        if t == aten._to_copy.default and _is_cast(node):
            node = node.args[0]
            continue
        if t == aten.add.Tensor:
            a, b = node.args[:2]
            if node.kwargs.get("alpha", 1) != 1:
                return None
            side, other = _scores_side(a, b, sv, reach)
            if side is None:
                return None
            if stage:
                return "a mask is added before the scaling or soft-capping of the scores"
            masks.append(("add", other))
            node = side
            continue
        if t == aten.where.self:
            cond, a, b = node.args[:3]
            side, other = _scores_side(a, b, sv, reach)
            if side is None:
                return None
            fill = _scalar(other)
            if fill is None:
                return "where() fills masked scores with a tensor, not a scalar"
            if stage:
                return "a mask is applied before the scaling or soft-capping of the scores"
            masks.append(("where", ("node", cond) if side is a else ("not", cond), fill))
            node = side
            continue
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            s, m, value = node.args[:3]
            fill = _scalar(value)
            if fill is None or not _reaches_scores(s, sv, reach):
                return None
            if stage:
                return "a mask is applied before the scaling or soft-capping of the scores"
            masks.append(("where", ("not", m), fill))
            node = s
            continue
        if t in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
            a, b = node.args[:2]
            if t in (aten.div.Tensor, aten.div.Scalar):
                side, c = a, _scalar(b)
                if not _reaches_scores(a, sv, reach):
                    return None
            else:
                side, other = _scores_side(a, b, sv, reach)
                if side is None:
                    return None
                c = _scalar(other)
            if c is None:
                return "scores are scaled by a tensor, not a constant"
            capped = _softcap_input(side, c, t) if t in (aten.mul.Tensor, aten.mul.Scalar) else None
            if capped is not None:
                if stage:
                    return "soft-capping after scaling twice or in an unexpected order"
                chain.extend([side, side.args[0]])
                softcap, stage, node = float(c), 1, capped
                continue
            scale = scale * c if t in (aten.mul.Tensor, aten.mul.Scalar) else scale / c
            stage, node = 2, side
            continue
        return None
    return None


def _softcap_input(node: fx.Node, c: float, _t) -> fx.Node | None:
    """``x`` when ``node`` is ``tanh(x / c)`` (Gemma 2's soft-capping is ``c * tanh(s / c)``)."""
    if not isinstance(node, fx.Node) or node.target != aten.tanh.default:
        return None
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or inner.target not in (aten.div.Tensor, aten.div.Scalar):
        return None
    cap = _scalar(inner.args[1])
    if cap is None or cap != c or c <= 0:
        return None
    return inner.args[0]


def _is_scores_root(node: Any, sv) -> bool:
    """``view(bmm(a, b), [B, H, Sq, Skv])`` with the softmax's shape."""
    if not isinstance(node, fx.Node) or node.target not in RESHAPES:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.target != aten.bmm.default:
        return False
    return _same_shape(tensor_meta(node), tuple(sv.shape))


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


# ------------------------------------------------------------------------------ operands
def _source_4d(node: Any, shape: tuple) -> fx.Node | None:
    """The 4-D tensor of ``shape`` that ``node`` is a row-major reshape of (through
    view/_unsafe_view/reshape/contiguous clone), or None."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        v = tensor_meta(node)
        if v is not None and v.dim() == 4 and _same_shape(v, shape):
            return node
        if node.target in RESHAPES or (node.target == aten.clone.default and _plain_clone(node)):
            node = node.args[0]
            continue
        return None
    return None


def _plain_clone(node: fx.Node) -> bool:
    return set(node.kwargs) <= {"memory_format"} and node.kwargs.get("memory_format") in (None, torch.contiguous_format)


def _strip_clones(node: fx.Node) -> fx.Node:
    while node.target == aten.clone.default and _plain_clone(node):
        node = node.args[0]
    return node


def _untranspose(node: fx.Node) -> fx.Node | None:
    """``k`` for ``k.transpose(-1, -2)`` (optionally broadcast over heads by expand)."""
    node = _strip_clones(node)
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
    if not (_eq(kv.shape[0], ev.shape[0]) and _eq(kv.shape[1], 1)):
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
    node = _strip_clones(node)
    if node.target == aten.expand.default:
        base, v, bv = node.args[0], tensor_meta(node), tensor_meta(node.args[0])
        if bv.dim() == 4 and _eq(bv.shape[1], 1) and all(_eq(a, c) for i, (a, c) in enumerate(zip(bv.shape, v.shape)) if i != 1):
            return base, v.shape[1]
        return node, 1
    if node.target not in RESHAPES:
        return node, 1
    src = _strip_clones(node.args[0])
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
    if not (_same_shape(e5, (bsz, hkv, n, s, d)) and _same_shape(out, (bsz, hkv * n, s, d))):
        return node, 1
    return base, n


def _unrepeat_pair(k, v) -> tuple[fx.Node, fx.Node, int] | str:
    """Un-repeated (K, V) and the repeat factor removed; both or neither are un-repeated,
    since the op needs K and V of one shape."""
    kb, kn = _unrepeat(k)
    vb, vn = _unrepeat(v)
    if kn == vn and _same_shape(tensor_meta(kb), tuple(tensor_meta(vb).shape)):
        return kb, vb, (kn if isinstance(kn, int) else 1)
    if isinstance(k, _Broadcast) or isinstance(v, _Broadcast):
        return "K and V are broadcast over heads differently"
    return k, v, 1


def _check_qkv(qv, kv, vv) -> str | None:
    if qv is None or kv is None or vv is None:
        return "q/k/v have no tensor metadata"
    if not qv.is_floating_point() or qv.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"attention in {qv.dtype}"
    if kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return f"q/k/v dtypes differ ({qv.dtype}, {kv.dtype}, {vv.dtype})"
    if kv.dim() != 4 or vv.dim() != 4:
        return "k/v are not 4-D"
    if not _same_shape(kv, tuple(vv.shape)):
        return f"k {tuple(kv.shape)} and v {tuple(vv.shape)} differ (the op needs equal K and V shapes)"
    if not (_eq(qv.shape[0], kv.shape[0]) and _eq(qv.shape[3], kv.shape[3])):
        return f"q {tuple(qv.shape)} and k {tuple(kv.shape)} disagree on batch or head dim"
    hq, hkv = qv.shape[1], kv.shape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int)):
        return f"symbolic head counts ({hq} query, {hkv} KV heads): the GQA grouping is not static"
    if hkv == 0 or hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} KV heads"
    if qv.device != kv.device or qv.device != vv.device:
        return "q/k/v on different devices"
    return None


def _score_shape(qv, kv) -> tuple:
    return (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])


# ------------------------------------------------------------------------------ masks
class MaskAnalysis:
    """Proves what a mask means; evaluations of constant mask subgraphs are cached (every
    layer of a model usually shares one mask)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._values: dict[fx.Node, torch.Tensor | None] = {}

    # -- entry points -------------------------------------------------------------------
    def additive_or_bool(self, mask: fx.Node, target: tuple) -> MaskPlan | str:
        """A mask given to SDPA or added to the scores: bool (True = attend) or float."""
        mv = tensor_meta(mask)
        if mv is None:
            return "mask has no tensor metadata"
        if not _broadcastable(mv, target):
            return f"mask {tuple(mv.shape)} does not broadcast to the scores {list(target)}"
        if mv.dtype == torch.bool:
            return self.condition(("node", mask), target, hard=True, original=("node", mask))
        if not mv.is_floating_point():
            return f"mask of dtype {mv.dtype}"
        value = self.constant(mask)
        if value is not None:
            with real_tensors():
                return self._constant_additive(mask, value, target)
        source = _strip_broadcast(mask)
        if source.target == aten.where.self:
            cond, a, b = source.args[:3]
            zero, fill = _scalar(a), _scalar(b)
            if zero == 0.0 and fill is not None and fill < 0:
                return self.condition(("node", cond), target, hard=fill == -math.inf, original=("node", mask), fill=fill)
        return MaskPlan(expr=("node", mask), what="mask: additive, passed through")

    def combine_eager(self, terms: list[tuple], target: tuple) -> MaskPlan | str:
        if not terms:
            return MaskPlan()
        if len(terms) == 1 and terms[0][0] == "add":
            return self.additive_or_bool(terms[0][1], target)
        if len(terms) == 1:
            _, cond, fill = terms[0]
            if fill >= 0 or math.isnan(fill):
                return f"masked scores are filled with {fill}, not a large negative value"
            original = ("where_float", cond, fill)
            return self.condition(cond, target, hard=fill == -math.inf, original=original, fill=fill)
        if len(terms) == 2 and terms[0][0] == "where" and terms[1][0] == "add":
            # GPT-2 (pre-masking_utils): where(causal_buffer, s, min) + attention_mask.
            _, cond, fill = terms[0]
            bias = terms[1][1]
            bv = tensor_meta(bias)
            if bv is None or not bv.is_floating_point() or not _broadcastable(bv, target):
                return "additive mask after where() is not a broadcastable float tensor"
            if fill >= 0 or math.isnan(fill):
                return f"masked scores are filled with {fill}, not a large negative value"
            plan = self.condition(cond, target, hard=True, original=("where_bias", cond, bias, fill), fill=fill)
            if isinstance(plan, str):
                return plan
            if plan.expr is None:
                plan.expr, plan.what = ("node", bias), plan.what + ", additive mask kept"
                return plan
            # Not fully proven: one float mask, the bias where attended, the fill elsewhere.
            return MaskPlan(expr=("where_bias", cond, bias, fill), what="mask: condition and additive mask combined")
        return "unsupported combination of masking operations"

    def condition(self, cond: tuple, target: tuple, hard: bool, original: tuple, fill: float = -math.inf) -> MaskPlan | str:
        """Plan for "attend where ``cond``" (the rest masked with ``fill``).

        hard: masked keys are excluded exactly (bool / -inf), so the condition may be split
        into proven position rules and a remaining bool mask. Otherwise (a finite fill) the
        mask is dropped only when it is entirely a position rule that leaves every row a key.
        """
        factors = self._factors(cond)
        constant: torch.Tensor | None = None
        opaque: list[tuple] = []
        pattern = None
        with real_tensors():
            for f in factors:
                value = self._value(f)
                if value is None:
                    opaque.append(f)
                else:
                    constant = value if constant is None else constant & value
            if constant is not None:
                pattern = _fit_positions(constant, target)
        if constant is not None:
            if pattern is None:  # a constant that is no position rule stays in the mask
                if not hard:
                    return self._passthrough(original)
                return MaskPlan(expr=_conjunction(factors), what="mask: bool (constant, not a position rule)")
        plan, notes = MaskPlan(), []
        if pattern is not None and pattern[0] == "causal":
            _, off, window, nonempty = pattern
            if (not hard and (opaque or not nonempty)) or (off and not isinstance(target[0], int)):
                return self._passthrough(original)
            plan.causal, plan.q_offset, plan.window = True, off, window
            notes.append(_position_rule_text(off, window, target))
        elif pattern is not None:
            notes.append("constant all-true part dropped")
        if opaque:
            if not hard:
                return self._passthrough(original)
            plan.expr = _conjunction(opaque)
            notes.append("bool mask" + (" for the input-dependent part" if pattern is not None else ""))
        plan.what = "mask: " + ", ".join(notes)
        return plan

    def _constant_additive(self, mask: fx.Node, value: torch.Tensor, target: tuple) -> MaskPlan:
        """A float mask that is a compile-time constant: 0 where attended, one negative fill
        elsewhere, is a position rule when it fits one."""
        masked = value[value != 0]
        fills = masked.unique() if masked.numel() else masked
        if fills.numel() > 1 or (fills.numel() == 1 and not float(fills[0]) < 0):
            return self._passthrough(("node", mask))
        hard = fills.numel() == 0 or float(fills[0]) == -math.inf
        pattern = _fit_positions(value == 0, target)
        if pattern is None:
            return self._passthrough(("node", mask))
        if pattern[0] == "all":
            return MaskPlan(what="mask: constant all-zero, dropped")
        _, off, window, nonempty = pattern
        if (not hard and not nonempty) or (off and not isinstance(target[0], int)):
            return self._passthrough(("node", mask))
        what = "mask: constant, " + _position_rule_text(off, window, target)
        return MaskPlan(causal=True, q_offset=off, window=window, what=what)

    def _passthrough(self, original: tuple) -> MaskPlan:
        if original[0] == "node":
            return MaskPlan(expr=original, what="mask: passed through (not proven)")
        return MaskPlan(expr=original, what="mask: condition passed as an additive mask (not proven)")

    # -- factors and constants -------------------------------------------------------------
    def _factors(self, cond: tuple) -> list[tuple]:
        kind, node = cond
        if kind == "node":
            node = _strip_broadcast(node)
            if node.target in AND_OPS:
                return [f for a in node.args[:2] for f in self._factors(("node", a))]
            if node.target in NOT_OPS:
                return [("not", node.args[0])]
            return [("node", node)]
        inner = _strip_broadcast(node)
        if inner.target in NOT_OPS:
            return self._factors(("node", inner.args[0]))
        return [("not", inner)]

    def _value(self, factor: tuple) -> torch.Tensor | None:
        kind, node = factor
        value = self.constant(node)
        if value is None or value.dtype != torch.bool:
            return None
        return ~value if kind == "not" else value

    def constant(self, node: Any) -> torch.Tensor | None:
        """The real value of ``node`` when it depends only on constants (frozen buffers,
        arange, scalars) and has static shapes; None otherwise. Evaluated once."""
        if not isinstance(node, fx.Node):
            return None
        if node in self._values:
            return self._values[node]
        self._values[node] = None  # cycles cannot happen; this also caps re-entry
        value = self._evaluate(node)
        self._values[node] = value
        return value

    def _evaluate(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            value = constant_value(self.gm, node)
            return value if isinstance(value, torch.Tensor) else None
        if node.op != "call_function":
            return None
        v = tensor_meta(node)
        if v is None or any(not isinstance(s, int) for s in v.shape) or v.numel() > MAX_CONSTANT_NUMEL:
            return None
        target = node.target
        if target is not operator.getitem:
            schema = getattr(target, "_schema", None)
            if schema is None or schema.is_mutable:
                return None
            if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
                return None
        ok = True

        def load(a):
            nonlocal ok
            if isinstance(a, fx.Node):
                value = self.constant(a)
                if value is None:
                    ok = False
                return value
            if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                ok = False
            return a

        args = fx.node.map_aggregate(node.args, load)
        kwargs = fx.node.map_aggregate(node.kwargs, load)
        if not ok:
            return None
        with real_tensors():
            out = target(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else None


def _fit_positions(value: torch.Tensor, target: tuple):
    """Classify a constant "may attend" tensor against the kernel's position rule.

    ("all",) when every entry is True; ("causal", off, window, rows_nonempty) when, for every
    batch and head, ``allowed[i, j] == (j <= i + off) and (window == 0 or i + off - j < window)``;
    None otherwise.
    """
    if value.dim() > 4:
        return None
    if bool(value.all()):
        return ("all",)
    sq, skv = target[2], target[3]
    if not (isinstance(sq, int) and isinstance(skv, int)):
        return None
    m = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    if m.shape[2] not in (1, sq) or m.shape[3] not in (1, skv):
        return None
    m = m.expand(m.shape[0], m.shape[1], sq, skv).cpu()
    first = m[0, 0]
    if not bool((m == first).all()):
        return None
    rows = torch.arange(sq)[:, None]
    cols = torch.arange(skv)[None, :]
    # off: from a row whose last allowed key is before the end (else the rule never binds).
    off = skv - 1
    for i in range(sq):
        allowed = first[i].nonzero()
        if allowed.numel() and int(allowed[-1]) < skv - 1:
            off = int(allowed[-1]) - i
            break
    window = 0
    for i in range(sq):
        allowed = first[i].nonzero()
        if allowed.numel() and int(allowed[0]) > 0:
            window = i + off - int(allowed[0]) + 1
            break
    expected = cols <= rows + off
    if window > 0:
        expected = expected & ((rows + off - cols) < window)
    if not bool((expected == first).all()):
        return None
    return ("causal", off, window, bool(first.any(dim=-1).all()))


def _position_rule_text(off: int, window: int, target: tuple) -> str:
    """What a proven position rule is, for the report. ``j <= i + off`` never binds when
    ``off >= Skv - 1`` (e.g. an anti-causal ``triu`` mask is exactly the window rule with
    the causal bound out of reach): then it is not called causal."""
    skv = target[3]
    if window and isinstance(skv, int) and off >= skv - 1:
        return f"proven window {window} (no upper bound on the keys)"
    return "proven causal" + (f" + window {window}" if window else "")


def _conjunction(factors: list[tuple]) -> tuple:
    return factors[0] if len(factors) == 1 else ("and", factors)


def _strip_broadcast(node: fx.Node) -> fx.Node:
    """Look through ``expand`` (a broadcast never changes a mask's meaning)."""
    while isinstance(node, fx.Node) and node.target == aten.expand.default:
        node = node.args[0]
    return node


def _broadcastable(v, target: tuple) -> bool:
    if v.dim() > 4:
        return False
    for m, t in zip(reversed(v.shape), reversed(target)):
        if not (_eq(m, 1) or _eq(m, t)):
            return False
    return True


def _scalar(a: Any) -> float | None:
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
        return _scalar(a.args[1])
    if t == aten.scalar_tensor.default:
        return _scalar(a.args[0])
    if t in (aten.zeros.default, aten.ones.default) and list(a.args[0]) == []:
        return 0.0 if t == aten.zeros.default else 1.0
    if t in (aten.lift_fresh_copy.default, aten.clone.default, aten._to_copy.default):
        # Casting a scalar: keep the value (finfo.min of the score dtype stays itself).
        return _scalar(a.args[0])
    if a.op == "get_attr":
        v = tensor_meta(a)
        if v is not None and v.numel() == 1:
            gm = a.graph.owning_module
            with real_tensors():
                return float(constant_value(gm, a).reshape(()).item())
    return None


# ------------------------------------------------------------------------------ emit
def emit(gm: fx.GraphModule, lw: Lowering) -> str | None:
    g = gm.graph
    qv = tensor_meta(lw.q)
    with g.inserting_before(lw.replace):
        mask = _build(g, lw.mask.expr)
        q_offsets = None
        if lw.mask.q_offset:
            with real_tensors():
                offsets = torch.full((qv.shape[0],), lw.mask.q_offset, dtype=torch.int32, device=qv.device)
            q_offsets = add_constant(gm, "attention_q_offsets", offsets, lw.replace)
        args = (lw.q, lw.k, lw.v, mask, None, q_offsets, float(lw.scale), bool(lw.mask.causal), int(lw.mask.window), float(lw.softcap))
        new = _call(g, torch.ops.llmopt.attention_prefill.default, args)
        new.meta.update({k: v for k, v in lw.replace.meta.items() if k != "val"})
    lw.replace.replace_all_uses_with(new)
    propagate_layout(g, {lw.replace: new})
    return None


def _call(g: fx.Graph, target, args, kwargs=None) -> fx.Node:
    kwargs = kwargs or {}
    node = g.call_function(target, args, kwargs)
    fake_args = fx.node.map_arg(args, lambda n: n.meta["val"])
    fake_kwargs = fx.node.map_arg(kwargs, lambda n: n.meta["val"])
    node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def _build(g: fx.Graph, expr) -> fx.Node | None:
    if expr is None:
        return None
    kind = expr[0]
    if kind == "node":
        return expr[1]
    if kind == "not":
        return _call(g, aten.bitwise_not.default, (expr[1],))
    if kind == "and":
        parts = [_build(g, e) for e in expr[1]]
        out = parts[0]
        for p in parts[1:]:
            out = _call(g, aten.bitwise_and.Tensor, (out, p))
        return out
    if kind == "where_float":
        cond = _build(g, expr[1])
        return _call(g, aten.where.Scalar, (cond, 0.0, float(expr[2])))
    if kind == "where_bias":
        cond = _build(g, expr[1])
        return _call(g, aten.where.ScalarOther, (cond, expr[2], float(expr[3])))
    raise ValueError(f"unknown mask expression {kind!r}")


def propagate_layout(g: fx.Graph, replaced: dict[fx.Node, fx.Node]) -> None:
    """Keep ``meta["val"]`` true after replacing nodes by ones with equal values but other
    strides (the llmopt ops return contiguous tensors), and keep the graph runnable.

    ``replaced`` maps each old node to its replacement, whose users are the old node's.
    Users are re-evaluated on fake tensors in graph order, and so on downstream while the
    strides keep changing (an elementwise op follows its input's layout; SDPA's output
    follows q's; a matmul or copy stops the change). A ``view`` that the new strides make
    impossible gets one copy of its input, laid out as it was before, right in front of it:
    e.g. Hugging Face's ``attn_output.transpose(1, 2).view(B, S, -1)`` after SDPA.
    """
    order = {n: i for i, n in enumerate(g.nodes)}
    old_vals = {new: old.meta.get("val") for old, new in replaced.items()}
    pending = {u for new in replaced.values() for u in new.users}
    while pending:
        node = min(pending, key=lambda n: order.get(n, len(order)))
        pending.discard(node)
        if node.op != "call_function":
            continue
        before = node.meta.get("val")
        try:
            after = _reevaluate(node)
        except Exception:
            if node.target not in (aten.view.default, aten._unsafe_view.default):
                continue  # cannot re-evaluate this op on fakes; its metadata stays as traced
            src = node.args[0]
            with g.inserting_before(node):
                copy = _copy_to_layout(g, src, old_vals.get(src))
            if copy is None:
                raise
            node.replace_input_with(src, copy)
            after = _reevaluate(node)
        node.meta["val"] = after
        if not _same_layout_vals(before, after):
            old_vals[node] = before
            pending.update(node.users)


def _reevaluate(node: fx.Node):
    args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
    return node.target(*args, **kwargs)


def _copy_to_layout(g: fx.Graph, src: fx.Node, old) -> fx.Node | None:
    """A copy of ``src`` with ``old``'s strides (old must be a permuted dense layout)."""
    if not isinstance(old, torch.Tensor):
        return None
    dims = old.dim()
    for perm in _candidate_perms(dims):
        shape = [old.shape[p] for p in perm]
        expected = [1] * dims
        for i in range(dims - 2, -1, -1):
            expected[i] = expected[i + 1] * shape[i + 1]
        if all(_eq(old.stride(p), e) or _eq(old.shape[p], 1) for p, e in zip(perm, expected)):
            if perm == list(range(dims)):
                return _call(g, aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
            inverse = [perm.index(i) for i in range(dims)]
            t = _call(g, aten.permute.default, (src, perm))
            c = _call(g, aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
            return _call(g, aten.permute.default, (c, inverse))
    return None


def _candidate_perms(dims: int) -> list[list[int]]:
    perms = [list(range(dims))]
    if dims == 4:
        perms += [[0, 2, 1, 3], [0, 2, 3, 1], [0, 3, 1, 2], [1, 0, 2, 3], [2, 0, 1, 3]]
    return perms


def _same_layout_vals(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout_vals(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dim() == b.dim() and all(
            _eq(s, t) or _eq(n, 1) for s, t, n in zip(a.stride(), b.stride(), a.shape)
        )
    return True


# ------------------------------------------------------------------------------ small helpers
def _eq(a, b) -> bool:
    return compat.statically_true(a == b)


def _same_shape(v, shape: tuple) -> bool:
    if v is None or v.dim() != len(shape):
        return False
    return all(_eq(a, b) for a, b in zip(v.shape, shape))


def _is_cast(node: fx.Node) -> bool:
    """``_to_copy`` that only changes the floating dtype."""
    if set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
        return False
    if node.kwargs.get("layout", torch.strided) != torch.strided:
        return False
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    return (
        src is not None and out is not None and src.device == out.device
        and src.is_floating_point() and out.is_floating_point()
    )


def _single_user(node: fx.Node, accept) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_function" and accept(user) else None
