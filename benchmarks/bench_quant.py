"""Decode speed and model size of quantized models: fp32 / bf16 / int8 / int4 (and W8A8).

What it measures, in one process, same model and inputs:

Timing: wall clock with synchronisation on CUDA; on CPU the process's CPU time (see
``clock``), with the wall-clock figure kept alongside. The single-linear rows are timed by
``llmopt.codegen.timing``: ``triton.testing.do_bench`` on CUDA, interleaved rounds of CPU
time on CPU.

* ``decode`` (eager): greedy decode tokens/s of a randomly initialised Llama (Hugging Face
  ``LlamaForCausalLM``, ``DynamicCache``), quantized in place with ``quantize_``, after a
  short prompt: median time per step over the generated tokens, warm-up excluded (a first
  short generation runs before timing, so kernel compilation is excluded too); the
  variants are timed in ``ROUNDS`` interleaved rounds and the median round is reported.
  CPU: a ~100M-parameter config (hidden 768, 12 layers, MLP 2048, vocab 32000). CUDA: a
  Llama-2-7B-shaped config cut to 4 layers.
* ``compiled``: the same model under ``torch.compile(backend="llmopt")`` with a
  ``StaticCache``, float vs ``options={"quantize": ...}`` (quantized inside the graph), and
  eager float as the common baseline (``run_backend``, over ``bench_decode.loop_static``).
* ``model bytes``: bytes of all persistent tensors (what ``save_quantized`` writes) and
  of the linear weights alone.
* ``linear``: one linear at M = 1 (the decode GEMV), weights streamed from memory (see
  ``bench_linear``): CPU at the 100M model's shapes (K = 768, N = 2048 / 3072, and
  2048 -> 768), CUDA at 4096 x 11008 (the issue's target: int4 >= 3x and
  int8 >= 1.8x the bf16 GEMV).

CPU variants: float32 model; ``int8`` computes in float32 through the generated int8 GEMV
(llmopt/codegen/int8_weight_only_cpu.py) and quantizes the untied ``lm_head`` too (the int8
default, ``quantize_head``); ``int8-head-float`` keeps it float; ``int8-bf16`` computes in
bf16 with aten's int8 weight-pack kernel (``compute_dtype="bfloat16"``); int4 computes in
bf16 (PyTorch's fast int4 CPU kernel is bf16-only), its head float unless ``+head``. On
CUDA everything is bf16.

    python benchmarks/bench_quant.py [--tokens 16] [--threads 1] [--device cpu|cuda]

Writes ``benchmarks/results/<device>-<date>-quant.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment  # noqa: E402
from llmopt.codegen.locked_file import atomic_write_text  # noqa: E402
from llmopt.codegen.timing import cuda_time_us, time_rounds  # noqa: E402
from llmopt.tools.bench import device_info  # noqa: E402
from llmopt.quant import W8A8, Int4WeightOnly, Int8WeightOnly, QuantizedLinear, quantize_, quantize_weight  # noqa: E402

CPU_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                  tie_word_embeddings=False)
CUDA_CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                   tie_word_embeddings=False)


def device_name(device: str) -> str:
    return device_info(torch.device(device))["name"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """Wall clock on CUDA; on CPU the process's CPU time, which on a shared, loaded machine
    measures the work done instead of the time spent waiting for a core (single-threaded
    runs: CPU time = time on an idle core, up to cache and memory-bandwidth sharing)."""
    return time.perf_counter() if device == "cuda" else time.process_time()


def tensor_bytes(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    linear = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            linear += module.qweight.nbytes
        elif isinstance(module, torch.nn.Linear):
            linear += module.weight.numel() * module.weight.element_size()
    return {"state_dict_bytes": total, "linear_weight_bytes": linear}


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, tokens: int, device: str) -> float:
    """Greedy decode with the HF cache; median step time over ``tokens`` steps (2 warm-up steps)."""
    out = model(prompt, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    times, walls = [], []
    for step in range(tokens + 2):
        sync(device)
        t0, w0 = clock(device), time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        if step >= 2:
            times.append(clock(device) - t0)
            walls.append(time.perf_counter() - w0)
        cache = out.past_key_values
    return 1.0 / statistics.median(times), 1.0 / statistics.median(walls)


def variants(base, device: str) -> dict:
    """name -> builder. CPU: the float32 model with bf16 compute inside the quantized linears
    (``compute_dtype="bfloat16"``); CUDA: the bf16 model."""
    def quant(cfg, dtype, filter_fn=None):
        def build():
            m = copy.deepcopy(base).to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return quantize_(m, cfg, filter_fn)
        return build

    if device == "cpu":
        return {
            "fp32": lambda: copy.deepcopy(base),
            "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
            "int8": quant(Int8WeightOnly(), torch.float32),
            "int8-head-float": quant(Int8WeightOnly(quantize_head=False), torch.float32),
            "int8-bf16": quant(Int8WeightOnly(compute_dtype="bfloat16"), torch.float32),
            "int4-g128": quant(Int4WeightOnly(128, compute_dtype="bfloat16"), torch.float32),
            "int4-g128+head": quant(Int4WeightOnly(128, compute_dtype="bfloat16", quantize_head=True), torch.float32),
            "w8a8": quant(W8A8(), torch.float32),
        }
    return {
        "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "int8": quant(Int8WeightOnly(), torch.bfloat16),
        "int4-g128": quant(Int4WeightOnly(128), torch.bfloat16),
        "int4-g128+head": quant(Int4WeightOnly(128, quantize_head=True), torch.bfloat16),
        "w8a8": quant(W8A8(), torch.bfloat16),
    }


def compiled_variants(device: str) -> dict:
    """name -> llmopt options (None: eager), for the compiled comparison."""
    if device == "cpu":
        return {
            "eager fp32": None,
            "llmopt fp32": {},
            "llmopt int8": {"quantize": Int8WeightOnly()},
            "llmopt int8-head-float": {"quantize": Int8WeightOnly(quantize_head=False)},
            "llmopt int4-g128 (bf16 compute)": {"quantize": Int4WeightOnly(128, compute_dtype="bfloat16")},
        }
    return {
        "eager bf16": None,
        "llmopt bf16": {},
        "llmopt int8": {"quantize": Int8WeightOnly()},
        "llmopt int4-g128": {"quantize": Int4WeightOnly(128)},
    }


ROUNDS = 3


def bench_decode(device: str, config: dict, tokens: int, prompt_len: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config)).eval().to(device)
    prompt = torch.randint(0, config["vocab_size"], (1, prompt_len), device=device)
    models = {}
    for name, build in variants(base, device).items():
        models[name] = build().to(device)
        decode_tokens_per_s(models[name], prompt, 4, device)  # compiles the kernels the variant uses
    # Interleaved rounds, median per variant: a slow spell of a shared machine then hits
    # every variant of one round instead of one variant's whole measurement.
    rounds = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            rounds[name].append(decode_tokens_per_s(model, prompt, tokens, device))
    results = {}
    for name, model in models.items():
        tps = statistics.median(r[0] for r in rounds[name])
        wall_tps = statistics.median(r[1] for r in rounds[name])
        results[name] = {"decode_tokens_per_s": tps, "decode_tokens_per_s_wall": wall_tps,
                         "rounds_tokens_per_s": [r[0] for r in rounds[name]], **tensor_bytes(model)}
        print(f"  decode {name:16s} {tps:8.1f} tok/s (wall {wall_tps:6.1f}; rounds "
              f"{', '.join(f'{r[0]:.1f}' for r in rounds[name])})  state {results[name]['state_dict_bytes'] / 2**20:8.1f} MiB  "
              f"linears {results[name]['linear_weight_bytes'] / 2**20:8.1f} MiB", flush=True)
    del models
    for name in results:
        for ref in ("fp32", "bf16"):
            if ref in results:
                results[name][f"speedup_vs_{ref}"] = (results[name]["decode_tokens_per_s"]
                                                      / results[ref]["decode_tokens_per_s"])
    return results


def run_backend(model, forward, prompt, tokens: int, max_len: int) -> dict:
    """One compiled variant through ``bench_decode.loop_static`` (HF StaticCache, greedy):
    a first generation that compiles and warms (``warmup_s``), then a timed one (TTFT and
    the median decode step)."""
    from bench_decode import loop_static

    start = time.perf_counter()
    loop_static(model, forward, prompt, tokens, max_len)
    warmup = time.perf_counter() - start
    ttft, steps = loop_static(model, forward, prompt, tokens, max_len)
    step = statistics.median(steps[1:] or steps)
    return {"decode_tokens_per_s": prompt.shape[0] / step, "decode_step_s": step, "ttft_s": ttft,
            "warmup_s": warmup}


def bench_compiled(device: str, config: dict, tokens: int, prompt_len: int) -> dict:
    """Eager float vs llmopt float vs llmopt quantized, HF StaticCache, one process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval().to(device=device, dtype=dtype)
    prompt = torch.randint(0, config["vocab_size"], (1, prompt_len), device=device)
    max_len = prompt_len + tokens + 8
    results = {}
    for name, options in compiled_variants(device).items():
        torch._dynamo.reset()
        # A quantized variant compiles its own copy: quantize= releases the floats it quantized.
        m = copy.deepcopy(model) if options and "quantize" in options else model
        forward = m.forward if options is None else torch.compile(m.forward, backend="llmopt", options=options)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = run_backend(m, forward, prompt, tokens, max_len)
        del m, forward
        results[name] = r
        print(f"  compiled {name:32s} {r['decode_tokens_per_s']:8.1f} tok/s  TTFT {r['ttft_s'] * 1e3:7.1f} ms  "
              f"warm-up {r['warmup_s']:5.1f} s", flush=True)
    base = next(iter(results.values()))["decode_tokens_per_s"]
    for r in results.values():
        r["speedup_vs_eager"] = r["decode_tokens_per_s"] / base
    return results


