"""Speculative decoding benchmark: acceptance and end-to-end tokens/s vs plain decoding.

Random weights agree on nothing, so acceptance is measured on models that learned the same
thing: a tiny Llama *target* and a smaller *draft* are trained here, seeded, on a synthetic
corpus (sentences of "words" drawn from a fixed dictionary of short token strings, with
a Zipf-like word frequency: inside a word the next token is certain, at a word boundary
it is a guess, as in text). Then, on held-out prompts, ``llmopt.generate`` decodes with
each proposer and k in {2, 4, 8}, greedily and by sampling at temperature 1 (seeded):

- ``draft``: the trained draft model (its own static KV cache);
- ``ngram``: prompt lookup, 3-grams down to 1-grams, no second model;
- ``layer_skip``: the target's first layer plus its head (self-speculation).

Reported per proposer and k: acceptance rate (accepted / proposed), mean accepted tokens
per verify step (the step also yields one token of its own), tokens/s and its ratio to
plain decoding (same mode) of the same prompts in the same process. Timing: the variants run in
interleaved rounds (every variant once per round), median round per variant; the run-to-run
spread is ``(max - min) / median`` over the rounds. Every variant's tokens are checked equal
to plain greedy decoding under greedy (the benchmark fails otherwise).

    python benchmarks/bench_speculative.py                 # CPU, ~2 minutes on 2 cores
    python benchmarks/bench_speculative.py --tiny --no-write   # seconds: a smoke run
    python benchmarks/bench_speculative.py --device cuda --compile   # on a GPU (the one-shot GPU check)

Writes ``benchmarks/results/<device>-<date>-speculative.json`` (``common.write_results``).
Models run eager (``--compile`` uses backend="llmopt" for target and draft).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import environment, write_results  # noqa: E402
from llmopt.runtime import generate  # noqa: E402
from llmopt.runtime.speculative import Speculative, layer_skip_draft  # noqa: E402

VOCAB = 96
SIZES = {
    "default": dict(target=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2),
                    draft=dict(hidden_size=48, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1),
                    train_steps=(200, 200), batch=12, seq=48, prompts=2, prompt_len=24, new_tokens=48, rounds=3),
    "tiny": dict(target=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1),
                 draft=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1),
                 train_steps=(4, 4), batch=4, seq=32, prompts=1, prompt_len=8, new_tokens=8, rounds=1),
}


def corpus(num: int, length: int, seed: int) -> torch.Tensor:
    """``[num, length]`` token sequences: words of a fixed seeded dictionary, Zipf-weighted."""
    g = torch.Generator().manual_seed(seed)
    dictionary = [torch.randint(3, VOCAB, (int(n),), generator=torch.Generator().manual_seed(1000 + i)).tolist()
                  for i, n in enumerate(torch.randint(2, 7, (48,), generator=torch.Generator().manual_seed(7)))]
    weights = 1.0 / torch.arange(1, len(dictionary) + 1, dtype=torch.float64)
    rows = []
    for _ in range(num):
        row: list[int] = []
        while len(row) < length:
            row += dictionary[int(torch.multinomial(weights, 1, generator=g))]
        rows.append(row[:length])
    return torch.tensor(rows)


def build(config_kwargs: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, **config_kwargs)
    return LlamaForCausalLM(config)


def train(model, steps: int, batch: int, seq: int, seed: int) -> float:
    """Next-token cross-entropy with AdamW on fresh corpus batches; returns the last loss."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        ids = corpus(batch, seq, seed=seed * 100_000 + step).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smallest models and run (a smoke test)")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--proposers", default="draft,ngram,layer_skip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help='torch.compile target and draft with backend="llmopt"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (models are trained and run there)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    size = SIZES["tiny" if args.tiny else "default"]
    ks = [int(k) for k in args.ks.split(",")]
    proposer_names = args.proposers.split(",")

    started = time.perf_counter()
    target = build(size["target"], args.seed).to(device)
    draft = build(size["draft"], args.seed + 1).to(device)
    target_loss = train(target, size["train_steps"][0], size["batch"], size["seq"], args.seed)
    draft_loss = train(draft, size["train_steps"][1], size["batch"], size["seq"], args.seed + 1)
    train_s = time.perf_counter() - started
    skip = layer_skip_draft(target, 1)
    run_target, run_draft, run_skip = target, draft, skip
    if args.compile:
        run_target = torch.compile(target, backend="llmopt", dynamic=False)
        run_draft = torch.compile(draft, backend="llmopt", dynamic=False)
        run_skip = torch.compile(skip, backend="llmopt", dynamic=False)

    held_out = corpus(size["prompts"], size["prompt_len"], seed=987_654).to(device)
    new = size["new_tokens"]
    cache_len = size["prompt_len"] + new + max(ks) + 1

    def spec_for(name: str, k: int) -> Speculative:
        if name == "draft":
            return Speculative(draft=run_draft, k=k)
        if name == "ngram":
            return Speculative(ngram=3, k=k)
        return Speculative(draft=run_skip, k=k)

    variants = [("plain", None)] + [(f"{p} k={k}", (p, k)) for p in proposer_names for k in ks]
    modes = {"greedy": {}, "sample T=1": {"temperature": 1.0}}
    expected = {i: generate(run_target, held_out[i:i + 1], new, stop_token_ids=(), max_seq_len=cache_len)
                for i in range(len(held_out))}
    keys = [(mode, name) for mode in modes for name, _ in variants]
    times = {key: [] for key in keys}
    stats = {key: [0, 0, 0] for key in keys}  # proposed, accepted, verify steps
    for round_ in range(size["rounds"] + 1):  # round 0 warms up (and compiles)
        for mode, name in keys:
            what = dict(variants)[name]
            start = time.perf_counter()
            for i in range(len(held_out)):
                spec = None if what is None else spec_for(*what)
                out = generate(run_target, held_out[i:i + 1], new, stop_token_ids=(), max_seq_len=cache_len,
                               speculative=spec, seed=i if modes[mode] else None, **modes[mode])
                if not modes[mode] and not torch.equal(out, expected[i]):
                    raise AssertionError(f"{name}: tokens differ from plain greedy decoding (prompt {i})")
                if spec is not None and round_ == 1:
                    st = spec.stats
                    stats[(mode, name)][0] += sum(st.proposed)
                    stats[(mode, name)][1] += sum(st.accepted)
                    stats[(mode, name)][2] += sum(st.steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ > 0:
                times[(mode, name)].append(time.perf_counter() - start)

    tokens = len(held_out) * new
    results = []
    for mode, name in keys:
        what = dict(variants)[name]
        plain = statistics.median(times[(mode, "plain")])
        median = statistics.median(times[(mode, name)])
        spread = (max(times[(mode, name)]) - min(times[(mode, name)])) / median
        row = {"decoding": mode, "proposer": "none" if what is None else what[0], "k": 0 if what is None else what[1]}
        proposed, accepted, steps = stats[(mode, name)]
        rate = accepted / proposed if proposed else 0.0
        per_step = accepted / steps if steps else 0.0
        row.update({
            "acceptance": "–" if what is None else f"{rate:.2f}",
            "accepted per step": "–" if what is None else f"{per_step:.2f}",
            "tokens_per_s": {"llmopt.generate": tokens / median},
            "speedup": {"vs plain decode": plain / median},
            "spread": f"{100 * spread:.0f}%",
            "figures": {"acceptance_rate": rate, "mean_accepted_per_step": per_step, "seconds_median": median,
                        "run_to_run_spread": spread, "verify_steps": steps},
        })
        results.append(row)
        print(f"{mode:>10} {name:>16}: {tokens / median:7.1f} tok/s  x{plain / median:4.2f}  acceptance "
              f"{row['acceptance']}  accepted/step {row['accepted per step']}  spread {row['spread']}")
    payload = {
        "benchmark": "speculative",
        "environment": environment(),
        "kernel": (f"llmopt.generate (greedy; sampling at temperature 1, seeded), batch 1, "
                   f"{len(held_out)} prompts x {size['prompt_len']} tokens, "
                   f"{new} new tokens; models {'compiled (llmopt)' if args.compile else 'eager'}, "
                   f"{args.threads} thread(s); target {size['target']} (loss {target_loss:.2f}), "
                   f"draft {size['draft']} (loss {draft_loss:.2f}), trained {train_s:.0f} s on the synthetic corpus"),
        "timing": (f"perf_counter, interleaved rounds after 1 warm-up round, median of {size['rounds']}; "
                   "spread = (max - min) / median over the rounds"),
        "note": ("greedy: every variant's tokens equal plain greedy decoding (checked); greedy decoding of "
                 "these models falls into loops the proposers predict, sampling measures acceptance at the "
                 "corpus' word boundaries"),
        "config": {"target": size["target"], "draft": size["draft"], "vocab_size": VOCAB, "seed": args.seed,
                   "train_steps": size["train_steps"], "ks": ks},
        "results": results,
    }
    if not args.no_write:
        print(f"wrote {write_results('speculative', payload)}")
    return payload


if __name__ == "__main__":
    main()
