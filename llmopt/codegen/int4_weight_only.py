"""int4 weight-only linear: ``y = x @ ((q - zeros) * scales)^T + bias``, codes packed two per byte.

In decode a linear is bound by the bytes of weight it reads: int4 weights quarter them
against bf16. The codes stay packed in memory and are dequantized in registers, inside
the matmul loop (the weight-only formats of gpt-fast; the layout is ``quant_packing``'s).

Math (``x: [M, K]``, leading dims flattened into M; ``w_packed: [N, K // 2]`` uint8, low
nibble = column ``2j``, high nibble = column ``2j + 1``; ``scales, zeros: [N, K // G]``):
``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``. A K tile never straddles a
group, so per tile ``acc += scales[n, g] * sum_k x * (q - z)``. Accumulation in fp32
(``q - z`` is a small integer, exact in the activation dtype); output in ``x.dtype``.

Kernels: the GEMV (``M <= GEMV_MAX_M``) and the flat GEMM of ``quant_launch``; ``BLOCK_K``
divides the group size (a correctness rule, enforced by the config pruning).

CPU (:func:`int4_weight_only_linear_cpu_impl`): up to ``CPU_INT4_GEMV_MAX_M`` rows
(decode), the int4 GEMV that Inductor generates (``int4_weight_only_cpu``: it streams the
packed weight once, ~4-5x faster than the float32 ``F.linear`` at M = 1, float32-exact);
more rows (prefill), a generated dequantize kernel writes the weight a cache-sized block
of rows at a time and oneDNN's linear (float32; ``F.linear`` otherwise) multiplies each
block (``int4_prefill_cpu``, ~4.6x faster than the reference's whole-weight eager
dequantize before oneDNN halved the matmul); the reference (dequantize, then
``F.linear``) where neither generated kernel runs. PyTorch's int4 CPU
kernel (``aten._weight_int4pack_mm_for_cpu``, 45 us against 116 us for the fp32 linear at
M=1, K=768, N=2048, bfloat16 only: its float32 path is 5x slower than the float32 linear)
reads its own blocked layout: ``quant_packing.pack_int4_for_cpu`` converts once, at load
time, and the separate op ``llmopt::int4_weight_only_linear_cpu`` consumes it
(``llmopt.quant`` picks it for bfloat16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .int4_weight_only_cpu import int4_gemv_cpu, int4_prefill_cpu
from .kernel_mode import on_tensor_device
from .quant_launch import (
    allocate_output, gemm_tile, implementation, launch_weight_only, load_tile, store_row, store_tile,
)
from .quant_packing import check_activations, check_bias, check_int4_weight, dequantize_int4, has_aten

OP = "int4_weight_only_linear"
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE"]


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _dequantized_nibbles(w_ptr, s_ptr, z_ptr, offs_n, offs_b, mask_n, mask_b, k0,
                         stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                         GROUP_SIZE: tl.constexpr):
    """``(lo, hi, scale)``: the even / odd columns ``q - z`` of a ``[BLOCK_N, BLOCK_K // 2]``
    packed tile in fp32, and its group's scales ``[BLOCK_N]``."""
    packed = load_tile(w_ptr, offs_n, offs_b, mask_n, mask_b, stride_wn, stride_wk, 0).to(tl.int32)
    group = k0 // GROUP_SIZE
    scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n * stride_zn + group * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
    lo = (packed & 0xF).to(tl.float32) - zero[:, None]
    hi = ((packed >> 4) & 0xF).to(tl.float32) - zero[:, None]
    return lo, hi, scale


@triton.jit
def _int4_wo_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr, M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    half_k = tl.multiple_of(K // 2, 16)  # K % GROUP_SIZE == 0 and GROUP_SIZE % 32 == 0: 16-byte rows
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # byte j of the tile holds columns 2j (low nibble) and 2j + 1 (high nibble)
        offs_b = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        mask_b = offs_b < half_k
        x_row = x_ptr + pid_m * stride_xm
        x_even = tl.load(x_row + (2 * offs_b) * stride_xk, mask=mask_b, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + (2 * offs_b + 1) * stride_xk, mask=mask_b, other=0.0).to(tl.float32)
        lo, hi, scale = _dequantized_nibbles(w_ptr, s_ptr, z_ptr, offs_n, offs_b, mask_n, mask_b, k0,
                                             stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                                             GROUP_SIZE)
        part = tl.sum(lo * x_even[None, :], axis=1) + tl.sum(hi * x_odd[None, :], axis=1)
        acc += part * scale
    store_row(y_ptr, acc, b_ptr, pid_m, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _int4_wo_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr, M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    half_k = tl.multiple_of(K // 2, 16)  # K % GROUP_SIZE == 0 and GROUP_SIZE % 32 == 0: 16-byte rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_b = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        mask_b = offs_b < half_k
        x_even = load_tile(x_ptr, offs_m, 2 * offs_b, mask_m, mask_b, stride_xm, stride_xk, 0.0)
        x_odd = load_tile(x_ptr, offs_m, 2 * offs_b + 1, mask_m, mask_b, stride_xm, stride_xk, 0.0)
        lo, hi, scale = _dequantized_nibbles(w_ptr, s_ptr, z_ptr, offs_n, offs_b, mask_n, mask_b, k0,
                                             stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                                             GROUP_SIZE)
        if FP32_DOT:
            part = tl.dot(x_even.to(tl.float32), tl.trans(lo), input_precision="ieee")
            part += tl.dot(x_odd.to(tl.float32), tl.trans(hi), input_precision="ieee")
        else:
            # q - z is a small integer: exact in fp16/bf16, so the dot runs in the activation dtype.
            part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype)))
            part += tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)))
        acc += part * scale[None, :]
    store_tile(y_ptr, acc, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS)


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------
def int4_weight_only_linear_ref(x, w_packed, scales, zeros, group_size, bias=None):
    """``x @ ((q - zeros) * scales)^T + bias``, dequantizing the whole weight first."""
    n, k = check_int4_weight(OP, x, w_packed, scales, zeros, group_size, bias)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_int4(w_packed, scales, zeros, group_size, compute).to(x.dtype)
    y = F.linear(x.reshape(-1, k), w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], n)


