"""Attention kernels: prefill TFLOP/s and decode GB/s of llmopt vs PyTorch SDPA and Inductor.

    python benchmarks/bench_attention.py                   # CUDA: full grid, bf16
    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --phases decode --decode-context 8192 --decode-batch 1 --no-write

Candidates, in one process on the same inputs:

* ``llmopt``: ``llmopt::attention_prefill`` (FlashAttention-2-style tiled kernel, causal)
  and ``llmopt::attention_decode`` (split-KV, one query token per sequence, per-sequence
  ``kv_lens``) from ``codegen/attention_prefill.py`` / ``attention_decode.py``;
* ``sdpa-flash`` / ``sdpa-efficient`` (CUDA): ``F.scaled_dot_product_attention`` forced to
  one backend with ``torch.nn.attention.sdpa_kernel``; ``sdpa`` (CPU): its default choice.
  GQA runs with ``enable_gqa=True``; a backend that refuses it gets K/V repeated to the
  query heads beforehand (outside the timing; the row's ``notes`` say so);
* ``inductor``: ``torch.compile`` of the same SDPA call (default mode, static shapes).

Shapes are Llama-2-7B / Llama-3-8B attention: 32 query heads, 32 or 8 KV heads, head dim
128, ``[B, H, S, D]`` contiguous. Prefill: causal self-attention over ``S`` in 512..16k with
the batch sized to about 16k tokens (8 at S <= 2048, down to 1 at 16k); TFLOP/s counts
``4 * B * Hq * D`` per attended (query, key) pair, ``S (S + 1) / 2`` pairs per head
(causal). Decode: one token per sequence over a cache whose valid length is the context
(512..16k) for batch 1..64; the cache capacity equals the context unless
``--decode-capacity`` is given (SDPA then gets the valid slice, its best case, while llmopt
gets the whole cache and ``kv_lens``); GB/s counts K and V of the valid length plus q and
out. On CUDA the caches rotate through copies larger than 3x L2, so every call reads K/V
from HBM, and times are GPU times of CUDA-graph replays (``bench_fusions.gpu_time_us``;
``--timing events`` times plain launches instead). Each row also checks the llmopt output
of the first sequence against SDPA (relative Frobenius error, ``rel_err_vs_sdpa``).

Targets of issue 4 (CUDA, flagged per row): prefill >= 90 % of ``sdpa-flash`` TFLOP/s at
head dim 128; decode at batch 1, 8k context >= 80 % of the copy bandwidth measured here
(``common.copy_bandwidth``, 1 GiB) and faster than SDPA (the faster of flash/efficient).

On CPU the llmopt ops run their PyTorch reference (the Triton kernels need a GPU), which
the output and the JSON say (``"kernel": "reference (CPU)"``), on a reduced grid that runs
in about a minute: fp32, 8 query heads with 8 or 2 KV heads (same GQA ratio as Llama-3),
prefill S in 512, 1024, 2048 (batch 2 up to 1024, then 1), decode context 512 and 2048 at
batch 1 and 2; 1 warm-up and 3 (prefill) or 10 (decode) timed runs; one thread
(``--threads``).

Writes ``benchmarks/results/<device>-<date>-attention.json`` (``common.write_results``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_fusions import announce_run, gpu_time_us, input_copies, relative_error  # noqa: E402
from common import (  # noqa: E402
    parse_run_arguments, save_results,
)
from llmopt.codegen.timing import time_cpu  # noqa: E402

import llmopt.codegen.attention_decode  # noqa: E402,F401  registers llmopt::attention_decode
import llmopt.codegen.attention_prefill  # noqa: E402,F401  registers llmopt::attention_prefill

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREFILL_TARGET = 0.90  # of sdpa-flash TFLOP/s, head dim 128
DECODE_TARGET = 0.80  # of copy bandwidth, batch 1, 8k context
DECODE_TARGET_SHAPE = (1, 8192)  # (batch, context)
PREFILL_TOKENS = 16384  # auto prefill batch: about this many tokens per call, 1..8 sequences


def sdpa_backends(cuda: bool) -> dict:
    """Candidate name -> SDPA backend to force (None: PyTorch's own choice)."""
    if not cuda:
        return {"sdpa": None}
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_call(backend, causal: bool, scale: float, gqa: bool) -> Callable:
    def run(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)

    return run


def repeat_kv(sets: list[tuple], group: int) -> list[tuple]:
    """Input sets with K/V repeated to the query heads (what HF's ``repeat_kv`` makes)."""
    return [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), *rest) for q, k, v, *rest in sets]


