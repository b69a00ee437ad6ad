"""W8A8 linear: per-token int8 activations times int8 weights, int32 accumulation.

In prefill a linear is bound by compute, not weight bytes: only quantizing the activations
too helps, multiplying int8 by int8 into int32 (SmoothQuant, Xiao et al. 2022,
arXiv:2211.10438).

Math (``x: [M, K]``, leading dims flattened into M; ``w_int8: [N, K]`` int8;
``w_scales: [N]``): per-token dynamic activation quantization
``s_x[m] = max_k |x[m, k]| / 127``, ``x_q = clamp(floor(x / s_x + 0.5), -127, 127)``
(computed in fp32), then ``acc = x_q @ w_int8^T`` in int32 (exact) and
``y = acc * s_x[m] * w_scales[n] + bias[n]`` in ``x.dtype``.

Kernels: one row-quantization kernel (bit-exact with :func:`quantize_rows_int8_ref`), then
the flat int8 GEMM with the scale epilogue (``quant_launch``'s GEMM config space).

CPU: ``aten._int_mm`` for the int32 product when the running torch has it (exact, like
the reference's fp64 product).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buckets import m_bucket, next_pow2
from .kernel_mode import on_tensor_device
from .quant_launch import (
    allocate_output, gemm_tile, grid_gemm, implementation, launch, load_tile, store_tile,
)
from .quant_packing import check_int8_weight, has_aten

OP = "w8a8_linear"
AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]
# Floor of the per-token activation absmax, so an all-zero row quantizes to zeros, not NaN.
ACT_AMAX_EPS = 1e-10
INT8_QMAX = 127


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _quantize_rows_int8_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    AMAX_EPS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), AMAX_EPS) / 127.0
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        # IEEE-rounded division, so the codes match the reference bit for bit.
        q = tl.floor(tl.div_rn(x, scale + tl.zeros_like(x)) + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + offs_k * stride_qk, q.to(tl.int8), mask=mask_k)
    tl.store(s_ptr + row, scale)


@triton.jit
def _w8a8_gemm_kernel(
    xq_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = load_tile(xq_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, 0)
        b = load_tile(w_ptr, offs_n, offs_k, mask_n, mask_k, stride_wn, stride_wk, 0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    store_tile(y_ptr, y, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


# ----------------------------------------------------------------------------------------
# References and CPU implementation
# ----------------------------------------------------------------------------------------
def quantize_rows_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of ``x: [M, K]``, computed in fp32.

    Returns ``(x_q int8 [M, K], scale fp32 [M])`` with ``x ~= x_q * scale[:, None]``.
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scale = amax.clamp_min(ACT_AMAX_EPS) / float(INT8_QMAX)
    q = torch.floor(xf / scale[:, None] + 0.5).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def _w8a8_linear(x, w_int8, w_scales, bias, int_mm: bool):
    """Quantize activations, multiply exactly (``aten._int_mm`` or fp64), scale epilogue."""
    n, k = check_int8_weight(OP, x, w_int8, w_scales, bias)
    x2 = x.reshape(-1, k)
    xq, sx = quantize_rows_int8_ref(x2)
    if int_mm and x.device.type == "cpu" and has_aten("_int_mm") and x2.shape[0] > 0:
        acc = torch.ops.aten._int_mm(xq, w_int8.t()).to(torch.float64)
    else:
        # exact: |acc| <= 127 * 127 * K < 2**53
        acc = xq.to(torch.float64) @ w_int8.to(torch.float64).t()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = acc.to(compute) * sx.to(compute)[:, None] * w_scales.to(compute)[None, :]
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w8a8_linear_ref(x, w_int8, w_scales, bias=None):
    """Per-token int8 activations times int8 weights (exact fp64 product), scale epilogue."""
    return _w8a8_linear(x, w_int8, w_scales, bias, int_mm=False)


def w8a8_linear_cpu(x, w_int8, w_scales, bias=None):
    """The CPU implementation: the reference with aten's int32 GEMM for the product."""
    return _w8a8_linear(x, w_int8, w_scales, bias, int_mm=True)


# ----------------------------------------------------------------------------------------
# Launchers and registered op
# ----------------------------------------------------------------------------------------
@on_tensor_device
def quantize_rows_int8_triton(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_rows_int8_ref` for ``x2: [M, K]``."""
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, sx
    block_k = min(max(next_pow2(k), 16), 1024 if x2.is_cuda else 128)
    _quantize_rows_int8_kernel[(m,)](
        x2, xq, sx, m, k, x2.stride(0), x2.stride(1), xq.stride(0), xq.stride(1),
        AMAX_EPS=ACT_AMAX_EPS, BLOCK_K=block_k,
    )
    return xq, sx


@on_tensor_device
def w8a8_linear_triton(x, w_int8, w_scales, bias=None, out=None, *, config=None):
    """Quantize activations per token (one kernel), then the int8 GEMM with scale epilogue."""
    n, k = check_int8_weight(OP, x, w_int8, w_scales, bias)
    x2, m, y, y2 = allocate_output(OP, x, k, n, out)
    if m == 0 or n == 0:
        return y
    xq, sx = quantize_rows_int8_triton(x2)
    b = bias if bias is not None else w_scales
    launch("w8a8_gemm", _w8a8_gemm_kernel, AUTOTUNE_KEY, grid_gemm(n, m), x,
           xq, sx, w_int8, w_scales, b, y2,
           m, n, k, xq.stride(0), xq.stride(1), w_int8.stride(0), w_int8.stride(1), y2.stride(0), y2.stride(1),
           config=config, M_BUCKET=m_bucket(m), HAS_BIAS=bias is not None)
    return y


@torch.library.custom_op("llmopt::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SmoothQuant W8A8 linear: per-token dynamic int8 activations, int8 weights, int32 GEMM;
    the implementation is chosen by ``quant_launch.implementation``."""
    run = implementation(x, triton_impl=w8a8_linear_triton, reference=w8a8_linear_ref, cpu=w8a8_linear_cpu)
    return run(x, w_int8, w_scales, bias)


@w8a8_linear.register_fake
def _(x, w_int8, w_scales, bias=None):
    n, _ = check_int8_weight(OP, x, w_int8, w_scales, bias)
    return x.new_empty((*x.shape[:-1], n))
