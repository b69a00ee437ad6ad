"""``llmopt bench``: how much faster is the model with llmopt, against eager and Inductor.

Same model object, same prompt, same process, one backend after the other (Dynamo reset in
between). For a causal LM each backend runs ``llmopt.generate`` (prefill, then a
static-shape decode loop over a reused :class:`~llmopt.runtime.StaticKVCache`, greedy,
no early stop) and we time, after warm-up, ``repeats`` calls of each of

``generate(max_new_tokens=n)``, timestamped through its streamer at the first and the
last token (the device is synchronised there, and only there: no per-step host
synchronisation perturbs the decode loop):

- **time to first token** (TTFT): call start → first token (prefill, sampling, the
  runtime's per-call setup); **prefill tokens/s** = batch × prompt_len / TTFT;
- **decode tokens/s** = batch × (n − 1) / (last token − first token).

Medians over the repeats, not means (a shared machine has outliers).

- **Compile time**: first call − median warm call: the time spent tracing and compiling
  the prefill and decode graphs.
- **Peak memory**: on CUDA ``torch.cuda.max_memory_allocated()`` over the timed calls (reset
  before; weights included). On CPU the peak resident set size of the process over the
  timed calls, from Linux's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
  where that is not possible, a 5 ms sampling thread reading ``VmRSS``; off Linux, the
  process-lifetime peak from ``resource.getrusage`` (not reset per backend). The method used is
  recorded with the figure; ``peak_memory_delta_mb`` is the peak minus the RSS before
  (:mod:`llmopt.tools.peak_memory`).
- **Bandwidth** (CUDA): bytes read per decode step (the weights once — quantized linears at
  their stored width, the input embedding table excepted unless tied to the head — plus
  the K/V cache up to the mean context length) / decode step time, against the
  device-to-device copy bandwidth measured here (``copy_bandwidth_gbs`` of
  :mod:`llmopt.codegen.timing`): the roofline fraction. Computed on CPU
  too (``achieved_gbs``), without a roofline.

Models that are not causal LMs (encoders, ``module:factory`` models without a
``generate``-able config) are timed as forward passes: prefill tokens/s only.

Backends: ``eager``, ``inductor`` (``torch.compile`` default), ``inductor-max-autotune``,
``llmopt`` (``--quantize`` goes to its ``quantize`` option; the label says so), and
``llmopt-aten`` / ``llmopt-inductor`` (llmopt with ``inner`` forced, to compare executors). The
runtime's CUDA-graph decode replay is used for ``llmopt`` only; ``inductor-max-autotune``
brings its own CUDA graphs.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .. import compat
from ..codegen.locked_file import atomic_write_text
from ..codegen.timing import copy_bandwidth_gbs
from .peak_memory import PeakMemory

SCHEMA = "llmopt.bench/1"
BACKENDS = ("eager", "inductor", "inductor-max-autotune", "llmopt", "llmopt-aten", "llmopt-inductor")
# llmopt-aten / llmopt-inductor: llmopt with its inner executor forced (how the per-device
# default of ``inner="auto"`` was measured: docs/executors.md).



@dataclass
class BenchSettings:
    backends: tuple[str, ...] = ("eager", "inductor", "llmopt")
    batch: int = 1
    prompt_len: int = 32
    new_tokens: int = 16
    repeats: int = 3
    warmup: int = 1
    quantize: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # extra llmopt options

    def __post_init__(self):
        self.backends = tuple(self.backends)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        for name in ("batch", "prompt_len", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (decode speed needs a decode step), got {self.new_tokens}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass
class BackendResult:
    backend: str
    label: str
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    method: str = ""
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    ttft_ms: float | None = None
    decode_step_ms: float | None = None
    compile_s: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_delta_mb: float | None = None
    memory_method: str = ""
    bytes_per_decode_step: int | None = None
    achieved_gbs: float | None = None
    roofline_fraction: float | None = None
    vs_eager: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    llmopt: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# -- the engine -------------------------------------------------------------------------------
def run_bench(spec, settings: BenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark ``spec`` (a :class:`~llmopt.tools.model_spec.ModelSpec`) on every backend of
    ``settings``; returns the JSON-ready result dictionary (schema ``llmopt.bench/1``)."""
    say = progress or (lambda msg: None)
    device = spec.device
    copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    results: list[BackendResult] = []
    for i, backend in enumerate(settings.backends, 1):
        label = _label(backend, settings)
        say(f"[{i}/{len(settings.backends)}] {label}")
        try:
            result = _bench_backend(spec, backend, label, settings, lambda m: say(f"[{i}/{len(settings.backends)}] {label}: {m}"))
        except Exception as exc:  # one backend failing must not lose the others' figures
            result = BackendResult(backend, label, status="failed", error=f"{type(exc).__name__}: {exc}")
            say(f"[{i}/{len(settings.backends)}] {label}: failed: {result.error}")
        finally:
            compat.reset_dynamo()
        if result.status == "ok" and result.decode_step_ms and spec.is_causal_lm:
            result.bytes_per_decode_step = bytes_per_decode_step(spec, settings, quantize=settings.quantize
                                                                 if is_llmopt_backend(backend) else None)
            result.achieved_gbs = result.bytes_per_decode_step / (result.decode_step_ms * 1e-3) / 1e9
            if copy_gbs:
                result.roofline_fraction = result.achieved_gbs / copy_gbs
        results.append(result)
    _add_ratios(results)
    from .inspection import versions

    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "model": spec.summary(),
        "settings": {**asdict(settings), "backends": list(settings.backends), "dtype": str(spec.dtype).replace("torch.", "")},
        "copy_bandwidth_gbs": copy_gbs,
        "results": [asdict(r) for r in results],
    }


