"""Quickstart: compile a small Llama with llmopt, generate, and compare with eager.

    python examples/quickstart.py [--layers 4] [--hidden 256] [--new-tokens 64]

Builds the model from a config (random weights, nothing downloaded), compiles its
forward with ``backend="llmopt"``, generates greedily with a static KV cache, prints the
compile report of the decode graph and tokens/s of eager vs llmopt.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmopt


def tokens_per_second(model, prompt, new_tokens):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    model.generate(prompt, **kwargs)  # warm-up (and compilation, for the compiled model)
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    return out, new_tokens * prompt.shape[0] / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    args = p.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_len))

    with torch.no_grad():
        eager_tokens, eager_tps = tokens_per_second(model, prompt, args.new_tokens)
        model.forward = torch.compile(model.forward, backend="llmopt")
        llmopt_tokens, llmopt_tps = tokens_per_second(model, prompt, args.new_tokens)

    print(llmopt.last_report())
    print()
    print(f"generated tokens identical to eager: {torch.equal(eager_tokens, llmopt_tokens)}")
    print(f"eager : {eager_tps:8.1f} tokens/s")
    print(f"llmopt: {llmopt_tps:8.1f} tokens/s  ({llmopt_tps / eager_tps:.2f}x)")


if __name__ == "__main__":
    main()
