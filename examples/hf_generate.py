"""Hugging Face ``generate`` with an llmopt-compiled forward, and ``llmopt.generate``.

    python examples/hf_generate.py [--model tiny-llama] [--layers 2] [--new-tokens 32] [--batch 2]

Builds a model (a preset or a local directory: see ``llmopt models``; random weights,
nothing downloaded), left-pads a batch of prompts of different lengths, and generates
greedily three ways:

1. eager Hugging Face ``model.generate`` — the reference;
2. the same ``model.generate`` with ``model.forward = torch.compile(model.forward,
   backend="llmopt")`` and llmopt's ``StaticKVCache`` (one buffer per layer, allocated once,
   so the compiled graphs never see a new shape and are traced once for the prefill and
   once for decode; ``--max-seq-len 4096`` reserves a long one: on CPU its pages are zeroed
   by the OS on first write, so the process grows with the tokens written, not with the
   capacity — the example prints both);
3. ``llmopt.generate`` (prefill + static decode loop, sampling on the device).

and checks that the three produce the same tokens.
"""
import argparse
import time

import torch

import llmopt
from llmopt.tools.model_spec import resolve
from llmopt.tools.peak_memory import PeakMemory


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help="preset name or local directory (default %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=12, help="length of the longest prompt")
    p.add_argument("--batch", type=int, default=2, help="prompts, of lengths prompt-len, prompt-len - 3, ...")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--max-seq-len", type=int, default=None, help="KV capacity (default: prompt-len + new-tokens)")
    args = p.parse_args()
    capacity = args.max_seq_len or args.prompt_len + args.new_tokens

    spec = resolve(args.model, dtype=args.dtype, layers=args.layers)
    model = spec.model
    if not spec.is_causal_lm:
        raise SystemExit(f"{args.model} is not a causal language model")
    # Left-padded prompts of different lengths (generation continues from the right edge).
    ids = spec.prompt(args.batch, args.prompt_len, seed=1)
    mask = torch.ones_like(ids)
    for row in range(args.batch):
        mask[row, : min(3 * row, args.prompt_len - 1)] = 0
    pad = model.generation_config.pad_token_id or 0
    ids = ids.masked_fill(mask == 0, pad)
    hf_kwargs = dict(attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                     do_sample=False, pad_token_id=pad)

    with torch.no_grad():
        model.generate(ids, **hf_kwargs)  # warm-up, as for the compiled model below
        start = time.perf_counter()
        eager = model.generate(ids, **hf_kwargs)
        eager_s = time.perf_counter() - start

        from llmopt.runtime import StaticKVCache

        model.forward = torch.compile(model.forward, backend="llmopt")
        with PeakMemory(torch.device(spec.device)) as building:  # peak RSS on CPU, allocated memory on CUDA
            cache = StaticKVCache(model.config, batch_size=args.batch, max_seq_len=capacity,
                                  dtype=spec.dtype, device=spec.device)
        _, built_mb, _ = building.result()
        model.generate(ids, past_key_values=cache, **hf_kwargs)  # compiles prefill and decode graphs
        cache.reset()
        start = time.perf_counter()
        compiled = model.generate(ids, past_key_values=cache, **hf_kwargs)
        compiled_s = time.perf_counter() - start

        ours = llmopt.generate(model, ids, args.new_tokens, attention_mask=mask, stop_token_ids=(), pad_token_id=pad)

    new = args.batch * args.new_tokens
    print(f"model: {spec.name}, {spec.num_parameters():,} parameters, {args.dtype} on {spec.device}")
    print(f"HF generate, eager          : {new / eager_s:8.1f} tokens/s")
    print(f"HF generate, llmopt forward : {new / compiled_s:8.1f} tokens/s")
    reserved = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    print(f"StaticKVCache: {capacity} slots, {reserved / 2**20:.1f} MB reserved; the process grew by "
          f"{built_mb:.1f} MB building it")
    print(f"tokens equal (HF compiled vs eager): {torch.equal(compiled, eager)}")
    print(f"tokens equal (llmopt.generate vs eager): {torch.equal(ours, eager)}")
    print("first row:", ours[0, -args.new_tokens:].tolist())


if __name__ == "__main__":
    main()
