"""Quantized linear layers: int8 / int4 weight-only GEMV and flat GEMM, and the W8A8 int8 GEMM.

In decode a linear is bound by the bytes of weight it reads: int8 weights halve them
against bf16, int4 quarter them. The weights stay quantized in memory and are dequantized
in registers, inside the matmul loop. In prefill only quantizing the activations too helps:
W8A8 multiplies int8 by int8 into int32 (SmoothQuant, Xiao et al. 2022, arXiv:2211.10438).

Math (``x: [M, K]`` activations, any leading dims flattened into M; ``y: [M, N]``):

* int8 weight-only — ``w_int8: [N, K]`` int8, ``scales: [N]``, ``W[n, k] = w_int8[n, k] * scales[n]``.
  The scale is per output channel, so it leaves the K sum:
  ``y[m, n] = scales[n] * sum_k x[m, k] * w_int8[n, k] + bias[n]``.
* int4 weight-only — ``w_packed: [N, K // 2]`` uint8, two 4-bit codes per byte: the low
  nibble is column ``2j``, the high nibble column ``2j + 1``; ``scales, zeros: [N, K // G]``
  (G = group size along K); ``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``.
  A K tile never straddles a group, so per tile ``acc += scales[n, g] * sum_k x * (q - z)``.
  Zeros are stored as floats: integer zero points (RTN, GPTQ, AWQ) are exact in any dtype.
* W8A8 — per-token dynamic activation quantization ``s_x[m] = max_k |x[m, k]| / 127``,
  ``x_q = clamp(floor(x / s_x + 0.5), -127, 127)`` (computed in fp32), then
  ``acc = x_q @ w_int8^T`` in int32 (exact) and ``y = acc * s_x[m] * w_scales[n] + bias[n]``.

Accumulation: fp32 for weight-only (the dequantized tile is exact in the activation dtype:
int8 codes and ``q - z`` are small integers), int32 for W8A8. Output dtype = ``x.dtype``.

Kernels (Triton): a GEMV for ``M <= GEMV_MAX_M`` (one program per row and ``BLOCK_N``
outputs; the product is reduced along K with ``tl.sum``: each weight byte is read once per
row, which is the decode case) and a flat GEMM for larger M (``BLOCK_M x BLOCK_N`` tiles,
``tl.dot``, small ``BLOCK_M`` for decode batches, larger ones for prefill through
autotuning), following FlashDecoding++ (Hong et al. 2023, arXiv:2311.01282) for the
GEMV / flat-GEMM split and gpt-fast for the weight-only formats.

CPU: for float32 / float16 activations and up to ``CPU_GEMV_MAX_M`` rows (decode),
``int8_weight_only_linear`` runs an int8 GEMV that Inductor generates from an eager
multiply-and-reduce (llmopt/codegen/quant_linear_cpu.py: it streams the int8 weight once,
3-4.5x faster than the float32 ``F.linear`` at M = 1). PyTorch's weight-pack kernels
(``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) are the fast path for
bfloat16 activations only: measured on an AVX512-bf16 CPU at M=1, K=768, N=2048 they take
86 us (int8) and 45 us (int4) against 116 us for fp32 ``F.linear``, while their fp32 and
fp16 paths take 0.9-9 ms (slower than dequantize + fp32 matmul, 250 us). So the
references below use them for bfloat16 inputs, when the running torch has them
(``hasattr``) and the shape is inside their contract, and dequantize + ``F.linear``
otherwise (for float32 int8, ``F.linear`` on the int8 codes then the per-channel scale on
the output: one pass over the weight). ``_weight_int8pack_mm`` crashes or returns garbage
for K not a multiple of 16 (torch 2.13), hence that check. The int4 CPU kernel reads its
own blocked weight layout: ``pack_int4_for_cpu`` converts once (at load time), and
``int4_weight_only_linear_cpu`` is the op that consumes it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .kernel_mode import kernel_mode, on_tensor_device, use_triton
from .quant_linear_cpu import int8_gemv_cpu

# Rows up to which the GEMV kernel is used instead of the flat GEMM.
GEMV_MAX_M = 2
# Floor of the per-token activation absmax, so an all-zero row quantizes to zeros, not NaN.
ACT_AMAX_EPS = 1e-10
INT8_QMAX = 127
# Float bytes of one block of weight rows converted at a time by the CPU int8 reference.
_DEQUANT_BLOCK_BYTES = 4 * 2**20
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------
# Autotune configuration space (CUDA only; the interpreter runs one config per kernel).
# ----------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def m_bucket(m: int) -> int:
    """Autotune key for the row count: min(next_pow2(M), 64), never the raw growing M."""
    return min(_next_pow2(max(m, 1)), 64)


def _gemv_configs():
    # BLOCK_K 32: int4 with group size 32 needs a K tile inside one group
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (16, 32, 64, 128)
        for bk in (32, 64, 128, 256, 512)
        for w in (4, 8)
        for s in (2, 4)
    ]


def _gemm_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64, 128)
        for bn in (32, 64, 128)
        for bk in (32, 64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles exceed the problem or straddle an int4 group.

    The int4 kernels apply one group's scale and zero to a whole K tile, so a tile must lie
    inside one group (``GROUP_SIZE % BLOCK_K == 0``); that rule is a correctness rule, not a
    speed one, so there is no fallback past it: an empty result raises.
    """
    args = {**named_args, **kwargs}
    m_b = args.get("M_BUCKET", 64)
    k = args["K"]
    group = args.get("GROUP_SIZE", None)
    exact = [cfg for cfg in configs if group is None or group % cfg.kwargs["BLOCK_K"] == 0]
    if not exact:
        raise ValueError(
            f"int4 weight-only linear: no config has a K tile inside a group of {group} columns "
            f"(BLOCK_K must divide the group size); use a group size that is a multiple of 32"
        )
    kept = []
    for cfg in exact:
        bm = cfg.kwargs.get("BLOCK_M", 16)
        bk = cfg.kwargs["BLOCK_K"]
        if bm > max(16, m_b):
            continue
        if bk > max(32, _next_pow2(k)):
            continue
        kept.append(cfg)
    # tiles past the problem only waste work: the smallest exact tile is a correct fallback
    return kept or [min(exact, key=lambda c: (c.kwargs.get("BLOCK_M", 16), c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]))]


