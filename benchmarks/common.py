"""Shared pieces of the benchmark scripts: environment record, timing, results files.

Every script times its candidates in one process on the same inputs, excludes warm-up,
reports medians (CUDA events on GPU, perf_counter on CPU) and writes
``benchmarks/results/<device>-<date>-<name>.json`` with the device and versions, which
``benchmarks/make_tables.py`` turns into the README tables.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device_kind": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": tf_version,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "threads": torch.get_num_threads(),
    }


def device_slug(env: dict) -> str:
    if env["device_kind"] == "cuda":
        return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    return "cpu"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / t


def write_results(name: str, payload: dict) -> Path:
    env = payload.setdefault("environment", environment())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{device_slug(env)}-{env['date']}-{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path