def bench_linear(device: str, shapes: list[tuple[int, int]], runs: int, copies: int) -> list[dict]:
    """One linear at M = 1, cycling through ``copies`` distinct weights so that each call
    streams its weight from memory as in a real decode step (a single weight would sit in
    the CPU's cache and flatter every variant)."""
    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        x32 = torch.randn(1, k, device=device)
        xb = x32.to(torch.bfloat16)
        ws = [torch.randn(n, k, device=device) * 0.02 for _ in range(copies)]
        wbs = [w.to(torch.bfloat16) for w in ws]
        q8s = [quantize_weight(w, "int8") for w in wbs]
        q8s32 = [quantize_weight(w, "int8") for w in ws]
        q4s = [QuantizedLinear(quantize_weight(w, "int4-g128")).to(torch.bfloat16) for w in wbs]
        cases = {
            "fp32 F.linear": lambda i: F.linear(x32, ws[i]),
            "bf16 F.linear": lambda i: F.linear(xb, wbs[i]),
            "int8 (fp32 x)": lambda i: torch.ops.llmopt.int8_weight_only_linear(x32, q8s32[i].data, q8s32[i].scales),
            "int8 (bf16 x)": lambda i: torch.ops.llmopt.int8_weight_only_linear(xb, q8s[i].data, q8s[i].scales),
            "int4-g128 (bf16 x)": lambda i: q4s[i](xb),
            "w8a8": lambda i: torch.ops.llmopt.w8a8_linear(xb, q8s[i].data, q8s[i].scales),
        }
        cycled = {name: (lambda i, fn=fn: fn(i % copies)) for name, fn in cases.items()}
        if device == "cuda":
            us = {name: cuda_time_us(fn) for name, fn in cycled.items()}
        else:  # interleaved rounds of `copies` calls each, CPU time (see ``clock``)
            timed = time_rounds(cycled, rounds=runs, warmup=1, calls=copies, clock=time.process_time)
            us = {name: t.median * 1e6 for name, t in timed.items()}
        row = {"N": n, "K": k, "M": 1, "weights_cycled": copies, "us": us}
        base = row["us"]["fp32 F.linear"] if device == "cpu" else row["us"]["bf16 F.linear"]
        row["speedup"] = {name: base / t for name, t in row["us"].items()}
        print(f"  linear N={n} K={k}: " + ", ".join(f"{k_}: {v:.1f} us" for k_, v in row["us"].items()), flush=True)
        rows.append(row)
        del ws, wbs, q8s, q8s32, q4s
    return rows


