"""Shared pieces of the benchmark scripts: environment record, timing, results files.

Every script times its candidates in one process on the same inputs, excludes warm-up,
reports medians (timed by ``llmopt.codegen.timing``: ``triton.testing.do_bench`` on GPU,
interleaved ``perf_counter`` rounds on CPU) and writes
``benchmarks/results/<device>-<date>-<name>.json`` with the device and versions, which
``benchmarks/make_tables.py`` turns into the README tables.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

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
    import importlib.metadata

    try:  # the torchao peer's version, where it is installed (its speed differs by release)
        torchao_version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        torchao_version = None
    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device_kind": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": tf_version,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "threads": torch.get_num_threads(),
    }
    if torchao_version is not None:
        env["torchao"] = torchao_version
    return env


def device_slug(env: dict) -> str:
    if env["device_kind"] == "cuda":
        return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    return "cpu"


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted), by
    ``llmopt.codegen.timing.copy_bandwidth_gbs`` (the scripts put the checkout on sys.path)."""
    from llmopt.codegen.timing import copy_bandwidth_gbs

    return copy_bandwidth_gbs(device, nbytes) * 1e9


def write_results(name: str, payload: dict) -> Path:
    env = payload.setdefault("environment", environment())
    # LLMOPT_BENCH_RESULTS: another directory (python -m llmopt.tools.gpu_check --out DIR sets it)
    results = Path(os.environ.get("LLMOPT_BENCH_RESULTS") or RESULTS)
    path = results / f"{device_slug(env)}-{env['date']}-{name}.json"
    # creates the directory; the scripts put the checkout on sys.path
    from llmopt.codegen.locked_file import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def save_results(name: str, payload: dict, no_write: bool) -> dict:
    """Writes ``payload`` as the ``name`` results file (:func:`write_results`) and says
    where, unless ``no_write``; returns ``payload`` (what each script's ``main`` returns)."""
    if not no_write:
        print("wrote", write_results(name, payload))
    return payload


def add_run_arguments(parser) -> None:
    """The options every kernel benchmark script shares: timing mode, warm-up, threads,
    copy-bandwidth buffer, no-write. ``--rep`` stays per script (its defaults differ)."""
    parser.add_argument("--timing", choices=["graph", "events"], default="graph",
                        help="CUDA: time CUDA-graph replays (GPU time) or plain launches (includes host overhead)")
    parser.add_argument("--warmup", type=int, default=None, help="default 5 (CUDA), 1 (CPU)")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 1024 CUDA, 256 CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; default 1 on CPU (on a shared machine a second OpenMP thread "
                             "mostly waits: Inductor's parallel regions stalled 40+ ms per call), untouched on CUDA")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")


def parse_run_arguments(parser, argv=None) -> tuple:
    """Adds :func:`add_run_arguments`'s options to ``parser``, parses ``argv`` and applies
    them (:func:`apply_run_arguments`); returns ``(args, cuda, device)``."""
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    cuda = apply_run_arguments(args)
    return args, cuda, torch.device("cuda" if cuda else "cpu")


def apply_run_arguments(args) -> bool:
    """Set the thread count and the warm-up default from :func:`add_run_arguments`'s
    options; returns whether CUDA is used."""
    import torch

    cuda = torch.cuda.is_available()
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return cuda