def is_llmopt_backend(backend: str) -> bool:
    """``llmopt`` or one of its executor-forcing variants (``llmopt-aten``, ``llmopt-inductor``)."""
    return backend == "llmopt" or backend.startswith("llmopt-")


def _label(backend: str, settings: BenchSettings) -> str:
    return f"{backend} ({settings.quantize})" if is_llmopt_backend(backend) and settings.quantize else backend


def _compile(model: torch.nn.Module, backend: str, settings: BenchSettings):
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, backend="inductor")
    if backend == "inductor-max-autotune":
        return torch.compile(model, backend="inductor", mode="max-autotune")
    options = dict(settings.options)
    if settings.quantize:
        options["quantize"] = settings.quantize
        # Every backend runs the one model: keep the float weights for those that follow
        # (quantize= would release them; README "Frozen weights"). The memory figures of a
        # quantized llmopt backend then include the float weights.
        options.setdefault("release_weights", False)
    if backend.startswith("llmopt-"):
        options["inner"] = backend.removeprefix("llmopt-")
    return torch.compile(model, backend="llmopt", options=options)


def _bench_backend(spec, backend: str, label: str, settings: BenchSettings, say) -> BackendResult:
    compat.reset_dynamo()
    result = BackendResult(backend, label)
    from ..report import reports

    first_report = reports()[-1].graph_index if reports() else -1
    model = _compile(spec.model, backend, settings)
    run = _runner(spec, model, backend, settings, result)

    say("first call (compiles)" if backend != "eager" else "first call")
    cold = run()
    for w in range(settings.warmup):
        say(f"warm-up {w + 1}/{settings.warmup}")
        run()
    samples: list[Timing] = []
    with PeakMemory(spec.device) as memory:
        for r in range(settings.repeats):
            say(f"run {r + 1}/{settings.repeats}")
            samples.append(run())
    total = statistics.median(t.total for t in samples)
    result.samples = {"total_s": [t.total for t in samples]}
    tokens_in = settings.batch * settings.prompt_len
    if samples[0].first_token is None:  # a forward pass
        result.prefill_tokens_per_s = tokens_in / total
    else:
        ttft = statistics.median(t.first_token for t in samples)
        decode = statistics.median(t.decode for t in samples)
        result.samples.update(ttft_s=[t.first_token for t in samples], decode_s=[t.decode for t in samples])
        result.ttft_ms = ttft * 1e3
        result.prefill_tokens_per_s = tokens_in / ttft
        steps = settings.new_tokens - 1
        result.decode_step_ms = decode / steps * 1e3
        result.decode_tokens_per_s = settings.batch * steps / decode
    result.compile_s = max(cold.total - total, 0.0) if backend != "eager" else 0.0
    result.peak_memory_mb, result.peak_memory_delta_mb, result.memory_method = memory.result()
    if is_llmopt_backend(backend):
        result.llmopt = _llmopt_summary(first_report, settings, result)
    say(_one_line(result))
    return result


