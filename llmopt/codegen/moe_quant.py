"""Mixture of experts over weight-only quantized expert stacks: int8 and int4, two ops.

The expert stacks are most of a MoE model's weights (Mixtral-8x7B: 45 of its 47 B
parameters), and a decode step is bound by the bytes of the ``k`` active experts it reads.
These ops are ``llmopt::fused_experts`` (``llmopt.codegen.moe_experts``: same routing
layout, roundings and fp32 combine) with the stacks stored quantized and dequantized in the
kernels' K loop (``llmopt.codegen.moe_kernels``)::

    fused_experts_int8(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation)
        w_gate_up: int8 [E, 2I, H]    gate_up_scales: [E, 2I]    W = q * s[:, :, None]
        w_down:    int8 [E, H, I]     down_scales:    [E, H]

    fused_experts_int4(x, w_gate_up, gate_up_scales, gate_up_zeros,
                       w_down, down_scales, down_zeros, weights, ids, activation, group_size)
        w_gate_up: uint8 [E, 2I, H / 2]  (two codes per byte, low nibble = even column)
        gate_up_scales, gate_up_zeros: [E, 2I, H / G]       W = (q - z) * s, per group of G inputs
        w_down:    uint8 [E, H, I / 2]   down_scales, down_zeros: [E, H, I / G]

Each expert's ``[N, K]`` slice is exactly what ``llmopt.quant.schemes.quantize_weight``
makes of that expert's matrix (int8: symmetric per output channel; int4: RTN per group,
asymmetric or symmetric), so one quantizer serves linears and experts
(``llmopt.quant.experts``). Scales and zeros are float (the model's dtype).

Accumulation fp32; the products are rounded to x.dtype where the float op rounds them.
The CPU implementation dequantizes each *active* expert's slice to x.dtype (an expert no
pair routes to is never touched) and runs the float reference's matmuls.

Source: vLLM ``fused_moe`` int8/int4 weight-only variants; gpt-fast's weight-only formats.
"""
from __future__ import annotations

import torch

from . import moe_kernels as mk
from .kernel_mode import on_tensor_device, use_triton
from .moe_experts import (
    ExpertStack, check_ids_in_range, check_kernel_dtype, check_routed_shapes, launch_fused_experts, routed_experts_ref,
)
from .moe_route import KERNEL_DTYPES
from .quant_packing import dequantize_int4, dequantize_int8

_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- checks
def _check_scales(op: str, name: str, scales: torch.Tensor, shape: tuple) -> None:
    if tuple(scales.shape) != tuple(shape) or scales.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{op}: {name} must be a float tensor of shape {list(shape)}, got {scales.dtype} {list(scales.shape)}")


def _check_int8(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation) -> None:
    op = "fused_experts_int8"
    if w_gate_up.dtype != torch.int8 or w_down.dtype != torch.int8:
        raise TypeError(f"{op}: the stacks must be int8 codes, got {w_gate_up.dtype} and {w_down.dtype}")
    check_routed_shapes(op, x, w_gate_up.shape, w_down.shape, weights, ids, activation)
    _check_scales(op, "gate_up_scales", gate_up_scales, w_gate_up.shape[:2])
    _check_scales(op, "down_scales", down_scales, w_down.shape[:2])


def _unpacked(shape) -> tuple:
    return (*shape[:-1], 2 * shape[-1])


