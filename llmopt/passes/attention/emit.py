"""Emit the rewrite: one ``llmopt.attention_prefill`` call in place of the matched attention.

The op returns a contiguous ``[B, Hq, Sq, D]`` tensor. SDPA's output on CPU is laid out as
``[B, Sq, Hq, D]`` and Hugging Face then does ``transpose(1, 2).view(B, Sq, -1)``, which
the new strides make impossible: :func:`~llmopt.graph.propagate_layout` re-derives the
metadata downstream and puts one copy in front of such a view (for decode, ``Sq == 1``,
both layouts coincide and no copy is needed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...codegen import attention_prefill as _attention_prefill  # noqa: F401  registers llmopt::attention_prefill
from ...graph import add_constant, call_with_meta, propagate_layout, real_tensors, tensor_meta
from .masks import MaskPlan

aten = torch.ops.aten


@dataclass
class Lowering:
    """One attention found in the graph, read into the op's arguments."""

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


def emit(gm: fx.GraphModule, lw: Lowering) -> fx.Node:
    """Insert the ``attention_prefill`` call for ``lw`` and make it replace ``lw.replace``."""
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
        new = call_with_meta(g, torch.ops.llmopt.attention_prefill.default, args)
        new.meta.update({k: v for k, v in lw.replace.meta.items() if k != "val"})
    lw.replace.replace_all_uses_with(new)
    propagate_layout(g, {lw.replace: new})
    return new


def _build(g: fx.Graph, expr) -> fx.Node | None:
    """Materialize a :class:`~.masks.MaskPlan` expression as nodes (None: no mask)."""
    if expr is None:
        return None
    kind = expr[0]
    if kind == "node":
        return expr[1]
    if kind == "not":
        return call_with_meta(g, aten.bitwise_not.default, (expr[1],))
    if kind == "and":
        parts = [_build(g, e) for e in expr[1]]
        out = parts[0]
        for p in parts[1:]:
            out = call_with_meta(g, aten.bitwise_and.Tensor, (out, p))
        return out
    if kind == "where_float":
        cond = _build(g, expr[1])
        return call_with_meta(g, aten.where.Scalar, (cond, 0.0, float(expr[2])))
    if kind == "where_bias":
        cond = _build(g, expr[1])
        return call_with_meta(g, aten.where.ScalarOther, (cond, expr[2], float(expr[3])))
    raise ValueError(f"unknown mask expression {kind!r}")
