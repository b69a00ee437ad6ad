"""The ``llmopt`` command: ``inspect`` what the compiler does to a model, ``bench`` it, ``autotune``.

    llmopt inspect MODEL [--dtype fp32|bf16|fp16] [--seq N] [--batch N] [--decode]
                         [--html out.html] [--json out.json] [-o key=value ...]
    llmopt bench MODEL [--backends eager,inductor,llmopt] [--quantize int8]
                       [--prompt-len N] [--new-tokens N] [--repeats N] [--out results.json] [--plot out.png]
    llmopt autotune MODEL ...         (linear-kernel tuning; see `llmopt autotune --help`)
    llmopt models                     (the preset model names)

MODEL is a preset (``tiny-llama``, ``llama-100m``, ``llama-2-7b``, ``llama-3-8b``...), a
Hugging Face model_type (``llama``: a small default config), a local directory with a
``config.json`` (weights from ``*.safetensors`` if present) or ``module:factory``; see
:mod:`llmopt.tools.model_spec`. Nothing is downloaded.

Exit status: 0 on success, 1 when the work failed (message on stderr), 2 for a usage
error or a subcommand this build does not have. Arguments that cannot work are refused
before any model is built or compiled, with exit status 2 and one line saying what to do:
``--device cuda`` where this torch has no CUDA or sees no GPU, and an output path
(``--html``, ``--json``, ``--out``, ``--plot``) whose directory is missing or not writable,
or that is a directory. An existing file at an output path is replaced (the user named
it), atomically: a failed write leaves the old file whole.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """A command-line argument that cannot work; the command exits with status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "autotune":
        return _autotune(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error, 0 for --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("llmopt: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"llmopt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as exc:
        print(f"llmopt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


# -- argument parsing -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmopt", description="Inspect and benchmark the llmopt torch.compile backend.")
    sub = p.add_subparsers(dest="command", metavar="{inspect,bench,autotune,models}")

    ins = sub.add_parser("inspect", help="compile a model and show what llmopt did to it",
                         description="Compile MODEL with llmopt and explain the result: graphs, graph breaks, "
                                     "recompiles, passes, near-misses, per-layer ops, linear kernels.")
    _model_args(ins, seq_default=16)
    ins.add_argument("--decode", action="store_true",
                     help="also compile a decode step with a static KV cache (runs llmopt.generate for 2 tokens)")
    ins.add_argument("--quantize", default=None, help="quantize option of the backend (int8, int4-g128, w8a8)")
    ins.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a backend option (value parsed as JSON when it can be), e.g. -o inner=inductor "
                          "-o 'disable=[\"fuse_rope\"]'")
    ins.add_argument("--html", metavar="PATH", help="write the self-contained HTML report here")
    ins.add_argument("--json", metavar="PATH", help="write the JSON explanation here ('-' for stdout, no table)")
    ins.add_argument("--layout", choices=("auto", "graphviz", "python"), default="auto",
                     help="graph drawing in the HTML: Graphviz dot if installed (auto), or the built-in layout")
    ins.add_argument("--no-graph-breaks", action="store_true",
                     help="skip the Dynamo graph-break analysis (one eager traced run less)")
    ins.set_defaults(run=_inspect)

    ben = sub.add_parser("bench", help="time eager, Inductor and llmopt on a model",
                         description="Prefill and decode tokens/s, time to first token, peak memory and compile "
                                     "time per backend, medians after warm-up, in one process.")
    _model_args(ben, seq_default=None)
    ben.add_argument("--backends", default="eager,inductor,llmopt",
                     help="comma-separated: eager, inductor, inductor-max-autotune, llmopt, llmopt-aten, llmopt-inductor (default: %(default)s)")
    ben.add_argument("--quantize", default=None, help="quantize option passed to the llmopt backend (int8, int4-g128...)")
    ben.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="an llmopt backend option, as for inspect")
    ben.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32 on CPU, 512 on CUDA)")
    ben.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 16 on CPU, 128 on CUDA)")
    ben.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, median reported")
    ben.add_argument("--warmup", type=int, default=1, help="untimed runs after the first (compiling) one")
    ben.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    ben.add_argument("--out", metavar="PATH", help="write the results JSON here")
    ben.add_argument("--plot", metavar="PATH", help="write a PNG plot comparing the backends here")
    ben.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ben.set_defaults(run=_bench)

    sub.add_parser("autotune", help="tune the linear kernels of a model on this GPU (--dry-run lists shapes on CPU)", add_help=False)
    mod = sub.add_parser("models", help="list the preset model names")
    mod.set_defaults(run=_models)
    return p


def _model_args(p: argparse.ArgumentParser, seq_default: int | None) -> None:
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="preset, Hugging Face model_type, local directory with config.json, or module:factory")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    if seq_default is not None:
        p.add_argument("--seq", type=int, default=seq_default, help="tokens in the example input (default %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers of a HF config")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def parse_options(pairs: Sequence[str], quantize: str | None = None) -> dict[str, Any]:
    """``["inner=inductor", "disable=[\\"fuse_rope\\"]"]`` -> an options dict (values JSON when possible)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    if quantize:
        out["quantize"] = quantize
    return out


# -- arguments checked before the work --------------------------------------------------------
def cuda_unavailable_reason(instead: str = "run with --device cpu") -> str | None:
    """Why this process cannot use CUDA, naming the torch build, and what to do (``instead``
    is the way to go on without a GPU); None when CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"CUDA is not available: this torch ({torch.__version__}) is built without CUDA. Install a CUDA "
                f"build of torch (https://pytorch.org/get-started/locally/) or {instead}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"CUDA is not available: this torch ({torch.__version__}) is built for CUDA {torch.version.cuda}, but no "
            f"CUDA GPU is visible{f' (CUDA_VISIBLE_DEVICES={visible!r})' if visible is not None else ''}. Check "
            f"the GPU and its driver (nvidia-smi), or {instead}")


