"""Residual add fused with RMSNorm or LayerNorm: one pass over each row.

A pre-norm decoder layer spells ``h = x + residual; y = norm(h)`` twice per layer. Eager
PyTorch runs that as an add, an upcast, a square, a mean, an rsqrt and two or three
multiplies, each reading and writing the whole activation. Here one program owns one row:
it reads ``x`` and ``residual`` once and writes ``h`` (the new residual stream) and ``y``
(the normalized row) once.

Math, per row of ``N`` elements, accumulated in fp32:

    h = round_to_dtype(x + residual)          exactly the tensor eager materializes
    RMSNorm:   y = h * rsqrt(mean(h^2) + eps) * (w + weight_offset)
    LayerNorm: y = (h - mean(h)) * rsqrt(var(h) + eps) * w + b        (biased variance)

``y`` is rounded once to ``x.dtype``. ``weight_offset = 1.0`` is Gemma's ``(1 + w)``; the
weight may be stored in another dtype than ``x`` (fp32 weight, bf16 activations).

Shapes: ``x, residual: [..., N]`` (leading dims merged into rows without a copy when their
strides allow; any row and column stride), ``weight, bias: [N]``; ``y, h: [..., N]``
contiguous, dtype of ``x``.

Long rows: a row of up to ``MAX_BLOCK_N`` elements is held in registers (one read, one
write). A longer row (16k, 32k hidden) is walked in ``MAX_BLOCK_N`` chunks: pass 1
accumulates the sum of squares (RMSNorm) or merges per-chunk mean and M2 with Chan et al.'s
update (LayerNorm), pass 2 reads the row again (``h`` when it was just written) and
normalizes. Registers never hold more than one chunk, whatever ``N``; the autotune pruning
keeps at most 32 elements per thread (ptxas for sm_90: no spills at 8192 with 8+ warps).

Also home of the helpers the other row-wise kernels (gated_activation, rope) share:
``rows_view`` (leading dims merged into one row stride, no copy), ``input_rows`` /
``output_rows`` (an input as rows, copied if need be; a caller's output buffer checked and
viewed as rows) and ``round_to`` (the final fp32 -> dtype rounding). The autotune key of a
row count, ``m_bucket``, is :mod:`llmopt.codegen.buckets`'s.

Sources: RMSNorm, Zhang & Sennrich 2019 (arXiv:1910.07467); LayerNorm, Ba et al. 2016
(arXiv:1607.06450); pairwise variance update, Chan, Golub & LeVeque 1979; one row per
program as in the Triton layer-norm tutorial.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .buckets import m_bucket, next_pow2
from .kernel_mode import on_tensor_device, use_triton
from .op_signature import signature_of

# Widest row held in registers at once; longer rows are processed in chunks of this size.
MAX_BLOCK_N = 8192

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- autotune space
def _norm_configs():
    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16, 32)]


def _prune_norm_configs(configs, named_args, **kwargs):
    """Keep warp counts that give each thread between 1 and 32 elements of the block."""
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if 32 * c.num_warps <= block_n and block_n // (32 * c.num_warps) <= 32]
    return kept or [min(configs, key=lambda c: c.num_warps)]


def _heuristic_num_warps(block_n: int) -> int:
    return max(1, min(16, block_n // 512))


# --------------------------------------------------------------------------- kernels
@triton.jit
def round_to(x, DTYPE: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``x`` (fp32) rounded to ``DTYPE``, to nearest even.

    The GPU's fp32 -> bf16 conversion rounds to nearest even, but Triton's CPU interpreter
    (3.x) truncates. ``EMULATE_RTNE`` (set by launchers for CPU tensors, i.e. under the
    interpreter) rounds with integer ops instead, so the interpreter reproduces the GPU's,
    and eager PyTorch's, bf16 results bit for bit.
    """
    if EMULATE_RTNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, y, x.to(DTYPE))  # NaN stays NaN
    else:
        return x.to(DTYPE)