# Interpreter / fallback configs: small tiles keep the CPU interpreter fast.
_GEMV_DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 64}
_GEMM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


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
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0,
        )
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * stride_ym + offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int8_wo_gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0,
        )
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            # int8 codes are exact in fp16/bf16, so the dot runs in the activation dtype.
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


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
        packed = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_b[None, :], other=0,
        ).to(tl.int32)
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs_n * stride_zn + group * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
        lo = (packed & 0xF).to(tl.float32) - zero[:, None]
        hi = ((packed >> 4) & 0xF).to(tl.float32) - zero[:, None]
        part = tl.sum(lo * x_even[None, :], axis=1) + tl.sum(hi * x_odd[None, :], axis=1)
        acc += part * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * stride_ym + offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_wo_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr, M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    half_k = tl.multiple_of(K // 2, 16)  # K % GROUP_SIZE == 0 and GROUP_SIZE % 32 == 0: 16-byte rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_b = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        mask_b = offs_b < half_k
        mask_x = mask_m[:, None] & mask_b[None, :]
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_rows + (2 * offs_b)[None, :] * stride_xk, mask=mask_x, other=0.0)
        x_odd = tl.load(x_rows + (2 * offs_b + 1)[None, :] * stride_xk, mask=mask_x, other=0.0)
        packed = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_b[None, :], other=0,
        ).to(tl.int32)
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs_n * stride_zn + group * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
        lo = (packed & 0xF).to(tl.float32) - zero[:, None]
        hi = ((packed >> 4) & 0xF).to(tl.float32) - zero[:, None]
        if FP32_DOT:
            part = tl.dot(x_even.to(tl.float32), tl.trans(lo), input_precision="ieee")
            part += tl.dot(x_odd.to(tl.float32), tl.trans(hi), input_precision="ieee")
        else:
            # q - z is a small integer: exact in fp16/bf16, so the dot runs in the activation dtype.
            part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype)))
            part += tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)))
        acc += part * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


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
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0,
        )
        b = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0,
        )
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