# --------------------------------------------------------------------------- one case
def time_candidates(phase: str, sets: list[tuple], args, device, causal: bool, scale: float,
                    group: int, valid: int) -> dict:
    """Times llmopt, each SDPA backend and Inductor on ``sets`` (rotated on CUDA).

    Each set is ``(q, k, v, kv_lens)``; SDPA and Inductor see ``k[:, :, :valid]``."""
    cuda = device.type == "cuda"
    n_sets = len(sets)
    rep = args.rep if phase == "prefill" else args.decode_rep
    ops = torch.ops.llmopt
    if phase == "prefill":
        def fused(q, k, v, lens):
            return ops.attention_prefill(q, k, v, None, None, None, scale, True)
    else:
        def fused(q, k, v, lens):
            return ops.attention_decode(q, k, v, lens, None, scale)

    def timed(fn, these):
        if cuda:
            return gpu_time_us(lambda i: fn(*these[i % n_sets]), n_sets, warmup=args.warmup, rep=rep,
                               graph=args.timing == "graph")
        return 1e6 * time_cpu(lambda i: fn(*these[0]), rounds=rep, warmup=args.warmup).median, "perf_counter"

    sliced = [(q, k[:, :, :valid], v[:, :, :valid]) for q, k, v, _ in sets]
    us, notes, timing = {}, {}, None
    try:
        us["llmopt"], timing = timed(fused, sets)
    except Exception as err:  # noqa: BLE001 -- report and keep benchmarking the other candidates
        print(f"    llmopt failed: {type(err).__name__}: {str(err)[:200]}")
        us["llmopt"] = None

    baselines: dict[str, Optional[object]] = dict(sdpa_backends(cuda))
    if args.inductor != "none":
        baselines["inductor"] = "compile"
    for name, backend in baselines.items():
        for gqa in ([True, False] if group > 1 else [False]):
            these = sliced if (gqa or group == 1) else repeat_kv(sliced, group)
            if backend == "compile":
                torch.compiler.reset()  # fresh per shape: no recompile limit, no dynamic-shape graph
                fn = torch.compile(sdpa_call(None, causal, scale, gqa), dynamic=False)
            else:
                fn = sdpa_call(backend, causal, scale, gqa)
            try:
                us[name], _ = timed(fn, these)
                if group > 1 and not gqa:
                    notes[name] = "K/V repeated to the query heads before the call (enable_gqa refused)"
                break
            except Exception as err:  # noqa: BLE001 -- a backend may refuse a shape: report it
                print(f"    {name} (enable_gqa={gqa}) failed: {type(err).__name__}: {str(err)[:160]}")
                us[name] = None
            finally:
                del these
    # Output check on the first sequence against SDPA over K/V repeated to the query heads:
    # plain MHA, which every backend takes (a GQA call that fell to the math backend would
    # materialize the score matrix: 17 GB at 16k).
    q, k, v, lens = (t[:1] for t in sets[0])
    k_mha, v_mha = (t[:, :, :valid].repeat_interleave(group, 1) for t in (k, v))
    try:
        reference = F.scaled_dot_product_attention(q, k_mha, v_mha, is_causal=causal, scale=scale)
        err = relative_error(fused(q, k, v, lens), reference)
    except Exception as exc:  # noqa: BLE001 -- a failing llmopt op is already reported above
        print(f"    output check failed: {type(exc).__name__}: {str(exc)[:200]}")
        err = None
    del k_mha, v_mha
    return {"us": us, "notes": notes, "timing": timing, "rel_err_vs_sdpa": err, "input_copies": n_sets}


