"""``llmopt.explain``: what llmopt did to a model, why it did not do more, in one object.

A compiler user asks "what did it do to my model?" and "why did it not fuse X?". The
answers are spread over Dynamo (how many graphs, where the graph breaks are and why,
what recompiled) and llmopt's :class:`~llmopt.report.CompileReport` of each graph (passes,
rewrites, near-misses with reasons, fallbacks, kernel choices). :func:`explain` runs the
model once under Dynamo's graph-break analysis and once compiled with llmopt, and
gathers everything into an :class:`Explanation`:

- the graphs compiled, graph breaks with their reasons and source location, and the
  recompilations (with the guards that failed);
- per graph: the compile report, the list of operations each model layer runs before and
  after the passes, and each linear's kernel;
- output as a terminal table (``str``), stable JSON (``to_json``) and a self-contained
  HTML page with the graphs drawn (``to_html``, see :mod:`llmopt.tools.html_report`).

``llmopt inspect MODEL`` is this function behind a command line (:mod:`llmopt.tools.cli`).

This module runs the model and holds the terminal view; the data model (per-layer ops,
linears, layer attribution, the JSON schema) is :mod:`llmopt.tools.explain`, which the
HTML view (:mod:`llmopt.tools.html_report`) reads as well.
"""
from __future__ import annotations

import platform
import time
from typing import Any, Callable, Sequence

import torch

from .. import compat
from ..codegen.locked_file import atomic_write_text
from ..report import CompileReport, reports
from .explain import ExplanationData, GraphBreak, clip, compress_ops, explain_graph, has_layer_attribute
from .html_report import render_html


class Explanation(ExplanationData):
    """What :func:`explain` returns: the data (:class:`~llmopt.tools.explain.ExplanationData`)
    with its two views; print it, ``to_json()`` it or ``to_html(path)`` it."""

    def to_html(self, path: str | None = None, *, layout: str = "auto") -> str:
        """The self-contained HTML page (written to ``path`` when given); see html_report."""
        page = render_html(self, layout=layout)
        if path is not None:
            atomic_write_text(path, page)
        return page

    def __str__(self) -> str:
        return format_text(self)