@functools.lru_cache(maxsize=None)
def _autotuned(name: str):
    """The CUDA variant of a kernel: autotuned over its config space, keyed by bucketed M."""
    kernel, configs, key = {
        "int8_gemv": (_int8_wo_gemv_kernel, _gemv_configs, ["M_BUCKET", "N", "K"]),
        "int8_gemm": (_int8_wo_gemm_kernel, _gemm_configs, ["M_BUCKET", "N", "K"]),
        "int4_gemv": (_int4_wo_gemv_kernel, _gemv_configs, ["M_BUCKET", "N", "K", "GROUP_SIZE"]),
        "int4_gemm": (_int4_wo_gemm_kernel, _gemm_configs, ["M_BUCKET", "N", "K", "GROUP_SIZE"]),
        "w8a8_gemm": (_w8a8_gemm_kernel, _gemm_configs, ["M_BUCKET", "N", "K"]),
    }[name]
    return triton.autotune(configs=configs(), key=key, prune_configs_by={"early_config_prune": _prune_configs})(kernel)


_CONFIG_SPACES = {"int8_gemv": _gemv_configs, "int8_gemm": _gemm_configs, "int4_gemv": _gemv_configs,
                  "int4_gemm": _gemm_configs, "w8a8_gemm": _gemm_configs}


def autotune_configs(name: str, **args) -> list[dict]:
    """The configs the CUDA autotuner of ``name`` (``int4_gemv``, ``int8_gemm``...) times for
    these launch arguments (``K``, ``M_BUCKET``, ``GROUP_SIZE``), after pruning, as dicts a
    launcher's ``config=`` takes. Tests run each of them in the interpreter."""
    kept = _prune_configs(_CONFIG_SPACES[name](), {}, **args)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]


def _launch(name: str, kernel, grid_fn, default: dict, is_cuda: bool, *args, config=None, **kwargs):
    """Autotuned launch on CUDA; one fixed config in the interpreter (autotuning there is
    slow); ``config`` (a dict of :func:`autotune_configs`) forces one config anywhere."""
    if config:
        kernel[grid_fn(config)](*args, **kwargs, **config)
    elif is_cuda:
        _autotuned(name)[grid_fn](*args, **kwargs)
    else:
        kernel[grid_fn(default)](*args, **kwargs, **default)