def int4_weight_only_linear_cpu_impl(x, w_packed, scales, zeros, group_size, bias=None):
    """The CPU implementation of ``int4_weight_only_linear`` (portable layout): the generated
    int4 GEMV for a few rows, the blocked generated dequantize + ``prefill_linear`` for more,
    the reference where neither runs (module docstring)."""
    n, k = check_int4_weight(OP, x, w_packed, scales, zeros, group_size, bias)
    x2 = x.reshape(-1, k)
    y = int4_gemv_cpu(x2, w_packed, scales, zeros, bias)
    if y is None:
        y = int4_prefill_cpu(x2, w_packed, scales, zeros, bias)
    if y is None:
        return int4_weight_only_linear_ref(x, w_packed, scales, zeros, group_size, bias)
    return y.reshape(*x.shape[:-1], n)


def int4_weight_only_linear_cpu_ref(x, w_cpu_packed, scales_and_zeros, group_size, bias=None):
    """The CPU int4 kernel on the layout made by ``quant_packing.pack_int4_for_cpu``."""
    op = "int4_weight_only_linear_cpu"
    if not has_aten("_weight_int4pack_mm_for_cpu"):
        raise RuntimeError(f"{op}: this torch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu; "
                           "use int4_weight_only_linear on the portable layout")
    if x.device.type != "cpu" or w_cpu_packed.device.type != "cpu":
        raise ValueError(f"{op}: CPU only (x on {x.device}); use int4_weight_only_linear on other devices")
    if w_cpu_packed.dtype != torch.uint8 or w_cpu_packed.dim() != 2:
        raise TypeError(f"{op}: w_cpu_packed must come from pack_int4_for_cpu (uint8 [N, K // 2]), got "
                        f"{w_cpu_packed.dtype} {tuple(w_cpu_packed.shape)}")
    n, k = w_cpu_packed.shape[0], w_cpu_packed.shape[1] * 2
    check_activations(op, x, k)
    if x.dtype == torch.float64:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16 (the CPU kernel has no float64)")
    if group_size <= 0 or k % group_size != 0 or scales_and_zeros.shape != (k // group_size, n, 2):
        raise ValueError(f"{op}: scales_and_zeros must be [K // group_size, N, 2]=[{k // max(group_size, 1)}, {n}, 2], "
                         f"got {tuple(scales_and_zeros.shape)} with group_size={group_size}")
    check_bias(op, bias, n, x)
    x2 = x.reshape(-1, k).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w_cpu_packed, group_size, scales_and_zeros.to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------
# Launcher and registered ops
# ----------------------------------------------------------------------------------------
@on_tensor_device
def int4_weight_only_linear_triton(x, w_packed, scales, zeros, group_size, bias=None, out=None, *, config=None):
    """Launch the int4 weight-only GEMV or flat GEMM; returns ``[..., N]``. ``config``: one
    of ``quant_launch.autotune_configs`` instead of the autotuner (tests, benchmarks)."""
    n, k = check_int4_weight(OP, x, w_packed, scales, zeros, group_size, bias)
    x2, m, y, y2 = allocate_output(OP, x, k, n, out)
    if m == 0 or n == 0:
        return y
    b = bias if bias is not None else scales
    args = (
        x2, w_packed, scales, zeros, b, y2,
        m, n, k, x2.stride(0), x2.stride(1), w_packed.stride(0), w_packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), y2.stride(0), y2.stride(1),
    )
    if config and group_size % config["BLOCK_K"]:
        raise ValueError(f"{OP}: config BLOCK_K={config['BLOCK_K']} straddles groups of "
                         f"{group_size} columns; BLOCK_K must divide the group size")
    launch_weight_only("int4", _int4_wo_gemv_kernel, _int4_wo_gemm_kernel, AUTOTUNE_KEY, x, m, n, args,
                       config=config, GROUP_SIZE=group_size, HAS_BIAS=bias is not None)
    return y


@torch.library.custom_op("llmopt::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(
    x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ ((q - zeros) * scales)^T + bias`` with int4 codes packed two per byte; the
    implementation is chosen by ``quant_launch.implementation``."""
    run = implementation(x, triton_impl=int4_weight_only_linear_triton, reference=int4_weight_only_linear_ref,
                         cpu=int4_weight_only_linear_cpu_impl)
    return run(x, w_packed, scales, zeros, group_size, bias)


@int4_weight_only_linear.register_fake
def _(x, w_packed, scales, zeros, group_size, bias=None):
    n, _ = check_int4_weight(OP, x, w_packed, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("llmopt::int4_weight_only_linear_cpu", mutates_args=())
def int4_weight_only_linear_cpu(
    x: torch.Tensor, w_cpu_packed: torch.Tensor, scales_and_zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """int4 weight-only linear on the CPU kernel's own layout (``pack_int4_for_cpu``); CPU only."""
    return int4_weight_only_linear_cpu_ref(x, w_cpu_packed, scales_and_zeros, group_size, bias)


@int4_weight_only_linear_cpu.register_fake
def _(x, w_cpu_packed, scales_and_zeros, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], w_cpu_packed.shape[0]))
