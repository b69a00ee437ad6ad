"""Fused row-wise kernels (residual + norm, gated activation, RoPE) vs eager and Inductor.

    python benchmarks/bench_fusions.py                     # CUDA: fp16 + bf16, full grid
    python benchmarks/bench_fusions.py --quick             # one dtype, one shape per op
    python benchmarks/bench_fusions.py --ops rope --tokens 2048 --dtype bf16 --no-write

Each llmopt op of issue 3 (``llmopt::add_rms_norm``, ``rms_norm``, ``add_layer_norm`` from
``codegen/residual_norm.py``, ``gated_activation`` and ``rope``) is timed against

* ``eager``: the unfused PyTorch ops as Hugging Face spells them (RMSNorm: upcast, pow,
  mean, rsqrt, mul, cast, mul; ``x + residual`` then ``F.layer_norm``; ``silu(g) * u`` on the
  two halves of a merged gate/up output; ``x * cos + rotate_half(x) * sin`` for q and k);
* ``inductor``: ``torch.compile`` of that same eager function (default mode) and, on CUDA,
  ``inductor-max-autotune`` (``mode="max-autotune-no-cudagraphs"``),

at Llama-2-7B / Llama-3-8B shapes (hidden 4096, intermediate 11008 / 14336, 32 query heads,
32 or 8 KV heads, head dim 128) for 1 and 2048 tokens, batch 1.

Bytes are those the ideal fused op moves (every input read once, every output written
once); GB/s = bytes / median time. On CUDA the time is GPU time: each candidate is captured
into a CUDA graph of several calls over rotating input copies (together > 3x L2, so every
call reads from HBM) and the graph replays are timed with CUDA events, so host overhead is
excluded for every candidate alike (as in a CUDA-graph decode step; ``--timing events``
times plain launches instead). The roofline is the copy bandwidth measured here
(``common.copy_bandwidth``, 1 GiB). Flags per row: ``below-85%`` (a bandwidth-bound row —
ideal time at copy bandwidth >= 5 us, i.e. the 2048-token rows — under 85 % of copy
bandwidth; 1-token rows are launch-latency bound and have no bandwidth target) and
``slower-than-inductor`` (llmopt slower than the faster Inductor mode), the targets of
issue 3. Each row also checks the llmopt output against eager (relative Frobenius error).

On CPU the llmopt ops run their PyTorch reference (``<op>_ref``: the Triton kernels need a
GPU); the output and the JSON say ``"kernel": "reference (CPU)"``. The CPU run is kept
short: fp32, one intermediate size (11008), 8 KV heads for RoPE, Inductor default mode
only, 1 warm-up and 3 timed runs, one input copy (no L2 rotation), hidden 4096 at both 1
and 2048 tokens, one thread (``--threads``).

A module of ``codegen/`` that is missing (or fails to import) is skipped with a message.
Writes ``benchmarks/results/<device>-<date>-fusions.json`` (``common.write_results``).
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import (  # noqa: E402
    copy_bandwidth, environment, parse_run_arguments, save_results,
)

from llmopt.codegen.kernel_mode import interpreting, use_triton  # noqa: E402
from llmopt.codegen.timing import cuda_time_us, time_cpu  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("add_rms_norm", "rms_norm", "add_layer_norm", "gated_activation", "rope")
# Which codegen module provides each op.
MODULE_OF = {
    "add_rms_norm": "residual_norm",
    "rms_norm": "residual_norm",
    "add_layer_norm": "residual_norm",
    "gated_activation": "gated_activation",
    "rope": "rope",
}
INDUCTOR_MODES = {"inductor": "default", "inductor-max-autotune": "max-autotune-no-cudagraphs"}
EPS = 1e-5
BANDWIDTH_TARGET = 0.85
# A row whose ideal time at copy bandwidth is below this is bound by launch latency, not
# by bandwidth: the 85 % target does not apply to it.
LATENCY_BOUND_US = 5.0
# Column labels of the shape fields in the printed table.
SHORT = {"tokens": "T", "hidden": "N", "intermediate": "I", "heads": "Hq", "kv_heads": "Hkv", "head_dim": "D"}


# --------------------------------------------------------------------------- timing
def gpu_time_us(call: Callable[[int], object], n_sets: int, *, warmup: int, rep: int,
                graph: bool = True) -> tuple[float, str]:
    """Median GPU microseconds of one ``call(i)`` (``i`` picks the input copy ``i % n_sets``).

    ``graph``: capture ``calls`` consecutive calls (at least ``n_sets``, enough for ~200 us)
    into one CUDA graph, time its replays for ``rep`` ms with ``llmopt.codegen.timing``'s
    ``cuda_time_us`` (``triton.testing.do_bench``) and divide: the host (Python,
    dispatcher, guards) is out of the measurement for every candidate alike. ``warmup``
    untimed calls come first (compiles, autotuning). Falls back to timing plain launches
    (CUDA events around each call) when capture fails.
    Returns ``(us, method)``. Kept here rather than in ``common.py`` (shared by
    ``bench_attention.py``).
    """
    for i in range(warmup):  # compiles, autotunes: never inside a capture
        call(i)
    torch.cuda.synchronize()
    if not graph:
        return cuda_time_us(call, warmup=1, rep=rep), "cuda-events"
    single = cuda_time_us(call, warmup=0, rep=3)
    calls = max(n_sets, min(32, math.ceil(200.0 / max(single, 1e-3))))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
            for i in range(calls):
                call(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                call(i)
        us = cuda_time_us(lambda _: g.replay(), warmup=2, rep=rep) / calls
        del g
        return us, "cuda-graph"
    except RuntimeError as err:
        torch.cuda.synchronize()
        print(f"    CUDA graph capture failed ({type(err).__name__}: {str(err)[:120]}); timing plain launches")
        return cuda_time_us(call, warmup=1, rep=rep), "cuda-events"


def input_copies(set_bytes: int, device: torch.device, limit_bytes: int = 2 << 30) -> int:
    """How many copies of an input set make the rotation > 3x L2 (1 on CPU): each timed call
    then reads its inputs from HBM, as a real layer does."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(3 * l2 / max(set_bytes, 1)), limit_bytes // max(set_bytes, 1)))


