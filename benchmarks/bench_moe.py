"""Mixture of experts end to end: a Mixtral-shaped model (8 experts, top-2) with llmopt vs
eager and Inductor, and the bytes a decode step reads against a dense model.

    python benchmarks/bench_moe.py                 # CPU: fp32, hidden 256, 2 layers
    python benchmarks/bench_moe.py --quick --no-write

Same model object and inputs for every backend, in one process; the backends run in two
groups (float, then quantized: Dynamo's recompile limit counts every backend's graphs, so
the cache is reset between groups); in each group every backend is compiled and warmed up
first, then the timed rounds alternate between the group's backends:

* ``eager``: transformers' own MoE block (its default "grouped_mm" experts);
* ``inductor``: ``torch.compile`` default mode (``freezing=True`` on CPU);
* ``llmopt``: ``backend="llmopt"``, where ``fuse_moe`` turns each block into
  ``moe_route`` + ``fused_experts`` (the run checks it fired once per layer);
* ``llmopt-int8`` / ``llmopt-int4``: the same with ``options={"quantize": ...}`` (int8
  per channel; int4 with ``--int4-group``): the experts run ``fused_experts_int8`` /
  ``_int4`` on quantized stacks, the other linears (router excepted) are quantized too.
  Their logits differ from eager by the quantization error (``rel_err_vs_eager``).

Figures, medians of ``--rep`` rounds:

* **prefill tokens/s**: one forward over a ``--prompt``-token prompt, no cache;
* **decode tokens/s**: ``llmopt.generate`` with ``--new`` tokens minus with 1 token (the
  prefill and per-call setup cancel), per decoded token;
* **bytes per decode step** (batch 1), from the weights: the non-expert weights (input
  embedding excluded) plus the k active experts' weights, against all experts' weights
  (what a loop over every expert, or a dense layout, reads) and a dense model of the same
  active size (a Mistral with intermediate k x I); and the active bytes with int8 / int4
  expert stacks (codes + scales (+ zeros), other weights as they are).

On CPU the llmopt ops run their CPU implementations (the Triton kernels need a GPU).
Writes ``benchmarks/results/<device>-<date>-moe.json`` (``common.write_results``).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from common import add_run_arguments, apply_run_arguments, environment, save_results  # noqa: E402
from examples._options import add_model_options  # noqa: E402

import llmopt  # noqa: E402
from llmopt.quant import Int4WeightOnly  # noqa: E402

BACKENDS = ("eager", "inductor", "llmopt", "llmopt-int8", "llmopt-int4")


def build_models(args):
    import transformers as tf

    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(
        **common, intermediate_size=args.intermediate, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
    )).eval()
    dense = tf.MistralForCausalLM(tf.MistralConfig(**common, intermediate_size=args.top_k * args.intermediate)).eval()
    return moe, dense


def quantized_expert_bytes(expert_params, bits: int, group: int) -> int:
    """Bytes of 3-D expert stacks [E, N, K] stored as int8 (one fp32 scale per row) or int4
    (a scale and a zero per row and group)."""
    total = 0
    for p in expert_params:
        e, n, k = p.shape
        total += e * n * k * bits // 8 + e * n * (1 if bits == 8 else 2 * (k // group)) * p.element_size()
    return total


def decode_bytes(moe, dense, top_k: int, num_experts: int, int4_group: int = 32) -> dict:
    """Weight bytes one batch-1 decode step reads (the input embedding is a gather, excluded)."""
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)

    embed = {id(p) for p in moe.get_input_embeddings().parameters()}
    expert = [p for n, p in moe.named_parameters() if ".experts." in n]
    other = [p for p in moe.parameters() if id(p) not in embed and all(p is not q for q in expert)]
    dense_embed = {id(p) for p in dense.get_input_embeddings().parameters()}
    dense_bytes = size(p for p in dense.parameters() if id(p) not in dense_embed)
    active = size(other) + size(expert) * top_k // num_experts
    quantized = {
        f"moe_active_int{bits}": size(other) + quantized_expert_bytes(expert, bits, int4_group) * top_k // num_experts
        for bits in (8, 4)
    }
    return {
        "moe_active": active,
        **quantized,
        "moe_all_experts": size(other) + size(expert),
        "dense_same_active_size": dense_bytes,
        "active_over_all_experts": active / (size(other) + size(expert)),
    }


def compile_for(model, backend: str, int4_group: int = 32):
    torch._dynamo.reset()
    return _compile_keeping_cache(model, backend, int4_group)


def _compile_keeping_cache(model, backend: str, int4_group: int = 32):
    """torch.compile without a Dynamo reset: each backend keeps its compiled graphs (Dynamo
    guards on the backend), so rounds can alternate between backends."""
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, options={"freezing": True} if not torch.cuda.is_available() else None)
    # A quantized backend compiles its own copy: quantize= releases the floats it quantized.
    if backend == "llmopt-int8":
        return torch.compile(copy.deepcopy(model), backend="llmopt", options={"quantize": "int8"})
    if backend == "llmopt-int4":
        return torch.compile(copy.deepcopy(model), backend="llmopt",
                             options={"quantize": Int4WeightOnly(group_size=int4_group)})
    return torch.compile(model, backend="llmopt")


def backend_groups(backends: list[str]) -> list[list[str]]:
    """The float backends, then the quantized ones (each group interleaves its rounds);
    eager, when asked for, leads the first group (the reference of the others)."""
    groups = [[b for b in backends if not b.startswith("llmopt-int")], [b for b in backends if b.startswith("llmopt-int")]]
    return [g for g in groups if g]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p, hidden=256, intermediate=512, experts=8, top_k=2, layers=2, heads=8, kv_heads=2, vocab=1024)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=17)
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--int4-group", type=int, default=32, help="int4 group size (must divide hidden and intermediate)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (a smoke run)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 64, 96, 1, 4, 2, 128
        args.prompt, args.new, args.rep = 16, 5, 2
    cuda = apply_run_arguments(args)
    device = torch.device("cuda" if cuda else "cpu")
    moe, dense = build_models(args)
    moe = moe.to(device)
    backends = [b for b in args.backends.split(",") if b]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=g).to(device)
    short = prompt[:, :8]

    results, reference, timings = {}, None, {}
    with torch.no_grad():
        for group in backend_groups(backends):
            # Dynamo's recompile limit counts the graphs of every backend on the model's
            # forward: each group (float backends; quantized backends) starts from a reset.
            torch.compiler.reset()
            models = {}
            for backend in group:  # compile and warm up every backend of the group first
                model = _compile_keeping_cache(moe, backend, args.int4_group)
                last = llmopt.last_report()  # reports are numbered; the registry keeps only the last 64
                start = last.graph_index + 1 if last is not None else 0
                t0 = time.perf_counter()
                logits = model(prompt).logits
                tokens = llmopt.generate(model, short, args.new)
                llmopt.generate(model, short, 1)
                row = {"backend": backend, "warmup_s": time.perf_counter() - t0}
                if reference is None:
                    reference = (logits.double(), tokens)
                else:
                    row["rel_err_vs_eager"] = float((logits.double() - reference[0]).norm() / reference[0].norm())
                    row["tokens_equal_eager"] = bool(torch.equal(tokens, reference[1]))
                if backend.startswith("llmopt"):
                    row["fuse_moe_rewrites_per_graph"] = [
                        r.rewrites_by_pass().get("fuse_moe", 0) for r in llmopt.reports() if r.graph_index >= start]
                models[backend], results[backend], timings[backend] = model, row, ([], [])
            # Interleaved rounds: a shared machine's load drifts, and drifts alike for every backend.
            for _ in range(args.rep):
                for backend, model in models.items():
                    prefill, step = timings[backend]
                    t = time.perf_counter()
                    model(prompt)
                    prefill.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    llmopt.generate(model, short, args.new)
                    long = time.perf_counter() - t
                    t = time.perf_counter()
                    llmopt.generate(model, short, 1)
                    step.append((long - (time.perf_counter() - t)) / (args.new - 1))
    for backend, (prefill, step) in timings.items():
        row = results[backend]
        row["tokens_per_s"] = {
            "prefill": args.prompt / statistics.median(prefill),
            "decode": 1.0 / statistics.median(step) if statistics.median(step) > 0 else math.inf,
        }
        row["decode_step_ms"] = 1e3 * statistics.median(step)
        row["prefill_ms"] = 1e3 * statistics.median(prefill)
        print(f"{backend:>9}: prefill {row['tokens_per_s']['prefill']:8.1f} tok/s   "
              f"decode {row['tokens_per_s']['decode']:7.1f} tok/s   ({row['decode_step_ms']:.2f} ms/step)")
    if "eager" in results:
        base = results["eager"]["tokens_per_s"]
        for row in results.values():
            row["speedup"] = {f"{phase} vs eager": row["tokens_per_s"][phase] / base[phase] for phase in base}
    nbytes = decode_bytes(moe, dense, args.top_k, args.experts, args.int4_group)
    print(f"bytes per decode step: MoE active {nbytes['moe_active']:,} / all experts {nbytes['moe_all_experts']:,}"
          f" / dense of the same active size {nbytes['dense_same_active_size']:,}"
          f" / active with int8 experts {nbytes['moe_active_int8']:,}, int4 {nbytes['moe_active_int4']:,}")
    payload = {
        "benchmark": "moe",
        "config": {k: getattr(args, k) for k in ("hidden", "intermediate", "experts", "top_k", "layers", "heads",
                                                  "kv_heads", "vocab", "prompt", "new", "rep", "quick", "int4_group")},
        "dtype": "float32",
        "kernel": "triton" if cuda else "CPU implementation",
        "results": list(results.values()),
        "decode_bytes": nbytes,
        "environment": environment(),
        "note": "decode step = (generate(new) - generate(1)) / (new - 1); medians of interleaved rounds",
    }
    return save_results("moe", payload, args.no_write)


if __name__ == "__main__":
    main()