def make_sets(phase, batch, seq, capacity, heads, kv_heads, head_dim, dtype, device, copies) -> list[tuple]:
    def one():
        q_len = seq if phase == "prefill" else 1
        q = torch.randn(batch, heads, q_len, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
        return q, k, v, lens

    return [one() for _ in range(copies)]


def prefill_batches(args, seq: int, cuda: bool) -> list[int]:
    if args.prefill_batch != "auto":
        return [int(b) for b in args.prefill_batch.split(",")]
    if cuda:
        return [max(1, min(8, PREFILL_TOKENS // seq))]
    return [2 if seq <= 1024 else 1]


def run_case(phase, batch, seq, heads, kv_heads, dtype, args, device, skipped: list) -> Optional[dict]:
    """One grid point: inputs (rotated copies for decode on CUDA), all candidates timed."""
    e = torch.empty((), dtype=dtype).element_size()
    capacity = max(seq, args.decode_capacity) if phase == "decode" else seq
    q_len = seq if phase == "prefill" else 1
    set_bytes = (2 * batch * kv_heads * capacity + batch * heads * q_len) * args.head_dim * e
    limit = int(args.max_kv_gib * 2**30)
    if set_bytes > limit:
        msg = f"{phase} B={batch} S={seq} Hkv={kv_heads}: {set_bytes / 2**30:.1f} GiB > --max-kv-gib {args.max_kv_gib}"
        print(f"  skipped {msg}")
        skipped.append(msg)
        return None
    # Prefill is compute-bound and re-reads K/V from L2 by design: one copy is enough.
    copies = input_copies(set_bytes, device, limit_bytes=limit) if phase == "decode" else 1
    torch.manual_seed(0)
    sets = make_sets(phase, batch, seq, capacity, heads, kv_heads, args.head_dim, dtype, device, copies)
    row = {"phase": phase, "batch": batch, "seq": seq, "capacity": capacity, "heads": heads, "kv_heads": kv_heads,
           "head_dim": args.head_dim, "dtype": str(dtype).removeprefix("torch."), "element_size": e,
           "causal": phase == "prefill"}
    row.update(time_candidates(phase, sets, args, device, phase == "prefill", args.head_dim ** -0.5,
                               heads // kv_heads, seq))
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next grid point may need the memory of this one's caches
    return row


# --------------------------------------------------------------------------- figures, table
def figures(row: dict, copy_gbps: float, cuda: bool) -> None:
    b, s, hq, hkv, d, e = (row[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim", "element_size"))
    us = row["us"]
    sdpa = [v for k, v in us.items() if k.startswith("sdpa") and v]
    mine = us.get("llmopt")
    row["speedup"] = {f"vs_{k}": (v / mine if (v and mine) else None) for k, v in us.items() if k != "llmopt"}
    flags = [] if mine else ["llmopt-failed"]
    if row["phase"] == "prefill":
        flops = 4 * b * hq * d * s * (s + 1) // 2
        row["flops"] = flops
        row["TFLOPs"] = {k: (flops / (v * 1e-6) / 1e12 if v else None) for k, v in us.items()}
        flash = row["TFLOPs"].get("sdpa-flash")
        row["fraction_of_flash"] = row["TFLOPs"]["llmopt"] / flash if (flash and mine) else None
        if cuda and d == 128 and row["fraction_of_flash"] is not None and row["fraction_of_flash"] < PREFILL_TARGET:
            flags.append("below-90%-flash")
    else:
        nbytes = (2 * b * hkv * s * d + 2 * b * hq * d) * e
        row["bytes"] = nbytes
        row["GBps"] = {k: (nbytes / (v * 1e-6) / 1e9 if v else None) for k, v in us.items()}
        row["copy_fraction"] = {k: (v / copy_gbps if v else None) for k, v in row["GBps"].items()}
        if cuda and mine and (b, s) == DECODE_TARGET_SHAPE:
            if row["copy_fraction"]["llmopt"] < DECODE_TARGET:
                flags.append("below-80%-copy")
            if sdpa and mine >= min(sdpa):
                flags.append("slower-than-sdpa")
    row["flags"] = flags


def fmt(v, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if v is not None else f"{'-':>{width}}"


def print_header(names: list[str]) -> None:
    cols = "".join(f"{n[:14]:>15s}" for n in names)
    print(f"{'phase':8s} {'B':>3s} {'S':>6s} {'Hq/Hkv':>7s} {'dtype':9s}{cols} {'llmopt':>10s} {'%copy':>6s}"
          f" {'xsdpa':>6s} {'xind':>6s}  flags")
    print(f"{'':8s} {'':>3s} {'':>6s} {'':>7s} {'':9s}{'(us)':>15s}{'':{15 * (len(names) - 1)}s} {'TF/s|GB/s':>10s}")


def print_row(row: dict, names: list[str]) -> None:
    times = "".join(fmt(row["us"].get(n), ".1f", 15) for n in names)
    metric = (row["TFLOPs"] if row["phase"] == "prefill" else row["GBps"])["llmopt"]
    frac = row.get("copy_fraction", {}).get("llmopt")
    vs_sdpa = [v for k, v in row["speedup"].items() if k.startswith("vs_sdpa") and v]
    heads = f"{row['heads']:>3d}/{row['kv_heads']:<3d}"
    frac = fmt(frac * 100 if frac else None, ".1f", 6)
    vs_sdpa = fmt(min(vs_sdpa) if vs_sdpa else None, ".2f", 6)
    vs_inductor = fmt(row["speedup"].get("vs_inductor"), ".2f", 6)
    print(f"{row['phase']:8s} {row['batch']:3d} {row['seq']:6d} {heads} {row['dtype']:9s}{times}"
          f" {fmt(metric, '.2f', 10)} {frac} {vs_sdpa} {vs_inductor}  {' '.join(row['flags'])}")


def parse_ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="prefill,decode")
    p.add_argument("--prefill-seq", type=parse_ints, default=None,
                   help="default 512,1024,2048,4096,8192,16384 (CUDA), 512,1024,2048 (CPU)")
    p.add_argument("--prefill-batch", default="auto",
                   help="comma list, or auto: ~16k tokens (1..8) on CUDA, 1-2 on CPU")
    p.add_argument("--decode-context", type=parse_ints, default=None,
                   help="valid KV lengths; default 512,1024,2048,4096,8192,16384 (CUDA), 512,2048 (CPU)")
    p.add_argument("--decode-batch", type=parse_ints, default=None, help="default 1,4,16,64 (CUDA), 1,2 (CPU)")
    p.add_argument("--decode-capacity", type=int, default=0, help="KV cache capacity (0: equal to the context)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32 CUDA, 8 CPU)")
    p.add_argument("--kv-heads", type=parse_ints, default=None, help="default 32,8 (CUDA), 8,2 (CPU)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default bf16 CUDA, fp32 CPU)")
    p.add_argument("--inductor", choices=["none", "default"], default="default")
    p.add_argument("--rep", type=int, default=None,
                   help="CUDA: ms of timed calls (triton.testing.do_bench), CPU: timed runs; median "
                        "(default 30 CUDA; CPU: 3 for prefill, 10 for decode)")
    p.add_argument("--max-kv-gib", type=float, default=24.0, help="skip decode cases whose K/V copy is larger")
    p.add_argument("--quick", action="store_true", help="CUDA: prefill 2k/8k, decode 8k at batch 1 and 16, 8 KV heads")
    args, cuda, device = parse_run_arguments(p, argv)
    dtypes = [DTYPES[d] for d in (args.dtype or ("bf16" if cuda else "fp32")).split(",")]
    heads = args.heads or (32 if cuda else 8)
    kv_heads = args.kv_heads or ([32, 8] if cuda else [8, 2])
    prefill_seq = args.prefill_seq or ([512, 1024, 2048, 4096, 8192, 16384] if cuda else [512, 1024, 2048])
    decode_context = args.decode_context or ([512, 1024, 2048, 4096, 8192, 16384] if cuda else [512, 2048])
    decode_batch = args.decode_batch or ([1, 4, 16, 64] if cuda else [1, 2])
    # CPU decode calls are short and, on a shared machine, noisy: more runs for the median.
    args.decode_rep = args.rep if args.rep is not None else (30 if cuda else 10)
    args.rep = args.rep if args.rep is not None else (30 if cuda else 3)
    if args.quick:
        kv_heads = kv_heads[-1:]
        prefill_seq = args.prefill_seq or ([2048, 8192] if cuda else [512])
        decode_context = args.decode_context or ([8192] if cuda else [512])
        decode_batch = args.decode_batch or ([1, 16] if cuda else [1])
        args.rep, args.decode_rep = min(args.rep, 20), min(args.decode_rep, 20)
    phases = [ph for ph in args.phases.split(",") if ph]
    if set(phases) - {"prefill", "decode"}:
        p.error(f"--phases takes prefill and/or decode, got {args.phases!r}")
    bad = [h for h in kv_heads if h <= 0 or heads % h]
    if bad:
        p.error(f"--heads {heads} must be a multiple of every --kv-heads, got {bad}")

    env, copy_gbps, kernel = announce_run(device, args.copy_mib)
    if not cuda:
        print("no CUDA device: the llmopt ops run their PyTorch reference (CPU); reduced grid "
              f"({heads} query heads), fp32, no targets")
    names = ["llmopt", *sdpa_backends(cuda), *(["inductor"] if args.inductor != "none" else [])]
    rows, skipped = [], []
    print_header(names)
    with torch.no_grad():
        for dtype in dtypes:
            grid = []
            if "prefill" in phases:
                grid += [("prefill", b, s, hkv) for hkv in kv_heads for s in prefill_seq
                         for b in prefill_batches(args, s, cuda)]
            if "decode" in phases:
                grid += [("decode", b, s, hkv) for hkv in kv_heads for s in decode_context for b in decode_batch]
            for phase, batch, seq, hkv in grid:
                row = run_case(phase, batch, seq, heads, hkv, dtype, args, device, skipped)
                if row is None:
                    continue
                row["kernel"] = kernel
                figures(row, copy_gbps, cuda)
                rows.append(row)
                print_row(row, names)
    if cuda:
        targets = [r for r in rows if (r["phase"] == "prefill" and r["head_dim"] == 128)
                   or (r["phase"] == "decode" and (r["batch"], r["seq"]) == DECODE_TARGET_SHAPE)]
        met = [r for r in targets if not r["flags"]]
        print(f"targets (issue 4): prefill >= {PREFILL_TARGET:.0%} of sdpa-flash TFLOP/s at D=128; decode B=1 8k >= "
              f"{DECODE_TARGET:.0%} of copy bandwidth and faster than SDPA: {len(met)}/{len(targets)} rows meet them")
    payload = {
        "benchmark": "attention",
        "environment": env,
        "kernel": kernel,
        "timing": (f"CUDA, {'graph replays' if args.timing == 'graph' else 'plain launches'}, CUDA events, median of "
                   f"{args.rep}, {args.warmup} warm-up calls, decode caches rotated past L2") if cuda else
                  f"perf_counter, median of {args.rep} (prefill) / {args.decode_rep} (decode), {args.warmup} warm-up",
        "copy_bandwidth_GBps": copy_gbps,
        "config": {"phases": phases, "heads": heads, "kv_heads": kv_heads, "head_dim": args.head_dim,
                   "prefill_seq": prefill_seq, "prefill_batch": args.prefill_batch, "decode_context": decode_context,
                   "decode_batch": decode_batch, "decode_capacity": args.decode_capacity,
                   "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "inductor": args.inductor,
                   "quick": args.quick, "flops": "4 * B * Hq * D per attended (q, k) pair; causal: S (S + 1) / 2 pairs",
                   "decode_bytes": "K and V of the valid length + q + out"},
        "targets": {"prefill_fraction_of_sdpa_flash": PREFILL_TARGET, "decode_copy_fraction": DECODE_TARGET,
                    "decode_target_shape": {"batch": DECODE_TARGET_SHAPE[0], "context": DECODE_TARGET_SHAPE[1]},
                    "decode_faster_than_sdpa": True},
        "note": None if cuda else (f"CPU: llmopt ops run their PyTorch reference; fp32, reduced grid ({heads} query "
                                   f"heads, KV heads {kv_heads}), SDPA default backend"),
        "skipped": skipped,
        "results": rows,
    }
    return save_results("attention", payload, args.no_write)


if __name__ == "__main__":
    main()