def check_device(name: str | None):
    """``--device`` as a torch.device (None: the default device), or UsageError."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise UsageError(f"--device {name}: {reason}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0; use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: llmopt inspect and bench run on cpu or cuda")
    return device


def check_output_path(path: str, flag: str) -> Path:
    """Refuse, before any work, an output path the command could not write at the end."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name in it, e.g. {p / ('out' + _suffix(flag))}")
    parent = p.parent
    if not parent.exists():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist; create it first "
                         f"(mkdir -p {parent}) or choose another path")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the directory {parent} is not writable; choose another path")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is read-only; make it writable or choose another path")
    return p


def _suffix(flag: str) -> str:
    return {"--html": ".html", "--plot": ".png"}.get(flag, ".json")


def check_distinct_outputs(named: dict[str, str | None]) -> None:
    """Two output flags naming one file would overwrite each other's result."""
    seen: dict[Path, str] = {}
    for flag, path in named.items():
        if path is None or path == "-":
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UsageError(f"{seen[resolved]} and {flag} name the same file {path}; give each its own")
        seen[resolved] = flag


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file in the same directory; the
    file keeps the mode of the one it replaces, else the usual 0644."""
    from ..codegen.locked_file import atomic_write

    target = Path(path)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
    atomic_write(target, lambda f: f.write(text), mode=mode)


# -- inspect ----------------------------------------------------------------------------------
def _inspect(args) -> int:
    import torch

    from . import model_spec
    from .inspection import explain
    from ..options import Options

    device = check_device(args.device)
    outputs = {"--json": args.json if args.json != "-" else None, "--html": args.html}
    for flag, path in outputs.items():
        if path is not None:
            check_output_path(path, flag)
    check_distinct_outputs(outputs)
    options = parse_options(args.option, args.quantize)
    Options.from_user(options)  # reject a bad option before building the model
    spec = model_spec.resolve(args.model, dtype=args.dtype, device=device, batch=args.batch, seq=args.seq,
                              layers=args.layers, seed=args.seed)
    calls = None
    if args.decode:
        if not spec.is_causal_lm:
            raise ValueError(f"--decode needs a causal language model; {spec.name} is {spec.kind}")
        try:
            from ..runtime import generate
        except ImportError as exc:
            raise RuntimeError(f"--decode needs llmopt.runtime, which this build lacks ({exc})") from exc
        prompt = spec.example_args[0]
        calls = [("prefill + decode (llmopt.generate, StaticKVCache)",
                  lambda compiled: generate(compiled, prompt, 2, stop_token_ids=()))]
    _status(f"llmopt inspect: {spec.name} ({spec.num_parameters():,} parameters, {args.dtype}, {spec.device}) ...")
    with torch.no_grad():
        explanation = explain(spec.model, *spec.example_args, options=options, example_kwargs=spec.example_kwargs,
                              calls=calls, graph_breaks=not args.no_graph_breaks)
    explanation.model.update(spec.summary())
    if args.json == "-":
        print(explanation.to_json())
    else:
        print(explanation)
    if args.json and args.json != "-":
        _write_atomically(args.json, explanation.to_json() + "\n")
        _status(f"wrote {args.json}")
    if args.html:
        _write_atomically(args.html, explanation.to_html(layout=args.layout))
        _status(f"wrote {args.html}")
    return EXIT_OK


# -- bench ------------------------------------------------------------------------------------
def _bench(args) -> int:
    import torch

    from . import model_spec
    from .bench import BenchSettings, format_table, is_llmopt_backend, plot, run_bench, write_json

    device = check_device(args.device) or model_spec.default_device()
    outputs = {"--out": args.out, "--plot": args.plot}
    for flag, path in outputs.items():
        if path is not None:
            check_output_path(path, flag)
    check_distinct_outputs(outputs)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    settings = BenchSettings(
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        batch=args.batch,
        prompt_len=args.prompt_len or (512 if cuda else 32),
        new_tokens=args.new_tokens or (128 if cuda else 16),
        repeats=args.repeats,
        warmup=args.warmup,
        quantize=args.quantize,
        options=parse_options(args.option),
    )
    if any(is_llmopt_backend(b) for b in settings.backends):
        from ..options import Options

        Options.from_user({**settings.options, **({"quantize": settings.quantize} if settings.quantize else {})})
    spec = model_spec.resolve(args.model, dtype=args.dtype, device=device, batch=settings.batch,
                              seq=settings.prompt_len, layers=args.layers, seed=args.seed)
    progress = None if args.quiet else _status
    _status(f"llmopt bench: {spec.name} ({spec.num_parameters():,} parameters, {args.dtype}, {device})", args.quiet)
    data = run_bench(spec, settings, progress=progress)
    print(format_table(data))
    if args.out:
        write_json(data, args.out)
        _status(f"wrote {args.out}", args.quiet)
    if args.plot:
        plot(data, args.plot)
        _status(f"wrote {args.plot}", args.quiet)
    return EXIT_OK if any(r["status"] == "ok" for r in data["results"]) else EXIT_FAILED


# -- autotune, models -------------------------------------------------------------------------
def _autotune(argv: list[str]) -> int:
    from . import autotune_cli

    return int(autotune_cli.main(argv) or 0)


def _models(args) -> int:
    from .model_spec import describe_presets

    print("Presets (random weights, nothing downloaded):")
    print(describe_presets())
    print("Also: a Hugging Face model_type (llama, mistral, gpt2, ... → a small default config), a local "
          "directory with config.json, or module:factory.")
    return EXIT_OK


def _status(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
