"""Quantize a model, check its logits, save it, load it back.

    python examples/quantize_and_save.py [--scheme int8|int4-g128|w8a8|gptq] [--out DIR [--overwrite]] [--small]

The model is a randomly initialised Llama (no download); with your own model, replace
``make_model`` by e.g. ``AutoModelForCausalLM.from_pretrained(...)``. ``--small`` uses a tiny
config (CI runs it that way).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llmopt.quant import GPTQ, Int4WeightOnly, Int8WeightOnly, W8A8, load_quantized, quantize_, save_quantized  # noqa: E402


def make_model(small: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if small:
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4)
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheme", default="int4-g128", choices=["int8", "int4-g128", "w8a8", "gptq"])
    parser.add_argument("--out", default=None, help="directory to save into (default: a temporary one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint already in --out (a non-empty directory is refused otherwise)")
    parser.add_argument("--small", action="store_true", help="tiny model (seconds)")
    args = parser.parse_args()

    # On CPU, int8 runs in float32 through llmopt's generated int8 GEMV (and quantizes the
    # untied lm_head too: quantize_head); int4 computes in bf16, PyTorch's fast int4 CPU
    # kernel being bf16-only.
    configs = {
        "int8": Int8WeightOnly(),
        "int4-g128": Int4WeightOnly(group_size=128, compute_dtype="bfloat16"),
        "w8a8": W8A8(smooth_alpha=0.5),
        "gptq": GPTQ(bits=4, group_size=128, compute_dtype="bfloat16"),
    }
    config = configs[args.scheme]
    model = make_model(args.small)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16))
    # Calibration: a few batches of token ids from representative text (random here).
    calibration = [torch.randint(0, vocab, (4, 64)) for _ in range(4)]

    with torch.no_grad():
        reference = model(prompt).logits
        t0 = time.perf_counter()
        quantize_(model, config, calibration=calibration if args.scheme in ("w8a8", "gptq") else None)
        print(f"quantized with {config} in {time.perf_counter() - t0:.1f} s")
        logits = model(prompt).logits
    err = float((logits - reference).norm() / reference.norm())
    print(f"relative logits error vs float: {err:.4f}")

    out = args.out or tempfile.mkdtemp(prefix="llmopt-quantized-")
    save_quantized(model, out, overwrite=args.overwrite)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"saved to {out}: {sorted(os.listdir(out))}, {size / 2**20:.1f} MiB")

    loaded = load_quantized(out, lambda: make_model(args.small))
    with torch.no_grad():
        same = torch.equal(loaded(prompt).logits, logits)
    print(f"loaded back; identical logits: {same}")
    if not same:
        raise SystemExit("round trip changed the logits")


if __name__ == "__main__":
    main()