@triton.jit
def _load_row_chunk(
    x_row, r_row, h_row, cols, mask, stride_xn, stride_rn, stride_hn,
    HAS_RESIDUAL: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """Load one chunk of the row as fp32; with a residual, store h = x + r rounded to h's dtype."""
    hv = tl.load(x_row + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols * stride_rn, mask=mask, other=0.0).to(tl.float32)
        # Round exactly like eager's `x + residual` in x.dtype; the norm reads the rounded h.
        h = round_to(hv + r, h_row.dtype.element_ty, EMULATE_RTNE)
        tl.store(h_row + cols * stride_hn, h, mask=mask)
        hv = h.to(tl.float32)
    return hv


@triton.jit
def _reload_row_chunk(x_row, h_row, cols, mask, stride_xn, stride_hn, HAS_RESIDUAL: tl.constexpr):
    """Pass 2's read of a chunk (fp32): ``h`` (already rounded) rather than x and the
    residual again, or ``x`` when there is no residual."""
    if HAS_RESIDUAL:
        hv = tl.load(h_row + cols * stride_hn, mask=mask, other=0.0).to(tl.float32)
    else:
        hv = tl.load(x_row + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    return hv


@triton.jit
def _row_pointers(x_ptr, res_ptr, y_ptr, h_ptr, stride_xm, stride_rm, stride_ym, stride_hm):
    """This program's row of x, the residual, y and h (one program per row, int64 offsets)."""
    row = tl.program_id(0).to(tl.int64)
    return x_ptr + row * stride_xm, res_ptr + row * stride_rm, y_ptr + row * stride_ym, h_ptr + row * stride_hm


@triton.jit
def _scale_shift(y, w_ptr, b_ptr, cols, mask, stride_w, stride_b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm's ``y * weight + bias`` in fp32, each part optional."""
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols * stride_b, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
    # sizes (M_BUCKET is only the autotune key)
    N, M_BUCKET,
    # strides
    stride_xm, stride_xn, stride_rm, stride_rn, stride_w, stride_ym, stride_yn, stride_hm, stride_hn,
    # scalars
    eps, weight_offset,
    # constexprs
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    x_row, r_row, y_row, h_row = _row_pointers(x_ptr, res_ptr, y_ptr, h_ptr, stride_xm, stride_rm, stride_ym, stride_hm)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        hv = _load_row_chunk(
            x_row, r_row, h_row, cols, mask, stride_xn, stride_rn, stride_hn, HAS_RESIDUAL, EMULATE_RTNE
        )
        rstd = 1.0 / tl.sqrt(tl.sum(hv * hv, axis=0) / N + eps)
        w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32) + weight_offset
        tl.store(y_row + cols * stride_yn, round_to(hv * rstd * w, y_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)
    else:
        # Pass 1: per-lane partial sums of squares, chunk by chunk (h written as we go).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            hv = _load_row_chunk(
                x_row, r_row, h_row, cols, mask, stride_xn, stride_rn, stride_hn, HAS_RESIDUAL, EMULATE_RTNE
            )
            acc += hv * hv
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        # Pass 2: normalize. Re-read h (already rounded) rather than x and residual.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            hv = _reload_row_chunk(x_row, h_row, cols, mask, stride_xn, stride_hn, HAS_RESIDUAL)
            w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32) + weight_offset
            tl.store(y_row + cols * stride_yn, round_to(hv * rstd * w, y_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)


@triton.jit
def _layer_norm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr,
    # sizes (M_BUCKET is only the autotune key)
    N, M_BUCKET,
    # strides
    stride_xm, stride_xn, stride_rm, stride_rn, stride_w, stride_b, stride_ym, stride_yn, stride_hm, stride_hn,
    # scalars
    eps,
    # constexprs
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    x_row, r_row, y_row, h_row = _row_pointers(x_ptr, res_ptr, y_ptr, h_ptr, stride_xm, stride_rm, stride_ym, stride_hm)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        hv = _load_row_chunk(
            x_row, r_row, h_row, cols, mask, stride_xn, stride_rn, stride_hn, HAS_RESIDUAL, EMULATE_RTNE
        )
        mean = tl.sum(hv, axis=0) / N
        # Two-step variance from registers: no E[x^2] - E[x]^2 cancellation.
        diff = tl.where(mask, hv - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / N + eps)
        y = _scale_shift(diff * rstd, w_ptr, b_ptr, cols, mask, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_row + cols * stride_yn, round_to(y, y_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)
    else:
        # Pass 1: exact mean and M2 of each chunk, merged into the running pair (Chan et al.).
        mean = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
        m2 = mean
        count = mean
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            hv = _load_row_chunk(
                x_row, r_row, h_row, cols, mask, stride_xn, stride_rn, stride_hn, HAS_RESIDUAL, EMULATE_RTNE
            )
            n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(hv, axis=0) / n_chunk
            diff = tl.where(mask, hv - chunk_mean, 0.0)
            chunk_m2 = tl.sum(diff * diff, axis=0)
            total = count + n_chunk
            delta = chunk_mean - mean
            mean = mean + delta * (n_chunk / total)
            m2 = m2 + chunk_m2 + delta * delta * (count * n_chunk / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: normalize. Re-read h (already rounded) rather than x and residual.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            hv = _reload_row_chunk(x_row, h_row, cols, mask, stride_xn, stride_hn, HAS_RESIDUAL)
            y = _scale_shift((hv - mean) * rstd, w_ptr, b_ptr, cols, mask, stride_w, stride_b, HAS_WEIGHT, HAS_BIAS)
            tl.store(y_row + cols * stride_yn, round_to(y, y_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)


_rms_norm_tuned = triton.autotune(
    configs=_norm_configs(), key=["N", "M_BUCKET"], prune_configs_by={"early_config_prune": _prune_norm_configs}
)(_rms_norm_kernel)
_layer_norm_tuned = triton.autotune(
    configs=_norm_configs(), key=["N", "M_BUCKET"], prune_configs_by={"early_config_prune": _prune_norm_configs}
)(_layer_norm_kernel)


# --------------------------------------------------------------------------- references
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation, except that an fp64 input (the tests' ground truth) stays fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """Eager RMSNorm: fp32 math (HF Llama's upcast), one rounding to ``x.dtype``."""
    acc = _acc_dtype(x.dtype)
    hf = x.to(acc)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(acc) + weight_offset if weight_offset else weight.to(acc)  # Gemma's (1 + w)
    return (hf * rstd * w).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` in ``x.dtype`` (as eager), then :func:`rms_norm_ref` of ``h``."""
    h = x + residual
    return rms_norm_ref(h, weight, eps, weight_offset), h


def layer_norm_ref(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """Eager LayerNorm over the last dim with fp32 statistics, one rounding to ``x.dtype``."""
    acc = _acc_dtype(x.dtype)
    hf = x.to(acc)
    mean = hf.mean(-1, keepdim=True)
    diff = hf - mean
    y = diff * torch.rsqrt(diff.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` in ``x.dtype`` (as eager), then :func:`layer_norm_ref` of ``h``."""
    h = x + residual
    return layer_norm_ref(h, weight, bias, eps), h


# --------------------------------------------------------------------------- launchers
def rows_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t: [..., N]`` as an ``[M, N]`` view of the same storage, or None when the leading
    dims cannot be merged into one row stride (then the caller copies or refuses)."""
    n = t.shape[-1]
    m = math.prod(t.shape[:-1])
    if m == 0:
        return t.new_empty((0, n))  # nothing to read or write
    lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    for (_, outer), (size, inner) in zip(lead, lead[1:]):
        if outer != inner * size:
            return None
    stride_m = lead[-1][1] if lead else n * t.stride(-1)
    return t.as_strided((m, n), (stride_m, t.stride(-1)), t.storage_offset())


def input_rows(t: torch.Tensor) -> torch.Tensor:
    """``t: [..., N]`` as ``[M, N]`` rows: a view where :func:`rows_view` finds one, else a copy."""
    rows = rows_view(t)
    # Leading dims that no single stride describes (rare: a permuted activation) are copied.
    return rows if rows is not None else t.reshape(-1, t.shape[-1])


def output_rows(out: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """A caller's output buffer as ``[M, N]`` rows, after checking it matches ``like``
    (ValueError naming ``name`` when it does not, or when no row view of it exists)."""
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}; pass out=None to allocate it"
        )
    rows = rows_view(out)
    if rows is None:
        raise ValueError(f"{name} with strides {out.stride()} cannot be written as rows; pass a contiguous tensor")
    return rows


def _check_norm_inputs(op: str, x, residual, params, kernel: bool = False) -> None:
    """The ops' contract; with ``kernel``, also a dtype the Triton kernel is built for."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dim to normalize, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"{op}: residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), got "
                f"{residual.dtype} {tuple(residual.shape)} on {residual.device}; cast or broadcast it first"
            )
    for name, p in params.items():
        if p is None:
            continue
        if p.shape != (x.shape[-1],) or p.device != x.device or not p.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a floating-point [{x.shape[-1]}] tensor on {x.device} (the size of x's "
                f"last dim), got {p.dtype} {tuple(p.shape)} on {p.device}"
            )
    if kernel:
        _check_kernel_dtype(op, x)


def _check_kernel_dtype(op: str, x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernel supports {KERNEL_DTYPES}, got {x.dtype}; use {op}_ref")


def _launch_rows(x, residual, y, h):
    """(x2, r2, y2, h2): the 2-D row views a norm kernel reads and writes (absent residual
    and h: x2 and y2, never touched: HAS_RESIDUAL is False)."""
    x2 = input_rows(x)
    r2 = input_rows(residual) if residual is not None else x2
    y2 = output_rows(y, x, "out")
    h2 = output_rows(h, x, "residual_out") if residual is not None else y2
    return x2, r2, y2, h2


# Each norm's kernels (autotuned; plain for the interpreter) and whether its per-feature
# vectors may be absent (then passed as any valid pointer, never read, with HAS_<NAME>=False).
_NORM_KERNELS = {
    "rms_norm": (_rms_norm_tuned, _rms_norm_kernel, False),
    "layer_norm": (_layer_norm_tuned, _layer_norm_kernel, True),
}


def _launch_norm(norm: str, x, residual, vectors: dict, scalars: tuple, y, h):
    """Launch ``norm``'s kernel (with the residual add when given) into ``y`` (and ``h``);
    returns (y, h). ``vectors``: the per-feature tensors by name in the kernel's order
    (``weight``; ``weight``, ``bias``); ``scalars``: the kernel's float arguments. One
    program per row: autotuned on CUDA; under the interpreter one fixed config
    (autotuning there would only time numpy)."""
    tuned, kernel, optional = _NORM_KERNELS[norm]
    x2, r2, y2, h2 = _launch_rows(x, residual, y, h)
    m, n = x2.shape
    if m == 0:
        return y, h
    block_n = min(next_pow2(n), MAX_BLOCK_N)
    args = (
        x2, r2, *(v if v is not None else x2 for v in vectors.values()), y2, h2,
        n, m_bucket(m),
        x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1),
        *(v.stride(0) if v is not None else 0 for v in vectors.values()),
        y2.stride(0), y2.stride(1), h2.stride(0), h2.stride(1),
        *(float(s) for s in scalars),
    )
    meta = dict(HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, SINGLE_BLOCK=n <= block_n,
                EMULATE_RTNE=not x.is_cuda)
    if optional:
        meta.update({f"HAS_{name.upper()}": v is not None for name, v in vectors.items()})
    if x.is_cuda:
        tuned[(m,)](*args, **meta)
    else:
        kernel[(m,)](*args, **meta, num_warps=_heuristic_num_warps(block_n))
    return y, h


def _new_or(out: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``out`` when given (checked at launch), else a fresh tensor like ``x``."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out


@on_tensor_device
@signature_of(rms_norm_ref, extra=("out",))
def rms_norm_triton(x, weight, eps, weight_offset=0.0, out: Optional[torch.Tensor] = None):
    """RMSNorm of ``x: [..., N]`` with the Triton kernel; returns ``out`` (allocated when None)."""
    _check_norm_inputs("rms_norm", x, None, {"weight": weight}, kernel=True)
    return _launch_norm("rms_norm", x, None, {"weight": weight}, (eps, weight_offset), _new_or(out, x), None)[0]


@on_tensor_device
@signature_of(add_rms_norm_ref, extra=("out", "residual_out"))
def add_rms_norm_triton(x, residual, weight, eps, weight_offset=0.0, out: Optional[torch.Tensor] = None,
                        residual_out: Optional[torch.Tensor] = None):
    """``h = x + residual; y = rms_norm(h)`` in one kernel; returns ``(y, h)``."""
    _check_norm_inputs("add_rms_norm", x, residual, {"weight": weight}, kernel=True)
    return _launch_norm("rms_norm", x, residual, {"weight": weight}, (eps, weight_offset), _new_or(out, x),
                        _new_or(residual_out, x))


@on_tensor_device
@signature_of(layer_norm_ref, extra=("out",))
def layer_norm_triton(x, weight, bias, eps, out: Optional[torch.Tensor] = None):
    """LayerNorm of ``x: [..., N]`` with the Triton kernel; returns ``out`` (allocated when None)."""
    _check_norm_inputs("layer_norm", x, None, {"weight": weight, "bias": bias}, kernel=True)
    return _launch_norm("layer_norm", x, None, {"weight": weight, "bias": bias}, (eps,), _new_or(out, x), None)[0]


@on_tensor_device
@signature_of(add_layer_norm_ref, extra=("out", "residual_out"))
def add_layer_norm_triton(x, residual, weight, bias, eps, out: Optional[torch.Tensor] = None,
                          residual_out: Optional[torch.Tensor] = None):
    """``h = x + residual; y = layer_norm(h)`` in one kernel; returns ``(y, h)``."""
    _check_norm_inputs("add_layer_norm", x, residual, {"weight": weight, "bias": bias}, kernel=True)
    return _launch_norm("layer_norm", x, residual, {"weight": weight, "bias": bias}, (eps,), _new_or(out, x),
                        _new_or(residual_out, x))


# --------------------------------------------------------------------------- registered ops
def _kernel_path(x: torch.Tensor) -> bool:
    # fp64 (and other dtypes the kernel does not cover) always takes the reference.
    return x.dtype in KERNEL_DTYPES and use_triton(x)


@torch.library.custom_op("llmopt::rms_norm", mutates_args=())
@signature_of(rms_norm_ref)
def rms_norm(x, weight, eps, weight_offset=0.0):
    """RMSNorm over the last dim, fp32 math, output in ``x.dtype`` (a fresh contiguous tensor)."""
    if _kernel_path(x):
        return rms_norm_triton(x, weight, eps, weight_offset)
    _check_norm_inputs("rms_norm", x, None, {"weight": weight})
    return rms_norm_ref(x, weight, eps, weight_offset).contiguous()


@rms_norm.register_fake
def _(x, weight, eps, weight_offset=0.0):
    return x.new_empty(x.shape)


@torch.library.custom_op("llmopt::add_rms_norm", mutates_args=())
@signature_of(add_rms_norm_ref)
def add_rms_norm(x, residual, weight, eps, weight_offset=0.0):
    """``h = x + residual`` (rounded to ``x.dtype``), ``y = rms_norm(h)``; returns ``(y, h)``."""
    if _kernel_path(x):
        return add_rms_norm_triton(x, residual, weight, eps, weight_offset)
    _check_norm_inputs("add_rms_norm", x, residual, {"weight": weight})
    y, h = add_rms_norm_ref(x, residual, weight, eps, weight_offset)
    return y.contiguous(), h.contiguous()


@add_rms_norm.register_fake
def _(x, residual, weight, eps, weight_offset=0.0):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("llmopt::layer_norm", mutates_args=())
@signature_of(layer_norm_ref)
def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim, fp32 statistics, output in ``x.dtype`` (fresh, contiguous)."""
    if _kernel_path(x):
        return layer_norm_triton(x, weight, bias, eps)
    _check_norm_inputs("layer_norm", x, None, {"weight": weight, "bias": bias})
    return layer_norm_ref(x, weight, bias, eps).contiguous()


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("llmopt::add_layer_norm", mutates_args=())
@signature_of(add_layer_norm_ref)
def add_layer_norm(x, residual, weight, bias, eps):
    """``h = x + residual`` (rounded to ``x.dtype``), ``y = layer_norm(h)``; returns ``(y, h)``."""
    if _kernel_path(x):
        return add_layer_norm_triton(x, residual, weight, bias, eps)
    _check_norm_inputs("add_layer_norm", x, residual, {"weight": weight, "bias": bias})
    y, h = add_layer_norm_ref(x, residual, weight, bias, eps)
    return y.contiguous(), h.contiguous()


@add_layer_norm.register_fake
def _(x, residual, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)
