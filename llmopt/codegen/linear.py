"""``llmopt::linear``: one linear op that picks GEMV, flat GEMM or cuBLAS by the number of rows.

Math and shapes::

    x:        [..., K]      leading dims are flattened to M rows
    weight:   [N, K]        nn.Linear layout, a frozen constant
    bias:     [N]           optional
    residual: [..., N_out]  optional
    y = x @ weight.T + bias                                    fp32 accumulation
    activation "" : out = y (+ residual)                       N_out = N
    activation "silu" | "gelu" | "gelu_tanh": weight holds merged [gate; up] rows (N = 2 I),
                    out = act(y[..., :I]) * y[..., I:] (+ residual)    N_out = I
    out:      [..., N_out]  in x.dtype

Why one op with a run-time choice: decode (M = batch, 1..64) and prefill (M = tokens) run
through the same graph. FlashDecoding++ (Hong et al., 2023, §5) shows the best kernel
changes with M — GEMV at M = 1, a "flat GEMM" for small M, a regular GEMM above — so the
``select_linear_kernel`` pass bakes a compact table ``kernels = "1:gemv,2:flat_gemm,...,
inf:mm"`` into the call at compile time, and at run time the op reads M, takes its bucket
``min(next_pow2(M), 64)`` (``"inf"`` above 64) and launches that kernel: switching between
prefill and decode needs no recompile. A bucket may carry its tuned launch config,
``"1:gemv[BLOCK_N=16,BLOCK_K=512,SPLIT_K=4]"``, baked in by the pass from the table the
graph was compiled with; a bucket without one runs the kernel's heuristic config. So a
compiled graph never reads the process-wide table, and compiling another model with
another table cannot change it. ``kernels = ""`` asks the op to choose itself, kernel and
config, from the active tuning table and the heuristic (:mod:`llmopt.codegen.tuning_table`).

Kernels: ``gemv`` (:mod:`llmopt.codegen.gemv`), ``flat_gemm``
(:mod:`llmopt.codegen.flat_gemm`) — both with the epilogue fused — and ``mm``,
``torch.nn.functional.linear`` (cuBLAS) with the epilogue in torch.
On CPU the op runs :func:`linear_cpu`: oneDNN's linear on the plain weight for fp32 (about
twice ``F.linear``'s bandwidth at decode sizes on the CI machine, no packed copy of the weight),
except at M = 1 inside a graph Inductor compiles, where the generated GEMV's expression
(:mod:`llmopt.codegen.bf16_gemv_cpu`, dtype-generic) becomes a loop of the graph's own C++;
for bf16 at M <= 2 that GEMV, ``F.linear`` otherwise; for dtypes the Triton kernels are not
built for, :func:`linear_ref`. :func:`cpu_linear_kernel` is the one rule.
"""
from typing import Optional

import torch

from llmopt import compat
from llmopt.codegen.bf16_gemv_cpu import BF16_GEMV_MAX_M, bf16_gemv_cpu, bf16_gemv_expression, bf16_gemv_runs
from llmopt.codegen.flat_gemm import flat_gemm_triton
from llmopt.codegen.gemv import KERNEL_DTYPES, check_linear_args, epilogue_ref, gemv_ref, gemv_triton
from llmopt.codegen.kernel_mode import use_triton
from llmopt.codegen.kernels_spec import m_bucket_label, parse_kernel_configs, parse_kernels
from llmopt.codegen.tuning_table import choose_kernel, device_name, get_active_table

# ---------------------------------------------------------------------------------------
# Contract and reference
# ---------------------------------------------------------------------------------------


def _flatten_checked(x, weight, bias, residual, activation: str):
    """Check the contract on the N-D input; return (x2 [M, K], residual2 [M, N_out] | None, N_out)."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"llmopt::linear: expected x [..., K] and weight [N, K], got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"llmopt::linear: x has K={x.shape[-1]} columns but weight {tuple(weight.shape)} has K={weight.shape[-1]}; "
            "weight must be in the nn.Linear layout [out_features, in_features]"
        )
    lead = tuple(x.shape[:-1])
    n_out = weight.shape[0] // 2 if activation else weight.shape[0]
    if residual is not None and tuple(residual.shape) != (*lead, n_out):
        raise ValueError(
            f"llmopt::linear: residual must have the output shape {(*lead, n_out)}, got {tuple(residual.shape)}"
        )
    x2 = x.reshape(-1, x.shape[-1])
    r2 = residual.reshape(-1, n_out) if residual is not None else None
    check_linear_args(x2, weight, bias, r2, activation, "llmopt::linear", dtypes=None)
    return x2, r2, n_out


def linear_ref(x, weight, bias=None, residual=None, activation: str = ""):
    """Eager reference and CPU implementation (also the ``mm`` kernel): ``F.linear`` in the
    input dtype, then the epilogue in torch; ``x`` may have leading dims."""
    _flatten_checked(x, weight, bias, residual, activation)
    return gemv_ref(x, weight, bias, residual, activation)


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether :func:`linear_cpu` runs oneDNN for this dtype (fp32, where oneDNN is built);
    the pass's kernel-choice reason reads the same rule."""
    return dtype == torch.float32 and compat.onednn_linear_available()


