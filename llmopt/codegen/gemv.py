"""GEMV: ``out = epilogue(x @ weight.T)`` for one (or a few) rows of ``x``.

Math and shapes::

    x:      [M, K]      M == 1 in decode (a few rows are handled one program row each)
    weight: [N, K]      nn.Linear layout, a frozen constant (any strides)
    bias:   [N]         optional
    acc[m, n] = sum_k x[m, k] * weight[n, k]          (fp32 accumulation)
    epilogue, in this order, in fp32:
        acc += bias
        gated (activation != ""): weight holds the merged rows [gate; up], N = 2 * I,
            out[m, i] = act(acc[m, i]) * acc[m, I + i]     (act: silu | gelu | gelu_tanh)
        out += residual                                     residual: [M, N_out]
    out:    [M, N_out]  in x.dtype, N_out = N (or I when gated)

Why a GEMV kernel: at M == 1 a linear is a matrix-vector product whose cost is reading
the weight once; GEMM tiles (cuBLAS) waste most of their tile on padding rows. Each
program owns ``BLOCK_N`` output features (and, when gated, the matching ``up`` rows, so
the merged [M, 2I] product never reaches memory) and streams ``BLOCK_K``-wide slabs of the
weight, accumulating elementwise products in a [BLOCK_N, BLOCK_K] fp32 register tile that
is reduced once at the end. When N is small relative to the SM count the K range is
split across programs (split-K): each writes its fp32 partial sums to a workspace and a
second, tiny kernel sums the partials and applies the epilogue — atomic-free, so results
are deterministic. Source: FlashDecoding++ (Hong et al., 2023, "flat GEMM / GEMV"
dispatch) and the FastGEMV-style row-per-warp reduction.

This module also holds what ``gemv`` and ``flat_gemm`` share: the argument contract
(:func:`check_linear_args`), the eager reference (:func:`gemv_ref`), the fused epilogue
(:func:`linear_epilogue`: bias, gated activation, residual), the launcher's first steps
(:func:`begin_linear_launch`, :func:`launch_config`) and launch
(:func:`launch_linear_kernel`, with the split-K reduce-plus-epilogue kernel).
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .buckets import next_pow2
from .kernel_mode import on_tensor_device

from .device_math import apply_activation

ACTIVATIONS = ("", "silu", "gelu", "gelu_tanh")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------
# Autotune config space and pruning
# ---------------------------------------------------------------------------------------

GEMV_CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the launchers ask at every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def gemv_configs() -> list[dict]:
    """The config space ``llmopt autotune`` sweeps for ``gemv`` (before pruning)."""
    # N and K are run-time arguments: each config compiles once for every shape
    space = itertools.product((8, 16, 32), (256, 512), (1, 2, 4, 8), (4, 8))
    return [
        {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "num_stages": 2}
        for bn, bk, sk, nw in space
    ]


def prune_gemv_configs(configs: list[dict], N: int, K: int, gated: bool = False) -> list[dict]:
    """Drop configs that cannot win for this shape: tiles wider than the problem, split-K
    slices shorter than two K blocks, or a register tile over 128 fp32 values per thread."""
    n_out = N // 2 if gated else N
    kept = []
    for c in configs:
        if c["BLOCK_N"] > max(8, next_pow2(n_out)) or c["BLOCK_K"] > max(32, next_pow2(K)):
            continue
        if c["SPLIT_K"] > 1 and K < 2 * c["BLOCK_K"] * c["SPLIT_K"]:
            continue
        per_thread = c["BLOCK_N"] * c["BLOCK_K"] * (2 if gated else 1) / (32 * c["num_warps"])
        if per_thread > 128:
            continue
        kept.append(c)
    return kept


def gemv_heuristic_config(N: int, K: int, M: int, gated: bool, device: torch.device) -> dict:
    """The config used when the tuning table has none for this shape.

    On CUDA: 16 features x 512 columns per program with 4 warps (64 fp32 accumulators per
    thread, 16-byte loads), and split-K until there are about four programs per SM, since
    a GEMV is bound by the bytes in flight. Under the interpreter: the largest tiles, the
    fewest programs (the interpreter runs programs one after another).
    """
    n_out = N // 2 if gated else N
    if device.type != "cuda":
        return {
            "BLOCK_N": min(64, max(8, next_pow2(n_out))),
            "BLOCK_K": min(128, max(16, next_pow2(K))),
            "SPLIT_K": 1,
            "num_warps": 4,
            "num_stages": 1,
        }
    block_n = 8 if gated else 16
    block_k = 512 if K >= 512 else max(32, next_pow2(K))
    programs = triton.cdiv(n_out, block_n) * max(M, 1)
    sms = sm_count(device)
    split_k = 1
    while programs * split_k < 4 * sms and K >= 2 * block_k * split_k * 2 and split_k < 16:
        split_k *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 2}


def validate_config(config: dict, keys: tuple[str, ...], kernel: str) -> dict:
    unknown = set(config) - set(keys)
    if unknown:
        raise ValueError(f"{kernel} config has unknown keys {sorted(unknown)}; valid keys: {', '.join(keys)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        value = config.get(key)
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"{kernel} config {key}={value} must be a power of two")
    if config.get("SPLIT_K", 1) < 1:
        raise ValueError(f"{kernel} config SPLIT_K={config['SPLIT_K']} must be >= 1")
    return config


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def gated_activation(gate, up, ACTIVATION: tl.constexpr):
    """act(gate) * up in fp32 (the shared activations of :mod:`llmopt.codegen.device_math`)."""
    return apply_activation(gate, ACTIVATION) * up


@triton.jit
def linear_epilogue(gate, up, b_ptr, r_ptrs, offs_n, mask_n, mask, N_OUT,
                    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """The fused epilogue of every linear kernel on fp32 accumulators, fp32 result:
    ``+ bias``, then ``act(gate) * up`` (merged [gate; up] rows), then ``+ residual``.

    ``offs_n`` / ``mask_n``: the output columns, shaped to broadcast against ``gate``
    (``[BLOCK_N]`` for a row, ``[1, BLOCK_N]`` for a tile); ``r_ptrs`` / ``mask``: the
    residual's pointers and mask in ``gate``'s shape. The GEMV, the flat GEMM and the split-K
    reduce all end here, so they cannot drift apart.
    """
    GATED: tl.constexpr = ACTIVATION != ""
    if HAS_BIAS:
        gate += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if GATED:
            up += tl.load(b_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if GATED:
        gate = gated_activation(gate, up, ACTIVATION)
    if HAS_RESIDUAL:
        gate += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    return gate


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, ws_ptr,
    # sizes
    N_OUT, K, K_PER_SPLIT,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
    stride_ws_split, stride_ws_m,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    GATED: tl.constexpr = ACTIVATION != ""

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    # int64 row offsets: lm_head-sized weights pass 2**31 elements
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    up_rows = w_ptr + (offs_n.to(tl.int64) + N_OUT)[:, None] * stride_wn
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    k_start = pid_k * K_PER_SPLIT

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K_PER_SPLIT, BLOCK_K)):
        offs_k = k_start + kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xv = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        mask_w = mask_n[:, None] & mask_k[None, :]
        wv = tl.load(w_rows + offs_k[None, :] * stride_wk, mask=mask_w, other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
        if GATED:
            uv = tl.load(up_rows + offs_k[None, :] * stride_wk, mask=mask_w, other=0.0)
            acc_up += uv.to(tl.float32) * xv[None, :]
    gate = tl.sum(acc, axis=1)
    up = tl.sum(acc_up, axis=1)

    if SPLIT_K > 1:
        # fp32 partials to the workspace [SPLIT_K, M, N]; the reduce kernel does the epilogue
        ws_row = ws_ptr + pid_k * stride_ws_split + row * stride_ws_m
        tl.store(ws_row + offs_n, gate, mask=mask_n)
        if GATED:
            tl.store(ws_row + N_OUT + offs_n, up, mask=mask_n)
    else:
        gate = linear_epilogue(gate, up, b_ptr, r_ptr + row * stride_rm + offs_n * stride_rn, offs_n, mask_n,
                               mask_n, N_OUT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
        tl.store(out_ptr + row * stride_om + offs_n * stride_on, gate.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _split_k_reduce_kernel(
    # pointers
    ws_ptr, b_ptr, r_ptr, out_ptr,
    # sizes
    N_OUT,
    # strides
    stride_ws_split, stride_ws_m, stride_rm, stride_rn, stride_om, stride_on,
    # constexprs
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
):
    """Sum the SPLIT_K fp32 partials of one row and apply the epilogue (bias, gate, residual)."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    GATED: tl.constexpr = ACTIVATION != ""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    ws_row = ws_ptr + row * stride_ws_m + offs_n
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        gate += tl.load(ws_row + s * stride_ws_split, mask=mask_n, other=0.0)
        if GATED:
            up += tl.load(ws_row + s * stride_ws_split + N_OUT, mask=mask_n, other=0.0)
    gate = linear_epilogue(gate, up, b_ptr, r_ptr + row * stride_rm + offs_n * stride_rn, offs_n, mask_n,
                           mask_n, N_OUT, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
    tl.store(out_ptr + row * stride_om + offs_n * stride_on, gate.to(out_ptr.dtype.element_ty), mask=mask_n)


# ---------------------------------------------------------------------------------------
# Reference and shared contract
# ---------------------------------------------------------------------------------------


def epilogue_ref(y: torch.Tensor, residual, activation: str) -> torch.Tensor:
    """The linear family's epilogue on ``y = x @ W.T + b``: the gated activation over the
    merged ``[gate; up]`` halves, then the residual add."""
    if activation:
        gate, up = y.chunk(2, dim=-1)
        if activation == "silu":
            y = F.silu(gate) * up
        elif activation == "gelu":
            y = F.gelu(gate) * up
        else:
            y = F.gelu(gate, approximate="tanh") * up
    if residual is not None:
        y = y + residual
    return y


def gemv_ref(x, weight, bias=None, residual=None, activation: str = "") -> torch.Tensor:
    """Eager reference of the linear family (gemv, flat_gemm, mm) and the CPU path.

    ``F.linear`` in the input dtype (cuBLAS / oneDNN accumulate half types in fp32), then
    the epilogue in torch. Works for any leading dims of ``x`` and any float dtype (fp64
    gives the tests' ground truth).
    """
    y = F.linear(x, weight, bias)
    return epilogue_ref(y, residual, activation)


def check_linear_args(x, weight, bias, residual, activation: str, kernel: str, dtypes=KERNEL_DTYPES) -> int:
    """Check the linear contract for a 2-D ``x`` and return the output width N_out.

    ``dtypes``: the dtypes the caller's kernel is built for (``None``: any floating dtype).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"{kernel}: activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{kernel}: expected x [M, K] and weight [N, K], got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)}; flatten leading dims of x first (x.reshape(-1, K))"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{kernel}: x has K={x.shape[1]} columns but weight {tuple(weight.shape)} has K={weight.shape[1]}; "
            "weight must be in the nn.Linear layout [out_features, in_features]"
        )
    if (dtypes is not None and x.dtype not in dtypes) or not x.dtype.is_floating_point:
        raise TypeError(f"{kernel}: dtype {x.dtype} is not supported; use float16, bfloat16 or float32")
    if weight.dtype != x.dtype:
        raise TypeError(f"{kernel}: weight dtype {weight.dtype} != x dtype {x.dtype}; cast one to the other")
    if weight.device != x.device:
        raise ValueError(f"{kernel}: weight on {weight.device} but x on {x.device}; move both to one device")
    N = weight.shape[0]
    if activation and N % 2:
        raise ValueError(
            f"{kernel}: activation={activation!r} needs merged [gate; up] weight rows (even N), got N={N}"
        )
    n_out = N // 2 if activation else N
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"{kernel}: bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"{kernel}: bias is {bias.dtype} on {bias.device}; expected {x.dtype} on {x.device}")
    if residual is not None:
        if residual.shape != (x.shape[0], n_out):
            raise ValueError(
                f"{kernel}: residual must have the output shape ({x.shape[0]}, {n_out}), got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(
                f"{kernel}: residual is {residual.dtype} on {residual.device}; expected {x.dtype} on {x.device}"
            )
    return n_out


def prepare_out(out, M: int, n_out: int, x: torch.Tensor, kernel: str) -> torch.Tensor:
    if out is None:
        return torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    if out.shape != (M, n_out) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"{kernel}: out must be a ({M}, {n_out}) {x.dtype} tensor on {x.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def begin_linear_launch(x, weight, bias, residual, activation: str, out, kernel: str):
    """What every linear launcher does first: check the contract, allocate or check
    ``out``, and finish the cases with nothing to launch. Returns ``(out, n_out, done)``;
    ``done``: ``out`` already holds the result (an empty output, or K = 0, whose result is
    the epilogue applied to zeros)."""
    n_out = check_linear_args(x, weight, bias, residual, activation, kernel)
    M, K = x.shape
    out = prepare_out(out, M, n_out, x, kernel)
    if M == 0 or n_out == 0:
        return out, n_out, True
    if K == 0:
        out.copy_(gemv_ref(x, weight, bias, residual, activation))
        return out, n_out, True
    return out, n_out, False


def launch_config(heuristic: dict, config, keys: tuple[str, ...], kernel: str) -> dict:
    """The kernel's heuristic config with the given (tuned) ``config`` checked and laid over it."""
    cfg = dict(heuristic)
    if config:
        cfg.update(validate_config(dict(config), keys, kernel))
    return cfg


def launch_linear_kernel(kernel, grid, sizes: tuple, x, weight, bias, residual, activation: str, out, cfg: dict,
                         **constexprs):
    """Launch a linear-family kernel, then (split-K) the reduce kernel; returns ``out``.

    The family's argument layout: pointers ``x, weight, bias, residual, out, workspace``
    (an absent bias / residual / workspace points at ``out``, never read), the kernel's
    ``sizes``, the strides of x, weight, residual, out and workspace (0 where absent), then
    ``SPLIT_K``, the epilogue constexprs and the kernel's own ``constexprs``.
    """
    split_k = cfg["SPLIT_K"]
    M = x.shape[0]
    ws = split_k_workspace(split_k, M, weight.shape[0], x.device) if split_k > 1 else out
    kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out, ws,
        *sizes,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        out.stride(0), out.stride(1),
        ws.stride(0) if split_k > 1 else 0, ws.stride(1) if split_k > 1 else 0,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=activation,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **constexprs,
    )
    if split_k > 1:
        launch_split_k_reduce(ws, bias, residual, out, activation, split_k)
    return out


