"""Flat GEMM: ``out = epilogue(x @ weight.T)`` for a small number of rows (M <= 64).

Math and shapes (the same contract as :mod:`llmopt.codegen.gemv`)::

    x:      [M, K]      small M: a decode batch, a short speculative/chunked step
    weight: [N, K]      nn.Linear layout, a frozen constant (any strides)
    bias:   [N]         optional
    acc = x @ weight.T                      fp32 accumulation (tl.dot; ieee for fp32 inputs)
    epilogue in fp32: + bias → act(gate) * up (gated, N = 2 I) → + residual [M, N_out]
    out:    [M, N_out]  in x.dtype

Why: with M of 2..64 a linear is still bound by reading the weight, but there are enough
rows for tensor cores. A regular GEMM tiles M by 64..128, so most of each tile is padding
and too few programs cover N to keep every SM streaming. FlashDecoding++ ("flat GEMM",
Hong et al., 2023, §5) pads M only to a small tile (here 16, the smallest ``tl.dot``
accepts, up to 64), tiles finely along N so there are many programs, and double-buffers
the K loop; Triton's software pipeliner does the buffering from ``num_stages``. When the
N tiles alone cannot fill the GPU, the K range is split (split-K) into fp32 partials that
the shared reduce kernel of :mod:`gemv` sums before the epilogue — no atomics, so the
result is deterministic. With a gated activation each program holds the ``gate`` tile
(rows n) and the ``up`` tile (rows n + I) of the merged weight, so the [M, 2I] product is
never written.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from llmopt.codegen.buckets import next_pow2
from llmopt.codegen.gemv import (
    begin_linear_launch,
    gemv_ref,
    k_per_split,
    launch_config,
    launch_linear_kernel,
    linear_epilogue,
    sm_count,
)
from llmopt.codegen.kernel_mode import on_tensor_device

# ---------------------------------------------------------------------------------------
# Autotune config space and pruning
# ---------------------------------------------------------------------------------------

FLAT_GEMM_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
FLAT_GEMM_MAX_BLOCK_M = 64


def flat_gemm_block_m(M: int) -> int:
    """M padded to the smallest tile ``tl.dot`` takes (16), up to 64."""
    return min(FLAT_GEMM_MAX_BLOCK_M, max(16, next_pow2(M)))


def flat_gemm_configs(M: int) -> list[dict]:
    """The config space ``llmopt autotune`` sweeps for ``flat_gemm`` at M rows (before pruning)."""
    block_m = flat_gemm_block_m(M)
    # N and K are run-time arguments: Triton compiles each config once for every shape, so
    # a sweep costs one compile per config and then only timing
    space = itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (3, 4))
    return [
        {"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_stages": ns, "num_warps": 4}
        for bn, bk, sk, ns in space
    ]


def shared_memory_bytes(config: dict, element_size: int, gated: bool) -> int:
    """Shared memory of the pipelined K loop: one x tile and one (or two) weight tiles per stage."""
    tiles = config["BLOCK_M"] * config["BLOCK_K"] + (2 if gated else 1) * config["BLOCK_K"] * config["BLOCK_N"]
    return config["num_stages"] * tiles * element_size


def prune_flat_gemm_configs(
    configs: list[dict], N: int, K: int, element_size: int = 2, gated: bool = False,
    max_shared_bytes: int = 160 * 1024,
) -> list[dict]:
    """Drop configs that overflow shared memory, tile far past the problem, or split K
    into slices shorter than two K blocks (nothing left to pipeline)."""
    n_out = N // 2 if gated else N
    kept = []
    for c in configs:
        if shared_memory_bytes(c, element_size, gated) > max_shared_bytes:
            continue
        if c["BLOCK_N"] > max(32, next_pow2(n_out)) or c["BLOCK_K"] > max(64, next_pow2(K)):
            continue
        if c["SPLIT_K"] > 1 and K < 2 * c["BLOCK_K"] * c["SPLIT_K"]:
            continue
        kept.append(c)
    return kept


def flat_gemm_heuristic_config(N: int, K: int, M: int, gated: bool, dtype: torch.dtype, device: torch.device) -> dict:
    """The config used when the tuning table has none for this shape.

    On CUDA: M padded to 16..64, 64 output features x 128 columns per step (32 for fp32,
    whose ieee dot runs on FMA units), 4 stages (3 when the gated tile pair or fp32 doubles
    shared memory), and split-K until there are about two programs per SM. Under the
    interpreter: the largest tiles, the fewest programs.
    """
    n_out = N // 2 if gated else N
    block_m = flat_gemm_block_m(M)
    if device.type != "cuda":
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": min(64, max(16, next_pow2(n_out))),
            "BLOCK_K": min(64, max(16, next_pow2(K))),
            "SPLIT_K": 1,
            "num_warps": 4,
            "num_stages": 1,
        }
    fp32 = dtype == torch.float32
    block_n = 64
    block_k = 32 if fp32 else 128
    block_k = min(block_k, max(16, next_pow2(K)))
    num_stages = 3 if (gated or fp32 or block_m == 64) else 4
    programs = triton.cdiv(n_out, block_n) * triton.cdiv(M, block_m)
    sms = sm_count(device)
    split_k = 1
    while programs * split_k < 2 * sms and K >= 2 * block_k * split_k * 4 and split_k < 8:
        split_k *= 2
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "SPLIT_K": split_k, "num_warps": 4, "num_stages": num_stages,
    }


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _flat_gemm_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, ws_ptr,
    # sizes
    M, N_OUT, K, K_PER_SPLIT,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
    stride_ws_split, stride_ws_m,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    GATED: tl.constexpr = ACTIVATION != ""

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # int64 row offsets: lm_head-sized weights pass 2**31 elements
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    up_cols = w_ptr + (offs_n.to(tl.int64) + N_OUT)[None, :] * stride_wn
    k_start = pid_k * K_PER_SPLIT

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K_PER_SPLIT, BLOCK_K)):
        offs_k = k_start + kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_k[:, None] & mask_n[None, :]
        wt = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_w, other=0.0)  # [BLOCK_K, BLOCK_N] = w^T tile
        if DOT_IN_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if GATED:
            ut = tl.load(up_cols + offs_k[:, None] * stride_wk, mask=mask_w, other=0.0)
            if DOT_IN_FP32:
                ut = ut.to(tl.float32)
            acc_up = tl.dot(xt, ut, acc_up, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # fp32 partials to the workspace [SPLIT_K, M, N]; the reduce kernel does the epilogue
        ws_tile = ws_ptr + pid_k * stride_ws_split + offs_m[:, None] * stride_ws_m + offs_n[None, :]
        tl.store(ws_tile, acc, mask=mask)
        if GATED:
            tl.store(ws_tile + N_OUT, acc_up, mask=mask)
    else:
        acc = linear_epilogue(acc, acc_up, b_ptr, r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                              offs_n[None, :], mask_n[None, :], mask, N_OUT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
        out_tile = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Reference and launcher
# ---------------------------------------------------------------------------------------


def flat_gemm_ref(x, weight, bias=None, residual=None, activation: str = "") -> torch.Tensor:
    """Eager reference: the same math as :func:`llmopt.codegen.gemv.gemv_ref` (one oracle
    for the whole linear family)."""
    return gemv_ref(x, weight, bias, residual, activation)


@on_tensor_device
def flat_gemm_triton(x, weight, bias=None, residual=None, activation: str = "", *, config=None, out=None):
    """Launch the flat GEMM kernel on a 2-D ``x`` [M, K]; any M works (M is tiled by
    BLOCK_M <= 64), it is meant for M <= 64.

    ``config``: a dict of :data:`FLAT_GEMM_CONFIG_KEYS` (from the tuning table), else
    :func:`flat_gemm_heuristic_config`. ``out``: an optional [M, N_out] buffer to write.
    """
    out, n_out, done = begin_linear_launch(x, weight, bias, residual, activation, out, "flat_gemm")
    if done:
        return out
    M, K = x.shape
    cfg = launch_config(flat_gemm_heuristic_config(weight.shape[0], K, M, bool(activation), x.dtype, x.device),
                        config, FLAT_GEMM_CONFIG_KEYS, "flat_gemm")
    if x.is_cuda and min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
        raise ValueError(f"flat_gemm config {cfg}: tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16")
    block_m, block_n, block_k, split_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(M, block_m), split_k)
    # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits (triton 3.9):
    # upcast there; bf16 x bf16 products are exact in fp32, so the math is unchanged.
    dot_in_fp32 = x.dtype == torch.bfloat16 and not x.is_cuda
    return launch_linear_kernel(
        _flat_gemm_kernel, grid, (M, n_out, K, k_per_split(K, split_k, block_k)), x, weight, bias, residual,
        activation, out, cfg, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or dot_in_fp32 else "tf32", DOT_IN_FP32=dot_in_fp32,
    )


__all__ = [
    "FLAT_GEMM_CONFIG_KEYS",
    "flat_gemm_block_m",
    "flat_gemm_configs",
    "flat_gemm_heuristic_config",
    "flat_gemm_ref",
    "flat_gemm_triton",
    "prune_flat_gemm_configs",
    "shared_memory_bytes",
]
