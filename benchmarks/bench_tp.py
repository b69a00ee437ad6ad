"""Tensor parallelism: decode tokens/s of N ranks vs 1 process (CPU: gloo; CUDA: NCCL).

    python benchmarks/bench_tp.py                 # CPU: writes results/cpu-<date>-tp.json
    python benchmarks/bench_tp.py --no-write --layers 2
    python benchmarks/bench_tp.py --device cuda   # >= 2 GPUs: 1 GPU vs all of them, bf16

The same seeded Llama (GQA) is compiled with llmopt three ways, each in fresh processes:

- ``1 rank, 1 thread``: no tensor parallelism;
- ``1 rank, 2 threads``: no tensor parallelism, the two cores the TP run uses;
- ``2 ranks, 1 thread each``: ``options={"tensor_parallel": "auto"}`` over gloo.

Per configuration: decode tokens/s from ``llmopt.generate`` (the slope between a short
and a long generation, so prefill and setup cancel; median of ``--rounds``), the bytes of
weights the rank's compiled graph holds, the bytes of its KV cache (a
``StaticKVCache(..., tensor_parallel=...)``: the rank's heads only), and the rank's peak RSS. An honest figure: the
ranks share one memory bus and gloo all-reduces go through the kernel's loopback TCP
(two per layer per token), so on CPU tensor parallelism saves memory per rank rather than
time; on GPUs the all-reduce runs over NVLink (NCCL) and decode is bandwidth-bound per GPU.
The results file records the machine's load average: on a shared machine (load above the
core count) the three configurations are not comparable and only the bytes are meaningful.

``--device cuda`` (what the one-shot GPU check runs on a machine with >= 2 GPUs): the same
model in bf16 at a GPU size (``--hidden 4096 --layers 8`` unless given), one process per
GPU over NCCL (``cuda:<rank>``), ``1 GPU`` against ``N GPUs`` (``--world``, default all
GPUs); the peak memory per rank is ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from examples._options import add_model_options  # noqa: E402
from llmopt.codegen.locked_file import atomic_write_text  # noqa: E402


def attention_heads(hidden: int) -> int:
    """Query heads of the benchmark's Llama (KV heads: half): head dim 64 at the CPU size,
    128 at GPU sizes."""
    return max(8, hidden // 128)


def model_config(args):
    import transformers as tf

    heads = attention_heads(args.hidden)
    return tf.LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                          num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                          max_position_embeddings=1024)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rank_main(args) -> None:
    import warnings

    import torch
    import torch.distributed as dist
    import transformers as tf

    import llmopt
    from llmopt import backend

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("RANK", "0"))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(device)
    options = {}
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        options["tensor_parallel"] = "auto"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(model_config(args)).eval().to(device, dtype)
    graphs = []
    pipeline = backend.run_pipeline
    backend.run_pipeline = lambda gm, ctx: (pipeline(gm, ctx), graphs.append(gm))[0]
    compiled = torch.compile(model, backend="llmopt", options=options)
    ids = torch.randint(1, 8192, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    short, long = 4, 4 + args.new_tokens

    from llmopt.runtime.static_cache import StaticKVCache

    # under TP the cache holds only this rank's KV heads (tensor_parallel=, as the compile)
    cache = StaticKVCache(model.config, batch_size=1, max_seq_len=args.prompt_len + long, dtype=dtype, device=device,
                          tensor_parallel=options.get("tensor_parallel"))
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def timed(n):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        llmopt.generate(compiled, ids, n, stop_token_ids=(), cache=cache)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.no_grad():
        timed(short), timed(long)  # compiles prefill and decode
        per_token = [(timed(long) - timed(short)) / (long - short) for _ in range(args.rounds)]
    consts = {n.target for n in graphs[-1].graph.nodes if n.op == "get_attr"}
    weight_bytes = sum(getattr(graphs[-1], t).numel() * getattr(graphs[-1], t).element_size() for t in consts)
    result = {
        "decode_tok_s": 1.0 / statistics.median(per_token),
        "decode_tok_s_runs": [1.0 / t for t in per_token],
        "graph_weight_mb": weight_bytes / 2**20,
        "kv_cache_mb": kv_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(args.out, json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run_config(world: int, threads: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "rank0.json"
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--rank-main", "--threads", str(threads), "--out", str(out),
               "--layers", str(args.layers), "--hidden", str(args.hidden), "--new-tokens", str(args.new_tokens),
               "--prompt-len", str(args.prompt_len), "--rounds", str(args.rounds), "--device", args.device]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"ranks exited with {codes}")
    return json.loads(out.read_text())


def results_payload(cases: dict, args, load: float) -> dict:
    """The results file (``common.write_results`` shape, rendered by make_tables.py)."""
    from common import environment

    base = next(iter(cases.values()))["decode_tok_s"]  # the 1-rank configuration comes first
    rows = [{"configuration": name, "decode_tokens_per_s": c["decode_tok_s"], "x_one_rank": c["decode_tok_s"] / base,
             "graph_weight_MB_per_rank": c["graph_weight_mb"], "kv_cache_MB_per_rank": c.get("kv_cache_mb"),
             "peak_RSS_MB_per_rank": c["peak_rss_mb"],
             **({"peak_CUDA_MB_per_rank": c["peak_cuda_mb"]} if "peak_cuda_mb" in c else {})}
            for name, c in cases.items()]
    heads = attention_heads(args.hidden)
    note = (f"Llama {args.layers} layers, hidden {args.hidden}, {heads} heads / {heads // 2} KV heads, vocab 8192, "
            f"{'bf16 on ' + args.device if args.device == 'cuda' else 'fp32'}; "
            f"decode slope between {4} and {4 + args.new_tokens} new tokens, median of {args.rounds}; "
            f"load average {load:.1f} during the run"
            + (" (a shared machine: timings not comparable, bytes are)" if load > (os.cpu_count() or 1) else ""))
    return {"benchmark": "tp", "environment": environment(), "note": note, "results": rows, "raw": cases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p, layers=4, hidden=512, new_tokens=16, prompt_len=16, rounds=5)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one rank per GPU over NCCL, bf16, 1 GPU vs --world GPUs (needs >= 2 GPUs)")
    p.add_argument("--world", type=int, default=0, help="CUDA: ranks of the TP run (default: every GPU)")
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    if args.rank_main:
        return rank_main(args)
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        args.world = args.world or gpus
        if gpus < 2 or not 2 <= args.world <= gpus:
            raise SystemExit(f"bench_tp --device cuda needs >= 2 GPUs and 2 <= --world <= {gpus}; "
                             f"this machine has {gpus} (run the CPU benchmark without --device)")
        if not any(a.startswith("--hidden") for a in argv):
            args.hidden = 4096
        if not any(a.startswith("--layers") for a in argv):
            args.layers = 8

    from common import save_results

    cases = {}
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    configs = (("1 rank, 1 thread", 1, 1), ("1 rank, 2 threads", 1, 2), ("2 ranks, 1 thread each", 2, 1))
    if args.device == "cuda":
        configs = (("1 GPU", 1, 1), (f"{args.world} GPUs", args.world, 1))
    for name, world, threads in configs:
        cases[name] = run_config(world, threads, args)
        c = cases[name]
        print(f"{name:24s} decode {c['decode_tok_s']:7.1f} tok/s   graph weights {c['graph_weight_mb']:6.1f} MB/rank   "
              f"KV cache {c['kv_cache_mb']:7.3f} MB/rank   peak RSS {c['peak_rss_mb']:6.0f} MB/rank", flush=True)
    payload = results_payload(cases, args, os.getloadavg()[0])
    save_results("tp" if args.device == "cpu" else "tp-cuda", payload, args.no_write)


if __name__ == "__main__":
    main()