# -- explain -------------------------------------------------------------------------------
def explain(
    model: Callable,
    *example_inputs: Any,
    options: dict[str, Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    calls: Sequence[tuple[str, Callable[[Callable], Any]]] | None = None,
    graph_breaks: bool = True,
) -> Explanation:
    """Compile ``model`` with llmopt on the example inputs and explain what happened.

    ``model(*example_inputs, **example_kwargs)`` runs once under Dynamo's graph-break
    analysis (eagerly, nothing optimized; skip with ``graph_breaks=False``), then
    ``torch.compile(model, backend="llmopt", options=options)`` runs it again. ``calls``
    replaces that second run by labelled functions of the compiled model, e.g.
    ``[("generate", lambda m: llmopt.generate(m, ids, 4))]`` to see the prefill and decode
    graphs of a static-cache decode loop; the graphs each call compiled are labelled with it.

    Runs under ``torch.no_grad()``. Resets Dynamo (as ``torch.compiler.reset()`` does) before and
    after, so compiled functions of the caller recompile at their next call.
    """
    from ..options import Options

    opts = Options.from_user(options)  # a bad option fails before any work
    user_options = dict(options or {}) if not isinstance(options, Options) else options.to_dict()
    kwargs = dict(example_kwargs or {})
    start = time.perf_counter()
    notes: list[str] = []

    breaks: list[GraphBreak] = []
    dynamo_graphs = None
    if graph_breaks:
        try:
            with torch.no_grad():
                found = compat.explain_graph_breaks(model, example_inputs, kwargs)
            dynamo_graphs = found["graph_count"]
            breaks = [GraphBreak(b["reason"], b["location"], b["stack"]) for b in found["break_reasons"]]
        except Exception as exc:  # analysis only: the compile below still tells most of the story
            notes.append(f"graph-break analysis failed ({type(exc).__name__}: {exc}); breaks not listed")

    if calls is None:
        calls = [("forward", lambda compiled: compiled(*example_inputs, **kwargs))]
    compat.reset_dynamo()
    compiled = torch.compile(model, backend="llmopt", options=user_options)
    last_index = _last_graph_index()
    labelled: list[tuple[CompileReport, str]] = []
    with compat.recording_recompiles() as recorder, torch.no_grad():
        for label, fn in calls:
            fn(compiled)
            new = [r for r in reports() if r.graph_index > last_index]
            if new:
                if new[0].graph_index > last_index + 1:
                    notes.append(f"{label}: more graphs than the report registry keeps; the oldest are missing")
                last_index = new[-1].graph_index
            labelled += [(r, label) for r in new]
    compat.reset_dynamo()
    if not recorder.available:
        notes.append("recompilations are not recorded on this torch version")

    graphs = [explain_graph(report, label) for report, label in labelled]
    if any(not has_layer_attribute(r.graph_before) for r, _ in labelled):
        notes.append("this build's graph view records no module path per node: per-layer lists are "
                     "inferred from the report's rewrites and the graph's edges (approximate)")
    if any(not r.kernel_choices for r, _ in labelled) and not any(p.name == "select_linear_kernel" and p.status == "ok"
                                                                    for r, _ in labelled for p in r.passes):
        notes.append("select_linear_kernel did not run in this build: linears run their PyTorch op "
                     "(aten.linear → mm/addmm)")
    return Explanation(
        model=_model_summary(model),
        options={k: v for k, v in opts.to_dict().items()},
        graphs=graphs,
        graph_breaks=breaks,
        dynamo_graph_count=dynamo_graphs,
        recompiles=list(recorder.messages),
        calls=[label for label, _ in calls],
        notes=notes,
        versions=versions(),
        seconds=time.perf_counter() - start,
    )


def versions() -> dict[str, str]:
    """Versions of what produced a result (llmopt, torch, triton, transformers, python)."""
    import llmopt

    out = {"llmopt": llmopt.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def _last_graph_index() -> int:
    rs = reports()
    return rs[-1].graph_index if rs else -1


def _model_summary(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"class": type(model).__name__}
    if isinstance(model, torch.nn.Module):
        params = {id(p): p for p in model.parameters()}.values()
        out["parameters"] = sum(p.numel() for p in params)
        first = next(iter(params), None)
        if first is not None:
            out["dtype"] = str(first.dtype).replace("torch.", "")
            out["device"] = str(first.device)
    return out


# -- terminal table ----------------------------------------------------------------------
def format_text(e: Explanation) -> str:
    t = e.totals()
    m = e.model
    params = m.get("parameters")
    head = f"llmopt explain — {m.get('name') or m.get('class')}"
    if params is not None:
        head += f" ({_human(params)} parameters, {m.get('dtype', '?')} on {m.get('device', '?')})"
    lines = [
        head,
        f"graphs compiled: {t['graphs']}   graph breaks: {t['graph_breaks']}   recompiles: {t['recompiles']}   "
        f"nodes: {t['nodes_before']} → {t['nodes_after']}   rewrites: {t['rewrites']}   near-misses: "
        f"{t['near_misses']}   fallbacks: {t['fallbacks']}   compile: {t['compile_seconds']:.2f} s",
    ]
    for b in e.graph_breaks:
        lines.append(f"  graph break at {b.location or '?'}: {_first_line(b.reason)}")
    for r in e.recompiles:
        lines.append(f"  recompile: {' / '.join(s.strip() for s in r.splitlines() if s.strip())}")
    for g in e.graphs:
        r = g.report
        lines += ["", f"graph {r.graph_index} ({g.call}) on {r.device} ({', '.join(r.dtypes) or '-'}), executor "
                      f"{r.executor or '?'}: nodes {r.nodes_before} → {r.nodes_after}, {r.compile_seconds:.2f} s"
                      + (f" ({r.phases_text()})" if r.compile_phases else "")]
        if g.inputs:
            lines.append(f"  inputs: {clip(', '.join(g.inputs), 110)}")
        lines.append(f"  {'pass':<24}{'status':<15}{'rewrites':>9}{'near-misses':>13}{'ms':>8}")
        near = {}
        for nm in r.near_misses:
            near[nm.pass_name] = near.get(nm.pass_name, 0) + 1
        for p in r.passes:
            lines.append(f"  {p.name:<24}{p.status:<15}{p.rewrites:>9}{near.get(p.name, 0):>13}{p.seconds * 1e3:>8.1f}")
            if p.error:
                lines.append(f"      error: {p.error}")
        if r.near_misses:
            lines.append("  near-misses:")
            lines += [f"    {nm.pass_name:<22} {nm.layer or '-':<30} {nm.reason}" for nm in r.near_misses]
        if r.fallbacks:
            lines.append("  fallbacks:")
            lines += [f"    {f.what}: {f.reason}" for f in r.fallbacks]
        if g.layers:
            lines.append(f"  {'layer':<30}{'ops before':>11}{'ops after':>11}   after the passes")
            for layer in g.layers:
                lines.append(f"  {layer.layer:<30}{len(layer.before):>11}{len(layer.after):>11}   "
                             f"{clip(compress_ops(layer.after), 70)}")
        if g.linears:
            lines.append(f"  {'linear (layer)':<36}{'weight':<14}{'kernel':<24}why")
            for lin in g.linears:
                lines.append(f"  {clip(lin.layer or lin.node, 35):<36}{lin.weight_shape:<14}{lin.kernel:<24}"
                             f"{clip(lin.reason, 60)}")
    for n in e.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0] if s.strip() else ""


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


__all__ = ["Explanation", "explain", "versions", "format_text"]
