"""Mixture of experts on the CPU: what ``moe_route`` and the fused-experts ops become in a
graph that Inductor compiles for the CPU (``codegen.cpu_decompositions``).

Why: the CPU implementation of ``fused_experts`` (``moe_experts.routed_experts_ref``) sorts
the (token, slot) pairs by expert and runs one matmul pair per non-empty expert. At decode
sizes (a few tokens) that is a dozen small ATen calls per layer (argsort, bincount, a host
read of the counts, gathers, two BLAS calls per expert, a scatter) around a few hundred KB
of weights: the calls, not the bytes, set the time, and the op is an extern call that
Inductor cannot fuse with anything.

Decode (:func:`experts_gemv_runs`, the one rule): the op becomes a traced expression that
Inductor lowers into the graph's own C++ loops:

    gu[t, j, n] = sum_h x[t, h] * W_gate_up[ids[t, j], n, h]      fp32, rounded to x.dtype
    a[t, j, i]  = act(gu[t, j, i]) * gu[t, j, I + i]               (gated_activation_ref)
    y[t, j, h]  = sum_i a[t, j, i] * W_down[ids[t, j], h, i]       fp32, rounded to x.dtype
    out[t, h]   = sum_j weights[t, j] * y[t, j, h]                 fp32, rounded once

``W[ids]`` is an indexed load *inside* each reduction (Inductor's indirect indexing: the
expert id is read once per output row, the row is then a contiguous vectorized K loop), so
only the ``k`` active experts' rows are read, once per pair, and no ``[T k, 2I, H]`` gather
is ever written. The gated activation and the weighted combine are pointwise loops Inductor
fuses with the reductions around them. The roundings are those of the reference, so the
expression and the op agree to fp32 summation order. int8 and int4 stacks use the same
expression with the dequantization inside the reduction (int8: the per-row scale applied
after the K sum; int4: ``(q - z) s`` per group, the two nibbles of a byte reduced as the
even and odd inputs).

``moe_route`` becomes its reference (softmax or sigmoid, top-k, renormalization): ATen that
Inductor fuses (softmax) or calls directly (top-k), without a custom-op call.

Prefill (more pairs than the rule allows): the op's sorted path (``moe_experts``: tokens
gathered in expert order, ``torch._grouped_mm`` or one matmul pair per expert, one
``index_add_``), whose matmuls are BLAS-sized there; under Inductor it is called through the
op's CPU twin (its shapes depend on the run-time counts per expert, and Inductor's meta
function of ``_grouped_mm`` takes bf16 only). A dense formulation (every token through every
expert, masked) was not adopted: it multiplies the matmul work by ``E / k``, and where that
would be small (few tokens) the GEMV already reads less.

Called rather than traced (the aten executor, which runs these decompositions eagerly), the
expression would materialize the gather, so every call runs the sorted path.

Source: the decode GEMV formulation of vLLM's ``fused_moe`` (one program row per pair);
the generated-GEMV technique of ``bf16_gemv_cpu``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import compat
from .gated_activation import gated_activation_ref
from .moe_experts import use_decode_path
from .moe_route import moe_route_ref

# ``dot(a, ids)``: for activations ``a [T, k or 1, K]`` (accumulation dtype) and the routed
# ``ids [T, k]``, ``[T, k, N]`` = ``sum_K a * W[ids]`` in the accumulation dtype.
RowDot = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def experts_gemv_runs(x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> bool:
    """Whether a fused-experts call on ``x [T, H]`` with ``ids [T, k]`` runs the generated
    GEMV: traced for Inductor, with a static token count (a symbolic one may grow past the
    rule), and no more pairs than experts (``moe_experts.use_decode_path``, the rule the
    GPU kernels use: past it the per-pair GEMVs would read some expert's rows more than
    once in all, and the sorted path's matmuls read each active expert once).

    Measured in one process on the loaded CI machine (E 8, top-2, H 256, I 512, fp32, one
    thread, the stacks cache-resident): the GEMV was 6x the sorted path at T = 1, and still
    1.5-8x it at T = 4..32 (up to 8x more pairs than experts), because the sorted path's
    fixed cost (sort, host read, one BLAS call per expert) dominates there. The rule stays
    at the bytes bound all the same: at model sizes (Mixtral-8x7B: 350 MB of experts per
    layer) a re-read row comes from memory, not cache. Raising it for stacks that fit the
    cache is a possible next step, to be measured on a quiet machine."""
    tokens, top_k = ids.shape
    return (compat.is_traced(x) and isinstance(tokens, int) and isinstance(top_k, int) and tokens > 0
            and use_decode_path(tokens, top_k, num_experts))


def _accumulation(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def experts_gemv(x, weights, ids, activation: str, inter: int, gate_up_dot: RowDot, down_dot: RowDot):
    """The decode expression of the module docstring over any stack format (``*_dot``)."""
    acc = _accumulation(x)
    gu = gate_up_dot(x.to(acc)[:, None, :], ids).to(x.dtype)
    a = gated_activation_ref(gu[..., :inter], gu[..., inter:], activation)
    y = down_dot(a.to(acc), ids).to(x.dtype)
    return (y.to(acc) * weights.to(acc)[..., None]).sum(dim=1).to(x.dtype)


def float_rows(stack: torch.Tensor, acc: torch.dtype) -> RowDot:
    """``dot`` over a float stack ``[E, N, K]``."""
    return lambda a, ids: (a[:, :, None, :] * stack[ids].to(acc)).sum(dim=-1)


def int8_rows(codes: torch.Tensor, scales: torch.Tensor, acc: torch.dtype) -> RowDot:
    """``dot`` over int8 codes ``[E, N, K]`` with one scale per row ``[E, N]``: the integer
    rows summed against the activations, then scaled (the scale is constant along K)."""
    return lambda a, ids: (a[:, :, None, :] * codes[ids].to(acc)).sum(dim=-1) * scales[ids].to(acc)


def _per_byte(params: torch.Tensor, repeat: int) -> torch.Tensor:
    """``[..., groups]`` -> ``[..., groups * repeat]``, each value repeated over its group's bytes."""
    return params[..., None].expand(*params.shape, repeat).flatten(-2)


def int4_rows(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, acc: torch.dtype) -> RowDot:
    """``dot`` over packed int4 codes ``[E, N, K / 2]`` (low nibble = even input) with
    ``scales`` / ``zeros`` ``[E, N, K / group]``: each byte's two codes dequantized in the
    reduction, ``(q - z) s``, against the even and the odd inputs."""

    def dot(a, ids):
        even, odd = a[..., None, 0::2], a[..., None, 1::2]
        q = packed[ids]
        # Per-group parameters repeated over the group's bytes: a view Inductor indexes, no copy.
        z, s = (_per_byte(p[ids].to(acc), group // 2) for p in (zeros, scales))
        lo = ((q & 0xF).to(acc) - z) * s
        hi = ((q >> 4).to(acc) - z) * s
        return (even * lo + odd * hi).sum(dim=-1)

    return dot


# --------------------------------------------------------------------------- the decompositions
def moe_route_cpu(logits, top_k: int, scoring: str, renormalize: bool):
    """``moe_route`` as ATen (its reference)."""
    return moe_route_ref(logits, top_k, scoring, renormalize)


def fused_experts_cpu(x, w_gate_up, w_down, weights, ids, activation: str, sorted_path: Callable):
    """``fused_experts``: the generated GEMV when :func:`experts_gemv_runs`, else
    ``sorted_path(...)`` with the op's arguments (the caller's: the op's CPU twin when traced)."""
    if experts_gemv_runs(x, ids, w_gate_up.shape[0]):
        acc = _accumulation(x)
        return experts_gemv(x, weights, ids, activation, w_gate_up.shape[1] // 2,
                            float_rows(w_gate_up, acc), float_rows(w_down, acc))
    return sorted_path(x, w_gate_up, w_down, weights, ids, activation)


def fused_experts_int8_cpu(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation: str,
                           sorted_path: Callable):
    """``fused_experts_int8``: as :func:`fused_experts_cpu`, int8 rows."""
    if experts_gemv_runs(x, ids, w_gate_up.shape[0]):
        acc = _accumulation(x)
        return experts_gemv(x, weights, ids, activation, w_gate_up.shape[1] // 2,
                            int8_rows(w_gate_up, gate_up_scales, acc), int8_rows(w_down, down_scales, acc))
    return sorted_path(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation)


def fused_experts_int4_cpu(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                           weights, ids, activation: str, group_size: int, sorted_path: Callable):
    """``fused_experts_int4``: as :func:`fused_experts_cpu`, int4 rows."""
    if experts_gemv_runs(x, ids, w_gate_up.shape[0]):
        acc = _accumulation(x)
        return experts_gemv(
            x, weights, ids, activation, w_gate_up.shape[1] // 2,
            int4_rows(w_gate_up, gate_up_scales, gate_up_zeros, group_size, acc),
            int4_rows(w_down, down_scales, down_zeros, group_size, acc),
        )
    return sorted_path(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros, weights, ids,
                       activation, group_size)


__all__ = ["experts_gemv", "experts_gemv_runs", "float_rows", "fused_experts_cpu", "fused_experts_int4_cpu",
           "fused_experts_int8_cpu", "int4_rows", "int8_rows", "moe_route_cpu"]