def kernel_label(t: torch.Tensor) -> str:
    """What an llmopt op runs on ``t``: its Triton kernel or its PyTorch reference."""
    if not use_triton(t):
        return "reference (CPU)" if t.device.type == "cpu" else "reference"
    return "triton (interpreter)" if interpreting() and not t.is_cuda else "triton"


def announce_run(device: torch.device, copy_mib: Optional[int]) -> tuple:
    """Measures the device copy bandwidth (over ``copy_mib`` MiB; 1 GiB on CUDA, 256 MiB
    on CPU by default) and prints it with the device, versions and what the llmopt ops run
    there; returns ``(environment, copy GB/s, kernel label)`` for the results file."""
    env = environment()
    nbytes = (copy_mib or (1024 if device.type == "cuda" else 256)) << 20
    copy_gbps = copy_bandwidth(str(device), nbytes=nbytes) / 1e9
    kernel = kernel_label(torch.empty(1, device=device))
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}; copy bandwidth {copy_gbps:.1f} GB/s; "
          f"llmopt ops run: {kernel}")
    return env, copy_gbps, kernel


def relative_error(actual, expected) -> float:
    """||a - e|| / ||e|| over all outputs (tuples concatenated), in fp64."""
    a = actual if isinstance(actual, (tuple, list)) else (actual,)
    e = expected if isinstance(expected, (tuple, list)) else (expected,)
    num = sum(float((x.double() - y.double()).norm()) ** 2 for x, y in zip(a, e))
    den = sum(float(y.double().norm()) ** 2 for y in e)
    return math.sqrt(num / den) if den else math.sqrt(num)


