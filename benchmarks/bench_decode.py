"""Decode benchmark: tokens/s, time to first token, roofline fraction and peak memory,
llmopt against every peer, side by side in one process.

    python benchmarks/bench_decode.py                       # CPU: ~100M-parameter Llama, fp32
    python benchmarks/bench_decode.py --dtype bf16 --batch 1,4 --cache short,4096
    python benchmarks/bench_decode.py --loop hf             # through HF generate(cache_implementation="static")
    python benchmarks/bench_decode.py --preset llama-2-7b --dtype bf16 --batch 1,8   # CUDA

Peers (``--backends``): ``eager``; ``inductor`` (``torch.compile`` default); on CPU
``inductor-freezing`` (``options={"freezing": True}``, Inductor's weight pre-packing); on
CUDA ``inductor-max-autotune`` (CUDA graphs); ``torchao-int8`` (torchao int8 weight-only +
Inductor, when torchao imports); llmopt as shipped (``llmopt``), its executors forced
(``llmopt-aten``, ``llmopt-inductor``) and quantized (``llmopt-int8``, ``llmopt-int4``, and
``llmopt-int4-head``: int4 with the untied ``lm_head`` quantized too, which the int4 default
keeps in float).

Method (DESIGN.md "Benchmarks"):
- same model, same prompt, same KV capacity; every backend compiles ``model.forward``;
- all backends are compiled and warmed first, then timed in ``--rounds`` interleaved rounds
  (the order rotates each round), so a slow phase of the machine hits every backend alike;
  a round is one generation (prefill + ``--new-tokens`` greedy steps); its decode figure
  is the median step, the first step excluded. Reported: the median over rounds and the
  spread (min and max of the round medians);
- loops (``--loop``): ``static`` (a plain prefill + decode loop over a HF ``StaticCache``:
  only the forward differs), ``hf`` (``model.generate(cache_implementation="static")``
  with the compiled forward, per-token times from a streamer), ``llmopt``
  (``llmopt.generate`` with the compiled model, per-token times from its streamer);
- KV capacity (``--cache``): ``short`` = prompt + new tokens, or a number (4096);
- TTFT: the prefill call to the first token, per round; reported as the median and spread
  over rounds, and against llmopt as the median of the per-round ratios
  (``ttft_llmopt_speedup_paired``: > 1 means llmopt's first token came sooner), which
  cancels the machine's phases that move every backend's TTFT alike;
- two step times: ``decode_step_s`` is the loop's step (token to token: the forward plus
  what the loop does around it, e.g. HF ``generate``'s logits processing, the argmax) and
  ``forward_step_s`` the compiled forward's decode calls alone (timed around each call of
  the backend's forward, the same wrapper for every backend; first decode call excluded);
- roofline: bytes a decode step must read = the parameters minus the input embedding
  table (a step reads ``batch`` rows of it) + the valid K and V of every layer; the
  fraction = those bytes / step time / the read bandwidth measured in the same run
  (:class:`ReadBandwidth`: ``sum`` over a 1 GiB tensor on CPU, a device copy on CUDA, once
  per round between the rounds; its median and spread are reported), for both step times
  (``roofline_fraction``, ``forward_roofline_fraction``); the issue's target is the
  forward's. Each round's step is divided by the bandwidth sampled around that round (the
  mean of the samples just before and after it) and the median over the rounds is
  reported: the shared machine's bandwidth drifts in phases of a minute or more (27.8 to
  49.7 GB/s within one run, while one case's rounds stayed within 1 %), so a step measured
  in a fast phase must not be divided by a slow phase's bandwidth, or the reverse. The
  fractions against the whole run's median bandwidth are kept as ``*_run_median``;
- peak memory (``--memory``): each backend once more in a fresh process (build, compile,
  one short generation); peak RSS on CPU (Linux ``VmHWM``), ``max_memory_allocated`` on
  CUDA, and the excess over eager as a fraction of the weight bytes;
- compile time (``--compile-time``): that fresh process's first generation (compile +
  first calls), with an empty cache directory (``cold``) and in 3 more fresh processes over
  the cache it filled (``warm``: the median, samples and spread; the backends alternated),
  and the ratio to Inductor's; the in-process ``warmup_s`` is not comparable across
  backends (docs/compile_time.md).
Writes ``benchmarks/results/<device>-<date>-decode[-<tag>].json``; ``make_tables.py`` turns the
files into the README table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, environment, write_results  # noqa: E402

PRESETS = {
    # ~110M parameters: the CPU configuration of issue 5.
    "llama-100m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4),
    # ~55M parameters: the small end of the CPU range of issue 16.
    "llama-50m": dict(vocab_size=16000, hidden_size=512, intermediate_size=2048, num_hidden_layers=10,
                      num_attention_heads=8, num_key_value_heads=4),
    # ~0.5B parameters.
    "llama-500m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                       num_attention_heads=12, num_key_value_heads=4),
    # ~1.1B parameters (TinyLlama-1.1B's shape): the large end of the CPU range of issue 16.
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BACKENDS = "eager,inductor,inductor-freezing,llmopt"
CUDA_BACKENDS = "eager,inductor,inductor-max-autotune,llmopt"


def build(preset: str, dtype: torch.dtype, device: str, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=max(max_len, 4096), **PRESETS[preset])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def torchao_available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def _own_code(fn, name: str):
    """``fn`` called through a function with a code object of its own.

    Dynamo keeps its compiled entries (and their guards) per code object and checks them in
    turn at every call: compiling several backends on the same ``model.forward`` would make
    each call of a later backend first fail the guards of all earlier ones (order-dependent
    cost, up to milliseconds), and share one recompile limit. A wrapper with its own code
    object gives each backend its own cache."""
    @functools.wraps(fn)  # keeps the signature generate loops inspect
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=name)
    return call


def _int4_with_head():
    from llmopt.quant import Int4WeightOnly

    return Int4WeightOnly(group_size=128, quantize_head=True)


def make_model(model, backend: str, shared: bool = True):
    """(the module the backend runs, a callable forward): quantizing peers get their own copy
    when ``model`` is shared with other backends (llmopt's ``quantize=`` releases the float
    weights it quantized, README "Frozen weights"); a fresh process measuring one backend's
    memory passes ``shared=False``."""
    if backend == "eager":
        return model, model.forward
    forward = _own_code(model.forward, "forward_" + "".join(c if c.isalnum() else "_" for c in backend))
    if backend == "inductor":
        return model, torch.compile(forward)
    if backend == "inductor-freezing":
        return model, torch.compile(forward, options={"freezing": True})
    if backend == "inductor-max-autotune":
        return model, torch.compile(forward, mode="max-autotune")
    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantized = copy.deepcopy(model)
        quantize_(quantized, Int8WeightOnlyConfig())
        return quantized, torch.compile(_own_code(quantized.forward, "forward_torchao"))
    options = {
        "llmopt": {},
        "llmopt-aten": {"inner": "aten"},
        "llmopt-inductor": {"inner": "inductor"},
        "llmopt-int8": {"quantize": "int8"},
        "llmopt-int4": {"quantize": "int4-g128"},
        "llmopt-int4-head": {"quantize": _int4_with_head()},
    }.get(backend)
    if options is None:
        raise SystemExit(f"unknown backend {backend!r}; see --help")
    if "quantize" in options and shared:
        model = copy.deepcopy(model)
        forward = _own_code(model.forward, "forward_" + "".join(c if c.isalnum() else "_" for c in backend))
    return model, torch.compile(forward, backend="llmopt", options=options)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the loops
class TimedForward:
    """A backend's forward that records how long each decode call takes (the forward step
    alone, without the loop around it). Calls of one token per sequence are decode calls;
    the others (prefill) are not recorded. ``functools.wraps`` keeps the signature that
    generate loops inspect. The same wrapper times every backend, so the figures compare."""

    def __init__(self, forward, device):
        functools.update_wrapper(self, forward)  # first: it copies forward's __dict__ over ours
        self.forward, self.device, self.times = forward, device, []

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        sync(self.device)
        t = time.perf_counter()
        out = self.forward(*args, **kwargs)
        sync(self.device)
        if ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
            self.times.append(time.perf_counter() - t)
        return out

    def take(self) -> list[float]:
        """The decode call times recorded since the last ``take``."""
        times, self.times = self.times, []
        return times


def loop_static(model, forward, prompt, new_tokens: int, cache_len: int) -> tuple[float, list[float]]:
    """(TTFT s, decode step times s): prefill + greedy decode over a HF StaticCache."""
    from transformers import StaticCache

    device, (batch, plen) = prompt.device, prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    sync(device)
    t0 = time.perf_counter()
    out = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(plen, device=device),
                  use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    ttft = time.perf_counter() - t0
    steps = []
    for i in range(new_tokens - 1):
        pos = torch.tensor([plen + i], device=device)
        t = time.perf_counter()
        out = forward(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True,
                      position_ids=pos.expand(batch, 1))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        steps.append(time.perf_counter() - t)
    return ttft, steps


class _Stamps:
    """A streamer for HF ``generate`` (``put``/``end``) and ``llmopt.generate`` (a call):
    the time of each token's arrival."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def __call__(self, step, tokens):
        self.put(tokens)