def _check_int4(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                weights, ids, activation, group_size) -> None:
    op = "fused_experts_int4"
    if w_gate_up.dtype != torch.uint8 or w_down.dtype != torch.uint8:
        raise TypeError(f"{op}: the stacks must be packed uint8 int4 codes, got {w_gate_up.dtype} and {w_down.dtype}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"{op}: the stacks must be 3-D, got {list(w_gate_up.shape)} and {list(w_down.shape)}")
    gu_shape, d_shape = _unpacked(w_gate_up.shape), _unpacked(w_down.shape)
    check_routed_shapes(op, x, gu_shape, d_shape, weights, ids, activation)
    if group_size < 16 or group_size & (group_size - 1) or gu_shape[2] % group_size or d_shape[2] % group_size:
        raise ValueError(f"{op}: group_size {group_size} must be a power of two >= 16 dividing H={gu_shape[2]} "
                         f"and I={d_shape[2]}; quantize the experts with a group size that divides both")
    for name, t, shape in (("gate_up_scales", gate_up_scales, gu_shape), ("gate_up_zeros", gate_up_zeros, gu_shape),
                           ("down_scales", down_scales, d_shape), ("down_zeros", down_zeros, d_shape)):
        _check_scales(op, name, t, (*shape[:2], shape[2] // group_size))


# --------------------------------------------------------------------------- references
def fused_experts_int8_ref(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation):
    """Each active expert dequantized to x.dtype, then the float reference's matmuls."""
    _check_int8(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation)
    check_ids_in_range("fused_experts_int8", ids, w_gate_up.shape[0])

    def expert(e):
        return (dequantize_int8(w_gate_up[e], gate_up_scales[e], x.dtype),
                dequantize_int8(w_down[e], down_scales[e], x.dtype))

    return routed_experts_ref(x, w_gate_up.shape[0], expert, weights, ids, activation)


def fused_experts_int4_ref(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                           weights, ids, activation, group_size):
    """Each active expert dequantized to x.dtype, then the float reference's matmuls."""
    _check_int4(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                weights, ids, activation, group_size)
    check_ids_in_range("fused_experts_int4", ids, w_gate_up.shape[0])

    def expert(e):
        return (dequantize_int4(w_gate_up[e], gate_up_scales[e], gate_up_zeros[e], group_size, x.dtype),
                dequantize_int4(w_down[e], down_scales[e], down_zeros[e], group_size, x.dtype))

    return routed_experts_ref(x, w_gate_up.shape[0], expert, weights, ids, activation)


# --------------------------------------------------------------------------- launchers
@on_tensor_device
def fused_experts_int8_triton(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation,
                              decode: bool | None = None):
    """The int8 experts with the Triton kernels; ``decode`` forces a path (None: by size)."""
    _check_int8(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation)
    check_kernel_dtype("fused_experts_int8", x, w_gate_up.shape[0], ids)
    gate_up = ExpertStack(w_gate_up, gate_up_scales, gate_up_scales, mk.QUANT_INT8, 1)
    down = ExpertStack(w_down, down_scales, down_scales, mk.QUANT_INT8, 1)
    return launch_fused_experts(x, gate_up, down, w_gate_up.shape[1] // 2, weights, ids, activation, decode)


@on_tensor_device
def fused_experts_int4_triton(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                              weights, ids, activation, group_size, decode: bool | None = None):
    """The int4 experts with the Triton kernels; ``decode`` forces a path (None: by size)."""
    _check_int4(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                weights, ids, activation, group_size)
    check_kernel_dtype("fused_experts_int4", x, w_gate_up.shape[0], ids)
    # The kernel reads scales and zeros with the same strides: both contiguous (no-ops normally).
    gate_up_scales, gate_up_zeros = gate_up_scales.contiguous(), gate_up_zeros.contiguous()
    down_scales, down_zeros = down_scales.contiguous(), down_zeros.contiguous()
    gate_up = ExpertStack(w_gate_up, gate_up_scales, gate_up_zeros, mk.QUANT_INT4, group_size)
    down = ExpertStack(w_down, down_scales, down_zeros, mk.QUANT_INT4, group_size)
    return launch_fused_experts(x, gate_up, down, w_gate_up.shape[1] // 2, weights, ids, activation, decode)


# --------------------------------------------------------------------------- registered ops
@torch.library.custom_op("llmopt::fused_experts_int8", mutates_args=())
def fused_experts_int8(
    x: torch.Tensor, w_gate_up: torch.Tensor, gate_up_scales: torch.Tensor, w_down: torch.Tensor,
    down_scales: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, activation: str,
) -> torch.Tensor:
    """:func:`llmopt.codegen.moe_experts.fused_experts` with int8 per-channel expert stacks."""
    args = (x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation)
    if x.dtype in KERNEL_DTYPES and use_triton(x, w_gate_up, w_down, weights, ids):
        return fused_experts_int8_triton(*args)
    return fused_experts_int8_ref(*args).contiguous()


@fused_experts_int8.register_fake
def _(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation):
    _check_int8(x, w_gate_up, gate_up_scales, w_down, down_scales, weights, ids, activation)
    return x.new_empty(x.shape)


@torch.library.custom_op("llmopt::fused_experts_int4", mutates_args=())
def fused_experts_int4(
    x: torch.Tensor, w_gate_up: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_zeros: torch.Tensor,
    w_down: torch.Tensor, down_scales: torch.Tensor, down_zeros: torch.Tensor, weights: torch.Tensor,
    ids: torch.Tensor, activation: str, group_size: int,
) -> torch.Tensor:
    """:func:`llmopt.codegen.moe_experts.fused_experts` with int4 grouped expert stacks."""
    args = (x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros, weights, ids,
            activation, group_size)
    if x.dtype in KERNEL_DTYPES and use_triton(x, w_gate_up, w_down, weights, ids):
        return fused_experts_int4_triton(*args)
    return fused_experts_int4_ref(*args).contiguous()


@fused_experts_int4.register_fake
def _(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros, weights, ids, activation,
      group_size):
    _check_int4(x, w_gate_up, gate_up_scales, gate_up_zeros, w_down, down_scales, down_zeros,
                weights, ids, activation, group_size)
    return x.new_empty(x.shape)
