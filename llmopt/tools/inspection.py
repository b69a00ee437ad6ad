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

Layer attribution: each node of the networkx view carries the module path it came from
when the view records it (``layer``); nodes created by passes, and views built without
that attribute, inherit the layer of their nearest attributed producer (else consumer),
and nodes named in the report (rewrites, near-misses, kernel choices) take the layer the
report recorded for them.
"""
from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import compat
from ..report import CompileReport, reports

SCHEMA = "llmopt.explain/1"

# Ops that only reinterpret memory (the string form of graph.VIEW_OPS plus getitem): listed
# apart in the per-layer view, since they launch nothing.
_VIEW_OP_NAMES = None

# Graph ops that are linear layers, before kernel selection (after it, llmopt.* ops whose
# name mentions linear/gemv/gemm).
_LINEAR_OPS = {"aten.linear.default", "aten.mm.default", "aten.addmm.default", "aten.matmul.default"}


def _view_op_names() -> set[str]:
    global _VIEW_OP_NAMES
    if _VIEW_OP_NAMES is None:
        from ..graph import VIEW_OPS

        _VIEW_OP_NAMES = {str(op) for op in VIEW_OPS} | {"getitem"}
    return _VIEW_OP_NAMES


@dataclass
class GraphBreak:
    reason: str
    location: str
    stack: list[str] = field(default_factory=list)


@dataclass
class LayerOps:
    """The operations one model layer (a decoder block, the embedding, the head) runs."""

    layer: str
    before: list[str]
    after: list[str]
    views_before: int = 0
    views_after: int = 0


@dataclass
class LinearKernel:
    """One linear of the compiled graph and the kernel that runs it."""

    node: str
    layer: str
    op: str
    weight_shape: str
    output_shape: str
    kernel: str
    reason: str


@dataclass
class GraphExplanation:
    report: CompileReport
    call: str
    layers: list[LayerOps]
    linears: list[LinearKernel]
    inputs: list[str] = field(default_factory=list)  # "shape dtype" of each runtime input

    def to_dict(self) -> dict[str, Any]:
        return {
            "call": self.call,
            "inputs": list(self.inputs),
            "report": self.report.to_dict(),
            "layers": [asdict(layer) for layer in self.layers],
            "linears": [asdict(lin) for lin in self.linears],
        }


@dataclass
class Explanation:
    """Everything :func:`explain` found; print it, ``to_json()`` it or ``to_html(path)`` it."""

    model: dict[str, Any]
    options: dict[str, Any]
    graphs: list[GraphExplanation]
    graph_breaks: list[GraphBreak]
    dynamo_graph_count: int | None
    recompiles: list[str]
    calls: list[str]
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def reports(self) -> list[CompileReport]:
        return [g.report for g in self.graphs]

    def totals(self) -> dict[str, Any]:
        rs = self.reports
        return {
            "graphs": len(rs),
            "graph_breaks": len(self.graph_breaks),
            "recompiles": len(self.recompiles),
            "nodes_before": sum(r.nodes_before for r in rs),
            "nodes_after": sum(r.nodes_after for r in rs),
            # The passes' own counts (what rewrites_by_pass sums); a pass may record fewer
            # entries than it counts (normalize removes no-ops in bulk).
            "rewrites": sum(p.rewrites for r in rs for p in r.passes),
            "near_misses": sum(len(r.near_misses) for r in rs),
            "fallbacks": sum(len(r.fallbacks) for r in rs),
            "failed_passes": sum(1 for r in rs for p in r.passes if p.status == "failed"),
            "compile_seconds": round(sum(r.compile_seconds for r in rs), 4),
        }

    def rewrites_by_pass(self) -> dict[str, int]:
        """Rewrites per pass, summed over every compiled graph."""
        out: dict[str, int] = {}
        for r in self.reports:
            for p in r.passes:
                out[p.name] = out.get(p.name, 0) + p.rewrites
        return out

    # -- output ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "options": self.options,
            "versions": self.versions,
            "calls": list(self.calls),
            "totals": self.totals(),
            "rewrites_by_pass": self.rewrites_by_pass(),
            "dynamo_graph_count": self.dynamo_graph_count,
            "graph_breaks": [asdict(b) for b in self.graph_breaks],
            "recompiles": list(self.recompiles),
            "graphs": [g.to_dict() for g in self.graphs],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, default=str)

    def to_html(self, path: str | None = None, *, layout: str = "auto") -> str:
        """The self-contained HTML page (written to ``path`` when given); see html_report."""
        from .html_report import render_html

        page = render_html(self, layout=layout)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
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

    Runs under ``torch.no_grad()``. Resets Dynamo (``torch._dynamo.reset()``) before and
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

    graphs = [_explain_graph(report, label) for report, label in labelled]
    if any(not _has_layer_attribute(r.graph_before) for r, _ in labelled):
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


# -- per-graph analysis ------------------------------------------------------------------
def _explain_graph(report: CompileReport, call: str) -> GraphExplanation:
    seeds = _report_layers(report)
    after = _attribute_layers(report.graph_after, seeds)
    # Nodes the passes left alone keep their names: they seed the graph before the passes.
    before = _attribute_layers(report.graph_before, {**after, **seeds})
    return GraphExplanation(report, call, _layer_ops(report, before, after), _linears(report, after),
                            _runtime_inputs(report))


def _runtime_inputs(report: CompileReport) -> list[str]:
    # After freezing, the placeholders left are what the graph receives per call.
    g = report.graph_after if report.graph_after is not None else report.graph_before
    if g is None:
        return []
    return [" ".join(x for x in (d.get("shape", ""), d.get("dtype", "")) if x) or n
            for n, d in g.nodes(data=True) if d.get("kind") == "placeholder"]


def _has_layer_attribute(g: Any) -> bool:
    return g is not None and any("layer" in data for _, data in g.nodes(data=True))


def _report_layers(report: CompileReport) -> dict[str, str]:
    seeds: dict[str, str] = {}
    for item in [*report.rewrites, *report.near_misses, *report.kernel_choices]:
        if item.layer:
            seeds.setdefault(item.node, item.layer)
    return seeds


def _attribute_layers(g: Any, seeds: dict[str, str]) -> dict[str, str]:
    """Node name -> module path for the call_function nodes of a networkx view."""
    if g is None:
        return {}
    order = {n: i for i, n in enumerate(g.nodes)}
    layer: dict[str, str] = {}
    for n, data in g.nodes(data=True):
        if data.get("kind") == "call_function":
            found = data.get("layer") or seeds.get(n) or ""
            if found:
                layer[n] = found
    # Producers first: a fused node sits in the layer of what it consumes; the latest
    # producer, not a residual from an earlier block.
    for n, data in g.nodes(data=True):
        if data.get("kind") != "call_function" or n in layer:
            continue
        preds = [p for p in g.predecessors(n) if p in layer]
        if preds:
            layer[n] = layer[max(preds, key=order.__getitem__)]
    for n in reversed(list(g.nodes)):
        if g.nodes[n].get("kind") != "call_function" or n in layer:
            continue
        succs = [s for s in g.successors(n) if s in layer]
        if succs:
            layer[n] = layer[min(succs, key=order.__getitem__)]
    return layer


_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


def block_of(layer: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; ``lm_head`` -> ``lm_head``."""
    if not layer:
        return "(outside any module)"
    m = _BLOCK.match(layer)
    return m.group(1) if m else layer


