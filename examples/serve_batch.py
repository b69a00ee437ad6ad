"""Serve a batch of prompts with llmopt.Engine: continuous batching over a paged KV cache.

    python examples/serve_batch.py [--layers 4] [--hidden 256] [--requests 16] [--new-tokens 32] [--compile]
                                   [--policy decode_first] [--threads 1]
    python examples/serve_batch.py --small          # a few seconds on a laptop CPU

Builds a Llama from a config (random weights, nothing downloaded), then serves
``--requests`` prompts of different lengths: half are there at the start, the others
arrive one per step while the first ones run, as in a server. Each step runs every
scheduled request in one forward (new prompts and ongoing decodes together); finished
requests leave at once and their KV blocks go to the next ones. Tokens are streamed as
they are produced (shown for the first ``--show`` requests). At the end it prints
throughput, the KV cache's use of the memory it reserved, and checks one request against
``llmopt.generate`` run on it alone.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmopt
from _options import add_model_options


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p, layers=4, hidden=256)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32, help="most tokens a request generates")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests running at once")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--policy", choices=["fcfs", "decode_first"], default="fcfs")
    p.add_argument("--compile", action="store_true", help='run the model through torch.compile(backend="llmopt")')
    p.add_argument("--show", type=int, default=2, help="stream the tokens of this many requests")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (small models: 1 is often fastest)")
    p.add_argument("--small", action="store_true", help="a tiny model and workload (CI)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        args.layers, args.hidden, args.requests, args.new_tokens = 1, 64, 4, 4

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 48, (args.requests,), generator=g)]
    # different output lengths, so that requests finish at different steps
    new_tokens = [max(1, args.new_tokens - (i % 3) * args.new_tokens // 4) for i in range(args.requests)]
    params = [llmopt.SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in new_tokens]

    served = torch.compile(model, backend="llmopt") if args.compile else model
    engine = llmopt.Engine(served, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                    max_model_len=max(map(len, prompts)) + args.new_tokens, policy=args.policy)
    print(engine)

    index, first_token = {}, {}
    start = time.perf_counter()

    def on_token(request_id, token, finished):
        i = index[request_id]
        first_token.setdefault(i, time.perf_counter() - start)
        if i < args.show:
            print(f"  step {engine.stats.steps:3d}  request {i}: {token}{'  (done)' if finished else ''}")

    waiting = list(range(args.requests))
    arrive_now = (args.requests + 1) // 2
    with torch.no_grad():
        while waiting or engine.has_unfinished():
            for i in waiting[:arrive_now]:
                index[engine.add_request(prompts[i], params[i], callback=on_token)] = i
            waiting, arrive_now = waiting[arrive_now:], 1
            for out in engine.step():
                i = index[out.request_id]
                if out.finished and i >= args.show:
                    print(f"  step {engine.stats.steps:3d}  request {i} done: "
                          f"{len(engine.output(out.request_id))} tokens")
    elapsed = time.perf_counter() - start

    outputs = {i: engine.output(rid) for rid, i in index.items()}
    stats = engine.stats
    cache = engine.cache
    engine.close()  # the model gets its own attention back

    generated = sum(len(o) for o in outputs.values())
    block_bytes = cache.layout.bytes_per_block
    static_bytes = args.max_num_seqs * engine.max_model_len * block_bytes // args.block_size
    print()
    print(f"{args.requests} requests, {generated} tokens in {stats.steps} steps "
          f"({stats.decode_only_steps} decode-only), {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s, "
          f"{stats.steps / elapsed:.1f} steps/s"
          + (" (compilation included)" if args.compile else ""))
    print(f"time to first token: median {sorted(first_token.values())[len(first_token) // 2] * 1e3:.0f} ms")
    print(f"KV cache used/reserved: {stats.mean_kv_utilization:.1%} (mean over steps); peak "
          f"{stats.peak_blocks_used} of {cache.allocator.num_blocks} blocks = "
          f"{stats.peak_blocks_used * block_bytes / 2**20:.2f} MiB, vs {static_bytes / 2**20:.2f} MiB for a static "
          f"cache of {args.max_num_seqs} x {engine.max_model_len} tokens; {stats.preemptions} preemption(s)")
    alone = llmopt.generate(model, torch.tensor([prompts[0]]), new_tokens[0], stop_token_ids=())
    print(f"tokens equal to llmopt.generate alone: {alone[0, len(prompts[0]):].tolist() == outputs[0]}")


if __name__ == "__main__":
    main()
