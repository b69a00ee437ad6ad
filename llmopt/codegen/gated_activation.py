"""Gated activations of GLU MLPs in one kernel: ``out = act(gate) * up``.

The MLP of Llama/Mistral/Qwen (SwiGLU), Gemma (GeGLU, tanh GELU) and friends computes
``down(act(gate(x)) * up(x))``. Eager runs ``act`` and ``*`` as two kernels with an
intermediate in HBM; here one kernel reads ``gate`` and ``up`` once and writes ``out``
once. After the gate/up matmuls are merged into one (``gu = x @ [W_gate; W_up]^T``), the
two operands are the halves ``gu[..., :I]`` and ``gu[..., I:]``: the kernel reads them
through their strides (row stride ``2 I``), with no copy.

Math, elementwise, computed in fp32 and rounded once to the input dtype:

    silu:       act(g) = g * sigmoid(g)                                    (SwiGLU)
    gelu:       act(g) = 0.5 g (1 + erf(g / sqrt(2)))                      (GeGLU, exact)
    gelu_tanh:  act(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))   (tanh approximation)

Both GELUs are evaluated in forms that do not cancel for negative ``g`` (``erfc``, and
``sigmoid(2 z)`` for ``(1 + tanh z) / 2``), so every element, tails included, keeps fp32's
relative precision; eager's ``1 + erf``/``1 + tanh`` only keeps it in absolute terms.

Shapes: ``gate, up: [..., I]`` (same shape and dtype; leading dims merged into rows without
a copy when their strides allow; any row and column stride); ``out: [..., I]`` contiguous.

Sources: Shazeer 2020, "GLU Variants Improve Transformer" (arXiv:2002.05202); GELU and its
tanh approximation, Hendrycks & Gimpel 2016 (arXiv:1606.08415).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .buckets import m_bucket, next_pow2
from .device_math import apply_activation
from .kernel_mode import on_tensor_device, use_triton
from .residual_norm import input_rows, output_rows, round_to

# The activation is a compile-time constant (its name) of the kernel: one specialization each.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- autotune space
def _gated_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
        for bm, bn in ((1, 1024), (1, 2048), (2, 1024), (4, 512), (8, 256), (16, 128), (32, 64))
        for w in (2, 4, 8)
    ]


def _prune_gated_configs(configs, named_args, **kwargs):
    """Drop tiles far wider than the row or taller than the rows, and tiles too small for the warps."""
    n, m_b = named_args["N"], named_args["M_BUCKET"]
    n_cap = next_pow2(n)
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= max(n_cap, 64)
        and c.kwargs["BLOCK_M"] <= m_b
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 32 * c.num_warps
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _heuristic_blocks(m: int, n: int):
    """(BLOCK_M, BLOCK_N) for the interpreter: about 4k elements per program."""
    block_n = min(next_pow2(n), 1024)
    block_m = min(next_pow2(max(m, 1)), max(1, 4096 // block_n))
    return block_m, block_n


# --------------------------------------------------------------------------- kernel
@triton.jit
def _gated_activation_kernel(
    # pointers
    gate_ptr, up_ptr, out_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M, N, M_BUCKET,
    # strides
    stride_gm, stride_gn, stride_um, stride_un, stride_om, stride_on,
    # constexprs
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    g = tl.load(gate_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
    out = apply_activation(g.to(tl.float32), ACTIVATION) * u.to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask)


_gated_activation_tuned = triton.autotune(
    configs=_gated_configs(), key=["N", "M_BUCKET"], prune_configs_by={"early_config_prune": _prune_gated_configs}
)(_gated_activation_kernel)


# --------------------------------------------------------------------------- reference
def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid activations: {', '.join(ACTIVATIONS)}")


def gated_activation_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Eager ``act(gate) * up`` in fp32 (fp64 for fp64 inputs), rounded once to ``gate.dtype``."""
    _check_activation(activation)
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(acc)
    # GELUs in their cancellation-free forms (same functions as torch's gelu, which computes
    # 0.5 g (1 + erf(.)) and loses the relative precision of its far negative tail).
    if activation == "silu":
        act = torch.nn.functional.silu(g)
    elif activation == "gelu":
        act = 0.5 * g * torch.special.erfc(g * -math.sqrt(0.5))
    else:  # 0.5 (1 + tanh(z)) = sigmoid(2 z)
        act = g * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g))
    return (act * up.to(acc)).to(gate.dtype)


# --------------------------------------------------------------------------- launcher
def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gated_activation: gate and up must have the same shape, dtype and device, got gate "
            f"{gate.dtype} {tuple(gate.shape)} on {gate.device} and up {up.dtype} {tuple(up.shape)} on {up.device}"
        )
    if gate.dim() < 1:
        raise ValueError("gated_activation: gate and up must have at least one dim ([..., I]), got scalars")
    if not gate.is_floating_point():
        raise TypeError(f"gated_activation: gate and up must be floating point, got {gate.dtype}")


@on_tensor_device
def gated_activation_triton(
    gate: torch.Tensor, up: torch.Tensor, activation: str, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``act(gate) * up`` with the Triton kernel; returns ``out`` (allocated contiguous when None)."""
    _check_activation(activation)
    _check_inputs(gate, up)
    if gate.dtype not in KERNEL_DTYPES:
        raise TypeError(f"gated_activation: the Triton kernel supports {KERNEL_DTYPES}, got {gate.dtype}")
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    o2 = output_rows(out, gate, "gated_activation: out")
    g2, u2 = input_rows(gate), input_rows(up)
    m, n = g2.shape
    if m == 0 or n == 0:
        return out
    args = (
        g2, u2, o2, m, n, m_bucket(m),
        g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), o2.stride(0), o2.stride(1),
    )
    if gate.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _gated_activation_tuned[grid](*args, ACTIVATION=activation, EMULATE_RTNE=False)
    else:
        # Interpreter: one fixed tile (autotuning there would only time numpy).
        block_m, block_n = _heuristic_blocks(m, n)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _gated_activation_kernel[grid](
            *args, ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, EMULATE_RTNE=True, num_warps=4
        )
    return out


# --------------------------------------------------------------------------- registered op
@torch.library.custom_op("llmopt::gated_activation", mutates_args=())
def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``activation`` in silu / gelu / gelu_tanh; fresh contiguous output."""
    if gate.dtype in KERNEL_DTYPES and use_triton(gate, up):
        return gated_activation_triton(gate, up, activation)
    _check_inputs(gate, up)
    return gated_activation_ref(gate, up, activation).contiguous()


@gated_activation.register_fake
def _(gate, up, activation):
    _check_activation(activation)
    return gate.new_empty(gate.shape)