# fp32 rows up to which the generated GEMV runs instead of oneDNN when Inductor compiles the
# graph. Measured on the CI machine (one thread, the machine shared: ratios of interleaved
# in-process medians): the whole llama-100m decode step at batch 1 is 1.12-1.31x faster
# with it (four runs), compile time unchanged; per linear it streams a K = 768 weight at
# x.sum()'s bandwidth, 1.2-1.5x oneDNN's, while oneDNN wins at K = 2048 (down_proj, 1.3-1.5x)
# and at M = 4 (the generated loop reads the weight once per row). Two threads, quiet
# machine: the step went 17.7-18.8 -> 14.2 ms with this and the traced attention twin.
# K bound: on llama-1b (K = 2048 and 5632 everywhere) the generated GEMV made the whole
# step 1.11x slower than oneDNN (176 vs 157 ms, 3 interleaved rounds, 2 threads, quiet
# machine), so weights with K > 1024 stay on oneDNN, except a small one: K <= 2048 and at
# most FP32_GEMV_SMALL_WEIGHT elements. Whole decode step at batch 1, the generated GEMV
# on those weights vs oneDNN (in-process interleaved rounds, 2 threads, greedy tokens
# identical; #16, seventh session): llama-100m (down_proj [768, 2048]) 1.14x faster
# (median of 7 rounds, 1.07-1.29x each), llama-50m ([512, 2048]) 1.09x, llama-500m
# (qkv [2560, 1536], o_proj [1536, 1536]) 1.08x (5 rounds), llama-1b (o_proj [2048, 2048])
# 1.04x (5 rounds, the machine's bandwidth moving 3-61 GB/s). Larger weights (llama-1b's
# qkv, gate/up; every K = 4096 / 5632) stay on oneDNN, 1.15-1.4x faster alone there.
# docs/executors.md.
# M: up to 4, with the input stored once (bf16_gemv_expression: a product by 1.0 viewed onto
# itself, which Inductor keeps; without it Inductor inlined the input's producer and 4 rows
# were slower than oneDNN). Whole llama-100m decode step, fp32, against M = 1 (two compiled
# copies in one process, 7 interleaved rounds, 2 threads; #16, ninth session): batch 4
# 23.9 -> 17.6 ms at cache 88 (1.35x) and 25.7 -> 18.2 ms at 4096 (1.41x), batch 2
# 19.2 -> 13.6 ms (1.41x); llama-1b batch 4 (only o_proj is a small weight) 210 -> 208 ms
# (1.01x); llama-500m batch 4 (qkv and o_proj small, K = 1536) 86.4 -> 87.2 ms (0.99x).
# docs/executors.md.
FP32_GEMV_MAX_M = 4
FP32_GEMV_MAX_K = 1024
FP32_GEMV_SMALL_MAX_K = 2048
FP32_GEMV_SMALL_WEIGHT = 2**22  # elements (16 MiB of fp32)


def small_gemv_weight(k: int | None, n: int | None = None) -> bool:
    """Whether a weight of ``n`` output and ``k`` input features (None: not known) takes
    the generated GEMV inlined in Inductor's code (the shape half of :func:`cpu_linear_kernel`'s
    rule: fp32 at M <= ``FP32_GEMV_MAX_M``, bf16 at 2 < M <= ``INLINED_GEMV_MAX_M``):
    K <= ``FP32_GEMV_MAX_K``, or K <= ``FP32_GEMV_SMALL_MAX_K`` and N * K <=
    ``FP32_GEMV_SMALL_WEIGHT`` elements. bf16 at 4 rows on llama-1b (every weight above
    that) made the decode step 1.47x slower than F.linear (3 rounds, 2 threads)."""
    if k is None or k <= FP32_GEMV_MAX_K:
        return True
    return n is not None and k <= FP32_GEMV_SMALL_MAX_K and n * k <= FP32_GEMV_SMALL_WEIGHT


def cpu_linear_kernel(dtype: torch.dtype, rows, k: int | None = None, n: int | None = None) -> str:
    """What :func:`linear_cpu` runs for ``rows`` rows (M) of ``dtype`` and a weight of ``k``
    input and ``n`` output features (None: not known, the M rule alone): ``"fp32_gemv"``
    (fp32, M <= ``FP32_GEMV_MAX_M`` and a weight shape :func:`small_gemv_weight` takes: the
    generated GEMV inlined in a graph Inductor compiles, oneDNN when the op is called),
    ``"onednn"`` (fp32), ``"bf16_gemv"`` (bf16, M <=
    ``BF16_GEMV_MAX_M``, or up to ``INLINED_GEMV_MAX_M`` for a weight :func:`small_gemv_weight`
    takes: :mod:`llmopt.codegen.bf16_gemv_cpu`; called, only up to ``BF16_GEMV_MAX_M``
    rows, else ``F.linear``) or ``"mm"`` (``F.linear``).
    The one rule; the pass's kernel-choice reasons read it."""
    if onednn_runs(dtype):
        decode_row = isinstance(rows, int) and 0 < rows <= FP32_GEMV_MAX_M
        return "fp32_gemv" if decode_row and small_gemv_weight(k, n) else "onednn"
    if bf16_gemv_runs(dtype, rows) or (bf16_gemv_runs(dtype, rows, inlined=True) and small_gemv_weight(k, n)):
        return "bf16_gemv"
    return "mm"


