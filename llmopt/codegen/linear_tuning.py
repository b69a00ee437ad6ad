"""Timing the linear candidates for the tuning table: ``llmopt autotune``, ``autotune="on"``
compiles and ``benchmarks/bench_linear.py`` time here.

For one weight shape [N, K] and row count M, each candidate kernel (``gemv``,
``flat_gemm``, ``mm``) is timed over its pruned config space (or its heuristic config) on
a CUDA GPU, the weight rotating through copies larger than the L2 cache as in a decode
step where every layer reads other weights; :func:`tune_shape` returns the winner as a
:class:`~llmopt.codegen.tuning_table.TuningEntry`. Times come from
:func:`llmopt.codegen.timing.cuda_time_us` (``triton.testing.do_bench``). Why apart from
the table: the table is data (entries, JSON, the heuristic); this is the measurement that
fills it, with the kernels' launchers and config spaces as its dependencies.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from llmopt.codegen.flat_gemm import (
    flat_gemm_configs,
    flat_gemm_heuristic_config,
    flat_gemm_triton,
    prune_flat_gemm_configs,
)
from llmopt.codegen.gemv import gemv_configs, gemv_heuristic_config, gemv_triton, prune_gemv_configs
from llmopt.codegen.kernels_spec import KERNELS
from llmopt.codegen.timing import cuda_time_us
from llmopt.codegen.tuning_table import TuningEntry


def _require_cuda(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"timing linear kernels needs a CUDA GPU (CUDA events), got device {str(device)!r}"
            f"{'' if torch.cuda.is_available() else ' and no GPU is visible'}; on a CPU machine run "
            "`llmopt autotune --dry-run` to list the shapes and candidates without timing"
        )
    return device


def cold_weight_copies(N: int, K: int, dtype, device) -> list[torch.Tensor]:
    """Enough weight copies that cycling through them defeats the L2 cache, as in a real
    decode step where every layer reads different weights."""
    element = torch.empty((), dtype=dtype).element_size()
    weight_bytes = N * K * element
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    copies = max(1, min(32, math.ceil(3 * l2 / max(weight_bytes, 1)), (2 << 30) // max(weight_bytes, 1)))
    return [torch.randn(N, K, device=device).div_(math.sqrt(K)).to(dtype) for _ in range(copies)]


def _candidate_fn(kernel: str, x, weights, config):
    if kernel == "mm":
        return lambda i: F.linear(x, weights[i % len(weights)])
    launch = gemv_triton if kernel == "gemv" else flat_gemm_triton
    outs = [torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device) for w in weights[:1]]
    return lambda i: launch(x, weights[i % len(weights)], config=config, out=outs[0])


def candidate_configs(kernel: str, N: int, K: int, M: int, dtype) -> list[dict | None]:
    """The pruned config space of ``kernel`` for this shape (``[None]``: its heuristic config)."""
    if kernel == "gemv":
        return [None, *prune_gemv_configs(gemv_configs(), N, K)]
    if kernel == "flat_gemm":
        element = torch.empty((), dtype=dtype).element_size()
        return [None, *prune_flat_gemm_configs(flat_gemm_configs(M), N, K, element)]
    return [None]


def time_configs(kernel: str, N: int, K: int, M: int, dtype, device="cuda", *, sweep: bool = True,
                 configs: list | None = None, warmup: int = 10, rep: int = 50,
                 failures: list | None = None) -> list[tuple[dict | None, float]]:
    """[(config, median us)] for ``kernel`` at x [M, K] @ w[N, K].T on a CUDA device.

    ``configs``: the configs to time; else with ``sweep`` every pruned config, else only
    the heuristic one (``None``). Weights rotate through copies larger than the L2 cache.
    Timed by :func:`llmopt.codegen.timing.cuda_time_us` (``triton.testing.do_bench``):
    ``warmup`` / ``rep`` are milliseconds of untimed / timed calls.

    A config that fails (out of shared memory or registers, a compile error, a launch
    error) is skipped, never the shape: the others are still timed. Each failure is
    appended to ``failures`` as ``(config, "ErrorType: message")`` when a list is given,
    and warned about otherwise. ``KeyboardInterrupt`` still stops the sweep.
    """
    device = _require_cuda(device)
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device).to(dtype)
    weights = cold_weight_copies(N, K, dtype, device)
    if configs is None:
        configs = candidate_configs(kernel, N, K, M, dtype) if sweep else [None]
    results = []
    for config in configs:
        try:
            results.append((config, cuda_time_us(_candidate_fn(kernel, x, weights, config), warmup=warmup, rep=rep)))
        except Exception as exc:  # noqa: BLE001 - one bad config must not lose the shape
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if failures is not None:
                failures.append((config, reason))
            else:
                warnings.warn(f"{kernel} config {config} failed at N={N} K={K} M={M} {dtype}, skipped: {reason}",
                              RuntimeWarning, stacklevel=2)
    return results


def time_candidates(N: int, K: int, M: int, dtype, device="cuda", *, kernels=KERNELS, sweep: bool = False,
                    warmup: int = 10, rep: int = 50) -> dict[str, float]:
    """{kernel: median us} for x [M, K] @ weight[N, K].T on a CUDA GPU (the best config of
    each kernel when ``sweep``; its heuristic config otherwise). Raises RuntimeError on CPU."""
    _require_cuda(device)
    times = {}
    for kernel in kernels:
        timed = time_configs(kernel, N, K, M, dtype, device, sweep=sweep, warmup=warmup, rep=rep)
        if timed:
            times[kernel] = min(us for _, us in timed)
    return times


def tune_shape(N: int, K: int, M: int, dtype, device="cuda", *, sweep: bool = True, warmup: int = 10,
               rep: int = 50) -> TuningEntry:
    """The fastest (kernel, config) for x [M, K] @ weight[N, K].T, as a :class:`TuningEntry`
    whose ``baseline_us`` is the ``mm`` (cuBLAS) time. Raises RuntimeError on CPU."""
    device = _require_cuda(device)
    best: tuple[float, str, dict] | None = None
    baseline = math.nan
    for kernel in KERNELS:
        for config, us in time_configs(kernel, N, K, M, dtype, device, sweep=sweep, warmup=warmup, rep=rep):
            if kernel == "mm":
                baseline = us
            if config is None:  # store the resolved heuristic config, so the entry is explicit
                config = ({} if kernel == "mm" else gemv_heuristic_config(N, K, M, False, device) if kernel == "gemv"
                          else flat_gemm_heuristic_config(N, K, M, False, dtype, device))
            if best is None or us < best[0]:
                best = (us, kernel, dict(config))
    assert best is not None, "mm is always timed"
    return TuningEntry(kernel=best[1], config=best[2], time_us=best[0], baseline_us=baseline)


__all__ = ["candidate_configs", "cold_weight_copies", "time_candidates", "time_configs", "tune_shape"]
