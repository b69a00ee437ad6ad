"""Decode benchmark: tokens/s and time to first token, eager vs Inductor vs llmopt.

    python benchmarks/bench_decode.py                      # CPU: ~100M-parameter Llama
    python benchmarks/bench_decode.py --preset llama-2-7b --dtype bf16 --batch 1,8   # CUDA

Same model, same prompt, same static KV cache capacity (``--max-cache-len``, default
4096), one process. Each backend compiles ``model.forward`` (eager: no compile); the loop
is a plain prefill + greedy decode over a Hugging Face StaticCache, so every backend does
identical work and only the forward differs. Reported per backend: time to first token
(prefill of the prompt, after warm-up), decode tokens/s (median step time) and achieved
bandwidth = bytes read per decode step (weights + the valid part of the KV cache) / step
time. On CUDA also Inductor ``mode="max-autotune"`` (CUDA graphs) and the fraction of the
measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, write_results  # noqa: E402

PRESETS = {
    # ~110M parameters: the CPU configuration of issue 5.
    "llama-100m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(preset: str, dtype: torch.dtype, device: str, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=max_len, **PRESETS[preset])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def make_forward(model, backend: str):
    if backend == "eager":
        return model.forward
    if backend == "inductor":
        return torch.compile(model.forward)
    if backend == "inductor-max-autotune":
        return torch.compile(model.forward, mode="max-autotune")
    if backend == "llmopt":
        return torch.compile(model.forward, backend="llmopt")
    if backend in ("llmopt-aten", "llmopt-inductor"):  # the inner executor forced (docs/executors.md)
        return torch.compile(model.forward, backend="llmopt", options={"inner": backend.removeprefix("llmopt-")})
    raise ValueError(backend)


def run_backend(model, forward, prompt, new_tokens, max_len):
    from transformers import StaticCache

    device = prompt.device
    batch, plen = prompt.shape

    def one_generation(record):
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        sync()
        t0 = time.perf_counter()
        out = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(plen, device=device),
                      use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        ttft = time.perf_counter() - t0
        steps = []
        for i in range(new_tokens):
            pos = torch.tensor([plen + i], device=device)
            sync()
            t = time.perf_counter()
            out = forward(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True,
                          position_ids=pos.expand(batch, 1))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            steps.append(time.perf_counter() - t)
        if record is not None:
            record.append((ttft, steps))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compile_start = time.perf_counter()
    one_generation(None)  # warm-up: compiles prefill and decode graphs
    compile_s = time.perf_counter() - compile_start
    runs = []
    one_generation(runs)
    one_generation(runs)
    ttft = statistics.median(r[0] for r in runs)
    step = statistics.median(s for r in runs for s in r[1][1:])  # first decode step excluded
    return {"ttft_s": ttft, "decode_step_s": step, "decode_tokens_per_s": batch / step, "warmup_s": compile_s}


def bytes_per_step(model, batch: int, kv_len: int) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * kv_len * head_dim * model.dtype.itemsize
    return weights + kv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default: llama-100m on CPU, llama-2-7b on CUDA)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--batch", default="1")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-cache-len", type=int, default=4096)
    p.add_argument("--backends", default=None, help="comma list: eager,inductor,inductor-max-autotune,llmopt,llmopt-aten,llmopt-inductor")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    preset = args.preset or ("llama-2-7b" if cuda else "llama-100m")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    backends = (args.backends or ("eager,inductor,inductor-max-autotune,llmopt" if cuda else "eager,inductor,llmopt")).split(",")
    env = environment()
    bandwidth = copy_bandwidth(device) if cuda else None
    results = []
    model = build(preset, dtype, device, args.max_cache_len)
    params = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {params / 1e6:.0f}M parameters, {dtype}, {env['device']}, max_cache_len {args.max_cache_len}")
    for batch in [int(b) for b in args.batch.split(",")]:
        prompt = torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), device=device)
        kv_len = args.prompt_len + args.new_tokens // 2
        for backend in backends:
            torch._dynamo.reset()
            with torch.no_grad():
                r = run_backend(model, make_forward(model, backend), prompt, args.new_tokens, args.max_cache_len)
            r.update(backend=backend, batch=batch)
            r["achieved_GBps"] = bytes_per_step(model, batch, kv_len) / r["decode_step_s"] / 1e9
            if bandwidth:
                r["roofline_fraction"] = r["achieved_GBps"] * 1e9 / bandwidth
            results.append(r)
            print(f"  batch {batch:3d} {backend:24s} TTFT {r['ttft_s'] * 1e3:8.1f} ms   decode {r['decode_tokens_per_s']:8.1f} tok/s"
                  f"   {r['achieved_GBps']:7.1f} GB/s")
    for batch in {r["batch"] for r in results}:
        base = {r["backend"]: r for r in results if r["batch"] == batch}
        if "llmopt" in base:
            for name, r in base.items():
                r["llmopt_speedup"] = base["llmopt"]["decode_tokens_per_s"] / r["decode_tokens_per_s"]
    payload = {"benchmark": "decode", "environment": env, "preset": preset, "config": PRESETS[preset], "dtype": str(dtype),
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "max_cache_len": args.max_cache_len,
               "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None, "results": results}
    if not args.no_write:
        print("wrote", write_results("decode", payload))
    return payload


if __name__ == "__main__":
    main()
