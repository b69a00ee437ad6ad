"""Linear kernels at Llama-2-7B / Llama-3-8B shapes: gemv, flat_gemm, cuBLAS, Inductor.

For every weight shape of a decoder layer after merging (QKV, o_proj, gate/up, down) and
the lm_head, and every M in 1, 2, 4, ..., 128, times each candidate of the linear dispatch
(``gemv``, ``flat_gemm`` with the tuned config of the active table or the heuristic one,
``mm`` = ``torch.nn.functional.linear`` = cuBLAS) and ``torch.compile(mode="max-autotune")``
of the same linear, and reports GB/s (weight + activations moved / time), TFLOP/s, the
fraction of the copy bandwidth measured here, and the kernel ``choose_kernels`` picks
with its ratio to cuBLAS. Weights rotate through copies larger than L2, as in a decode
step where every layer reads new weights; timed by ``llmopt.codegen.timing`` (do_bench on
CUDA), warm-up excluded, medians.

Writes ``benchmarks/results/<device>-<date>-linear.json`` with the device, torch and
Triton versions. On a machine without CUDA it runs a reduced set (two shapes, M in 1, 8,
128, fp32) through the PyTorch path only, and says so.

    python benchmarks/bench_linear.py                      # everything (CUDA)
    python benchmarks/bench_linear.py --inductor none --m 1,8,64 --models llama3-8b
"""
import argparse
import datetime
import json
import math
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llmopt.codegen.locked_file import atomic_write_text  # noqa: E402
from llmopt.codegen.timing import copy_bandwidth_gbs, cuda_time_us, time_cpu  # noqa: E402
from llmopt.codegen.linear_tuning import cold_weight_copies, time_configs  # noqa: E402
from llmopt.codegen.tuning_table import (  # noqa: E402
    choose_kernel,
    device_name,
    get_active_table,
    m_bucket_label,
)