def _from_stamps(t0: float, stamps: list[float], skip_prompt: bool) -> tuple[float, list[float]]:
    times = stamps[1:] if skip_prompt else stamps  # HF's streamer first receives the prompt
    ttft = times[0] - t0
    return ttft, [b - a for a, b in zip(times, times[1:])]


@contextlib.contextmanager
def _running(model, forward):
    """``model.forward`` is the backend's forward for the duration (generate loops call the model)."""
    saved = model.forward
    model.forward = forward
    try:
        yield
    finally:
        model.forward = saved


def loop_hf(model, forward, prompt, new_tokens: int, cache_len: int) -> tuple[float, list[float]]:
    """HF ``generate(cache_implementation="static")``: its cache holds prompt + new tokens
    (HF sizes it; ``cache_len`` does not apply)."""
    stamps = _Stamps(prompt.device)
    with _running(model, forward):
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", streamer=stamps,
                       pad_token_id=0)
    return _from_stamps(t0, stamps.times, skip_prompt=True)


def loop_llmopt(model, forward, prompt, new_tokens: int, cache_len: int) -> tuple[float, list[float]]:
    import llmopt

    stamps = _Stamps(prompt.device)
    with _running(model, forward):
        t0 = time.perf_counter()
        llmopt.generate(model, prompt, max_new_tokens=new_tokens, stop_token_ids=(), streamer=stamps,
                        max_seq_len=cache_len, cuda_graphs=False)
    return _from_stamps(t0, stamps.times, skip_prompt=False)