def with_table_rows(report: dict) -> dict:
    """The report in the layout of the other benchmark scripts (``benchmarks/common.py``):
    ``environment`` and ``results`` rows of ``{"figure": ..., "value": {variant: number}}``,
    which ``make_tables.py`` renders; the full measurements stay under ``details``."""
    rows = []
    for device, entry in report["results"].items() if isinstance(report["results"], dict) else ():
        decode = entry["decode"]
        rows.append({"device": device, "figure": "decode tokens/s",
                     "value": {k: v["decode_tokens_per_s"] for k, v in decode.items()}})
        ref = "fp32" if "fp32" in decode else "bf16"
        rows.append({"device": device, "figure": f"decode speedup vs {ref}",
                     "value": {k: v[f"speedup_vs_{ref}"] for k, v in decode.items()}})
        rows.append({"device": device, "figure": "linear weight MB",
                     "value": {k: v["linear_weight_bytes"] / 2**20 for k, v in decode.items()}})
        compiled = entry.get("compiled", {})
        if compiled:
            rows.append({"device": device, "figure": "compiled decode tokens/s (StaticCache)",
                         "value": {k: v["decode_tokens_per_s"] for k, v in compiled.items()}})
            rows.append({"device": device, "figure": "compiled decode speedup vs eager",
                         "value": {k: v["speedup_vs_eager"] for k, v in compiled.items()}})
        for case in entry["linear_m1"]:
            rows.append({"device": device, "figure": f"linear M=1 N={case['N']} K={case['K']}: us",
                         "value": dict(case["us"])})
    if not rows:
        return report
    return {"benchmark": "quant", "environment": environment(), "results": rows,
            "note": "CPU: int8 computes in fp32 through the generated int8 GEMV, lm_head int8 too unless "
                    "'head-float'; int8-bf16 and int4 compute in bf16 with PyTorch's weight-pack kernels; "
                    "CPU time per step (eager); compiled rows: wall time, StaticCache",
            "details": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed per variant")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both when CUDA exists)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine a second OpenMP thread mostly waits "
                             "for a core and turns 100 us kernels into 16 ms scheduler stalls)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    import transformers
    import triton

    report = {
        "benchmark": "bench_quant",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "cpu_kernels": {name: hasattr(torch.ops.aten, name) for name in
                        ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm")},
        "results": {},
    }
    for device in devices:
        print(f"[{device}] {device_name(device)}  threads={torch.get_num_threads()}", flush=True)
        config = CPU_CONFIG if device == "cpu" else CUDA_CONFIG
        shapes = [(2048, 768), (3072, 768), (768, 2048)] if device == "cpu" else [(11008, 4096), (4096, 11008)]
        entry = {
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "model_config": config,
            "linear_m1": bench_linear(device, shapes, runs=7 if device == "cpu" else 50,
                                      copies=32 if device == "cpu" else 4),
            "decode": bench_decode(device, config, args.tokens, args.prompt),
            "compiled": bench_compiled(device, config, args.tokens, args.prompt),
        }
        report["results"][device] = entry

    report = with_table_rows(report)
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if "cuda" in devices else "cpu"
    path = os.path.join(args.out, f"{tag}-{dt.date.today().isoformat()}-quant.json")
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
