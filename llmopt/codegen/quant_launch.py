"""What the three quantized-linear kernel families share: the autotune config space and its
pruning, the launch (autotuned on CUDA, one fixed config in the interpreter), the tile
load / epilogue ``@triton.jit`` blocks, and the one dispatch point that decides which
implementation of an op runs (:func:`implementation`).

Families: ``int8_weight_only``, ``int4_weight_only``, ``w8a8`` (one module each). Each
picks a GEMV for ``M <= GEMV_MAX_M`` (one program per row and ``BLOCK_N`` outputs, the
product reduced along K with ``tl.sum``: each weight byte is read once per row, the
decode case) and a flat GEMM above (``BLOCK_M x BLOCK_N`` tiles, ``tl.dot``; small
``BLOCK_M`` for decode batches, larger for prefill through autotuning), following
FlashDecoding++ (Hong et al. 2023, arXiv:2311.01282) for the GEMV / flat-GEMM split.

Dispatch (:func:`implementation`), per call, from the tensors' device and
``LLMOPT_KERNELS`` (see ``kernel_mode``):

* CUDA: the Triton kernel; the reference under ``LLMOPT_KERNELS=reference``.
* CPU: the op's CPU implementation (PyTorch's weight-pack kernels, the generated int8
  GEMV, or the reference); the reference under ``reference``; the Triton kernel in the
  interpreter under ``LLMOPT_KERNELS=triton`` with ``TRITON_INTERPRET=1`` (how the kernel
  tests run on CPU, through the registered op, ``opcheck`` and ``torch.compile``).
* any other device: the reference.

Why one dispatch function called from each op's body, and not
``torch.library.register_kernel(op, "cpu")``: the aten executor calls an op's Python
implementation directly (``compat.custom_op_python_impl``, which saves the dispatcher's
~60 us per call on CPU), and torch (2.13) wraps a registered kernel in a closure,
``torch._library.custom_ops.wrapped_fn``, that an FX graph cannot name: a compiled graph
calling it fails. The op body stays the one entry point, and this module the one place
where the choice is made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buckets import m_bucket, next_pow2
from .kernel_mode import kernel_mode, use_triton
from .quant_packing import check_out

# Rows up to which the GEMV kernel is used instead of the flat GEMM.
GEMV_MAX_M = 2


# ----------------------------------------------------------------------------------------
# Autotune configuration space (CUDA only; the interpreter runs one config per kernel).
# ----------------------------------------------------------------------------------------
def gemv_configs() -> list[triton.Config]:
    # BLOCK_K 32: int4 with group size 32 needs a K tile inside one group
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (16, 32, 64, 128)
        for bk in (32, 64, 128, 256, 512)
        for w in (4, 8)
        for s in (2, 4)
    ]


def gemm_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64, 128)
        for bn in (32, 64, 128)
        for bk in (32, 64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]


def prune_configs(configs, named_args, **kwargs):
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
        if bk > max(32, next_pow2(k)):
            continue
        kept.append(cfg)
    # tiles past the problem only waste work: the smallest exact tile is a correct fallback
    return kept or [min(exact, key=lambda c: (c.kwargs.get("BLOCK_M", 16), c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]))]


# Interpreter / fallback configs: small tiles keep the CPU interpreter fast.
GEMV_DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 64}
GEMM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_SPACES = {"gemv": gemv_configs, "gemm": gemm_configs}


def autotune_configs(name: str, **args) -> list[dict]:
    """The configs the CUDA autotuner of ``name`` (``int4_gemv``, ``int8_gemm``, ``w8a8_gemm``)
    times for these launch arguments (``K``, ``M_BUCKET``, ``GROUP_SIZE``), after pruning,
    as dicts a launcher's ``config=`` takes. Tests run each of them in the interpreter."""
    kept = prune_configs(_SPACES[name.rsplit("_", 1)[1]](), {}, **args)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]


# The autotuned variant of each kernel, made on its first CUDA launch; like Triton's own
# JIT cache it is filled, never changed.
_AUTOTUNED: dict[str, object] = {}


def _autotuned(name: str, kernel, key: list[str]):
    """The CUDA variant of a kernel: autotuned over its config space, keyed by bucketed M."""
    if name not in _AUTOTUNED:
        space = _SPACES[name.rsplit("_", 1)[1]]
        _AUTOTUNED[name] = triton.autotune(configs=space(), key=key,
                                           prune_configs_by={"early_config_prune": prune_configs})(kernel)
    return _AUTOTUNED[name]


