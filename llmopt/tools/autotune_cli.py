"""``llmopt autotune MODEL_OR_CONFIG``: time the linear kernels of a model on this GPU and
write the tuning table that ``select_linear_kernel`` reads.

Which of GEMV, flat GEMM and cuBLAS is fastest depends on the GPU, the dtype, the weight
shape (N, K) and the number of rows M (FlashDecoding++, Hong et al., 2023, §5, profiles
the same candidates offline). This command

1. collects every linear shape of the model *after* ``merge_parallel_linears`` (merged
   Q/K/V, merged gate/up, o_proj, down_proj, lm_head):

   - ``--shapes config`` infers them from the Hugging Face config of Llama-layout families
     (llama, mistral, qwen2, qwen3, gemma, gemma2): no weights are built, so a 7B or 8B
     preset costs nothing on the host;
   - ``--shapes graph`` builds the model on CPU and compiles one forward through the
     llmopt backend (normalize, merge_parallel_linears, select_linear_kernel), then reads
     ``N``/``K`` of each linear from the compile report's kernel choices;
   - ``--shapes auto`` (default): ``config`` when the family is known, else ``graph``.
     The tests check that both agree on tiny models;

2. for each shape and each ``--batch`` M, times the candidates with ``triton.testing.do_bench``
   (:mod:`llmopt.codegen.timing`: ``--warmup`` ms untimed, then the median of ``--rep`` ms
   of calls, the L2 cache flushed and the weights rotated) through ``tune_shape`` — every pruned config of each kernel with ``--sweep`` (default);
3. writes the winner to the table after every (shape, M), atomically: an interrupted run
   (Ctrl-C) loses nothing, and running the same command again skips what is already in the
   table (``--no-resume`` re-times it);
4. prints per shape the chosen kernel and its speed against cuBLAS, with a progress bar
   and an ETA (tqdm when installed, else a line on stderr).

``--dry-run`` works without a GPU: it lists the shapes, the M buckets, the heuristic's
kernel, the candidate kernels and their pruned config counts, and what the table already
holds. Without a GPU and without ``--dry-run`` the command exits with status 2.

``MODEL_OR_CONFIG`` is resolved by :mod:`llmopt.tools.model_spec` (presets such as
``tiny-llama``, ``llama-2-7b``, ``llama-3-8b``; Hugging Face ``model_type`` names; local
directories with ``config.json``; ``module:factory``). ``llmopt.tools.cli`` dispatches
``llmopt autotune ...`` to :func:`main`.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codegen.tuning_table import (
    KERNELS,
    TuningTable,
    default_table_path,
    device_name,
    dtype_name,
    heuristic_kernel,
    m_bucket_label,
)
from ..codegen.linear_tuning import candidate_configs, tune_shape

try:
    from tqdm.auto import tqdm
except ImportError:  # optional: a plain stderr line replaces the bar
    tqdm = None

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}

# Families whose decoder layer is Llama's (q/k/v/o attention, gate/up/down MLP, lm_head):
# their merged linear shapes follow from the config alone.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

# The passes that decide linear shapes (and the one that reports them) for --shapes graph.
GRAPH_PASSES = ("normalize", "merge_parallel_linears", "select_linear_kernel")


@dataclass(frozen=True)
class LinearShape:
    """One weight shape ``[N, K]`` of the model, the linears that have it and how many."""

    N: int
    K: int
    names: tuple[str, ...]
    count: int

    @property
    def label(self) -> str:
        return f"{'/'.join(self.names)} x{self.count}"


def _merge_shapes(items) -> list[LinearShape]:
    """(name, N, K, count) items → one LinearShape per (N, K), in first-seen order."""
    names: dict[tuple[int, int], list[str]] = {}
    counts: collections.Counter = collections.Counter()
    for name, n, k, count in items:
        key = (int(n), int(k))
        names.setdefault(key, [])
        if name not in names[key]:
            names[key].append(name)
        counts[key] += count
    return [LinearShape(n, k, tuple(names[(n, k)]), counts[(n, k)]) for n, k in names]


# --------------------------------------------------------------------------- shapes
def shapes_from_config(config) -> list[LinearShape] | None:
    """The merged linear shapes of a Llama-layout config, or None for other families."""
    if getattr(config, "model_type", None) not in LLAMA_LAYOUT:
        return None
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layers, vocab = int(config.num_hidden_layers), int(config.vocab_size)
    return _merge_shapes([
        ("q+k+v", (heads + 2 * kv_heads) * head_dim, hidden, layers),  # merge_parallel_linears
        ("o_proj", hidden, heads * head_dim, layers),
        ("gate+up", 2 * inter, hidden, layers),  # merged; the gated epilogue halves the output
        ("down_proj", hidden, inter, layers),
        ("lm_head", vocab, hidden, 1),
    ])


def shapes_from_graph(spec) -> list[LinearShape]:
    """Compile one forward of ``spec.model`` (on CPU) through llmopt and read its linears."""
    from .. import compat
    from ..report import reports

    before = {id(r) for r in reports()}
    compat.reset_dynamo()
    compiled = torch.compile(spec.model, backend="llmopt", options={"only": list(GRAPH_PASSES), "inner": "aten"})
    with torch.no_grad():
        compiled(*spec.example_args, **spec.example_kwargs)
    compat.reset_dynamo()
    items = []
    for report in reports():
        if id(report) in before:
            continue
        for choice in report.kernel_choices:
            if choice.op == "linear" and choice.N is not None and choice.K is not None:
                items.append((choice.layer.rsplit(".", 1)[-1] or choice.node, choice.N, choice.K, 1))
    if not items:
        raise RuntimeError(f"{spec.name}: no linear with a frozen weight in the compiled graph; nothing to tune")
    return _merge_shapes(items)


def hf_config(model: str):
    """The Hugging Face config of a preset or a local directory without building the model, else None."""
    from .model_spec import PRESETS

    if model in PRESETS:
        import transformers

        preset = PRESETS[model]
        return transformers.AutoConfig.for_model(preset.model_type, **preset.config)
    if os.path.isfile(os.path.join(model, "config.json")):
        import transformers

        return transformers.AutoConfig.from_pretrained(model, local_files_only=True)
    return None


def collect_shapes(model: str, dtype: torch.dtype, source: str = "auto") -> tuple[list[LinearShape], str]:
    """(shapes, how they were found) for ``MODEL_OR_CONFIG``; see the module docstring."""
    if source in ("auto", "config"):
        config = hf_config(model)
        shapes = shapes_from_config(config) if config is not None else None
        if shapes is not None:
            return shapes, f"inferred from the {config.model_type} config (merged Q/K/V and gate/up)"
        if source == "config":
            kind = getattr(config, "model_type", None) if config is not None else "not a preset or config directory"
            raise ValueError(f"{model}: cannot infer linear shapes from the config ({kind}); "
                             f"supported families: {', '.join(LLAMA_LAYOUT)}. Use --shapes graph")
    from .model_spec import resolve

    spec = resolve(model, dtype=dtype, device="cpu", batch=1, seq=4)
    return shapes_from_graph(spec), "collected from the llmopt-compiled graph on CPU"


# --------------------------------------------------------------------------- progress
class _LineProgress:
    """A progress line on stderr with elapsed time and ETA, when tqdm is not installed."""

    def __init__(self, total: int, clock=time.monotonic):
        self.total, self.done, self.clock = total, 0, clock
        self.start, self.postfix = clock(), ""

    def write(self, text: str) -> None:
        print(text, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.done += n
        elapsed = self.clock() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else math.nan
        print(f"[{self.done}/{self.total}] {100 * self.done / max(self.total, 1):5.1f}%  elapsed {_duration(elapsed)}"
              f"  ETA {_duration(eta)}  {self.postfix}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _progress(total: int):
    if tqdm is not None:
        return tqdm(total=total, unit="shape", file=sys.stderr, dynamic_ncols=True)
    return _LineProgress(total)


# --------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``llmopt autotune`` (for ``llmopt.tools.cli``'s subparser)."""
    parser.add_argument("model", metavar="MODEL_OR_CONFIG",
                        help="preset (tiny-llama, llama-2-7b, llama-3-8b, ...), HF model_type, local directory "
                             "with config.json, or module:factory")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="activation/weight dtype (default bf16)")
    parser.add_argument("--batch", default="1,2,4,8,16", type=_batch_list,
                        help="comma-separated row counts M to tune (decode batch sizes; default 1,2,4,8,16)")
    parser.add_argument("--table", default=None,
                        help=f"tuning table JSON (default {default_table_path()}, from $LLMOPT_CACHE_DIR / XDG)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list shapes and candidate kernels/configs without timing (no GPU needed)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip (shape, M bucket) pairs already in the table (default); --no-resume re-times them")
    parser.add_argument("--shapes", choices=("auto", "config", "graph"), default="auto",
                        help="how to find the linear shapes (default auto: config for Llama-layout families)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="time every pruned config of each kernel (default); --no-sweep: heuristic configs only")
    parser.add_argument("--warmup", type=int, default=10,
                        help="milliseconds of untimed calls before timing (triton.testing.do_bench; default 10)")
    parser.add_argument("--rep", type=int, default=50,
                        help="milliseconds of timed calls; the median call is kept (default 50)")
    parser.set_defaults(handler=run)


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch values must be >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """``llmopt autotune`` with ``argv`` (the arguments after ``autotune``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="llmopt autotune",
                                     description="Time GEMV / flat GEMM / cuBLAS for every linear shape of a model "
                                                 "on this GPU and write the tuning table.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _error(message: str) -> int:
    print(f"llmopt autotune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    table_path = Path(args.table) if args.table else default_table_path()
    gpu = _cuda_available()
    if not gpu and not args.dry_run:
        from .cli import cuda_unavailable_reason

        instead = "add --dry-run to list the shapes and candidates here"
        why = cuda_unavailable_reason(instead) or f"no CUDA GPU is visible; run on the GPU you deploy on, or {instead}"
        return _error(f"no CUDA GPU to time the kernels on (CUDA events): {why}")
    if args.warmup < 0 or args.rep < 1:
        return _error(f"--warmup must be >= 0 and --rep >= 1, got {args.warmup} and {args.rep}")
    try:
        shapes, how = collect_shapes(args.model, dtype, args.shapes)
    except (ValueError, RuntimeError, TypeError) as exc:
        return _error(str(exc))
    ms = _ms_by_bucket(args.batch)
    dev = device_name(torch.device("cuda")) if gpu else None
    table = TuningTable.load(table_path, device_name=dev)  # corrupt / foreign: empty, with a warning
    table.path = table_path
    key_device = dev or table.device_name or "cuda"

    print(f"llmopt autotune: {args.model}, {dtype_name(dtype)}, on {dev or 'no GPU (dry run)'}")
    print(f"  {len(shapes)} linear shapes, {how}")
    print(f"  M: {', '.join(f'{m} (bucket {b})' for b, m in ms.items())}")
    print(f"  table: {table_path} ({len(table)} entries)")
    tasks, done = [], []
    for shape in shapes:
        for bucket, M in ms.items():
            entry = table.get(key_device, dtype, shape.N, shape.K, bucket)
            (done if entry is not None and args.resume else tasks).append((shape, bucket, M))
    if args.dry_run:
        _print_dry_run(shapes, ms, table, key_device, dtype, args.sweep)
        print(f"\n{len(tasks)} (shape, M) pairs to time, {len(done)} already in the table"
              f"{'' if args.resume else ' (re-timed: --no-resume)'}; nothing timed (--dry-run)")
        return EXIT_OK
    return _tune(tasks, done, shapes, ms, table, dev, dtype, args)


def _ms_by_bucket(batch: list[int]) -> dict[str, int]:
    """{bucket: M}: the largest M given for each bucket (the table has one entry per bucket)."""
    out: dict[str, int] = {}
    for M in sorted(set(batch)):
        bucket = m_bucket_label(M)
        if bucket in out:
            print(f"  note: M={out[bucket]} and M={M} share bucket {bucket}; timing M={M}", file=sys.stderr)
        out[bucket] = M
    return out


def _print_dry_run(shapes, ms, table, key_device, dtype, sweep: bool) -> None:
    for shape in shapes:
        print(f"\n{shape.label}  N={shape.N} K={shape.K}")
        for bucket, M in ms.items():
            kernel, _ = heuristic_kernel(key_device, dtype, shape.N, shape.K, bucket)
            cands = []
            for k in KERNELS:
                n = len(candidate_configs(k, shape.N, shape.K, M, dtype)) if sweep else 1
                cands.append("mm (cuBLAS)" if k == "mm" else f"{k} ({n} config{'s' if n != 1 else ''})")
            entry = table.get(key_device, dtype, shape.N, shape.K, bucket)
            status = (f"in table: {entry.kernel} {entry.time_us:.1f} us, {entry.speedup:.2f}x vs cuBLAS"
                      if entry is not None else "to time")
            print(f"  M={M:<4} bucket {bucket:<4} heuristic {kernel:<10} candidates: {', '.join(cands)}  [{status}]")


def _tune(tasks, done, shapes, ms, table, dev, dtype, args) -> int:
    if done:
        print(f"  resuming: {len(done)} (shape, M) pairs already in the table are skipped (--no-resume re-times them)")
    progress = _progress(len(tasks))
    failures = 0
    try:
        for shape, bucket, M in tasks:
            progress.set_postfix_str(f"{shape.names[0]} N={shape.N} K={shape.K} M={M}")
            try:
                entry = tune_shape(shape.N, shape.K, M, dtype, "cuda", sweep=args.sweep, warmup=args.warmup,
                                   rep=args.rep)
            except (RuntimeError, ValueError) as exc:  # one shape failing must not lose the others
                failures += 1
                progress.write(f"  {shape.label:<22} N={shape.N:<6} K={shape.K:<6} M={M:<4} failed: {exc}")
                progress.update()
                continue
            table.put(dev, dtype, shape.N, shape.K, bucket, entry)
            try:
                table.save(table.path)  # after every pair: Ctrl-C loses at most the one being timed
            except OSError as exc:  # locked by another writer for too long, disk full, permissions
                progress.close()
                print(f"llmopt autotune: error: could not save the tuning table {table.path}: {exc}. The pairs "
                      "saved before this one are in it; run the same command again to resume.", file=sys.stderr)
                return EXIT_FAILED
            progress.write(_result_line(shape, M, entry))
            progress.update()
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted: the table {table.path} holds every pair timed so far ({len(table)} entries); "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.close()
    _print_summary(shapes, ms, table, dev, dtype)
    print(f"\ntable written to {table.path} ({len(table)} entries)")
    if failures:
        print(f"llmopt autotune: {failures} (shape, M) pairs failed; see above", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _result_line(shape: LinearShape, M: int, entry) -> str:
    return (f"  {shape.label:<22} N={shape.N:<6} K={shape.K:<6} M={M:<4} → {entry.kernel:<9} "
            f"{entry.time_us:9.1f} us  cuBLAS {entry.baseline_us:9.1f} us  {entry.speedup:5.2f}x")


def _print_summary(shapes, ms, table, dev, dtype) -> None:
    print("\nchosen kernel per shape and M (speed vs cuBLAS):")
    for shape in shapes:
        cells = []
        for bucket, M in ms.items():
            entry = table.get(dev, dtype, shape.N, shape.K, bucket)
            cells.append(f"M={M}: {entry.kernel} {entry.speedup:.2f}x" if entry is not None else f"M={M}: -")
        print(f"  {shape.label:<22} N={shape.N:<6} K={shape.K:<6} " + "  ".join(cells))


__all__ = ["LinearShape", "add_arguments", "collect_shapes", "main", "run", "shapes_from_config", "shapes_from_graph"]