@dataclass
class Timing:
    """One timed call: total seconds; for generation also the first token and the decode loop."""

    total: float
    first_token: float | None = None
    decode: float | None = None


def _runner(spec, model, backend: str, settings: BenchSettings, result: BackendResult) -> Callable[[], Timing]:
    """The timed call: one ``generate`` of ``new_tokens`` (or one forward pass)."""
    prompt = spec.prompt(settings.batch, settings.prompt_len)
    sync = _synchronizer(spec.device)
    if spec.is_causal_lm:
        try:
            from ..runtime import generate
            from ..runtime.static_cache import StaticKVCache
        except ImportError as exc:
            result.notes.append(f"llmopt.runtime is not available ({exc}): timing forward passes only")
        else:
            cache = StaticKVCache(spec.config, batch_size=settings.batch,
                                  max_seq_len=settings.prompt_len + settings.new_tokens,
                                  dtype=spec.dtype, device=spec.device)
            graphs = is_llmopt_backend(backend) and spec.device.type == "cuda"
            result.method = "llmopt.generate + StaticKVCache" + (" + CUDA graphs" if graphs else "")
            last = settings.new_tokens - 1

            def run_generate() -> Timing:
                marks: dict[int, float] = {}

                def streamer(step: int, tokens) -> None:
                    # Two synchronisations per call (first and last token), none in between.
                    if step == 0 or step == last:
                        sync()
                        marks[step] = time.perf_counter()

                sync()
                start = time.perf_counter()
                generate(model, prompt, settings.new_tokens, cache=cache, stop_token_ids=(), cuda_graphs=graphs,
                         streamer=streamer)
                sync()
                end = time.perf_counter()
                return Timing(end - start, marks[0] - start, marks[last] - marks[0])

            return run_generate
    args = spec.example_args if spec.example_args else (prompt,)
    if spec.example_args and isinstance(spec.example_args[0], torch.Tensor) and spec.example_args[0].dim() == 2 \
            and not spec.example_args[0].is_floating_point():
        args = (prompt, *spec.example_args[1:])
    result.method = "forward"

    def run_forward() -> Timing:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model(*args, **spec.example_kwargs)
        sync()
        return Timing(time.perf_counter() - start)

    return run_forward


def _llmopt_summary(first_report: int, settings: BenchSettings, result: BackendResult) -> dict[str, Any]:
    from ..report import reports

    rs = [r for r in reports() if r.graph_index > first_report]
    summary = {
        "graphs": len(rs),
        "rewrites": sum(len(r.rewrites) for r in rs),
        "near_misses": sum(len(r.near_misses) for r in rs),
        "fallbacks": sum(len(r.fallbacks) for r in rs),
        "failed_passes": sorted({p.name for r in rs for p in r.passes if p.status == "failed"}),
        "executor": sorted({r.executor for r in rs}),
    }
    if settings.quantize:
        states = {p.status for r in rs for p in r.passes if p.name == "quantize_linears"}
        done = sum(p.rewrites for r in rs for p in r.passes if p.name == "quantize_linears")
        if "ok" not in states or not done:
            result.notes.append(f"--quantize {settings.quantize}: the quantize_linears pass "
                                f"{'is not in this build' if not states or states == {'not-available'} else 'made no rewrite'}; "
                                "weights ran unquantized")
        summary["quantized_linears"] = done
    if summary["failed_passes"]:
        result.notes.append(f"passes failed and were skipped: {', '.join(summary['failed_passes'])}")
    return summary