LOOPS = {"static": loop_static, "hf": loop_hf, "llmopt": loop_llmopt}


# --------------------------------------------------------------------------- roofline
class ReadBandwidth:
    """Bytes/s the device reads, sampled between the timed rounds.

    CPU: ``sum`` over a 1 GiB fp32 tensor with all threads, 32x the CI machine's last-level
    cache (32 MiB), so that it streams from memory and not from cache; a sample is the
    median of 5 sums (the first ones pay page and frequency warm-up). CUDA: half of a
    device copy's traffic. Why sampled per round rather than once: on a shared machine
    the figure moved from 27.8 to 49.1 GB/s between runs of one day; measured next to each
    round it sees the machine the rounds saw, and the median over the run with its spread
    (``read_bandwidth_spread_GBps``) says how far to trust the roofline fractions."""

    BYTES = 2**30  # the CPU buffer (a smoke test may shrink it)

    def __init__(self, device: torch.device):
        self.device, self.samples = device, []
        self._buffer = torch.ones(self.BYTES // 4, dtype=torch.float32) if device.type == "cpu" else None

    def sample(self) -> float:
        if self.device.type == "cuda":
            value = copy_bandwidth("cuda") / 2
        else:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                self._buffer.sum()
                times.append(time.perf_counter() - t)
            value = self._buffer.numel() * 4 / statistics.median(times)
        self.samples.append(value)
        return value

    def median(self) -> float:
        return statistics.median(self.samples)

    def spread(self) -> list[float]:
        return [min(self.samples), max(self.samples)]


def read_bandwidth(device: torch.device) -> float:
    """One :class:`ReadBandwidth` sample: bytes/s the device reads."""
    return ReadBandwidth(device).sample()


def bytes_per_step(model, batch: int, kv_len: int, weight_bytes: int | None = None) -> int:
    """Bytes one decode step must read: weights (the input embedding table excepted, of
    which it reads ``batch`` rows) + the valid K and V of every layer."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    if weight_bytes is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        weight_bytes -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.finfo(model.dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * kv_len * head_dim * itemsize
    return weight_bytes + kv


# Weight bits of the quantizing backends (their linears; embeddings and norms stay float).
QUANT_BITS = {"llmopt-int8": 8, "torchao-int8": 8, "llmopt-int4": 4, "llmopt-int4-head": 4}


def quantized_weight_bytes(model, bits: int) -> int:
    """Weight bytes with every 2-D weight but the input embedding at ``bits`` per element plus
    one fp32 scale per row (group scales of int4 are a few % more: an approximation)."""
    emb = model.get_input_embeddings().weight
    total = 0
    for p in model.parameters():
        if p.dim() == 2 and p is not emb:
            total += p.numel() * bits // 8 + p.shape[0] * 4
        else:
            total += p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------- fresh processes
# One backend alone in a fresh process: build, compile, one short generation. Prints its
# peak memory and the time of that first generation (compile + first calls).
_MEMORY_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {bench_dir!r})
import bench_decode as b
args = json.loads({args!r})
device = torch.device(args["device"])
model = b.build(args["preset"], b.DTYPES[args["dtype"]], args["device"], args["cache_len"])
def rss_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
base = rss_mb("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated() / 2**20
with torch.no_grad():
    module, forward = b.make_model(model, args["backend"], shared=False)
    prompt = torch.randint(1, model.config.vocab_size, (args["batch"], args["prompt_len"]), device=device)
    start = time.perf_counter()
    b.loop_static(module, forward, prompt, min(8, args["cache_len"] - args["prompt_len"]), args["cache_len"])
    first = time.perf_counter() - start
peak = rss_mb("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2**20
print(json.dumps({{"model_MB": base, "peak_MB": peak, "first_generation_s": first}}))
"""


def _fresh_process(backend: str, args, device: torch.device, cache_len: int, batch: int,
                   env: dict | None = None) -> dict:
    child = _MEMORY_CHILD.format(bench_dir=str(Path(__file__).resolve().parent), args=json.dumps(dict(
        backend=backend, preset=args.preset, dtype=args.dtype, device=device.type, cache_len=cache_len,
        batch=batch, prompt_len=args.prompt_len)))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=1800,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory(backend: str, args, device: torch.device, cache_len: int, batch: int) -> dict:
    """Peak memory of one backend in a fresh process (so that no other backend's state counts)."""
    out = _fresh_process(backend, args, device, cache_len, batch)
    out.pop("first_generation_s", None)
    return out


WARM_COMPILE_RUNS = 3


def compile_times(backends: list[str], args, device: torch.device, cache_len: int, batch: int) -> dict:
    """Compile time of each backend alone in fresh processes: the first generation (compile
    of the prefill and decode graphs + their first calls), ``cold`` with an empty cache
    directory of the backend's own, then ``warm`` in :data:`WARM_COMPILE_RUNS` more fresh
    processes over the directory the cold one filled (Inductor's FX graph and AOTAutograd
    caches, llmopt's capture cache), the backends alternated round by round so that a
    noisy minute hits them all. ``warm_s`` is the median, with the samples and their
    spread; ``warm_vs_inductor`` (added by the caller) is the median of the rounds' ratios.
    The in-process ``warmup_s`` depends on the backends compiled before it (Inductor keeps
    built C++ kernels in memory, and the default cache directory outlives the process), so
    it is no fair comparison."""
    out: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        caches = {be: stack.enter_context(tempfile.TemporaryDirectory(prefix="llmopt-bench-cache-")) for be in backends}
        for be in backends:
            run = _fresh_process(be, args, device, cache_len, batch, {"TORCHINDUCTOR_CACHE_DIR": caches[be]})
            out[be] = {"error": run["error"]} if "error" in run else {"cold_s": run["first_generation_s"], "warm_samples_s": []}
        for _ in range(WARM_COMPILE_RUNS):
            for be in backends:
                if "error" in out[be]:
                    continue
                run = _fresh_process(be, args, device, cache_len, batch, {"TORCHINDUCTOR_CACHE_DIR": caches[be]})
                if "error" in run:
                    out[be] = {"error": run["error"]}
                else:
                    out[be]["warm_samples_s"].append(run["first_generation_s"])
    for r in out.values():
        if "warm_samples_s" in r:
            r["warm_s"] = statistics.median(r["warm_samples_s"])
            r["warm_spread_s"] = [min(r["warm_samples_s"]), max(r["warm_samples_s"])]
    return out


# --------------------------------------------------------------------------- one case
def run_case(model, backends, prompt, cache_len: int, args, loop, bandwidth: ReadBandwidth | None = None) -> list[dict]:
    """Every backend compiled and warmed, then ``args.rounds`` interleaved rounds; one
    ``bandwidth`` sample after each round."""
    device = prompt.device
    runs, prepared = {}, {}
    for backend in backends:
        module, forward = make_model(model, backend)
        forward = TimedForward(forward, device)
        start = time.perf_counter()
        with torch.no_grad():
            loop(module, forward, prompt, args.new_tokens, cache_len)  # compile prefill + decode, warm
        prepared[backend] = (module, forward, time.perf_counter() - start)
        runs[backend] = []
    order = list(backends)
    round_bandwidth = []  # per round: the mean of the samples taken just before and just after it
    before = bandwidth.samples[-1] if bandwidth is not None and bandwidth.samples else None
    for r in range(args.rounds):
        for backend in order[r % len(order):] + order[:r % len(order)]:
            module, forward, _ = prepared[backend]
            forward.take()
            with torch.no_grad():
                ttft, steps = loop(module, forward, prompt, args.new_tokens, cache_len)
            calls = forward.take()
            runs[backend].append((ttft, statistics.median(steps[1:] or steps), statistics.median(calls[1:] or calls)))
        if bandwidth is not None:
            after = bandwidth.sample()
            round_bandwidth.append(after if before is None else (before + after) / 2)
            before = after
    results = []
    for backend in backends:
        module = prepared[backend][0]
        ttfts, steps, calls = (list(column) for column in zip(*runs[backend]))
        step = statistics.median(steps)
        results.append({
            "backend": backend, "batch": prompt.shape[0], "cache_len": cache_len, "loop": args.loop,
            "ttft_s": statistics.median(ttfts), "ttft_spread_s": [min(ttfts), max(ttfts)], "ttft_rounds_s": ttfts,
            "decode_step_s": step, "decode_step_spread_s": [min(steps), max(steps)],
            "decode_tokens_per_s": prompt.shape[0] / step,
            "forward_step_s": statistics.median(calls), "forward_step_spread_s": [min(calls), max(calls)],
            "decode_step_rounds_s": steps, "forward_step_rounds_s": calls, "round_read_bandwidth_GBps":
                [b / 1e9 for b in round_bandwidth],
            "warmup_s": prepared[backend][2], "rounds": args.rounds,
            "bytes_per_step": bytes_per_step(module, prompt.shape[0], args.prompt_len + args.new_tokens // 2,
                                             quantized_weight_bytes(module, QUANT_BITS[backend])
                                             if backend in QUANT_BITS else None),
        })
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default: llama-100m on CPU, llama-2-7b on CUDA)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cache", default="short", help="comma list of KV capacities: 'short' (prompt + new tokens) or a number")
    p.add_argument("--max-cache-len", type=int, default=None, help="(old spelling of --cache N)")
    p.add_argument("--loop", default="static", choices=sorted(LOOPS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default=None, help="comma list: eager,inductor,inductor-freezing,inductor-max-autotune,"
                                                    "torchao-int8,llmopt,llmopt-aten,llmopt-inductor,llmopt-int8,llmopt-int4,llmopt-int4-head")
    p.add_argument("--memory", action="store_true", help="also measure each backend's peak memory in a fresh process")
    p.add_argument("--compile-time", action="store_true",
                   help="also time each backend's compile in fresh processes, cold and warm Inductor cache")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--tag", default=None, help="suffix of the results file name")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every backend keeps its compiled prefill and decode graphs alive side by side.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.preset = args.preset or ("llama-2-7b" if cuda else "llama-100m")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    dtype = DTYPES[args.dtype]
    backends = (args.backends or (CUDA_BACKENDS if cuda else CPU_BACKENDS)).split(",")
    if "torchao-int8" in backends and not torchao_available():
        print("torchao is not installed: torchao-int8 skipped")
        backends.remove("torchao-int8")
    caches = [args.max_cache_len] if args.max_cache_len else [
        args.prompt_len + args.new_tokens if c == "short" else int(c) for c in args.cache.split(",")]
    env = environment()
    bandwidth = ReadBandwidth(device)
    bandwidth.sample()
    model = build(args.preset, dtype, device.type, max(caches))
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.0f}M parameters, {args.dtype}, {env['device']}, {env['threads']} threads, "
          f"read bandwidth {bandwidth.median() / 1e9:.1f} GB/s (first sample), loop {args.loop}, {args.rounds} interleaved rounds")
    results = []
    for cache_len in caches:
        for batch in [int(b) for b in args.batch.split(",")]:
            prompt = torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), device=device)
            torch._dynamo.reset()  # each case compiles its own graphs; drop the previous case's
            case = run_case(model, backends, prompt, cache_len, args, LOOPS[args.loop], bandwidth)
            results.extend(case)
    # Roofline fractions: each round's step against the bandwidth sampled around that round
    # (the machine's bandwidth drifts in phases of a minute or more: 27.8-49.7 GB/s in one
    # run, while a case's rounds stayed within 1%), median over the rounds; the fractions
    # against the whole run's median bandwidth are kept as *_run_median.
    for cache_len in caches:
        for batch in [int(b) for b in args.batch.split(",")]:
            case = [r for r in results if r["cache_len"] == cache_len and r["batch"] == batch]
            eager = next((r for r in case if r["backend"] == "eager"), None)
            for r in case:
                r["achieved_GBps"] = r["bytes_per_step"] / r["decode_step_s"] / 1e9
                r["roofline_fraction_run_median"] = r["bytes_per_step"] / r["decode_step_s"] / bandwidth.median()
                r["forward_roofline_fraction_run_median"] = r["bytes_per_step"] / r["forward_step_s"] / bandwidth.median()
                paired = r["round_read_bandwidth_GBps"]
                r["roofline_fraction"] = statistics.median(
                    r["bytes_per_step"] / t / (b * 1e9) for t, b in zip(r["decode_step_rounds_s"], paired))
                r["forward_roofline_fraction"] = statistics.median(
                    r["bytes_per_step"] / t / (b * 1e9) for t, b in zip(r["forward_step_rounds_s"], paired))
                if eager is not None:
                    r["vs_eager"] = eager["decode_step_s"] / r["decode_step_s"]
                if args.memory:
                    r["memory"] = peak_memory(r["backend"], args, device, cache_len, batch)
            if args.compile_time:
                compiles = compile_times([r["backend"] for r in case], args, device, cache_len, batch)
                for r in case:
                    r["compile"] = compiles[r["backend"]]
            inductor = next((r.get("compile", {}) for r in case if r["backend"] == "inductor"), {})
            for r in case:
                c = r.get("compile", {})
                if "cold_s" in c and inductor.get("cold_s"):
                    c["cold_vs_inductor"] = c["cold_s"] / inductor["cold_s"]
                if c.get("warm_samples_s") and inductor.get("warm_samples_s"):
                    c["warm_vs_inductor"] = statistics.median(
                        a / b for a, b in zip(c["warm_samples_s"], inductor["warm_samples_s"]))
            if args.memory and eager is not None and "peak_MB" in eager["memory"]:
                weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
                for r in case:
                    if "peak_MB" in r["memory"]:
                        r["memory"]["over_eager_of_weights"] = (r["memory"]["peak_MB"] - eager["memory"]["peak_MB"]) / weight_mb
            llm = next((r for r in case if r["backend"] == "llmopt"), None)
            for r in case:
                if llm is not None:
                    r["llmopt_speedup"] = r["decode_step_s"] / llm["decode_step_s"]
                    # TTFT paired per round: the backends of a round run back to back, so the
                    # machine's slow and fast phases (TTFT moves by +-10% between rounds)
                    # cancel in the ratio; the median of the per-round ratios.
                    r["ttft_llmopt_speedup_paired"] = statistics.median(
                        a / b for a, b in zip(r["ttft_rounds_s"], llm["ttft_rounds_s"]))
                lo, hi = r["decode_step_spread_s"]
                mem = r.get("memory", {})
                print(f"  cache {cache_len:5d} batch {batch:2d} {r['backend']:18s} TTFT {r['ttft_s'] * 1e3:8.1f} ms  "
                      f"decode {r['decode_tokens_per_s']:7.1f} tok/s (step {r['decode_step_s'] * 1e3:6.2f} ms, "
                      f"rounds {lo * 1e3:.2f}-{hi * 1e3:.2f}; forward {r['forward_step_s'] * 1e3:6.2f} ms)  "
                      f"{r['roofline_fraction']:5.0%} roofline (forward {r['forward_roofline_fraction']:4.0%})"
                      + (f"  peak {mem['peak_MB']:.0f} MB" if "peak_MB" in mem else "")
                      + (f"  compile cold {r['compile']['cold_s']:.1f} s warm {r['compile']['warm_s']:.1f} s"
                         if "cold_s" in r.get("compile", {}) else "")
                      + (f"  llmopt {r['llmopt_speedup']:.2f}x (TTFT {r['ttft_llmopt_speedup_paired']:.3f}x paired)"
                         if "llmopt_speedup" in r else ""), flush=True)
    print(f"read bandwidth over the run: median {bandwidth.median() / 1e9:.1f} GB/s, "
          f"spread {bandwidth.spread()[0] / 1e9:.1f}-{bandwidth.spread()[1] / 1e9:.1f} GB/s ({len(bandwidth.samples)} samples)")
    payload = {"benchmark": "decode", "environment": env, "preset": args.preset, "config": PRESETS[args.preset],
               "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "loop": args.loop,
               "read_bandwidth_GBps": bandwidth.median() / 1e9,
               "read_bandwidth_spread_GBps": [b / 1e9 for b in bandwidth.spread()],
               "read_bandwidth_samples": len(bandwidth.samples), "results": results}
    if not args.no_write:
        print("wrote", write_results("decode" + (f"-{args.tag}" if args.tag else ""), payload))
    return payload


if __name__ == "__main__":
    main()
