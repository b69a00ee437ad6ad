"""Speculative decoding and beam search with llmopt.generate.

    python examples/speculative.py [--layers 4] [--hidden 256] [--new-tokens 48] [--k 4] [--compile]
    python examples/speculative.py --layers 2 --hidden 64 --new-tokens 8     # seconds

Builds a Llama from a config (random weights, nothing downloaded) and a smaller draft with
the same vocabulary, then decodes one repetitive prompt greedily four ways: plain, with the
draft model proposing k tokens per step, with prompt lookup (n-gram) and with the target's
first layer as its own draft (layer skip). Greedy speculative decoding gives exactly the
plain tokens; what changes is how many target forwards it takes (acceptance). Random
weights agree little, so the draft accepts little here: benchmarks/bench_speculative.py
trains models that agree. Last, beam search (num_beams=4) on the same prompt.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmopt
from _options import add_model_options
from llmopt.runtime.speculative import layer_skip_draft


def build(layers: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1) * 2,
                         num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=1024,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p, layers=4, hidden=256, new_tokens=48)
    p.add_argument("--k", type=int, default=4, help="proposals per verify step")
    p.add_argument("--compile", action="store_true", help='compile target and draft with backend="llmopt"')
    args = p.parse_args()

    target = build(args.layers, args.hidden, seed=0)
    draft = build(1, max(args.hidden // 2, 64), seed=1)
    skip = layer_skip_draft(target, 1)  # shares the target's weights
    if args.compile:
        target, draft, skip = (llmopt.compile(m, dynamic=False) for m in (target, draft, skip))
    g = torch.Generator().manual_seed(0)
    motif = torch.randint(3, 2048, (6,), generator=g)
    prompt = torch.cat([motif.repeat(4), torch.randint(3, 2048, (4,), generator=g), motif[:3]])[None]

    def run(name, **kw):
        start = time.perf_counter()
        out = llmopt.generate(target, prompt, args.new_tokens, stop_token_ids=(), **kw)
        seconds = time.perf_counter() - start
        spec = kw.get("speculative")
        extra = ""
        if spec is not None:
            s = spec.stats
            extra = (f"  acceptance {s.acceptance_rate:.2f}, accepted/step {s.mean_accepted_per_step:.2f}, "
                     f"verify steps {s.steps[0]}")
        print(f"{name:>12}: {args.new_tokens / seconds:7.1f} tokens/s{extra}")
        return out

    k = args.k
    variants = (("draft", llmopt.Speculative(draft=draft, k=k)),
                ("ngram", llmopt.Speculative(ngram=3, k=k)),
                ("layer skip", llmopt.Speculative(draft=skip, k=k)))
    for _, spec in ((None, None),) + variants:  # warm-up (first calls; compiles with --compile)
        llmopt.generate(target, prompt, args.new_tokens, stop_token_ids=(), speculative=spec)
    plain = run("plain")
    for name, spec in variants:
        out = run(name, speculative=spec)
        print(f"{'':>12}  tokens identical to plain greedy: {torch.equal(out, plain)}")
    beams = llmopt.generate(target, prompt, args.new_tokens, stop_token_ids=(), num_beams=4)
    print(f"beam search (4 beams): {beams[0, prompt.shape[1]:].tolist()[:12]} ...")


if __name__ == "__main__":
    main()
