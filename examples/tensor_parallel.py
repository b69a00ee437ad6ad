"""Tensor parallelism: one model over several processes, compiled as one graph per rank.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py          # what you run on GPUs
    python examples/tensor_parallel.py --nproc 2                      # same, launched here

Every rank builds the same model (a preset, random weights, nothing downloaded), then
compiles it with ``options={"tensor_parallel": "auto"}``: the pass ``shard_tensor_parallel``
keeps this rank's attention heads and MLP features, adds an all-reduce after ``o_proj`` /
``down_proj`` and gathers the vocabulary-parallel logits (docs/tensor_parallel.md). Rank 0
then checks that greedy tokens from ``llmopt.generate`` and from Hugging Face ``generate``
with a static cache of the rank's KV heads (``StaticKVCache(..., tensor_parallel="auto")``)
equal the model run eagerly in one process, and so do ``llmopt.Engine``'s (which checks
every step that all ranks scheduled the same batch, and takes rank 0's sampled tokens), and
prints what was sharded. ``llmopt.generate``'s own cache holds only the rank's KV heads too
(it reads the compile's ``tensor_parallel`` option). A mixture-of-experts model (``--model``
a local Mixtral / Qwen-MoE directory) has its experts split along their intermediate dimension.

Without ``torchrun`` (no ``RANK`` in the environment) the script starts ``--nproc`` copies of
itself with the variables ``torchrun`` would set. Backend: NCCL when CUDA is available,
gloo otherwise.
"""
import argparse
import datetime
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

import llmopt
from llmopt.tools.model_spec import resolve


def launch_here(nproc: int) -> None:
    """Start ``nproc`` ranks of this script as ``torchrun`` would, print rank 0's output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env,
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, text=True))
    out, _ = procs[0].communicate()
    codes = [p.wait() for p in procs]
    print(out, end="")
    if any(codes):
        raise SystemExit(f"ranks exited with {codes}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help="preset name or local directory (default %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--nproc", type=int, default=2, help="ranks to start when not launched by torchrun")
    args = p.parse_args()
    if "RANK" not in os.environ:
        return launch_here(args.nproc)

    cuda = torch.cuda.is_available()
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)

    spec = resolve(args.model, layers=args.layers, device="cuda" if cuda else "cpu")  # seeded: same weights on every rank
    model = spec.model
    ids = spec.prompt(1, args.prompt_len, seed=1)
    hf_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                     pad_token_id=model.generation_config.pad_token_id or 0)
    with torch.no_grad():
        eager = llmopt.generate(model, ids, args.new_tokens, stop_token_ids=())

        compiled = torch.compile(model, backend="llmopt", options={"tensor_parallel": "auto"})
        ours = llmopt.generate(compiled, ids, args.new_tokens, stop_token_ids=())
        report = llmopt.last_report()

        from llmopt.runtime import StaticKVCache

        model.forward = torch.compile(model.forward, backend="llmopt", options={"tensor_parallel": "auto"})
        # tensor_parallel=: the cache holds only this rank's key/value heads
        cache = StaticKVCache(model.config, batch_size=1, max_seq_len=args.prompt_len + args.new_tokens,
                              dtype=spec.dtype, device=spec.device, tensor_parallel="auto")
        hf = model.generate(ids, past_key_values=cache, **hf_kwargs)

        # the Engine: the same requests on every rank; paged pools of this rank's KV heads
        params = llmopt.SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=())
        with llmopt.Engine(compiled, max_num_seqs=2, block_size=8,
                           max_model_len=args.prompt_len + args.new_tokens + 8) as engine:
            served = engine.generate([ids[0].tolist()], params)[0]

    if rank == 0:
        world = dist.get_world_size()
        print(f"model: {spec.name}, {spec.num_parameters():,} parameters, {world} ranks ({dist.get_backend()})")
        for line in report.notes:
            if line.startswith("shard_tensor_parallel"):
                print(line)
        for r in report.rewrites:
            if r.pass_name == "shard_tensor_parallel" and r.layer.startswith(("model.layers.0.", "lm_head")):
                print(f"  {r.layer}: {r.detail}")
        print(f"tokens equal (llmopt.generate, {world} ranks vs eager): {torch.equal(ours, eager)}")
        print(f"tokens equal (HF generate + StaticKVCache, {world} ranks vs eager): {torch.equal(hf, eager)}")
        print(f"tokens equal (llmopt.Engine, {world} ranks vs eager): {served == eager[0, ids.shape[1]:].tolist()}")
        print(f"KV heads in this rank's cache: {cache.shape[1]} of {model.config.num_key_value_heads}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
