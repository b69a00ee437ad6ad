"""int8 weight-only linear: ``y = x @ (w_int8 * scales[:, None])^T + bias``.

In decode a linear is bound by the bytes of weight it reads: int8 weights halve them
against bf16. The weights stay int8 in memory and are converted in registers, inside the
matmul loop (the weight-only formats of gpt-fast).

Math (``x: [M, K]`` activations, leading dims flattened into M; ``w_int8: [N, K]`` int8;
``scales: [N]``; ``y: [M, N]`` in ``x.dtype``): the scale is per output channel, so it
leaves the K sum: ``y[m, n] = scales[n] * sum_k x[m, k] * w_int8[n, k] + bias[n]``.
Accumulation in fp32 (the int8 codes are exact in the activation dtype).

Kernels: the GEMV (``M <= GEMV_MAX_M``) and the flat GEMM of ``quant_launch``.

CPU (:func:`int8_weight_only_linear_cpu`): for float32 / float16 activations and up to
``CPU_GEMV_MAX_M`` rows (decode) the int8 GEMV that Inductor generates
(``int8_weight_only_cpu``: it streams the int8 weight once, 3-4.5x faster than the float32
``F.linear`` at M = 1). For bfloat16 activations aten's ``_weight_int8pack_mm``: measured on
an AVX512-bf16 CPU at M=1, K=768, N=2048 it takes 86 us against 116 us for fp32
``F.linear``, while its fp32 and fp16 paths take 0.9-9 ms (slower than dequantize + fp32
matmul, 250 us), hence bf16 only, when the running torch has it and the call is inside its
contract (``quant_packing.int8pack_cpu_supported``). Otherwise the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .int8_weight_only_cpu import PREFILL_BLOCK_BYTES, int8_gemv_cpu, int8_prefill_cpu
from .kernel_mode import on_tensor_device
from .quant_launch import (
    allocate_output, gemm_tile, implementation, launch_weight_only, load_tile, store_row, store_tile,
)
from .quant_packing import aligned, check_int8_weight, dequantize_int8, int8pack_cpu_supported

OP = "int8_weight_only_linear"
# Autotune key of both kernels: bucketed rows, never the raw growing M.
AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]
# Float bytes of one block of weight rows converted at a time by the reference: converting
# a 32000 x 768 head whole allocates 98 MB and takes 60 ms at M = 16 (page faults), in 3 MB
# blocks 14 ms. The same bound as the CPU prefill's blocks (int8_weight_only_cpu), one value.
DEQUANT_BLOCK_BYTES = PREFILL_BLOCK_BYTES


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _int8_wo_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + pid_m * stride_xm + offs_k * stride_xk, mask=mask_k, other=0.0)
        w = load_tile(w_ptr, offs_n, offs_k, mask_n, mask_k, stride_wn, stride_wk, 0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    store_row(y_ptr, acc, b_ptr, pid_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _int8_wo_gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, 0.0)
        w = load_tile(w_ptr, offs_n, offs_k, mask_n, mask_k, stride_wn, stride_wk, 0)
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            # int8 codes are exact in fp16/bf16, so the dot runs in the activation dtype.
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


# ----------------------------------------------------------------------------------------
# Reference and CPU implementation
# ----------------------------------------------------------------------------------------
def int8_weight_only_linear_ref(x, w_int8, scales, bias=None):
    """``x @ (w_int8 * scales[:, None])^T + bias`` in eager PyTorch (the test oracle, and the
    CPU implementation past the fast paths)."""
    n, k = check_int8_weight(OP, x, w_int8, scales, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.dtype in (torch.float32, torch.float64):
        # The per-channel scale leaves the K sum: scale the [M, N] output, not the [N, K]
        # weight (one conversion pass over the weight instead of two; |q| <= 127 keeps
        # the unscaled sums far inside the float32 range), a block of rows at a time.
        rows = max(64, DEQUANT_BLOCK_BYTES // (x.element_size() * max(k, 1)))
        if n <= rows:
            y = F.linear(x2, w_int8.to(x.dtype))
        else:
            y = torch.cat([F.linear(x2, w_int8[i:i + rows].to(x.dtype)) for i in range(0, n, rows)], dim=-1)
        y = y * scales.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
    else:
        w = dequantize_int8(w_int8, scales, torch.float32).to(x.dtype)
        y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*lead, n)


def int8_weight_only_linear_cpu(x, w_int8, scales, bias=None):
    """The CPU implementation: aten's int8 kernel for bfloat16, the generated int8 GEMV for a
    few rows of other dtypes, the reference otherwise (module docstring)."""
    n, k = check_int8_weight(OP, x, w_int8, scales, bias)
    x2 = x.reshape(-1, k)
    if int8pack_cpu_supported(x2, w_int8):
        y = torch.ops.aten._weight_int8pack_mm(aligned(x2), w_int8, aligned(scales.to(x.dtype)))
        if bias is not None:
            y = y + bias.to(y.dtype)
    else:
        y = int8_gemv_cpu(x2, w_int8, scales, bias)
        if y is None:
            y = int8_prefill_cpu(x2, w_int8, scales, bias)
        if y is None:
            return int8_weight_only_linear_ref(x, w_int8, scales, bias)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------
# Launcher and registered op
# ----------------------------------------------------------------------------------------
@on_tensor_device
def int8_weight_only_linear_triton(x, w_int8, scales, bias=None, out=None, *, config=None):
    """Launch the int8 weight-only GEMV (M <= GEMV_MAX_M) or flat GEMM; returns ``[..., N]``.
    ``config``: one of ``quant_launch.autotune_configs`` instead of the autotuner."""
    n, k = check_int8_weight(OP, x, w_int8, scales, bias)
    x2, m, y, y2 = allocate_output(OP, x, k, n, out)
    if m == 0 or n == 0:
        return y
    b = bias if bias is not None else scales
    args = (x2, w_int8, scales, b, y2,
            m, n, k, x2.stride(0), x2.stride(1), w_int8.stride(0), w_int8.stride(1), y2.stride(0), y2.stride(1))
    launch_weight_only("int8", _int8_wo_gemv_kernel, _int8_wo_gemm_kernel, AUTOTUNE_KEY, x, m, n, args,
                       config=config, HAS_BIAS=bias is not None)
    return y


@torch.library.custom_op("llmopt::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ (w_int8 * scales[:, None])^T + bias`` (x: [..., K], w_int8: int8 [N, K]);
    the implementation is chosen by ``quant_launch.implementation``."""
    run = implementation(x, triton_impl=int8_weight_only_linear_triton, reference=int8_weight_only_linear_ref,
                         cpu=int8_weight_only_linear_cpu)
    return run(x, w_int8, scales, bias)


@int8_weight_only_linear.register_fake
def _(x, w_int8, scales, bias=None):
    n, _ = check_int8_weight(OP, x, w_int8, scales, bias)
    return x.new_empty((*x.shape[:-1], n))