def _add_ratios(results: list[BackendResult]) -> None:
    base = next((r for r in results if r.backend == "eager" and r.status == "ok"), None)
    if base is None:
        return
    for r in results:
        if r.status != "ok":
            continue
        ratios = {}
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            a, b = getattr(r, key), getattr(base, key)
            if a and b:
                ratios[key.replace("_tokens_per_s", "_vs_eager")] = a / b
        r.vs_eager = ratios


def _one_line(r: BackendResult) -> str:
    bits = [f"prefill {_fmt(r.prefill_tokens_per_s)} tok/s"]
    if r.decode_tokens_per_s is not None:
        bits.append(f"decode {_fmt(r.decode_tokens_per_s)} tok/s")
    if r.ttft_ms is not None:
        bits.append(f"TTFT {r.ttft_ms:.1f} ms")
    if r.peak_memory_mb is not None:
        bits.append(f"peak {r.peak_memory_mb:.0f} MB")
    if r.compile_s:
        bits.append(f"compile {r.compile_s:.1f} s")
    return ", ".join(bits)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


# -- measurements -----------------------------------------------------------------------------
def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def bytes_per_decode_step(spec, settings: BenchSettings, quantize: str | None = None) -> int:
    """Bytes a decode step must read: weights once + the K/V cache at the mean context."""
    model = spec.model
    seen: set[int] = set()
    weights = 0
    quantized = _quantized_linears(model, quantize)
    bits = _quant_bits(quantize)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and embed.weight is head.weight
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if embed is not None and p is embed.weight and not tied:
            continue  # only batch rows of the embedding table are read
        module_name = name.rsplit(".", 1)[0]
        if module_name in quantized and name.endswith("weight"):
            weights += int(p.numel() * bits / 8) + _scale_bytes(p, quantize)
        else:
            weights += p.numel() * p.element_size()
    cfg = spec.config
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    context = settings.prompt_len + settings.new_tokens / 2
    kv = 2 * layers * settings.batch * kv_heads * head_dim * context * torch.tensor([], dtype=spec.dtype).element_size()
    return int(weights + kv)


def _quantized_linears(model, quantize: str | None) -> set[str]:
    if not quantize:
        return set()
    try:
        from ..quant import parse_quantize, select_linears
    except ImportError:
        return set()
    try:
        return set(select_linears(model, parse_quantize(quantize)))
    except (ValueError, TypeError):
        return set()


def _quant_bits(quantize: str | None) -> int:
    if not quantize:
        return 16
    q = quantize.lower()
    return 4 if "4" in q.split("-")[0] else 8