# ----------------------------------------------------------------------------------------
# Layout helpers shared by the references, the launchers and llmopt.quant
# ----------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``q: [N, K]`` (integers in [0, 15], K even) into ``uint8 [N, K // 2]``.

    Column ``2j`` goes to the low nibble of byte ``j``, column ``2j + 1`` to the high nibble.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got K={q.shape[-1]}")
    q = q.to(torch.int16)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [N, K // 2]`` -> ``uint8 [N, K]`` codes in [0, 15]."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_int8(w_int8: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``w_int8 [N, K] * scales [N]`` in ``dtype``."""
    return w_int8.to(dtype) * scales.to(dtype)[:, None]


def dequantize_int4(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    """``(q - zeros) * scales`` with per-group parameters broadcast along K; ``[N, K]`` in ``dtype``."""
    q = unpack_int4(w_packed).to(dtype)
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    w = (q - zeros.to(dtype)[:, :, None]) * scales.to(dtype)[:, :, None]
    return w.view(n, k)


def quantize_rows_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of ``x: [M, K]``, computed in fp32.

    Returns ``(x_q int8 [M, K], scale fp32 [M])`` with ``x ~= x_q * scale[:, None]``.
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scale = amax.clamp_min(ACT_AMAX_EPS) / float(INT8_QMAX)
    q = torch.floor(xf / scale[:, None] + 0.5).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def _has_aten(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# _weight_int8pack_mm reads its operands with aligned vector loads (torch 2.13): a weight
# or activation that does not start on a 64-byte boundary (a view into a safetensors file,
# a slice) crashes the process. torch's allocator aligns to 64 bytes.
_INT8PACK_ALIGN = 64


def int8pack_cpu_supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether ``aten._weight_int8pack_mm`` is the fast, safe choice for this call.

    The weight must be contiguous and 64-byte aligned (the activations are copied when
    they are not); K must be a multiple of 16.
    """
    return (
        _has_aten("_weight_int8pack_mm")
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and w_int8.shape[1] % 16 == 0
        and w_int8.is_contiguous()
        and w_int8.data_ptr() % _INT8PACK_ALIGN == 0
        and x.numel() > 0
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % _INT8PACK_ALIGN == 0 else t.clone()


def int4pack_cpu_supported(n: int, k: int, group_size: int) -> bool:
    """Whether the CPU int4 weight-pack kernel accepts a ``[n, k]`` weight with this group size."""
    return (
        _has_aten("_weight_int4pack_mm_for_cpu")
        and _has_aten("_convert_weight_to_int4pack_for_cpu")
        and n % 16 == 0
        and group_size in (32, 64, 128, 256)
        and k % group_size == 0
    )


def pack_int4_for_cpu(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert llmopt's int4 layout to the CPU kernel's: ``(packed uint8, scales_and_zeros)``.

    The CPU kernel computes ``W = (q - 8) * scale + zero_offset``; with llmopt's
    ``W = (q - z) * s`` that is ``zero_offset = (8 - z) * s``. ``scales_and_zeros`` is
    ``[K // G, N, 2]`` fp32. The packed layout is private to the running torch: never save it.
    """
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    if not int4pack_cpu_supported(n, k, group_size):
        raise ValueError(
            f"the CPU int4 kernel needs N % 16 == 0, group_size in (32, 64, 128, 256) and K % group_size == 0 "
            f"(got N={n}, K={k}, group_size={group_size}) and a torch that has aten._weight_int4pack_mm_for_cpu"
        )
    q = unpack_int4(w_packed.cpu()).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s = scales.cpu().to(torch.float32)
    offset = (8.0 - zeros.cpu().to(torch.float32)) * s
    scales_and_zeros = torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


# ----------------------------------------------------------------------------------------
# Contracts
# ----------------------------------------------------------------------------------------
def _check_x(op: str, x: torch.Tensor, k: int) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., K] with K={k} (the weight's in_features), got {tuple(x.shape)}")


def _check_bias(op: str, bias, n: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    if bias.shape != (n,):
        raise ValueError(f"{op}: bias must be [N]=[{n}], got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}; move them to one device")


def _check_int8_weight(op: str, x, w_int8, scales, bias) -> tuple[int, int]:
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError(f"{op}: weight must be a 2-D int8 tensor [N, K], got {w_int8.dtype} {tuple(w_int8.shape)}")
    n, k = w_int8.shape
    _check_x(op, x, k)
    if scales.shape != (n,) or not scales.is_floating_point():
        raise ValueError(f"{op}: scales must be a float tensor [N]=[{n}], got {scales.dtype} {tuple(scales.shape)}")
    if w_int8.device != x.device or scales.device != x.device:
        raise ValueError(f"{op}: x ({x.device}), weight ({w_int8.device}) and scales ({scales.device}) must share a device")
    _check_bias(op, bias, n, x)
    return n, k


def _check_int4_weight(op: str, x, w_packed, scales, zeros, group_size, bias) -> tuple[int, int]:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(
            f"{op}: w_packed must be a 2-D uint8 tensor [N, K // 2] (two int4 codes per byte), "
            f"got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    _check_x(op, x, k)
    if group_size <= 0 or group_size % 32 != 0 or k % group_size != 0:
        raise ValueError(
            f"{op}: group_size must be a positive multiple of 32 dividing K={k}, got {group_size}"
        )
    groups = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (n, groups) or not t.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a float tensor [N, K // group_size]=[{n}, {groups}], "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if w_packed.device != x.device:
        raise ValueError(f"{op}: w_packed is on {w_packed.device} but x is on {x.device}")
    _check_bias(op, bias, n, x)
    return n, k


def _check_out(op: str, out, shape, x) -> None:
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"{op}: out must be {tuple(shape)} {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype}")


# ----------------------------------------------------------------------------------------
# References (the CPU implementation and the test oracle)
# ----------------------------------------------------------------------------------------
def int8_weight_only_linear_ref(x, w_int8, scales, bias=None):
    """``x @ (w_int8 * scales[:, None])^T + bias``; the aten int8 kernel for bf16 on CPU."""
    n, k = _check_int8_weight("int8_weight_only_linear", x, w_int8, scales, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if int8pack_cpu_supported(x2, w_int8):
        y = torch.ops.aten._weight_int8pack_mm(_aligned(x2), w_int8, _aligned(scales.to(x.dtype)))
        if bias is not None:
            y = y + bias.to(y.dtype)
    elif x.dtype in (torch.float32, torch.float64):
        # The per-channel scale leaves the K sum: scale the [M, N] output, not the [N, K]
        # weight (one conversion pass over the weight instead of two; |q| <= 127 keeps
        # the unscaled sums far inside the float32 range). The weight is converted in
        # blocks of rows that stay in cache: converting a 32000 x 768 head whole allocates
        # 98 MB and takes 60 ms at M = 16 (page faults), in 3 MB blocks 14 ms.
        rows = max(64, _DEQUANT_BLOCK_BYTES // (x.element_size() * max(k, 1)))
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


def int8_weight_only_linear_cpu_fast(x, w_int8, scales, bias=None):
    """The CPU path: aten's int8 kernel for bfloat16, the generated int8 GEMV
    (llmopt/codegen/quant_linear_cpu.py) for a few rows of other dtypes, the reference
    (dequantize + matmul) otherwise."""
    n, k = _check_int8_weight("int8_weight_only_linear", x, w_int8, scales, bias)
    x2 = x.reshape(-1, k)
    y = None if int8pack_cpu_supported(x2, w_int8) else int8_gemv_cpu(x2, w_int8, scales, bias)
    if y is None:
        return int8_weight_only_linear_ref(x, w_int8, scales, bias)
    return y.reshape(*x.shape[:-1], n)


def int4_weight_only_linear_ref(x, w_packed, scales, zeros, group_size, bias=None):
    """``x @ ((q - zeros) * scales)^T + bias``, dequantizing the whole weight first."""
    n, k = _check_int4_weight("int4_weight_only_linear", x, w_packed, scales, zeros, group_size, bias)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_int4(w_packed, scales, zeros, group_size, compute).to(x.dtype)
    y = F.linear(x.reshape(-1, k), w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], n)


def int4_weight_only_linear_cpu_ref(x, w_cpu_packed, scales_and_zeros, group_size, bias=None):
    """The CPU int4 kernel on the layout made by :func:`pack_int4_for_cpu`."""
    op = "int4_weight_only_linear_cpu"
    if not _has_aten("_weight_int4pack_mm_for_cpu"):
        raise RuntimeError(f"{op}: this torch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu; "
                           "use int4_weight_only_linear on the portable layout")
    if x.device.type != "cpu" or w_cpu_packed.device.type != "cpu":
        raise ValueError(f"{op}: CPU only (x on {x.device}); use int4_weight_only_linear on other devices")
    if w_cpu_packed.dtype != torch.uint8 or w_cpu_packed.dim() != 2:
        raise TypeError(f"{op}: w_cpu_packed must come from pack_int4_for_cpu (uint8 [N, K // 2]), got "
                        f"{w_cpu_packed.dtype} {tuple(w_cpu_packed.shape)}")
    n, k = w_cpu_packed.shape[0], w_cpu_packed.shape[1] * 2
    _check_x(op, x, k)
    if x.dtype == torch.float64:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16 (the CPU kernel has no float64)")
    if group_size <= 0 or k % group_size != 0 or scales_and_zeros.shape != (k // group_size, n, 2):
        raise ValueError(f"{op}: scales_and_zeros must be [K // group_size, N, 2]=[{k // max(group_size, 1)}, {n}, 2], "
                         f"got {tuple(scales_and_zeros.shape)} with group_size={group_size}")
    _check_bias(op, bias, n, x)
    x2 = x.reshape(-1, k).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w_cpu_packed, group_size, scales_and_zeros.to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def w8a8_linear_ref(x, w_int8, w_scales, bias=None):
    """Per-token int8 activations times int8 weights, int32 accumulation, scale epilogue."""
    n, k = _check_int8_weight("w8a8_linear", x, w_int8, w_scales, bias)
    x2 = x.reshape(-1, k)
    xq, sx = quantize_rows_int8_ref(x2)
    if x.device.type == "cpu" and _has_aten("_int_mm") and x2.shape[0] > 0:
        acc = torch.ops.aten._int_mm(xq, w_int8.t()).to(torch.float64)
    else:
        # exact: |acc| <= 127 * 127 * K < 2**53
        acc = xq.to(torch.float64) @ w_int8.to(torch.float64).t()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = acc.to(compute) * sx.to(compute)[:, None] * w_scales.to(compute)[None, :]
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _fp32_dot(x: torch.Tensor) -> bool:
    """fp32 tiles and an IEEE dot: for fp32 inputs (exact, no tf32), and for bf16 in the
    interpreter, whose ``tl.dot`` on bf16 returns garbage (triton 3.9, numpy has no bf16)."""
    return x.dtype in (torch.float32, torch.float64) or (x.dtype == torch.bfloat16 and not x.is_cuda)


def _output(op: str, x: torch.Tensor, k: int, n: int, out):
    """``(x2 [M, K], M, y [..., N], y2 [M, N])``: the flattened input and the (checked or
    new) output of a quantized linear."""
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    _check_out(op, out, (*x.shape[:-1], n), x)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device) if out is None else out
    return x2, m, y, y.view(m, n)


def _grid_gemv(n: int, m: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)


def _grid_gemm(n: int, m: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))


def _launch_weight_only(scheme: str, x, m: int, n: int, args: tuple, block_k=None, config=None,
                        **constexprs) -> None:
    """The ``<scheme>_gemv`` kernel for ``M <= GEMV_MAX_M``, the ``<scheme>_gemm`` one above;
    ``block_k(default_block_k)`` narrows the interpreter's fixed BLOCK_K (int4: inside a group)."""
    gemv = m <= GEMV_MAX_M
    default = _GEMV_DEFAULT if gemv else _GEMM_DEFAULT
    if block_k is not None:
        default = dict(default, BLOCK_K=block_k(default["BLOCK_K"]))
    name = f"{scheme}_{'gemv' if gemv else 'gemm'}"
    kernel = {"int8_gemv": _int8_wo_gemv_kernel, "int8_gemm": _int8_wo_gemm_kernel,
              "int4_gemv": _int4_wo_gemv_kernel, "int4_gemm": _int4_wo_gemm_kernel}[name]
    if not gemv:
        constexprs["FP32_DOT"] = _fp32_dot(x)
    _launch(name, kernel, (_grid_gemv if gemv else _grid_gemm)(n, m), default, x.is_cuda, *args,
            config=config, M_BUCKET=m_bucket(m), **constexprs)


@on_tensor_device
def int8_weight_only_linear_triton(x, w_int8, scales, bias=None, out=None):
    """Launch the int8 weight-only GEMV (M <= GEMV_MAX_M) or flat GEMM; returns ``[..., N]``."""
    n, k = _check_int8_weight("int8_weight_only_linear", x, w_int8, scales, bias)
    x2, m, y, y2 = _output("int8_weight_only_linear", x, k, n, out)
    if m == 0 or n == 0:
        return y
    b = bias if bias is not None else scales
    args = (x2, w_int8, scales, b, y2,
            m, n, k, x2.stride(0), x2.stride(1), w_int8.stride(0), w_int8.stride(1), y2.stride(0), y2.stride(1))
    _launch_weight_only("int8", x, m, n, args, HAS_BIAS=bias is not None)
    return y


def _int4_block_k(default_bk: int, group_size: int) -> int:
    """Largest power of two <= default_bk dividing group_size (a K tile stays inside a group)."""
    bk = default_bk
    while bk > 32 and group_size % bk:
        bk //= 2
    return bk


@on_tensor_device
def int4_weight_only_linear_triton(x, w_packed, scales, zeros, group_size, bias=None, out=None, *, config=None):
    """Launch the int4 weight-only GEMV or flat GEMM; returns ``[..., N]``. ``config``: one
    of :func:`autotune_configs` instead of the autotuner (tests, benchmarks)."""
    n, k = _check_int4_weight("int4_weight_only_linear", x, w_packed, scales, zeros, group_size, bias)
    x2, m, y, y2 = _output("int4_weight_only_linear", x, k, n, out)
    if m == 0 or n == 0:
        return y
    b = bias if bias is not None else scales
    args = (
        x2, w_packed, scales, zeros, b, y2,
        m, n, k, x2.stride(0), x2.stride(1), w_packed.stride(0), w_packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), y2.stride(0), y2.stride(1),
    )
    if config and group_size % config["BLOCK_K"]:
        raise ValueError(f"int4_weight_only_linear: config BLOCK_K={config['BLOCK_K']} straddles groups of "
                         f"{group_size} columns; BLOCK_K must divide the group size")
    _launch_weight_only("int4", x, m, n, args, block_k=lambda bk: _int4_block_k(bk, group_size), config=config,
                        GROUP_SIZE=group_size, HAS_BIAS=bias is not None)
    return y


@on_tensor_device
def quantize_rows_int8_triton(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_rows_int8_ref` for ``x2: [M, K]``."""
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, sx
    block_k = min(max(_next_pow2(k), 16), 1024 if x2.is_cuda else 128)
    _quantize_rows_int8_kernel[(m,)](
        x2, xq, sx, m, k, x2.stride(0), x2.stride(1), xq.stride(0), xq.stride(1),
        AMAX_EPS=ACT_AMAX_EPS, BLOCK_K=block_k,
    )
    return xq, sx


@on_tensor_device
def w8a8_linear_triton(x, w_int8, w_scales, bias=None, out=None):
    """Quantize activations per token (one kernel), then the int8 GEMM with scale epilogue."""
    n, k = _check_int8_weight("w8a8_linear", x, w_int8, w_scales, bias)
    x2, m, y, y2 = _output("w8a8_linear", x, k, n, out)
    if m == 0 or n == 0:
        return y
    xq, sx = quantize_rows_int8_triton(x2)
    b = bias if bias is not None else w_scales
    _launch("w8a8_gemm", _w8a8_gemm_kernel, _grid_gemm(n, m), _GEMM_DEFAULT, x.is_cuda,
            xq, sx, w_int8, w_scales, b, y2,
            m, n, k, xq.stride(0), xq.stride(1), w_int8.stride(0), w_int8.stride(1), y2.stride(0), y2.stride(1),
            M_BUCKET=m_bucket(m), HAS_BIAS=bias is not None)
    return y


# ----------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("llmopt::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ (w_int8 * scales[:, None])^T + bias`` (x: [..., K], w_int8: int8 [N, K])."""
    if use_triton(x):
        return int8_weight_only_linear_triton(x, w_int8, scales, bias)
    if x.device.type == "cpu" and kernel_mode() == "auto":
        return int8_weight_only_linear_cpu_fast(x, w_int8, scales, bias)
    return int8_weight_only_linear_ref(x, w_int8, scales, bias)


@int8_weight_only_linear.register_fake
def _(x, w_int8, scales, bias=None):
    n, _ = _check_int8_weight("int8_weight_only_linear", x, w_int8, scales, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("llmopt::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(
    x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ ((q - zeros) * scales)^T + bias`` with int4 codes packed two per byte."""
    if use_triton(x):
        return int4_weight_only_linear_triton(x, w_packed, scales, zeros, group_size, bias)
    return int4_weight_only_linear_ref(x, w_packed, scales, zeros, group_size, bias)


@int4_weight_only_linear.register_fake
def _(x, w_packed, scales, zeros, group_size, bias=None):
    n, _ = _check_int4_weight("int4_weight_only_linear", x, w_packed, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("llmopt::int4_weight_only_linear_cpu", mutates_args=())
def int4_weight_only_linear_cpu(
    x: torch.Tensor, w_cpu_packed: torch.Tensor, scales_and_zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """int4 weight-only linear on the CPU kernel's own layout (see :func:`pack_int4_for_cpu`)."""
    return int4_weight_only_linear_cpu_ref(x, w_cpu_packed, scales_and_zeros, group_size, bias)


@int4_weight_only_linear_cpu.register_fake
def _(x, w_cpu_packed, scales_and_zeros, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], w_cpu_packed.shape[0]))


@torch.library.custom_op("llmopt::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SmoothQuant W8A8 linear: per-token dynamic int8 activations, int8 weights, int32 GEMM."""
    if use_triton(x):
        return w8a8_linear_triton(x, w_int8, w_scales, bias)
    return w8a8_linear_ref(x, w_int8, w_scales, bias)


@w8a8_linear.register_fake
def _(x, w_int8, w_scales, bias=None):
    n, _ = _check_int8_weight("w8a8_linear", x, w_int8, w_scales, bias)
    return x.new_empty((*x.shape[:-1], n))