def split_k_workspace(split_k: int, M: int, N: int, device) -> torch.Tensor:
    """fp32 partial sums [SPLIT_K, M, N]; every slot is written, so ``empty`` is enough."""
    return torch.empty((split_k, M, N), dtype=torch.float32, device=device)


def launch_split_k_reduce(ws, bias, residual, out, activation: str, split_k: int) -> None:
    M, n_out = out.shape
    block_n = min(1024, max(16, next_pow2(n_out)))
    grid = (triton.cdiv(n_out, block_n), M)
    _split_k_reduce_kernel[grid](
        ws, bias if bias is not None else ws, residual if residual is not None else ws, out,
        n_out,
        ws.stride(0), ws.stride(1),
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        out.stride(0), out.stride(1),
        SPLIT_K=split_k, BLOCK_N=block_n,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=activation,
        num_warps=4,
    )


def k_per_split(K: int, split_k: int, block_k: int) -> int:
    """Columns per split, a multiple of BLOCK_K so every split's loop has the same trip count."""
    return triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


@on_tensor_device
def gemv_triton(x, weight, bias=None, residual=None, activation: str = "", *, config=None, out=None):
    """Launch the GEMV kernel on a 2-D ``x`` [M, K] (one program row per row of x).

    ``config``: a dict of :data:`GEMV_CONFIG_KEYS` (from the tuning table), else
    :func:`gemv_heuristic_config`. ``out``: an optional [M, N_out] buffer to write.
    """
    out, n_out, done = begin_linear_launch(x, weight, bias, residual, activation, out, "gemv")
    if done:
        return out
    M, K = x.shape
    cfg = launch_config(gemv_heuristic_config(weight.shape[0], K, M, bool(activation), x.device), config,
                        GEMV_CONFIG_KEYS, "gemv")
    block_n, block_k, split_k = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    grid = (triton.cdiv(n_out, block_n), M, split_k)
    return launch_linear_kernel(
        _gemv_kernel, grid, (n_out, K, k_per_split(K, split_k, block_k)), x, weight, bias, residual, activation,
        out, cfg, BLOCK_N=block_n, BLOCK_K=block_k,
    )


__all__ = [
    "ACTIVATIONS",
    "GEMV_CONFIG_KEYS",
    "KERNEL_DTYPES",
    "begin_linear_launch",
    "check_linear_args",
    "epilogue_ref",
    "gemv_configs",
    "gemv_heuristic_config",
    "gemv_ref",
    "gemv_triton",
    "launch_config",
    "launch_linear_kernel",
    "linear_epilogue",
    "prune_gemv_configs",
]
