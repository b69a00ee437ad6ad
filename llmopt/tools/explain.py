"""The explanation data model: what llmopt did to each compiled graph, as plain data.

:func:`~llmopt.tools.inspection.explain` gathers Dynamo's story (graphs, graph breaks,
recompiles) and one :class:`~llmopt.report.CompileReport` per graph; this module turns each
report and its networkx graph views into a :class:`GraphExplanation` (the operations each
model layer runs before and after the passes, each linear's kernel) and holds the whole as
:class:`ExplanationData` with its JSON form and schema check. The two views read it and
nothing else: the terminal table (:mod:`llmopt.tools.inspection`) and the HTML page
(:mod:`llmopt.tools.html_report`); the shared text helpers (``short_op``, ``compress_ops``,
``clip``) live here so that neither view imports the other.

Layer attribution: each node of the networkx view carries the module path it came from
when the view records it (``layer``); nodes created by passes, and views built without
that attribute, inherit the layer of their nearest attributed producer (else consumer),
and nodes named in the report (rewrites, near-misses, kernel choices) take the layer the
report recorded for them.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..report import CompileReport

SCHEMA = "llmopt.explain/1"

# Graph ops that are linear layers, before kernel selection (after it, llmopt.* ops whose
# name mentions linear/gemv/gemm).
_LINEAR_OPS = {"aten.linear.default", "aten.mm.default", "aten.addmm.default", "aten.matmul.default"}


@functools.cache
def view_op_names() -> frozenset[str]:
    """Ops that only reinterpret memory (the string form of graph.VIEW_OPS plus getitem):
    listed apart in the per-layer view, since they launch nothing."""
    from ..graph import VIEW_OPS

    return frozenset({str(op) for op in VIEW_OPS} | {"getitem"})


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
class ExplanationData:
    """Everything :func:`~llmopt.tools.inspection.explain` found, as data: the graphs with
    their reports, graph breaks, recompiles. :class:`~llmopt.tools.inspection.Explanation`
    adds the two views (``str()``, ``to_html``) to it."""

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


# -- per-graph analysis ------------------------------------------------------------------
def explain_graph(report: CompileReport, call: str) -> GraphExplanation:
    """The explanation of one compiled graph, labelled with the call that compiled it."""
    seeds = _report_layers(report)
    after = attribute_layers(report.graph_after, seeds)
    # Nodes the passes left alone keep their names: they seed the graph before the passes.
    before = attribute_layers(report.graph_before, {**after, **seeds})
    return GraphExplanation(report, call, _layer_ops(report, before, after), _linears(report, after),
                            _runtime_inputs(report))


def _runtime_inputs(report: CompileReport) -> list[str]:
    # After freezing, the placeholders left are what the graph receives per call.
    g = report.graph_after if report.graph_after is not None else report.graph_before
    if g is None:
        return []
    return [" ".join(x for x in (d.get("shape", ""), d.get("dtype", "")) if x) or n
            for n, d in g.nodes(data=True) if d.get("kind") == "placeholder"]


def has_layer_attribute(g: Any) -> bool:
    """Whether a networkx view records the module path of its nodes (else layers are inferred)."""
    return g is not None and any("layer" in data for _, data in g.nodes(data=True))


def _report_layers(report: CompileReport) -> dict[str, str]:
    seeds: dict[str, str] = {}
    for item in [*report.rewrites, *report.near_misses, *report.kernel_choices]:
        if item.layer:
            seeds.setdefault(item.node, item.layer)
    return seeds


def attribute_layers(g: Any, seeds: dict[str, str]) -> dict[str, str]:
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
    view_names = view_op_names()
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


def is_linear_op(op: str) -> bool:
    """Whether a graph op (its string form) is a linear layer, before or after kernel selection."""
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
        if data.get("kind") != "call_function" or not is_linear_op(op):
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


# -- text helpers shared by the two views ----------------------------------------------------
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



def clip(s: str, n: int) -> str:
    """``s`` cut to ``n`` characters, an ellipsis marking the cut."""
    return s if len(s) <= n else s[: n - 1] + "…"



__all__ = ["SCHEMA", "ExplanationData", "GraphExplanation", "GraphBreak", "LayerOps", "LinearKernel", "explain_graph",
           "attribute_layers", "has_layer_attribute", "block_of", "short_op", "is_linear_op", "view_op_names",
           "validate", "compress_ops", "clip"]
