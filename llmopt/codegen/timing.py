"""How llmopt times things: one GPU timer, one CPU timer, one copy-bandwidth probe.

Autotuning (``tuning_table``), ``llmopt bench`` and the scripts in ``benchmarks/`` all time
through here, so that a figure in a results file, a tuning-table entry and a benchmark
table are measured the same way.

- GPU (:func:`cuda_time_us`): ``triton.testing.do_bench`` — CUDA events around each call,
  the L2 cache flushed before each, median of the timed calls. ``warmup`` and ``rep`` are
  do_bench's budgets in milliseconds (it turns them into call counts from a first
  estimate), not call counts.
- CPU (:func:`time_rounds`, :func:`time_cpu`): interleaved rounds. Each round times every
  candidate once, in an order rotated from round to round, so that a burst of load on a
  shared machine falls on all candidates alike instead of on whichever ran then; the
  result is the median per candidate and its spread, ``(max - min) / median`` over the
  rounds (a figure without its spread cannot be told from noise).
- :func:`copy_bandwidth_gbs`: device-to-device copy bandwidth, (read + write) bytes over
  the time of one copy: the roofline the benchmarks compare against, measured in the same
  run.

Lives in ``codegen`` because the tuning table (codegen) times kernels; it imports nothing
from llmopt.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


def cuda_time_us(fn: Callable[[int], object], *, warmup: float = 25, rep: float = 100) -> float:
    """Median microseconds of one ``fn(i)`` on the current CUDA device, timed by
    ``triton.testing.do_bench``; ``warmup`` / ``rep``: milliseconds of untimed / timed calls.
    ``i`` counts the calls from 0, so that a caller can rotate input copies (weights
    larger than the L2 cache, as a real decode step reads them)."""
    import triton.testing

    calls = itertools.count()
    return 1000.0 * triton.testing.do_bench(lambda: fn(next(calls)), warmup=warmup, rep=rep, return_mode="median")


@dataclass(frozen=True)
class CpuTiming:
    """Seconds per call of one candidate over the rounds: median, spread and the samples."""

    median: float
    spread: float  # (max - min) / median over the rounds; 0 for one round
    samples: tuple[float, ...]


def time_rounds(candidates: Mapping[str, Callable[[int], object]], *, rounds: int, warmup: int = 1,
                calls: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, CpuTiming]:
    """Time every candidate ``fn(i)`` in ``rounds`` interleaved rounds (module docstring).

    ``warmup`` untimed rounds come first (compiles, caches); each timed round runs each
    candidate ``calls`` times and records the mean per call. ``clock``: ``perf_counter``
    (wall), or ``time.process_time`` (CPU time of the process, which on a loaded machine
    counts the work done rather than the wait for a core). ``i`` counts a candidate's
    calls from 0."""
    if rounds < 1 or calls < 1 or warmup < 0:
        raise ValueError(f"rounds and calls must be >= 1 and warmup >= 0, got {rounds}, {calls}, {warmup}")
    names = list(candidates)
    counters = {name: itertools.count() for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn, counter = candidates[name], counters[name]
            start = clock()
            for _ in range(calls):
                fn(next(counter))
            if r >= warmup:
                samples[name].append((clock() - start) / calls)
    out = {}
    for name, times in samples.items():
        median = statistics.median(times)
        spread = (max(times) - min(times)) / median if median > 0 else 0.0
        out[name] = CpuTiming(median, spread, tuple(times))
    return out


def time_cpu(fn: Callable[[int], object], *, rounds: int, warmup: int = 1, calls: int = 1,
             clock: Callable[[], float] = time.perf_counter) -> CpuTiming:
    """:func:`time_rounds` of one candidate."""
    return time_rounds({"fn": fn}, rounds=rounds, warmup=warmup, calls=calls, clock=clock)["fn"]


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30, rounds: int = 10) -> float:
    """Device copy bandwidth in GB/s: (read + write) bytes / time of one ``nbytes`` copy
    (:func:`cuda_time_us` on CUDA, :func:`time_cpu` elsewhere)."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        seconds = cuda_time_us(lambda i: dst.copy_(src)) * 1e-6
    else:
        seconds = time_cpu(lambda i: dst.copy_(src), rounds=rounds).median
    del src, dst
    return 2 * nbytes / seconds / 1e9


__all__ = ["CpuTiming", "copy_bandwidth_gbs", "cuda_time_us", "time_cpu", "time_rounds"]