def short_op(op: str) -> str:
    """``aten.mm.default`` -> ``mm``; ``llmopt.rms_norm.default`` -> ``llmopt.rms_norm``."""
    parts = op.split(".")
    if len(parts) >= 2 and parts[0] == "aten":
        return parts[1]
    if len(parts) >= 3 and parts[-1] in ("default", "Tensor", "Scalar", "int", "dim", "using_ints"):
        return ".".join(parts[:-1])
    return op


def _ops_by_block(g: Any, layers: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    ops: dict[str, list[str]] = {}
    views: dict[str, int] = {}
    if g is None:
        return ops, views
    view_names = _view_op_names()
    for n, data in g.nodes(data=True):
        if data.get("kind") != "call_function":
            continue
        block = block_of(layers.get(n, ""))
        ops.setdefault(block, [])
        views.setdefault(block, 0)
        if data.get("op") in view_names:
            views[block] += 1
        else:
            ops[block].append(short_op(str(data.get("op", ""))))
    return ops, views


def _layer_ops(report: CompileReport, before: dict[str, str], after: dict[str, str]) -> list[LayerOps]:
    ops_b, views_b = _ops_by_block(report.graph_before, before)
    ops_a, views_a = _ops_by_block(report.graph_after, after)
    blocks = list(ops_b) + [b for b in ops_a if b not in ops_b]
    return [LayerOps(b, ops_b.get(b, []), ops_a.get(b, []), views_b.get(b, 0), views_a.get(b, 0)) for b in blocks]


def _is_linear(op: str) -> bool:
    if op in _LINEAR_OPS:
        return True
    return op.startswith("llmopt.") and any(k in op for k in ("linear", "gemv", "gemm"))


def _linears(report: CompileReport, layers: dict[str, str]) -> list[LinearKernel]:
    g = report.graph_after
    if g is None:
        return []
    chosen = {k.node: k for k in report.kernel_choices}
    selector = next((p for p in report.passes if p.name == "select_linear_kernel"), None)
    if selector is None or selector.status == "not-available":
        default_reason = "select_linear_kernel is not in this build: the PyTorch op runs"
    elif selector.status != "ok":
        default_reason = f"select_linear_kernel {selector.status}: the PyTorch op runs"
    else:
        default_reason = "no kernel choice recorded for this node"
    out = []
    for n, data in g.nodes(data=True):
        op = str(data.get("op", ""))
        if data.get("kind") != "call_function" or not _is_linear(op):
            continue
        weight = ""
        for p in g.predecessors(n):
            pd = g.nodes[p]
            if pd.get("kind") in ("get_attr", "placeholder") and pd.get("shape", "").count(",") == 1:
                weight = pd["shape"]
                break
        k = chosen.get(n)
        out.append(LinearKernel(
            node=n,
            layer=(k.layer if k and k.layer else layers.get(n, "")),
            op=short_op(op),
            weight_shape=weight,
            output_shape=str(data.get("shape", "")),
            kernel=k.kernel if k else f"PyTorch {short_op(op)}",
            reason=k.reason if k else default_reason,
        ))
    return out


# -- schema --------------------------------------------------------------------------------
def validate(data: dict[str, Any]) -> list[str]:
    """Problems with an explanation dictionary against schema ``llmopt.explain/1`` (empty
    when valid): required keys and their types, down to each graph's report."""
    problems: list[str] = []

    def need(obj: Any, key: str, kind, where: str) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            problems.append(f"{where}{key}: expected {names}, got {type(value).__name__}")
            return None
        return value

    if data.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
    for key, kind in (("model", dict), ("options", dict), ("versions", dict), ("calls", list), ("totals", dict),
                      ("rewrites_by_pass", dict), ("graph_breaks", list), ("recompiles", list), ("graphs", list),
                      ("notes", list), ("seconds", (int, float))):
        need(data, key, kind, "")
    for key in ("graphs", "graph_breaks", "recompiles", "nodes_before", "nodes_after", "rewrites", "near_misses",
                "fallbacks"):
        need(data.get("totals") or {}, key, int, "totals.")
    for i, b in enumerate(data.get("graph_breaks") or []):
        need(b, "reason", str, f"graph_breaks[{i}].")
        need(b, "location", str, f"graph_breaks[{i}].")
    for i, g in enumerate(data.get("graphs") or []):
        where = f"graphs[{i}]."
        need(g, "call", str, where)
        report = need(g, "report", dict, where) or {}
        for key, kind in (("nodes_before", int), ("nodes_after", int), ("passes", list), ("rewrites", list),
                          ("near_misses", list), ("fallbacks", list), ("kernel_choices", list)):
            need(report, key, kind, where + "report.")
        for j, p in enumerate(report.get("passes") or []):
            need(p, "name", str, f"{where}report.passes[{j}].")
            need(p, "status", str, f"{where}report.passes[{j}].")
            need(p, "rewrites", int, f"{where}report.passes[{j}].")
        for j, m in enumerate(report.get("near_misses") or []):
            need(m, "reason", str, f"{where}report.near_misses[{j}].")
        for j, layer in enumerate(need(g, "layers", list, where) or []):
            need(layer, "layer", str, f"{where}layers[{j}].")
            need(layer, "before", list, f"{where}layers[{j}].")
            need(layer, "after", list, f"{where}layers[{j}].")
        for j, lin in enumerate(need(g, "linears", list, where) or []):
            for key in ("node", "layer", "kernel", "reason"):
                need(lin, key, str, f"{where}linears[{j}].")
    return problems


# -- terminal table ----------------------------------------------------------------------
def compress_ops(ops: Sequence[str]) -> str:
    """``["mm", "mm", "mm", "add"]`` -> ``"mm×3 add"`` (consecutive repeats folded)."""
    out: list[str] = []
    prev, count = None, 0
    for op in [*ops, None]:
        if op == prev:
            count += 1
            continue
        if prev is not None:
            out.append(prev if count == 1 else f"{prev}×{count}")
        prev, count = op, 1
    return " ".join(out)


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
                      f"{r.executor or '?'}: nodes {r.nodes_before} → {r.nodes_after}, {r.compile_seconds:.2f} s"]
        if g.inputs:
            lines.append(f"  inputs: {_clip(', '.join(g.inputs), 110)}")
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
                             f"{_clip(compress_ops(layer.after), 70)}")
        if g.linears:
            lines.append(f"  {'linear (layer)':<36}{'weight':<14}{'kernel':<24}why")
            for lin in g.linears:
                lines.append(f"  {_clip(lin.layer or lin.node, 35):<36}{lin.weight_shape:<14}{lin.kernel:<24}"
                             f"{_clip(lin.reason, 60)}")
    for n in e.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0] if s.strip() else ""


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


__all__ = ["Explanation", "GraphExplanation", "GraphBreak", "LayerOps", "LinearKernel", "explain", "versions", "validate",
           "block_of", "short_op", "compress_ops", "format_text"]
