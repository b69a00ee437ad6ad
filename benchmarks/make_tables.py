"""Generate the benchmark tables of the READMEs from the committed results files.

    python benchmarks/make_tables.py            # rewrite the generated sections
    python benchmarks/make_tables.py --check    # exit 1 if a README is out of date (CI)

Reads every ``benchmarks/results/*.json``: those written by ``llmopt bench --out`` (schema
``llmopt.bench/1``: end-to-end tokens/s per backend) and those of the kernel benchmark
scripts (``benchmarks/common.py``'s ``write_results``: a ``benchmark`` name, an
``environment`` and ``results`` rows with one figure per candidate), and replaces the
text between the marker lines

    <!-- bench:start -->
    <!-- bench:end -->

in ``benchmarks/README.md`` (one table per results file, with device, versions and
settings, and its plot when ``<same name>.png`` exists) and in the top ``README.md`` (the
newest ``llmopt bench`` result per device and model, condensed). Numbers are never typed by hand: rerun
this script after adding a results file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from llmopt.codegen.locked_file import atomic_write_text  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SCHEMA = "llmopt.bench/1"


def load_results(directory: Path = RESULTS) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]], list[str]]:
    """``(bench, scripts, skipped)``: ``llmopt bench`` results oldest first, results of the
    kernel benchmark scripts (``common.write_results``), and the files skipped (why)."""
    found, scripts, skipped = [], [], []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            skipped.append(f"{path.name}: unreadable ({exc})")
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            found.append((path, data))
        elif isinstance(data, dict) and isinstance(data.get("results"), list) and "benchmark" in data:
            scripts.append((path, data))
        else:
            skipped.append(f"{path.name}: neither an `llmopt bench` nor a benchmark-script result")
    found.sort(key=lambda item: (item[1].get("created", ""), item[0].name))
    return found, scripts, skipped


# -- results of the kernel benchmark scripts (benchmarks/common.py) ---------------------------
# The per-candidate figure shown, by preference; "speedup" is always shown when present.
_METRICS = ("tokens_per_s", "us", "ms", "GBps", "TFLOPs")
_MAX_ROWS = 48


def _is_metric(value) -> bool:
    return isinstance(value, dict) and value and all(isinstance(v, (int, float, type(None))) for v in value.values())


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def script_table(data: dict) -> list[str]:
    rows = [r for r in data.get("results", []) if isinstance(r, dict)]
    if not rows:
        return ["_No rows._"]
    metric = next((m for m in _METRICS if any(_is_metric(r.get(m)) for r in rows)), None)
    if metric is None:
        metric = next((k for k in rows[0] if _is_metric(rows[0].get(k)) and k != "speedup"), None)
    # Row keys: scalar (or small dict, e.g. a shape) fields that differ between rows.
    keys = []
    for key in rows[0]:
        if key in (metric, "speedup") or _is_metric(rows[0].get(key)) and key != "shape":
            continue
        values = {json.dumps(r.get(key), sort_keys=True, default=str) for r in rows}
        if len(values) > 1 and all(not isinstance(r.get(key), list) or len(r.get(key)) < 4 for r in rows):
            if not any(isinstance(r.get(key), float) for r in rows):
                keys.append(key)
    candidates = list(dict.fromkeys(c for r in rows for c in (r.get(metric) or {}))) if metric else []
    # Rows of plain numbers (bench_decode: one row per backend): each numeric field a column.
    scalars = [] if metric else [
        k for k in rows[0]
        if k not in keys and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    ]
    speedups = list(dict.fromkeys(c for r in rows for c in (r.get("speedup") or {})))
    head = (keys + [f"{metric} {c}" for c in candidates] + [k.replace("_", " ") for k in scalars]
            + [f"{s.replace('_', ' ')}" for s in speedups])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(keys) + "---:|" * (len(head) - len(keys))]
    for r in rows[:_MAX_ROWS]:
        cells = [_cell(r.get(k, "")) for k in keys]
        cells += [_cell((r.get(metric) or {}).get(c, "–")) for c in candidates]
        cells += [_cell(float(r[k])) for k in scalars]
        cells += [(f"{v:.2f}×" if isinstance(v, (int, float)) else "–")
                  for v in ((r.get("speedup") or {}).get(s) for s in speedups)]
        out.append("| " + " | ".join(cells) + " |")
    if len(rows) > _MAX_ROWS:
        out.append(f"\n_{len(rows) - _MAX_ROWS} more rows in the file._")
    return out


def scripts_section(scripts: list[tuple[Path, dict]]) -> list[str]:
    out: list[str] = []
    for path, data in sorted(scripts, key=lambda item: (str(item[1].get("benchmark")), item[0].name)):
        env = data.get("environment", {})
        versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers") if env.get(k))
        out += [f"#### `{data.get('benchmark')}` on {env.get('device', '?')} — {env.get('date', '')}", ""]
        details = [versions] + [str(data[k]) for k in ("kernel", "timing", "note") if data.get(k)]
        if data.get("copy_bandwidth_GBps"):
            details.append(f"measured copy bandwidth {data['copy_bandwidth_GBps']:.1f} GB/s")
        out += ["; ".join(d for d in details if d) + f". File: `results/{path.name}`.", "", *script_table(data), ""]
    return out


def _num(v, digits=1) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _ratio(r: dict, key: str) -> str:
    v = (r.get("vs_eager") or {}).get(key)
    return f"{v:.2f}×" if v else "–"


def _device(data: dict) -> str:
    d = data.get("device", {})
    name = d.get("name", d.get("type", "?"))
    if d.get("type") == "cpu" and d.get("threads"):
        name += f" ({d['threads']} threads)"
    return name


def _versions(data: dict) -> str:
    v = data.get("versions", {})
    return ", ".join(f"{k} {v[k]}" for k in ("llmopt", "torch", "triton", "transformers") if k in v)


def _settings(data: dict) -> str:
    s = data.get("settings", {})
    text = (f"{s.get('dtype')}, batch {s.get('batch')}, prompt {s.get('prompt_len')} tokens, "
            f"{s.get('new_tokens')} new tokens, median of {s.get('repeats')} after {s.get('warmup')} warm-up")
    if s.get("quantize"):
        text += f", llmopt quantize={s['quantize']}"
    return text


def _model(data: dict) -> str:
    m = data.get("model", {})
    params = m.get("parameters")
    if not params:
        return m.get("name", "?")
    return f"{m.get('name', '?')} ({params / 1e6:.{0 if params >= 1e7 else 2}f}M parameters)"


def result_table(data: dict, roofline: bool) -> list[str]:
    head = "| backend | prefill tok/s | decode tok/s | TTFT ms | peak memory MB | compile s | prefill × eager | decode × eager |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if roofline:
        head += " decode GB/s (roofline) |"
        sep += "---:|"
    lines = [head, sep]
    for r in data.get("results", []):
        if r.get("status") != "ok":
            lines.append(f"| {r.get('label')} | failed: {str(r.get('error', ''))[:80]} |" + " |" * (7 if roofline else 6))
            continue
        row = (f"| {r['label']} | {_num(r.get('prefill_tokens_per_s'))} | {_num(r.get('decode_tokens_per_s'))} | "
               f"{_num(r.get('ttft_ms'))} | {_num(r.get('peak_memory_mb'), 0)} | {_num(r.get('compile_s'))} | "
               f"{_ratio(r, 'prefill_vs_eager')} | {_ratio(r, 'decode_vs_eager')} |")
        if roofline:
            frac = r.get("roofline_fraction")
            row += f" {_num(r.get('achieved_gbs'))} ({frac:.0%}) |" if frac is not None else " – |"
        lines.append(row)
    return lines


def benchmarks_section(results: list[tuple[Path, dict]], scripts: list[tuple[Path, dict]], skipped: list[str]) -> str:
    out: list[str] = ["### End to end (`llmopt bench`)", ""]
    if not results:
        out += ["_No `llmopt bench` results committed yet: run `llmopt bench MODEL --out "
                "benchmarks/results/<device>-<date>-bench.json --plot benchmarks/results/<device>-<date>-bench.png`, "
                "then `python benchmarks/make_tables.py`._", ""]
    for path, data in reversed(results):  # newest first
        roofline = any(r.get("roofline_fraction") is not None for r in data.get("results", []))
        out += [
            f"#### {_model(data)} on {_device(data)} — {data.get('created', '')[:10]}",
            "",
            f"{_settings(data)}. {_versions(data)}. File: `results/{path.name}`.",
            "",
            *result_table(data, roofline),
        ]
        if roofline and data.get("copy_bandwidth_gbs"):
            out.append(f"\nRoofline: measured device copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s.")
        mem = next((r.get("memory_method") for r in data.get("results", []) if r.get("memory_method")), None)
        if mem:
            out.append(f"\nPeak memory: {mem}.")
        png = path.with_suffix(".png")
        if png.exists():
            out += ["", f"![{_model(data)} on {_device(data)}](results/{png.name})"]
        out.append("")
    if scripts:
        out += ["### Kernels and subsystems (`benchmarks/bench_*.py`)", "", *scripts_section(scripts)]
    if skipped:
        out.append("Files not shown: " + "; ".join(skipped) + ".")
    return "\n".join(out).rstrip()


def decode_tables(scripts: list[tuple[Path, dict]]) -> list[str]:
    """The newest ``bench_decode.py`` result per device, model, dtype and loop: decode
    tokens/s per backend and case (KV capacity, batch) with the median's spread over the
    interleaved rounds, llmopt's speed-up over each peer, roofline fraction (of the loop's
    step, and of the forward step alone where the file has it), TTFT with its spread and,
    where the file has it, llmopt's TTFT against each peer paired per round, and, when
    measured, peak memory."""
    newest: dict[tuple, tuple[Path, dict]] = {}
    for path, data in sorted(scripts, key=lambda item: item[0].name):
        if data.get("benchmark") == "decode" and data.get("results") and "loop" in data:
            tag = path.stem.split("decode", 1)[-1].lstrip("-")  # --tag: one table per kind of run
            device = data.get("environment", {}).get("device", "?")
            newest[(device, data.get("preset"), data.get("dtype"), data.get("loop"), tag)] = (path, data)
    out = []
    for (device, preset, dtype, loop, _), (path, data) in sorted(newest.items(), key=lambda kv: tuple(map(str, kv[0]))):
        env = data.get("environment", {})
        bw_spread = data.get("read_bandwidth_spread_GBps")
        bandwidth = _num(data.get("read_bandwidth_GBps")) + (
            f" (spread {_num(bw_spread[0])}–{_num(bw_spread[1])})" if bw_spread else "")
        out += [f"**Decode, {preset} {dtype} on {device}, {env.get('threads')} threads** (loop `{loop}`, prompt "
                f"{data.get('prompt_len')}, {data.get('new_tokens')} new tokens, {data['results'][0].get('rounds')} "
                f"interleaved rounds, read bandwidth {bandwidth} GB/s; torch "
                f"{env.get('torch')}, transformers {env.get('transformers')}; `{path.name}`)", "",
                "| KV capacity | batch | backend | decode tok/s (spread) | × eager | llmopt × this | roofline | TTFT ms "
                "(spread) | llmopt TTFT × this, paired | peak MB |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data["results"]:
            lo, hi = r.get("decode_step_spread_s", [None, None])
            spread = f" ({r['batch'] / hi:.1f}–{r['batch'] / lo:.1f})" if lo and hi else ""
            mem = r.get("memory", {}).get("peak_MB")
            forward = r.get("forward_roofline_fraction")
            roofline = f"{r.get('roofline_fraction', 0):.0%}" + (f" (forward {forward:.0%})" if forward else "")
            t_lo, t_hi = r.get("ttft_spread_s", [None, None])
            ttft_spread = f" ({t_lo * 1e3:.1f}–{t_hi * 1e3:.1f})" if t_lo and t_hi else ""
            paired = r.get("ttft_llmopt_speedup_paired")
            out.append(f"| {r.get('cache_len')} | {r.get('batch')} | {r['backend']} | "
                       f"{_num(r.get('decode_tokens_per_s'))}{spread} | {_num(r.get('vs_eager'), 2)}× | "
                       f"{_num(r.get('llmopt_speedup'), 2)}× | "
                       f"{roofline} | {_num(r.get('ttft_s', 0) * 1e3)}{ttft_spread} | "
                       f"{_num(paired, 3) + '×' if paired else '—'} | {_num(mem, 0) if mem else '—'} |")
        out.append("")
    return out


def top_section(results: list[tuple[Path, dict]], scripts: list[tuple[Path, dict]] = ()) -> str:
    decode = decode_tables(list(scripts))
    if not results and not decode:
        return "_No benchmark results yet; see [benchmarks/README.md](benchmarks/README.md)._"
    if not results:
        return "\n".join(decode).rstrip()
    newest: dict[tuple[str, str], tuple[Path, dict]] = {}
    for path, data in results:  # oldest first: later files replace earlier ones
        newest[(_device(data), _model(data))] = (path, data)
    out = ["Generated by `benchmarks/make_tables.py` from `benchmarks/results/` "
           "(all runs and methods: [benchmarks/README.md](benchmarks/README.md)).", ""]
    for (device, model), (path, data) in sorted(newest.items()):
        out += [
            f"**{model} on {device}** ({_settings(data)}; {_versions(data)})",
            "",
            "| backend | prefill tok/s | decode tok/s | TTFT ms | decode × eager |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in data.get("results", []):
            if r.get("status") == "ok":
                out.append(f"| {r['label']} | {_num(r.get('prefill_tokens_per_s'))} | "
                           f"{_num(r.get('decode_tokens_per_s'))} | {_num(r.get('ttft_ms'))} | "
                           f"{_ratio(r, 'decode_vs_eager')} |")
        png = path.with_suffix(".png")
        if png.exists():
            out += ["", f"![{model} on {device}](benchmarks/results/{png.name})"]
        out.append("")
    return "\n".join(decode + out).rstrip()


def replace_section(text: str, body: str) -> str | None:
    """``text`` with the lines between the markers replaced by ``body``; None without markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return text[: start + len(START)] + "\n\n" + body + "\n\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if a README is out of date")
    p.add_argument("--results", type=Path, default=RESULTS, help="results directory (default: %(default)s)")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root holding README.md and benchmarks/")
    args = p.parse_args(argv)

    results, scripts, skipped = load_results(args.results)
    targets = [
        (args.root / "benchmarks" / "README.md", benchmarks_section(results, scripts, skipped)),
        (args.root / "README.md", top_section(results, scripts)),
    ]
    stale = []
    for path, body in targets:
        if not path.exists():
            print(f"{path}: missing, skipped", file=sys.stderr)
            continue
        text = path.read_text(encoding="utf-8")
        new = replace_section(text, body)
        if new is None:
            print(f"{path}: no `{START}` / `{END}` marker lines, skipped", file=sys.stderr)
            continue
        if new == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            atomic_write_text(path, new)
            print(f"updated {path.relative_to(args.root) if path.is_relative_to(args.root) else path}")
    if stale:
        print("out of date (run python benchmarks/make_tables.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    print(f"{len(results)} llmopt bench result(s), {len(scripts)} benchmark-script result(s), {len(skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
