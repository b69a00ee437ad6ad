"""SDPA as ATen lowers it, read into one :class:`~.emit.Lowering`.

The ops: ``_scaled_dot_product_flash_attention_for_cpu`` (CPU),
``_scaled_dot_product_{efficient,flash,cudnn}_attention`` (CUDA) and
``scaled_dot_product_attention``. They are read through their schemas (argument names),
so ``is_causal``, ``attn_mask``/``attn_bias``, ``scale`` (None → 1/sqrt(D)) and GQA heads
are read the same way for all; their extra outputs (logsumexp, philox state) must be
unused. ``repeat_kv`` in front of K/V is removed (see :mod:`.operands`); the mask is
proven by :class:`~.masks.MaskAnalysis`.

Source: PyTorch's SDPA decompositions; Hugging Face ``sdpa_attention_forward``.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ...graph import tensor_meta
from .emit import Lowering
from .masks import MaskAnalysis, MaskPlan
from .operands import check_qkv, score_shape, unrepeat_pair

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


def match_sdpa(gm: fx.GraphModule, node: fx.Node, analysis: MaskAnalysis) -> Lowering | str | None:
    """The lowering of the SDPA call ``node``; a reason (str) when it cannot be lowered;
    None when there is nothing to lower (output 0 unused)."""
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
    reason = check_qkv(qv, kv, vv)
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
    target = score_shape(qv, kv)
    if raw_mask is None:
        plan = MaskPlan(causal=causal, what="is_causal" if causal else "no mask")
    elif causal:
        # Both a mask and is_causal: the mask is passed through with the flag.
        plan = MaskPlan(expr=("node", raw_mask), causal=True, what="mask: passed through with is_causal")
    else:
        plan = analysis.additive_or_bool(raw_mask, target)
        if isinstance(plan, str):
            return plan
    pair = unrepeat_pair(k, v)
    if isinstance(pair, str):
        return pair
    k_base, v_base, removed = pair
    name = node.target.__name__.split(".")[0]
    return Lowering(f"sdpa ({name})", q, k_base, v_base, float(scale), plan, replace, repeats_removed=removed)
