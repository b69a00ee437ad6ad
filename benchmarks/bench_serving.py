"""Serving benchmark: continuous batching on the paged cache vs one request at a time vs
static batching, on a synthetic ShareGPT-like workload with Poisson arrivals.

Workload (same for every mode, seeded): ``--requests`` requests; prompt and output lengths
drawn from log-normal distributions (ShareGPT's conversation turns are heavy-tailed
around a median; the defaults are that shape scaled down for a small CPU model, see
``SIZES``), clipped to ``[min, max]``; arrivals a Poisson process of ``--rate`` requests/s.
Each request generates exactly its drawn output length (greedy, no stop token), so every
mode does the same useful work.

Modes, all in one process on the same random-weight Llama:

- ``one_at_a_time``: ``llmopt.generate`` on each request alone, in arrival order;
- ``static``: FCFS batches of up to ``--batch`` arrived requests, left-padded, each batch
  run to its longest output with ``llmopt.generate`` (a request's result is ready when
  its batch ends, as with ``model.generate``), ``StaticKVCache`` of the batch's longest
  prompt + output per row;
- ``continuous``: ``llmopt.Engine`` (``max_num_seqs=--batch``, FCFS), requests added as they
  arrive, ``num_blocks`` = the KV memory one static batch reserves at the longest lengths.

Time is virtual but made of measured compute: the clock advances by the wall time of each
forward (generate call or engine step) and jumps over idle gaps to the next arrival, so
the result does not depend on sleeping and every mode sees the same arrival schedule.
Reported per mode: output tokens/s (generated tokens / makespan), requests/s, time to
first token (arrival -> first token), time per output token after the first (TPOT,
``(last - first token) / (output tokens - 1)``), latency (arrival -> last token), each as
p50/p90/p99, normalized latency (latency / output tokens), and KV memory utilisation =
used / reserved token slots: for the engine, the mean over steps of tokens stored / slots
of allocated blocks (``PagedKVCache.utilization``); for static batching, the mean over
decode steps of the tokens rows actually hold / the batch's ``rows x (longest prompt +
longest output)`` reservation; one at a time, the same for one row. (A static batch's
requests all finish when the batch does, so its TPOT includes waiting for the batch.)

    python benchmarks/bench_serving.py                     # CPU: small model, 200 requests, ~3 min on 2 cores
    python benchmarks/bench_serving.py --size tiny --requests 20 --no-write     # a quick look (seconds)
    python benchmarks/bench_serving.py --device cuda --size 1b --requests 200 --rate 8
    python benchmarks/bench_serving.py --compile --modes continuous   # the engine on backend="llmopt"

Writes ``benchmarks/results/<device>-<date>-serving.json`` (``common.write_results``): the
``results`` rows (one figure per row, one value per mode, the throughput ratios) are what
``make_tables.py`` renders; ``modes`` keeps each mode's full summary and ``config`` the
model and workload.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import environment, write_results  # noqa: E402
from llmopt import compat  # noqa: E402
from llmopt.codegen.locked_file import atomic_write_text  # noqa: E402
from llmopt.runtime import SamplingParams, generate  # noqa: E402
from llmopt.runtime.engine import Engine  # noqa: E402

# Model configs (random weights) and workload shapes per size. Log-normal (median, sigma)
# in tokens; ShareGPT itself has prompt/output medians in the hundreds with sigma ~ 1.
SIZES = {
    "tiny": dict(model=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512),
                 prompt=(24, 0.8, 4, 192), output=(20, 0.8, 2, 96), rate=40.0, dtype="float32"),
    "small": dict(model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=4096),
                  prompt=(64, 0.9, 4, 384), output=(48, 0.8, 2, 256), rate=6.0, dtype="float32"),
    "1b": dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000),
               prompt=(256, 1.0, 8, 2048), output=(192, 0.9, 8, 1024), rate=8.0, dtype="bfloat16"),
}


def build_model(size: str, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2, **spec["model"])
    dtype = getattr(torch, spec["dtype"]) if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model, config, dtype


def workload(n: int, size: str, rate: float, seed: int, vocab: int):
    """(arrival_s, prompt_ids, output_len) per request, sorted by arrival."""
    spec = SIZES[size]
    g = torch.Generator().manual_seed(seed)

    def lognormal(median, sigma, lo, hi):
        z = torch.randn(n, generator=g, dtype=torch.float64)
        return [int(min(max(round(math.exp(math.log(median) + sigma * float(x))), lo), hi)) for x in z]

    prompts = lognormal(*spec["prompt"])
    outputs = lognormal(*spec["output"])
    gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=g).tolist()
    arrivals, t = [], 0.0
    for gap in gaps:
        t += gap
        arrivals.append(t)
    ids = [torch.randint(3, vocab, (p,), generator=g).tolist() for p in prompts]
    return list(zip(arrivals, ids, outputs))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def percentiles(values):
    if not values:
        return {}
    v = sorted(values)

    def pick(q):
        return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": sum(v) / len(v)}


def summarize(name, requests, finish, first, makespan, kv_util, extra=None):
    generated = sum(out for _, _, out in requests)
    latency = [finish[i] - requests[i][0] for i in range(len(requests))]
    ttft = [first[i] - requests[i][0] for i in range(len(requests))]
    per_token = [lat / requests[i][2] for i, lat in enumerate(latency)]
    # time per output token after the first (vLLM's TPOT); one-token requests have none
    tpot = [(finish[i] - first[i]) / (requests[i][2] - 1) for i in range(len(requests)) if requests[i][2] > 1]
    result = {
        "mode": name,
        "makespan_s": makespan,
        "generated_tokens": generated,
        "output_tokens_per_s": generated / makespan,
        "requests_per_s": len(requests) / makespan,
        "latency_s": percentiles(latency),
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "latency_per_output_token_s": percentiles(per_token),
        "kv_utilization": kv_util,
    }
    if extra:
        result.update(extra)
    return result


def timed_generate(model, input_ids, max_new_tokens, device, **kwargs) -> tuple[float, float]:
    """``llmopt.generate`` without stop tokens, timed: ``(seconds, seconds to the first token)``."""
    marks = {}

    def streamer(step, tokens):
        if step == 0:
            _sync(device)
            marks["first"] = time.perf_counter()

    _sync(device)
    t0 = time.perf_counter()
    generate(model, input_ids, max_new_tokens, stop_token_ids=(), streamer=streamer, **kwargs)
    _sync(device)
    return time.perf_counter() - t0, marks["first"] - t0


def run_one_at_a_time(model, requests, device):
    clock, finish, first, util_num, util_den = 0.0, {}, {}, 0.0, 0
    for i, (arrival, prompt, out_len) in enumerate(requests):
        clock = max(clock, arrival)
        start = clock
        elapsed, to_first = timed_generate(model, torch.tensor([prompt], device=device), out_len, device)
        first[i] = start + to_first
        clock = start + elapsed
        finish[i] = clock
        reserved = len(prompt) + out_len  # the cache generate allocates for it
        for s in range(out_len):
            util_num += (len(prompt) + s) / reserved
            util_den += 1
    return summarize("one_at_a_time", requests, finish, first, clock, util_num / max(util_den, 1))


def run_static(model, requests, device, batch, pad_id=0):
    clock, finish, first, util_num, util_den = 0.0, {}, {}, 0.0, 0
    i, n = 0, len(requests)
    batches = 0
    while i < n:
        clock = max(clock, requests[i][0])
        group = [j for j in range(i, min(i + batch, n)) if requests[j][0] <= clock]
        i = group[-1] + 1
        prompts = [requests[j][1] for j in group]
        outs = [requests[j][2] for j in group]
        width, new = max(map(len, prompts)), max(outs)
        ids = torch.full((len(group), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(group), width), dtype=torch.int64)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        elapsed, to_first = timed_generate(model, ids.to(device), new, device, attention_mask=mask.to(device))
        start = clock
        clock += elapsed
        batches += 1
        for j in group:
            finish[j] = clock
            first[j] = start + to_first
        # used: tokens each row really holds (its own prompt + outputs so far, none after it
        # finished); reserved: rows x (longest prompt + longest output)
        reserved = len(group) * (width + new)
        for s in range(new):
            used = sum(len(p) + min(s, o) for p, o in zip(prompts, outs))
            util_num += used / reserved
            util_den += 1
    return summarize("static", requests, finish, first, clock, util_num / max(util_den, 1),
                     {"batches": batches, "batch_size": batch})


def run_continuous(model, requests, device, batch, block_size, num_blocks, policy):
    engine = Engine(model, max_num_seqs=batch, block_size=block_size, num_blocks=num_blocks,
                    max_model_len=max(len(p) + o for _, p, o in requests) + 1, policy=policy)
    clock, finish, first = 0.0, {}, {}
    rid_to_index = {}
    nxt, n = 0, len(requests)
    step_times = []
    while len(finish) < n:
        if not engine.has_unfinished() and nxt < n:
            clock = max(clock, requests[nxt][0])  # idle: jump to the next arrival
        while nxt < n and requests[nxt][0] <= clock:
            _, prompt, out_len = requests[nxt]
            rid = engine.add_request(prompt, SamplingParams(max_new_tokens=out_len, stop_token_ids=()))
            rid_to_index[rid] = nxt
            nxt += 1
        _sync(device)
        t0 = time.perf_counter()
        outputs = engine.step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        step_times.append(elapsed)
        clock += elapsed
        for out in outputs:
            i = rid_to_index[out.request_id]
            first.setdefault(i, clock)
            if out.finished:
                finish[i] = clock
                engine.release(out.request_id)
    stats = engine.stats
    extra = {
        "max_num_seqs": batch,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "policy": policy,
        "steps": stats.steps,
        "decode_only_steps": stats.decode_only_steps,
        "preemptions": stats.preemptions,
        "peak_blocks_used": stats.peak_blocks_used,
        "step_time_s": percentiles(step_times),
    }
    engine.close()
    return summarize("continuous", requests, finish, first, clock, stats.mean_kv_utilization, extra)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model + workload size (default: small "
                        "on CPU, 1b on CUDA)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests/s")
    parser.add_argument("--batch", type=int, default=16, help="static batch size = engine max_num_seqs")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--policy", choices=["fcfs", "decode_first"], default="fcfs")
    parser.add_argument("--modes", default="continuous,static,one_at_a_time")
    parser.add_argument("--compile", action="store_true",
                        help='every mode runs torch.compile(model, backend="llmopt"); the warm-up is then the whole '
                             "workload, untimed, so that every graph is compiled before timing (twice the run time). "
                             "The generate modes (static, one_at_a_time) may still recompile while timed, since their "
                             "batch shapes depend on timing: compare --modes continuous")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machines: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results JSON path (default: results/<device>-<date>-serving.json)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    size = args.size or ("1b" if device.type == "cuda" else "small")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rate = args.rate or SIZES[size]["rate"]
    model, config, dtype = build_model(size, device, args.seed)
    served = torch.compile(model, backend="llmopt") if args.compile else model
    requests = workload(args.requests, size, rate, args.seed, config.vocab_size)
    longest = max(len(p) + o for _, p, o in requests)
    # the engine gets the KV memory one full static batch would reserve at the longest lengths
    num_blocks = args.batch * -(-longest // args.block_size)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")

    # Warm-up (excluded), per mode: a few short requests through its path. With --compile,
    # Dynamo's graphs are reset first, because its recompile limit counts the graphs of one
    # function and generate's static-cache graphs and the engine's paged ones would share it.
    warm = workload(8, size, 1e6, args.seed + 1, config.vocab_size)
    warm = [(0.0, p[: 4 + 3 * i], 2 + i % 4) for i, (_, p, _) in enumerate(warm)]

    def run(mode, reqs):
        with torch.no_grad():
            if mode == "one_at_a_time":
                return run_one_at_a_time(served, reqs, device)
            if mode == "static":
                return run_static(served, reqs, device, args.batch)
            return run_continuous(served, reqs, device, args.batch, args.block_size, num_blocks, args.policy)

    modes_out = {}
    for mode in modes:
        if args.compile:
            compat.reset_dynamo()
        # a compiled model meets a graph per size-1 specialisation and per dynamic variant
        # (decode-only or not, one sequence or many): run the whole workload once untimed
        for rnd in ((warm, warm[1::2]) if not args.compile else (requests,)):
            run(mode, rnd[:2] if mode == "one_at_a_time" else rnd)
        t0 = time.perf_counter()
        modes_out[mode] = r = run(mode, requests)
        print(f"{mode:>14}: {r['output_tokens_per_s']:8.1f} tok/s  TTFT p50/p90/p99 "
              f"{_ms(r['ttft_s'], 'p50')}/{_ms(r['ttft_s'], 'p90')}/{_ms(r['ttft_s'], 'p99')} ms  "
              f"TPOT p50/p90/p99 {_ms(r['tpot_s'], 'p50')}/{_ms(r['tpot_s'], 'p90')}/{_ms(r['tpot_s'], 'p99')} ms  "
              f"KV used/reserved {r['kv_utilization']:.1%}  ({time.perf_counter() - t0:.0f} s wall)", flush=True)

    ratios = {}
    if "continuous" in modes_out:
        for base in ("one_at_a_time", "static"):
            if base in modes_out:
                ours, theirs = modes_out["continuous"], modes_out[base]
                ratios[f"continuous_vs_{base}"] = {
                    "throughput": ours["output_tokens_per_s"] / theirs["output_tokens_per_s"],
                    "latency_p50": ours["latency_s"]["p50"] / theirs["latency_s"]["p50"],
                    "latency_p99": ours["latency_s"]["p99"] / theirs["latency_s"]["p99"],
                }
    prompt_lens = [len(p) for _, p, _ in requests]
    out_lens = [o for _, _, o in requests]
    payload = {
        "benchmark": "serving",
        "environment": environment(),
        "config": {
            "model": {"family": "llama", "dtype": str(dtype).replace("torch.", ""), "random_weights": True,
                      "parameters": sum(p.numel() for p in model.parameters()), **SIZES[size]["model"]},
            "workload": {
                "size": size, "requests": args.requests, "arrival": f"Poisson, {rate} requests/s", "seed": args.seed,
                "prompt_lognormal_median_sigma_min_max": SIZES[size]["prompt"],
                "output_lognormal_median_sigma_min_max": SIZES[size]["output"],
                "prompt_tokens": percentiles(prompt_lens), "output_tokens": percentiles(out_lens),
                "sampling": "greedy, exactly the drawn output length (no stop token)",
            },
            "batch": args.batch, "block_size": args.block_size, "num_blocks": num_blocks, "policy": args.policy,
            "compiled": "llmopt" if args.compile else "eager",
        },
        "kernel": f"model {'compiled with backend=llmopt' if args.compile else 'eager'}; {size} Llama, "
                  f"{args.requests} requests",
        "timing": "virtual clock: measured wall time of each forward, idle gaps skipped; warm-up excluded",
        "note": "KV used/reserved: mean over steps of token slots holding data / slots reserved "
                "(paged: allocated blocks; static and one at a time: rows x longest prompt + output)",
        "targets": {"continuous_kv_utilization": 0.9},
        "results": table_rows(modes_out),
        "modes": modes_out,
        "ratios": ratios,
    }
    for name, r in ratios.items():
        print(f"{name}: throughput x{r['throughput']:.2f}, latency p50 x{r['latency_p50']:.2f}, "
              f"p99 x{r['latency_p99']:.2f}")
    if not args.no_write:
        if args.out:
            out = Path(args.out)
            atomic_write_text(out, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        else:
            out = write_results("serving", payload)
        print(f"wrote {out}")
    return payload


MODES = ("continuous", "static", "one_at_a_time")

# (figure, key in a mode's summary, percentile or None, scale): one results row each
_FIGURES = (
    ("output tokens/s", "output_tokens_per_s", None, 1.0),
    ("requests/s", "requests_per_s", None, 1.0),
    ("TTFT p50 ms", "ttft_s", "p50", 1e3),
    ("TTFT p90 ms", "ttft_s", "p90", 1e3),
    ("TTFT p99 ms", "ttft_s", "p99", 1e3),
    ("TPOT p50 ms", "tpot_s", "p50", 1e3),
    ("TPOT p90 ms", "tpot_s", "p90", 1e3),
    ("TPOT p99 ms", "tpot_s", "p99", 1e3),
    ("latency p50 s", "latency_s", "p50", 1.0),
    ("latency p90 s", "latency_s", "p90", 1.0),
    ("latency p99 s", "latency_s", "p99", 1.0),
    ("KV used/reserved", "kv_utilization", None, 1.0),
)


def table_rows(modes_out: dict) -> list[dict]:
    """The ``results`` rows of ``benchmarks/make_tables.py``: one figure per row, one value
    per mode; the throughput row also carries the continuous / baseline ratios."""
    rows = []
    for figure, key, pct, scale in _FIGURES:
        value = {}
        for mode, summary in modes_out.items():
            v = summary.get(key)
            v = v.get(pct) if isinstance(v, dict) else v
            value[mode] = None if v is None else v * scale
        row = {"figure": figure, "value": value}
        if key == "output_tokens_per_s" and value.get("continuous"):
            row["speedup"] = {f"continuous vs {m.replace('_', ' ')}": value["continuous"] / value[m]
                              for m in ("static", "one_at_a_time") if value.get(m)}
        rows.append(row)
    return rows


def _ms(pcts: dict, key: str) -> str:
    v = pcts.get(key) if pcts else None
    return "–" if v is None else f"{v * 1e3:.0f}"


if __name__ == "__main__":
    main()