def launch(name: str, kernel, key: list[str], grid_fn, x: torch.Tensor, *args, config=None, **kwargs) -> None:
    """Launch ``kernel`` (named ``<scheme>_<gemv|gemm>``): autotuned over ``key`` on CUDA;
    one fixed config in the interpreter (autotuning there is slow); ``config`` (a dict of
    :func:`autotune_configs`) forces one config anywhere."""
    if config:
        kernel[grid_fn(config)](*args, **kwargs, **config)
    elif x.is_cuda:
        _autotuned(name, kernel, key)[grid_fn](*args, **kwargs)
    else:
        default = GEMV_DEFAULT if name.endswith("gemv") else GEMM_DEFAULT
        if "GROUP_SIZE" in kwargs:
            default = dict(default, BLOCK_K=int4_block_k(default["BLOCK_K"], kwargs["GROUP_SIZE"]))
        kernel[grid_fn(default)](*args, **kwargs, **default)


def launch_weight_only(scheme: str, gemv_kernel, gemm_kernel, key: list[str], x: torch.Tensor, m: int, n: int,
                       args: tuple, config=None, **constexprs) -> None:
    """The ``<scheme>_gemv`` kernel for ``M <= GEMV_MAX_M``, the ``<scheme>_gemm`` one above."""
    gemv = m <= GEMV_MAX_M
    if not gemv:
        constexprs["FP32_DOT"] = fp32_dot(x)
    launch(f"{scheme}_{'gemv' if gemv else 'gemm'}", gemv_kernel if gemv else gemm_kernel, key,
           (grid_gemv if gemv else grid_gemm)(n, m), x, *args, config=config, M_BUCKET=m_bucket(m), **constexprs)


def int4_block_k(default_bk: int, group_size: int) -> int:
    """Largest power of two <= default_bk dividing group_size (a K tile stays inside a group)."""
    bk = default_bk
    while bk > 32 and group_size % bk:
        bk //= 2
    return bk


def fp32_dot(x: torch.Tensor) -> bool:
    """fp32 tiles and an IEEE dot: for fp32 inputs (exact, no tf32), and for bf16 in the
    interpreter, whose ``tl.dot`` on bf16 returns garbage (triton 3.9, numpy has no bf16)."""
    return x.dtype in (torch.float32, torch.float64) or (x.dtype == torch.bfloat16 and not x.is_cuda)


def grid_gemv(n: int, m: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)


def grid_gemm(n: int, m: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))


# ----------------------------------------------------------------------------------------
# Shared @triton.jit blocks: every load masked, the epilogue in fp32
# ----------------------------------------------------------------------------------------
@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's ``[BLOCK_M, BLOCK_N]`` output tile on the ``grid_gemm`` grid:
    ``(offs_m, offs_n, mask_m, mask_n)``."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def load_tile(ptr, offs_r, offs_c, mask_r, mask_c, stride_r, stride_c, other):
    """The ``[rows, cols]`` tile at ``ptr + r * stride_r + c * stride_c``; ``other`` outside."""
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=mask_r[:, None] & mask_c[None, :], other=other)


@triton.jit
def store_row(y_ptr, acc, b_ptr, row, offs_n, mask_n, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    """GEMV epilogue: ``acc [BLOCK_N] (+ bias)`` into row ``row`` of ``y`` in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def store_tile(y_ptr, acc, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    """GEMM epilogue: ``acc [BLOCK_M, BLOCK_N] (+ bias)`` into ``y`` in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------
# Outputs and the dispatch point
# ----------------------------------------------------------------------------------------
def allocate_output(op: str, x: torch.Tensor, k: int, n: int, out):
    """``(x2 [M, K], M, y [..., N], y2 [M, N])``: the flattened input and the (checked or
    new) output of a quantized linear."""
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    check_out(op, out, (*x.shape[:-1], n), x)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device) if out is None else out
    return x2, m, y, y.view(m, n)


def implementation(x: torch.Tensor, *, triton_impl, reference, cpu=None):
    """Which implementation of a quantized-linear op runs a call on activations ``x``: the
    one dispatch point of the three families (module docstring). ``cpu``: the op's CPU
    implementation (default: the reference)."""
    if use_triton(x):  # CUDA, or LLMOPT_KERNELS=triton: the kernel (in the interpreter on CPU)
        return triton_impl
    if cpu is not None and x.device.type == "cpu" and kernel_mode() == "auto":
        return cpu
    return reference