# --------------------------------------------------------------------------- eager spellings
def rms_norm_eager(x, weight, eps: float = EPS):
    """HF ``LlamaRMSNorm.forward``: upcast, pow, mean, rsqrt, mul, cast, mul."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_eager(x, residual, weight, eps: float = EPS):
    h = x + residual
    return rms_norm_eager(h, weight, eps), h


def add_layer_norm_eager(x, residual, weight, bias, eps: float = EPS):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def swiglu_eager(gate_up):
    """``silu(gate) * up`` on the halves of the merged gate/up projection (views, no copy)."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_eager(q, k, cos, sin):
    """HF ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    op: str
    shape: dict
    make_inputs: Callable[[], tuple]  # one fresh input set on the device
    fused: Callable[..., object]  # the llmopt op
    eager: Callable[..., object]  # the unfused PyTorch spelling (also what Inductor compiles)
    nbytes: int  # bytes the ideal fused op reads + writes


def build_cases(op: str, args, dtype: torch.dtype, device: torch.device, tokens: int) -> list[Case]:
    ops = torch.ops.llmopt
    e = torch.empty((), dtype=dtype).element_size()
    n = args.hidden

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    if op == "add_rms_norm":
        return [Case(op, {"tokens": tokens, "hidden": n},
                     lambda: (randn(tokens, n), randn(tokens, n), 1 + 0.1 * randn(n)),
                     lambda x, r, w: ops.add_rms_norm(x, r, w, EPS),
                     add_rms_norm_eager, (4 * tokens * n + n) * e)]
    if op == "rms_norm":
        return [Case(op, {"tokens": tokens, "hidden": n},
                     lambda: (randn(tokens, n), 1 + 0.1 * randn(n)),
                     lambda x, w: ops.rms_norm(x, w, EPS),
                     rms_norm_eager, (2 * tokens * n + n) * e)]
    if op == "add_layer_norm":
        return [Case(op, {"tokens": tokens, "hidden": n},
                     lambda: (randn(tokens, n), randn(tokens, n), 1 + 0.1 * randn(n), 0.1 * randn(n)),
                     lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS),
                     add_layer_norm_eager, (4 * tokens * n + 2 * n) * e)]
    if op == "gated_activation":
        cases = []
        for inter in args.intermediate:
            cases.append(Case(op, {"tokens": tokens, "intermediate": inter, "layout": "merged gate/up [T, 2I]"},
                              lambda inter=inter: (randn(tokens, 2 * inter),),
                              lambda gu: ops.gated_activation(gu[..., :gu.shape[-1] // 2], gu[..., gu.shape[-1] // 2:],
                                                              "silu"),
                              swiglu_eager, 3 * tokens * inter * e))
        return cases
    if op == "rope":
        cases = []
        hq, d = args.heads, args.head_dim
        for hkv in args.kv_heads:
            def make(hkv=hkv):
                # HF layout: projections [B, S, H, D] viewed as [B, H, S, D] (transpose, no copy)
                q = randn(1, tokens, hq, d).transpose(1, 2)
                k = randn(1, tokens, hkv, d).transpose(1, 2)
                angle = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * torch.logspace(
                    0, -4, d // 2, device=device)[None, :]
                angle = torch.cat((angle, angle), dim=-1)[None]  # [1, S, D], HF's duplicated halves
                return q, k, angle.cos().to(dtype), angle.sin().to(dtype)

            cases.append(Case(op, {"tokens": tokens, "heads": hq, "kv_heads": hkv, "head_dim": d},
                              make, lambda q, k, c, s: ops.rope(q, k, c, s, q.shape[-1], False), rope_eager,
                              (2 * (hq + hkv) * tokens * d + 2 * tokens * d) * e))
        return cases
    raise ValueError(op)


def load_modules(ops: list[str]) -> tuple[list[str], list[dict]]:
    """Import the codegen module of each op (registers ``llmopt::<op>``); skip missing ones."""
    available, skipped = [], []
    for op in ops:
        module = MODULE_OF[op]
        try:
            importlib.import_module(f"llmopt.codegen.{module}")
            getattr(torch.ops.llmopt, op)
        except Exception as err:  # noqa: BLE001 -- a module being written may fail in any way: skip it
            reason = f"llmopt/codegen/{module}.py: {type(err).__name__}: {err}"
            print(f"skipping {op}: {reason}")
            skipped.append({"op": op, "reason": reason})
            continue
        available.append(op)
    return available, skipped


# --------------------------------------------------------------------------- running
def time_case(case: Case, args, device: torch.device, modes: list[str]) -> dict:
    cuda = device.type == "cuda"
    first = case.make_inputs()
    set_bytes = sum(t.numel() * t.element_size() for t in first)
    n_sets = input_copies(set_bytes, device)
    sets = [first] + [case.make_inputs() for _ in range(n_sets - 1)]
    candidates: dict[str, Optional[Callable]] = {"llmopt": case.fused, "eager": case.eager}
    candidates.update({name: None for name in modes})  # compiled when their turn comes
    us, timing = {}, None
    for name, fn in candidates.items():
        if fn is None:
            torch.compiler.reset()  # a fresh cache per shape: no recompile limit, no dynamic-shape graph
            fn = torch.compile(case.eager, mode=INDUCTOR_MODES[name], dynamic=False)
        try:
            if cuda:
                us[name], timing = gpu_time_us(lambda i, fn=fn: fn(*sets[i % n_sets]), n_sets,
                                               warmup=args.warmup, rep=args.rep, graph=args.timing == "graph")
            else:
                us[name] = 1e6 * time_cpu(lambda i, fn=fn: fn(*sets[0]), rounds=args.rep, warmup=args.warmup).median
                timing = "perf_counter"
        except Exception as err:  # noqa: BLE001 -- a failing candidate (e.g. Inductor) is reported, the run goes on
            print(f"    {name} failed for {case.op} {case.shape}: {type(err).__name__}: {str(err)[:200]}")
            us[name] = None
    try:
        err = relative_error(case.fused(*sets[0]), case.eager(*sets[0]))
    except Exception as exc:  # noqa: BLE001 -- already reported by the timing loop
        print(f"    output check failed: {type(exc).__name__}: {str(exc)[:200]}")
        err = None
    del sets
    return {"us": us, "timing": timing, "rel_err_vs_eager": err, "input_copies": n_sets}


def figures(row: dict, nbytes: int, copy_gbps: float, cuda: bool) -> None:
    us = row["us"]
    row["GBps"] = {k: (nbytes / (v * 1e-6) / 1e9 if v else None) for k, v in us.items()}
    row["copy_fraction"] = {k: (v / copy_gbps if v else None) for k, v in row["GBps"].items()}
    mine = us.get("llmopt")
    row["speedup"] = {f"vs_{k}": (v / mine if (v and mine) else None) for k, v in us.items() if k != "llmopt"}
    inductor = [v for k, v in us.items() if k.startswith("inductor") and v]
    flags = []
    ideal_us = nbytes / (copy_gbps * 1e9) * 1e6
    row["bandwidth_bound"] = ideal_us >= LATENCY_BOUND_US
    if mine is None:
        flags.append("llmopt-failed")
    elif cuda:
        if row["bandwidth_bound"] and row["copy_fraction"]["llmopt"] < BANDWIDTH_TARGET:
            flags.append("below-85%")
        if inductor and mine > min(inductor):
            flags.append("slower-than-inductor")
    row["flags"] = flags


def fmt(v, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if v is not None else f"{'-':>{width}}"


def print_header(modes: list[str]) -> None:
    cols = "".join(f"{n[:14]:>15s}" for n in ["llmopt", "eager", *modes])
    print(f"{'op':16s} {'shape':26s} {'dtype':9s}{cols} {'GB/s':>8s} {'%copy':>6s} {'xeager':>7s} {'xind':>6s}  flags")
    print(f"{'':16s} {'':26s} {'':9s}{'(us)':>15s}")


def print_row(row: dict, modes: list[str]) -> None:
    shape = " ".join(f"{SHORT.get(k, k)}={v}" for k, v in row["shape"].items() if k in SHORT)
    times = "".join(fmt(row["us"].get(n), ".1f", 15) for n in ["llmopt", "eager", *modes])
    best_ind = [row["speedup"].get(f"vs_{m}") for m in modes if row["speedup"].get(f"vs_{m}")]
    frac = row["copy_fraction"]["llmopt"]
    print(f"{row['op']:16s} {shape:26s} {row['dtype']:9s}{times} {fmt(row['GBps']['llmopt'], '.1f', 8)}"
          f" {fmt(frac * 100 if frac else None, '.1f', 6)} {fmt(row['speedup'].get('vs_eager'), '.2f', 7)}"
          f" {fmt(min(best_ind) if best_ind else None, '.2f', 6)}  {' '.join(row['flags'])}")


def parse_ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--tokens", type=parse_ints, default=[1, 2048], help="rows (tokens, batch 1)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=parse_ints, default=None, help="default 11008,14336 (CUDA), 11008 (CPU)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=parse_ints, default=None, help="default 32,8 (CUDA), 8 (CPU)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None,
                   help="comma list of fp32,fp16,bf16 (default fp16,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--inductor", choices=["none", "default", "max-autotune", "all"], default=None,
                   help="Inductor modes to time (default: all on CUDA, default on CPU)")
    p.add_argument("--rep", type=int, default=None,
                   help="CUDA: ms of timed calls (triton.testing.do_bench), CPU: timed runs; median (default 50 / 3)")
    p.add_argument("--quick", action="store_true", help="one dtype, one intermediate size, 8 KV heads, fewer runs")
    args, cuda, device = parse_run_arguments(p, argv)
    dtypes = [DTYPES[d] for d in (args.dtype or ("fp16,bf16" if cuda else "fp32")).split(",")]
    args.intermediate = args.intermediate or ([11008, 14336] if cuda else [11008])
    args.kv_heads = args.kv_heads or ([32, 8] if cuda else [8])
    args.rep = args.rep if args.rep is not None else (50 if cuda else 3)
    inductor = args.inductor or ("all" if cuda else "default")
    if args.quick:
        dtypes, args.intermediate, args.kv_heads = dtypes[-1:], args.intermediate[-1:], args.kv_heads[-1:]
        args.rep = min(args.rep, 20 if cuda else 2)
        inductor = "default" if inductor == "all" else inductor
    modes = {"none": [], "default": ["inductor"], "max-autotune": ["inductor-max-autotune"],
             "all": ["inductor", "inductor-max-autotune"]}[inductor]
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")

    env, copy_gbps, kernel = announce_run(device, args.copy_mib)
    if not cuda:
        print("no CUDA device: the llmopt ops run their PyTorch reference (CPU); reduced grid, fp32, "
              "GB/s for information only (no targets)")
    available, skipped = load_modules(ops)
    rows = []
    print_header(modes)
    with torch.no_grad():
        for dtype in dtypes:
            for op in available:
                for tokens in args.tokens:
                    for case in build_cases(op, args, dtype, device, tokens):
                        torch.manual_seed(0)
                        row = {"op": op, "shape": case.shape, "dtype": str(dtype).removeprefix("torch."),
                               "bytes": case.nbytes, "kernel": kernel}
                        row.update(time_case(case, args, device, modes))
                        figures(row, case.nbytes, copy_gbps, cuda)
                        rows.append(row)
                        print_row(row, modes)
    flagged = [r for r in rows if r["flags"]]
    if cuda:
        print(f"targets (issue 3): bandwidth-bound rows >= {BANDWIDTH_TARGET:.0%} of copy bandwidth, never slower "
              f"than Inductor: {len(rows) - len(flagged)}/{len(rows)} rows meet them")
    payload = {
        "benchmark": "fusions",
        "environment": env,
        "kernel": kernel,
        "timing": (f"CUDA, {'graph replays' if args.timing == 'graph' else 'plain launches'}, CUDA events, median of "
                   f"{args.rep}, {args.warmup} warm-up calls, inputs rotated past L2") if cuda else
                  f"perf_counter, median of {args.rep}, {args.warmup} warm-up, one input copy",
        "copy_bandwidth_GBps": copy_gbps,
        "config": {"ops": ops, "tokens": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
                   "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "eps": EPS,
                   "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "inductor": modes,
                   "quick": args.quick},
        "targets": {"bandwidth_fraction": BANDWIDTH_TARGET, "not_slower_than_inductor": True,
                    "applies_to": f"bandwidth-bound rows (ideal time >= {LATENCY_BOUND_US} us), CUDA only"},
        "note": None if cuda else ("CPU: llmopt ops run their PyTorch reference; fp32, reduced grid "
                                   "(intermediate 11008, 8 KV heads), Inductor default only, no L2 rotation"),
        "skipped": skipped,
        "results": rows,
    }
    return save_results("fusions", payload, args.no_write)


if __name__ == "__main__":
    main()
