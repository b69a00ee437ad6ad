"""Quickstart: compile a small Llama with llmopt, generate, and compare with eager.

    python examples/quickstart.py [--layers 4] [--hidden 256] [--new-tokens 64]

Builds the model from a config (random weights, nothing downloaded), compiles its
forward with ``backend="llmopt"``, generates greedily with a static KV cache, prints the
compile report of the decode graph and tokens/s of eager vs llmopt. The timing runs
eager and llmopt in interleaved rounds (``--rounds``) and prints the median with its
spread (min–max over rounds): one sample on a busy machine is noise, not a result.
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmopt
from _options import add_model_options


def timed_generate(model, prompt, new_tokens):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    return out, new_tokens * prompt.shape[0] / (time.perf_counter() - start)


def summary(values):
    return f"{statistics.median(values):8.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p, layers=4, hidden=256, new_tokens=64, prompt_len=16, rounds=5)
    args = p.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_len))

    eager_forward = model.forward
    llmopt_forward = torch.compile(model.forward, backend="llmopt")
    rates = {"eager": [], "llmopt": []}
    outputs = {}
    with torch.no_grad():
        for forward in (eager_forward, llmopt_forward):  # warm-up (and compilation)
            model.forward = forward
            timed_generate(model, prompt, args.new_tokens)
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            for name, forward in (("eager", eager_forward), ("llmopt", llmopt_forward)):
                model.forward = forward
                outputs[name], rate = timed_generate(model, prompt, args.new_tokens)
                rates[name].append(rate)
    model.forward = eager_forward

    ratios = [b / a for a, b in zip(rates["eager"], rates["llmopt"])]
    print(llmopt.last_report())
    print()
    print(f"generated tokens identical to eager: {torch.equal(outputs['eager'], outputs['llmopt'])}")
    print(f"tokens/s, median of {args.rounds} interleaved rounds:")
    print(f"eager : {summary(rates['eager'])}")
    print(f"llmopt: {summary(rates['llmopt'])}")
    print(f"llmopt / eager: {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