def _scale_bytes(weight: torch.Tensor, quantize: str | None) -> int:
    rows = weight.shape[0]
    q = (quantize or "").lower()
    if "-g" in q:
        group = int(q.split("-g")[1].split("-")[0])
        return rows * (weight.shape[1] // group) * 4  # a 16-bit scale and zero point per group
    return rows * 4  # one fp32 scale per output channel


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(name=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(info: dict[str, Any]) -> str:
    """A file-name-safe device name: ``cpu``, ``nvidia-h100-80gb-hbm3``."""
    if info.get("type") != "cuda":
        return "cpu"
    name = str(info.get("name", "cuda")).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


# -- output -----------------------------------------------------------------------------------
def format_table(data: dict[str, Any]) -> str:
    """The results as a terminal table."""
    s = data["settings"]
    m = data["model"]
    lines = [
        f"llmopt bench — {m['name']} ({m['parameters']:,} parameters, {s['dtype']}) on {data['device'].get('name')}",
        f"batch {s['batch']}, prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens, median of "
        f"{s['repeats']} after {s['warmup']} warm-up",
        "",
        f"{'backend':<24}{'prefill tok/s':>14}{'decode tok/s':>14}{'TTFT ms':>10}{'peak MB':>10}{'compile s':>11}"
        f"{'× eager':>9}",
    ]
    for r in data["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:<24}failed: {r['error']}")
            continue
        ratio = r["vs_eager"].get("decode_vs_eager") or r["vs_eager"].get("prefill_vs_eager")
        lines.append(
            f"{r['label']:<24}{_fmt(r['prefill_tokens_per_s']):>14}{_fmt(r['decode_tokens_per_s']):>14}"
            f"{_num(r['ttft_ms'], 1):>10}{_num(r['peak_memory_mb'], 0):>10}{_num(r['compile_s'], 1):>11}"
            f"{(f'{ratio:.2f}' if ratio else '-'):>9}"
        )
        if r.get("roofline_fraction") is not None:
            lines.append(f"{'':<24}decode reads {r['achieved_gbs']:.0f} GB/s = {r['roofline_fraction']:.0%} of "
                         f"the measured copy bandwidth ({data['copy_bandwidth_gbs']:.0f} GB/s)")
        for n in r.get("notes", []):
            lines.append(f"{'':<24}note: {n}")
    mem = next((r["memory_method"] for r in data["results"] if r.get("memory_method")), "")
    if mem:
        lines.append(f"peak memory: {mem}")
    return "\n".join(lines)


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_json(data: dict[str, Any], path: str) -> None:
    """``data`` to ``path`` (the ``--json`` the user named), atomically: a temporary file
    renamed over it, so a reader never sees half a file."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def plot(data: dict[str, Any], path: str) -> None:
    """A PNG comparing the backends: prefill and decode tokens/s, TTFT, peak memory."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg", force=True)  # no display needed; set here, not at import
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if r["status"] == "ok"]
    labels = [r["label"] for r in ok]
    panels = [
        ("prefill_tokens_per_s", "prefill tokens/s (higher is better)"),
        ("decode_tokens_per_s", "decode tokens/s (higher is better)"),
        ("ttft_ms", "time to first token, ms (lower is better)"),
        ("peak_memory_mb", "peak memory, MB (lower is better)"),
    ]
    colors = {"eager": "#8a94a6", "inductor": "#5b8def", "inductor-max-autotune": "#2f5fb3", "llmopt": "#2e9d57",
              "llmopt-aten": "#6cbf84", "llmopt-inductor": "#1f6e3c"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        values = [r.get(key) or 0.0 for r in ok]
        bars = ax.bar(range(len(ok)), values, color=[colors.get(r["backend"], "#999") for r in ok])
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(ok)), labels, fontsize=8, rotation=15)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        for bar, v in zip(bars, values):
            if v:
                ax.annotate(_fmt(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    s, m = data["settings"], data["model"]
    fig.suptitle(f"{m['name']} ({s['dtype']}, batch {s['batch']}, prompt {s['prompt_len']}, {s['new_tokens']} new) — "
                 f"{data['device'].get('name')}\ntorch {data['versions'].get('torch')}, "
                 f"llmopt {data['versions'].get('llmopt')}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate(data: dict[str, Any]) -> list[str]:
    """Problems with a result dictionary against schema ``llmopt.bench/1`` (empty when valid)."""
    problems = []
    top = {"schema": str, "created": str, "device": dict, "versions": dict, "model": dict, "settings": dict,
           "results": list}
    for key, kind in top.items():
        if not isinstance(data.get(key), kind):
            problems.append(f"{key}: expected {kind.__name__}, got {type(data.get(key)).__name__}")
    if data.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
    number = (int, float, type(None))
    for i, r in enumerate(data.get("results") or []):
        for key, kind in (("backend", str), ("label", str), ("status", str), ("method", str),
                          ("prefill_tokens_per_s", number), ("decode_tokens_per_s", number), ("ttft_ms", number),
                          ("compile_s", number), ("peak_memory_mb", number), ("memory_method", str),
                          ("vs_eager", dict), ("samples", dict), ("notes", list)):
            if not isinstance(r.get(key), kind):
                problems.append(f"results[{i}].{key}: expected {kind}, got {type(r.get(key)).__name__}")
    return problems


__all__ = ["BACKENDS", "SCHEMA", "is_llmopt_backend", "BenchSettings", "BackendResult", "run_bench", "format_table",
           "write_json", "plot", "validate", "bytes_per_decode_step", "device_info",
           "device_slug"]