# (name, N = out features, K = in features), after merge_parallel_linears
SHAPES = {
    "llama2-7b": [("qkv", 3 * 4096, 4096), ("o_proj", 4096, 4096), ("gate_up", 2 * 11008, 4096),
                  ("down", 4096, 11008), ("lm_head", 32000, 4096)],
    "llama3-8b": [("qkv", 4096 + 2 * 1024, 4096), ("o_proj", 4096, 4096), ("gate_up", 2 * 14336, 4096),
                  ("down", 4096, 14336), ("lm_head", 128256, 4096)],
}
CPU_SHAPES = {"llama2-7b": [("o_proj", 4096, 4096), ("gate_up", 2 * 11008, 4096)]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inductor_us(N, K, M, dtype, device, mode, warmup, rep):
    """``torch.compile(F.linear, mode=...)`` timed like the candidates; None when it does not compile."""
    torch.compiler.reset()  # a fresh cache per shape, so no shape falls back to eager at the cache limit
    compiled = torch.compile(lambda x, w: F.linear(x, w), mode=mode, dynamic=False)
    x = torch.randn(M, K, device=device).to(dtype)
    weights = cold_weight_copies(N, K, dtype, device)
    try:
        return cuda_time_us(lambda i: compiled(x, weights[i % len(weights)]), warmup=warmup, rep=rep)
    except Exception as err:  # noqa: BLE001 -- any Inductor failure: report it, keep benchmarking
        print(f"    inductor {mode} failed for N={N} K={K} M={M}: {type(err).__name__}: {err}")
        return None


def figures(us, N, K, M, element_size, copy_gbs):
    bytes_moved = (N * K + M * K + M * N) * element_size
    gbs = bytes_moved / (us * 1e-6) / 1e9
    return {"us": round(us, 3), "GB/s": round(gbs, 1), "TFLOP/s": round(2 * M * N * K / (us * 1e-6) / 1e12, 3),
            "copy_fraction": round(gbs / copy_gbs, 3)}


def run_cuda(args, dtype, device):
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s")
    table = get_active_table()
    dev = device_name(device)
    element_size = torch.empty((), dtype=dtype).element_size()
    inductor_mode = {"none": None, "default": "default", "max-autotune": "max-autotune-no-cudagraphs"}[args.inductor]
    cases = []
    for model in args.models:
        for name, N, K in SHAPES[model]:
            for M in args.m:
                bucket = m_bucket_label(M)
                chosen, tuned, reason = choose_kernel(table, dev, dtype, N, K, bucket)
                case = {"model": model, "layer": name, "N": N, "K": K, "M": M, "bucket": bucket,
                        "chosen": chosen, "reason": reason, "candidates": {}}
                for kernel in ("gemv", "flat_gemm", "mm"):
                    configs = [tuned] if (kernel == chosen and tuned) else None
                    timed = time_configs(kernel, N, K, M, dtype, device, sweep=args.sweep, configs=configs,
                                         warmup=args.warmup, rep=args.rep)
                    if timed:
                        config, us = min(timed, key=lambda t: t[1])
                        case["candidates"][kernel] = {**figures(us, N, K, M, element_size, copy_gbs),
                                                      "config": config}
                if inductor_mode:
                    us = inductor_us(N, K, M, dtype, device, inductor_mode, args.warmup, args.rep)
                    if us is not None:
                        case["candidates"][f"inductor-{args.inductor}"] = figures(us, N, K, M, element_size, copy_gbs)
                cand = case["candidates"]
                if chosen in cand and "mm" in cand:
                    case["chosen_vs_cublas"] = round(cand["mm"]["us"] / cand[chosen]["us"], 3)
                cases.append(case)
                line = "  ".join(f"{k} {v['us']:8.1f}us {v['GB/s']:6.0f}GB/s" for k, v in cand.items())
                print(f"{model:9s} {name:8s} N={N:6d} K={K:5d} M={M:4d}  {line}  chosen={chosen} "
                      f"({case.get('chosen_vs_cublas', float('nan')):.2f}x cuBLAS)")
    return {"copy_bandwidth_GBs": round(copy_gbs, 1), "cases": cases}


def run_cpu(args, dtype, device):
    print("no CUDA device: reduced CPU run, PyTorch path (mm) only — the Triton kernels need a GPU")
    copy_gbs = copy_bandwidth_gbs(device, nbytes=1 << 28)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s")
    element_size = torch.empty((), dtype=dtype).element_size()
    cases = []
    for model, shapes in CPU_SHAPES.items():
        for name, N, K in shapes:
            weight = torch.randn(N, K).div_(math.sqrt(K)).to(dtype)
            for M in (1, 8, 128):
                x = torch.randn(M, K).to(dtype)
                us = 1e6 * time_cpu(lambda i: F.linear(x, weight), rounds=args.cpu_rep, warmup=2).median
                case = {"model": model, "layer": name, "N": N, "K": K, "M": M, "bucket": m_bucket_label(M), "chosen": "mm",
                        "reason": "cpu: the PyTorch op",
                        "candidates": {"mm": figures(us, N, K, M, element_size, copy_gbs)}}
                cases.append(case)
                v = case["candidates"]["mm"]
                print(f"{model:9s} {name:8s} N={N:6d} K={K:5d} M={M:4d}  mm {v['us']:10.1f}us {v['GB/s']:6.1f}GB/s "
                      f"{v['TFLOP/s']:.3f} TFLOP/s")
    return {"copy_bandwidth_GBs": round(copy_gbs, 2), "cases": cases, "note": "CPU: reduced set, PyTorch path only"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--inductor", choices=["none", "default", "max-autotune"], default="max-autotune")
    parser.add_argument("--sweep", action="store_true", help="time every pruned config, report each kernel's best")
    parser.add_argument("--warmup", type=int, default=10, help="CUDA: ms of untimed calls (triton.testing.do_bench)")
    parser.add_argument("--rep", type=int, default=50, help="CUDA: ms of timed calls; the median call is kept")
    parser.add_argument("--cpu-rep", type=int, default=5, help="CPU: timed rounds; the median is kept")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(SHAPES)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(SHAPES)}")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    results = run_cuda(args, dtype, device) if cuda else run_cpu(args, dtype, device)

    import triton

    dev = device_name(device) if cuda else f"cpu-{platform.machine()}"
    record = {
        "benchmark": "linear",
        "device": dev,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "warmup": args.warmup if cuda else 2,
        "rep": args.rep if cuda else args.cpu_rep,
        "timing": ("triton.testing.do_bench (CUDA events, L2 flushed), median, weights rotated past L2" if cuda
                   else "perf_counter, interleaved rounds, median"),
        **results,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"{slug}-{record['date']}-linear.json"
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