def linear_cpu(x, weight, bias=None, residual=None, activation: str = ""):
    """The CPU implementation, by :func:`cpu_linear_kernel`: oneDNN's linear on the plain
    weight for fp32 (what :func:`compat.onednn_linear` explains; at M = 1 under Inductor's
    retrace the generated GEMV's expression instead), the generated bf16 GEMV
    for bf16 decode rows (its compiled kernel when called, M <= 2; its expression when
    traced for Inductor, M <= 4 for a small weight), ``F.linear`` otherwise (oneDNN is not
    faster there without a packed copy of the weight); the epilogue in torch. Traceable, so the Inductor executor fuses the
    epilogue into a C++ loop (docs/executors.md). Unchecked: the op checks its contract
    first; a compiled graph checked it when traced."""
    same = x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel = cpu_linear_kernel(x.dtype, rows, x.shape[-1], weight.shape[0]) if same else "mm"
    if kernel == "fp32_gemv":
        if compat.is_traced(x):  # Inductor's retrace: the expression becomes the graph's C++
            y = bf16_gemv_expression(x.reshape(rows, x.shape[-1]), weight, bias)
            return epilogue_ref(y.view(*x.shape[:-1], weight.shape[0]), residual, activation)
        kernel = "onednn"  # called (aten executor, eager): not measured faster than oneDNN
    if kernel == "onednn":
        return epilogue_ref(compat.onednn_linear(x, weight, bias), residual, activation)
    traced = kernel == "bf16_gemv" and compat.is_traced(x)
    if kernel == "bf16_gemv" and (traced or rows <= BF16_GEMV_MAX_M):
        x2 = x.reshape(rows, x.shape[-1])
        y = bf16_gemv_expression(x2, weight, bias) if traced else bf16_gemv_cpu(x2, weight, bias)
        if y is not None:
            return epilogue_ref(y.view(*x.shape[:-1], weight.shape[0]), residual, activation)
    return gemv_ref(x, weight, bias, residual, activation)


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------


def select_kernel(x2, weight, kernels: str) -> tuple:
    """(kernel, launch config or None) for the 2-D input ``x2`` under the ``kernels`` string:
    the string's kernel and config for x2's M bucket (None: the kernel's heuristic config),
    or with ``""`` / ``"auto"`` the active table's entry, else the heuristic."""
    if x2.dtype not in KERNEL_DTYPES:
        return "mm", None
    bucket = m_bucket_label(x2.shape[0])
    if kernels in ("", "auto"):
        N, K = weight.shape
        kernel, config, _ = choose_kernel(get_active_table(), device_name(x2.device), x2.dtype, N, K, bucket)
        return kernel, config
    kernel = parse_kernels(kernels)[bucket]
    config = parse_kernel_configs(kernels)[bucket] if kernel != "mm" else None
    return kernel, (dict(config) if config else None)  # a copy: the parsed string is cached


def linear_triton(x, weight, bias=None, residual=None, activation: str = "", kernels: str = ""):
    """Run the kernel ``kernels`` names for x's M bucket (see the module docstring)."""
    x2, r2, n_out = _flatten_checked(x, weight, bias, residual, activation)
    out_shape = (*x.shape[:-1], n_out)
    kernel, config = select_kernel(x2, weight, kernels)
    if kernel == "mm" or x2.shape[0] == 0:
        return gemv_ref(x, weight, bias, residual, activation)
    launch = gemv_triton if kernel == "gemv" else flat_gemm_triton
    return launch(x2, weight, bias, r2, activation, config=config).view(out_shape)


# ---------------------------------------------------------------------------------------
# The registered op
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("llmopt::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: str,
    kernels: str,
) -> torch.Tensor:
    """``epilogue(x @ weight.T + bias)`` with the kernel chosen per M bucket by ``kernels``."""
    if use_triton(x, weight):
        return linear_triton(x, weight, bias, residual, activation, kernels)
    if x.device.type == "cpu":
        _flatten_checked(x, weight, bias, residual, activation)
        return linear_cpu(x, weight, bias, residual, activation)
    return linear_ref(x, weight, bias, residual, activation)


@linear.register_fake
def _linear_fake(x, weight, bias, residual, activation, kernels):
    if kernels not in ("", "auto"):
        parse_kernels(kernels)  # a bad string fails at compile time, not at the first call
    _, _, n_out = _flatten_checked(x, weight, bias, residual, activation)
    return x.new_empty((*x.shape[:-1], n_out))


__all__ = ["FP32_GEMV_MAX_K", "FP32_GEMV_MAX_M", "FP32_GEMV_SMALL_MAX_K", "FP32_GEMV_SMALL_WEIGHT", "small_gemv_weight",
           "linear", "linear_cpu", "cpu_linear_kernel", "onednn_runs", "linear_ref", "linear_triton", "select_kernel"]
