"""A self-contained HTML page for an :class:`~llmopt.tools.explain.ExplanationData` (``llmopt inspect --html``).

One file, no scripts, no network: inline CSS and inline SVG, so it opens from disk, from a
CI artifact or an e-mail. Sections: a summary (graphs, graph breaks with reasons,
recompiles), rewrites per pass, then per compiled graph the pass table, near-misses with
their reasons, fallbacks, the per-layer list of operations before → after the passes, the
kernel of each linear, and the graph before and after drawn as SVG.

Drawing. With Graphviz installed (``dot`` on PATH) the graphs are laid out by ``dot
-Tsvg``; otherwise (or with ``layout="python"``) by a small layered layout written here,
in the spirit of Sugiyama et al. (1981): rank = longest path from the inputs (weights and
inputs placed just above their first user, not all on the first row), order within a rank
by the barycenter of the neighbours (a few sweeps), x placed at the barycenter of the
producers and pushed right to keep boxes apart, so a decoder layer reads as one column
with its branches beside it. One box per node (op, shape, dtype; the node name and module
path in a tooltip), edges as curves; the drawing sits in a scrollable panel, which keeps a
300-node graph readable at full size.
"""
from __future__ import annotations

import html
import shutil
import subprocess
import time
from typing import Any

from .explain import ExplanationData, GraphExplanation, clip, compress_ops, is_linear_op, short_op, view_op_names

# Box geometry of the Python layout (px).
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 176, 34, 22, 30, 16


# -- the page --------------------------------------------------------------------------------
def render_html(e: ExplanationData, layout: str = "auto") -> str:
    """The page as a string. ``layout``: ``"auto"`` (Graphviz if installed), ``"graphviz"``,
    ``"python"``."""
    if layout not in ("auto", "graphviz", "python"):
        raise ValueError(f"layout must be 'auto', 'graphviz' or 'python', got {layout!r}")
    t = e.totals()
    name = e.model.get("name") or e.model.get("class", "model")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>llmopt inspect — {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>llmopt inspect — {_e(name)}</h1>",
        f"<p class=sub>{_e(_model_line(e))}</p>",
        f"<p class=sub>{_e(' · '.join(f'{k} {v}' for k, v in e.versions.items()))} · "
        f"{_e(time.strftime('%Y-%m-%d %H:%M'))}</p></header>",
        _toc(e),
        '<section id="summary"><h2>Summary</h2>',
        _cards(t),
        _graph_breaks(e),
        _recompiles(e),
        _options(e),
        _notes(e),
        "</section>",
        _rewrites_by_pass(e),
    ]
    for g in e.graphs:
        parts.append(_graph_section(g, layout))
    parts.append(_LEGEND_FOOT)
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _model_line(e: ExplanationData) -> str:
    m = e.model
    bits = [m.get("class", "")]
    if m.get("parameters") is not None:
        bits.append(f"{m['parameters']:,} parameters")
    for key in ("dtype", "device", "source", "weights"):
        if m.get(key):
            bits.append(f"{key} {m[key]}")
    if e.calls:
        bits.append("calls: " + ", ".join(e.calls))
    return " · ".join(b for b in bits if b)


def _toc(e: ExplanationData) -> str:
    items = ['<a href="#summary">Summary</a>', '<a href="#passes">Rewrites per pass</a>']
    for g in e.graphs:
        i = g.report.graph_index
        items.append(f'<a href="#graph{i}">Graph {i} ({_e(g.call)})</a>')
    return "<nav>" + " · ".join(items) + "</nav>"


def _cards(t: dict[str, Any]) -> str:
    cards = [
        ("graphs compiled", t["graphs"], ""),
        ("graph breaks", t["graph_breaks"], "warn" if t["graph_breaks"] else "good"),
        ("recompiles", t["recompiles"], "warn" if t["recompiles"] else "good"),
        ("nodes before → after", f"{t['nodes_before']} → {t['nodes_after']}", ""),
        ("rewrites", t["rewrites"], "good" if t["rewrites"] else ""),
        ("near-misses", t["near_misses"], "warn" if t["near_misses"] else ""),
        ("fallbacks", t["fallbacks"], "bad" if t["fallbacks"] else ""),
        ("failed passes", t["failed_passes"], "bad" if t["failed_passes"] else "good"),
        ("compile time", f"{t['compile_seconds']:.2f} s", ""),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v, cls in cards
    ) + "</div>"


def _graph_breaks(e: ExplanationData) -> str:
    if e.dynamo_graph_count is None and not e.graph_breaks:
        return "<h3>Graph breaks</h3><p>Not analysed.</p>"
    if not e.graph_breaks:
        return "<h3>Graph breaks</h3><p class=good-text>None: Dynamo captured the model whole.</p>"
    rows = [[b.location or "?", _reason_html(b.reason)] for b in e.graph_breaks]
    return "<h3>Graph breaks</h3>" + _table(["where", "reason"], rows, raw_cols={1}, cls="breaks")


def _reason_html(reason: str) -> str:
    lines = reason.strip().splitlines()
    head = _e(lines[0]) if lines else ""
    if len(lines) > 1:
        head += f"<details><summary>more</summary><pre>{_e(chr(10).join(lines[1:]))}</pre></details>"
    return head


def _recompiles(e: ExplanationData) -> str:
    if not e.recompiles:
        return "<h3>Recompiles</h3><p class=good-text>None.</p>"
    items = "".join(f"<li><pre>{_e(r)}</pre></li>" for r in e.recompiles)
    return f"<h3>Recompiles</h3><ol>{items}</ol>"


def _options(e: ExplanationData) -> str:
    rows = [[k, repr(v)] for k, v in sorted(e.options.items())]
    return "<details><summary>Options</summary>" + _table(["option", "value"], rows) + "</details>"


def _notes(e: ExplanationData) -> str:
    if not e.notes:
        return ""
    return "<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in e.notes) + "</ul>"


def _rewrites_by_pass(e: ExplanationData) -> str:
    status: dict[str, list[str]] = {}
    near: dict[str, int] = {}
    for r in e.reports:
        for p in r.passes:
            status.setdefault(p.name, []).append(p.status)
        for m in r.near_misses:
            near[m.pass_name] = near.get(m.pass_name, 0) + 1
    rows = []
    for name, count in e.rewrites_by_pass().items():
        states = sorted(set(status.get(name, [])))
        rows.append([name, ", ".join(states), count, near.get(name, 0)])
    body = _table(["pass", "status", "rewrites", "near-misses"], rows, cls="passes", status_col=1)
    return f'<section id="passes"><h2>Rewrites per pass (all graphs)</h2>{body}</section>'


def _graph_section(g: GraphExplanation, layout: str) -> str:
    r = g.report
    i = r.graph_index
    out = [
        f'<section id="graph{i}"><h2>Graph {i} — {_e(g.call)}</h2>',
        f"<p class=sub>{_e(r.device)} · {_e(', '.join(r.dtypes) or '-')} · executor {_e(r.executor or '?')} · "
        f"nodes {r.nodes_before} → {r.nodes_after} · frozen constants {r.frozen_constants} · mutated inputs "
        f"{len(r.mutated_inputs)} · compile {r.compile_seconds:.2f} s</p>",
    ]
    if g.inputs:
        out.append(f"<p class=sub>inputs per call: {_e(', '.join(g.inputs))}</p>")
    near: dict[str, int] = {}
    for m in r.near_misses:
        near[m.pass_name] = near.get(m.pass_name, 0) + 1
    rows = [[p.name, p.status, p.rewrites, near.get(p.name, 0), f"{p.seconds * 1e3:.1f}", p.error or ""] for p in r.passes]
    out.append("<h3>Passes</h3>" + _table(["pass", "status", "rewrites", "near-misses", "ms", "error"], rows,
                                          cls="passes", status_col=1))
    if r.near_misses:
        rows = [[m.pass_name, m.layer or "-", m.node, m.reason] for m in r.near_misses]
        out.append("<h3>Near-misses (why a pass did not fire)</h3>" +
                   _table(["pass", "layer", "node", "reason"], rows, cls="near"))
    else:
        out.append("<h3>Near-misses</h3><p>None recorded.</p>")
    if r.fallbacks:
        rows = [[f.what, f.reason] for f in r.fallbacks]
        out.append("<h3>Fallbacks</h3>" + _table(["what", "reason"], rows, cls="fallbacks"))
    if r.rewrites:
        rows = [[w.pass_name, w.layer or "-", w.detail] for w in r.rewrites]
        out.append(f"<details><summary>Rewrites ({len(r.rewrites)})</summary>" +
                   _table(["pass", "layer", "what"], rows) + "</details>")
    out.append(_layers_table(g))
    out.append(_linears_table(g))
    out.append(_histogram(r))
    out.append(_graphs(g, layout))
    out.append("</section>")
    return "\n".join(out)


def _layers_table(g: GraphExplanation) -> str:
    if not g.layers:
        return ""
    rows = []
    for layer in g.layers:
        rows.append([
            _e(layer.layer),
            _ops_html(layer.before, layer.views_before),
            _ops_html(layer.after, layer.views_after),
        ])
    return ("<h3>Per layer: operations before → after</h3>"
            '<p class=sub>Device operations in graph order (repeats folded); views and getitem only counted.</p>'
            + _table(["layer", "before", "after"], rows, raw_cols={0, 1, 2}, cls="layers"))


def _ops_html(ops: list[str], views: int) -> str:
    chips = []
    for item in compress_ops(ops).split():
        op = item.split("×")[0]
        cls = "chip llm" if op.startswith("llmopt.") else "chip"
        chips.append(f'<span class="{cls}">{_e(item)}</span>')
    tail = f'<span class="count">{len(ops)} ops' + (f" + {views} views" if views else "") + "</span>"
    return tail + " " + "".join(chips)


def _linears_table(g: GraphExplanation) -> str:
    if not g.linears:
        return "<h3>Linear kernels</h3><p>No linear in this graph.</p>"
    rows = [[lin.layer or "-", lin.node, lin.weight_shape, lin.output_shape, lin.kernel, lin.reason] for lin in g.linears]
    return "<h3>Linear kernels</h3>" + _table(["layer", "node", "weight [N, K]", "output", "kernel", "why"], rows,
                                              cls="kernels")


def _histogram(r) -> str:
    ops = sorted(set(r.ops_before) | set(r.ops_after))
    rows = []
    for op in ops:
        b, a = r.ops_before.get(op, 0), r.ops_after.get(op, 0)
        rows.append([short_op(op), b, a, a - b])
    return (f"<details><summary>Op histogram ({len(ops)} kinds)</summary>"
            + _table(["op", "before", "after", "Δ"], rows) + "</details>")


def _graphs(g: GraphExplanation, layout: str) -> str:
    r = g.report
    panels = []
    for which, graph in (("before", r.graph_before), ("after", r.graph_after)):
        if graph is None:
            panels.append(f'<div class="panel"><b>{which} the passes</b>: no graph recorded.</div>')
            continue
        svg, how = graph_svg(graph, layout=layout, title=f"graph {r.graph_index} {which}", report=r, which=which)
        panels.append(
            f'<details class="panel" open><summary><b>{which} the passes</b> — {graph.number_of_nodes()} nodes '
            f'<span class=sub>({_e(how)}; scroll inside the panel)</span></summary><div class="scroll">{svg}</div>'
            "</details>"
        )
    return '<h3>Graph before / after</h3><div class="graphs">' + "".join(panels) + "</div>"


# -- SVG -------------------------------------------------------------------------------------
def graph_svg(g: Any, layout: str = "auto", title: str = "graph", report: Any = None, which: str = "after"):
    """``(svg_text, how)`` for a networkx view: Graphviz if available/asked, else the Python layout."""
    if layout in ("auto", "graphviz") and shutil.which("dot"):
        from ..graph import to_dot

        try:
            dot = report.to_dot(which) if report is not None else to_dot(g, title=title)
            done = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=120,
                                  check=True)
            return _strip_xml_prolog(done.stdout), "Graphviz dot"
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            return layered_svg(g, title), f"Python layout; Graphviz failed: {type(exc).__name__}"
    how = "Python layered layout" + (" (Graphviz not installed)" if layout == "graphviz" else "")
    return layered_svg(g, title), how


def _strip_xml_prolog(svg: str) -> str:
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def layout_positions(g: Any) -> dict[str, tuple[float, float]]:
    """Top-left corner of each node's box in the layered layout (see the module doc)."""
    nodes = list(g.nodes)
    if not nodes:
        return {}
    order = {n: i for i, n in enumerate(nodes)}
    # "Floating" nodes depend on no computation: inputs, weights, and what is computed from
    # them alone (a transposed weight, an arange). They go just above their first user
    # (as late as possible), not all on the first row.
    floating: set[str] = set()
    for n in nodes:  # insertion order of an FX graph is topological
        if g.nodes[n].get("kind") in ("placeholder", "get_attr") or all(p in floating for p in g.predecessors(n)):
            if g.nodes[n].get("kind") != "output":
                floating.add(n)
    rank: dict[str, int] = {}
    for n in nodes:
        if n not in floating:
            preds = [rank[p] for p in g.predecessors(n) if p in rank]
            rank[n] = max(preds) + 1 if preds else 1
    for n in reversed(nodes):
        if n in floating:
            users = [rank[s] for s in g.successors(n) if s in rank]
            rank[n] = min(users) - 1 if users else 0
    low = min(rank.values())
    rank = {n: r - low for n, r in rank.items()}
    sources = floating

    rows: dict[int, list[str]] = {}
    for n in sorted(nodes, key=order.__getitem__):
        rows.setdefault(rank[n], []).append(n)
    ranks = sorted(rows)
    step = BOX_W + GAP_X
    x = {n: i * step for r in ranks for i, n in enumerate(rows[r])}

    def place(row: list[str], neighbours) -> None:
        # Barycenter order, then x at the barycenter pushed right to keep boxes apart.
        def bary(n):
            xs = [x[m] for m in neighbours(n) if m in x]
            return sum(xs) / len(xs) if xs else x[n]

        want = {n: bary(n) for n in row}
        row.sort(key=lambda n: (want[n], order[n]))
        # Packed from the left and from the right, then averaged: both keep boxes a step
        # apart, and the average does not drift to one side rank after rank.
        left, right = [], []
        pos = -1e18
        for n in row:
            pos = max(want[n], pos + step)
            left.append(pos)
        pos = 1e18
        for n in reversed(row):
            pos = min(want[n], pos - step)
            right.append(pos)
        for n, a, b in zip(row, left, reversed(right)):
            x[n] = (a + b) / 2

    for _ in range(2):
        for r in ranks:
            place(rows[r], g.predecessors)
        for r in reversed(ranks):
            if any(m in sources for m in rows[r]):
                place(rows[r], lambda n: [*g.successors(n), *g.predecessors(n)])
    for r in ranks:  # final downward pass: producers decide, so chains stay straight
        place(rows[r], g.predecessors)
    shift = min(x.values()) - MARGIN
    y_of = {r: MARGIN + i * (BOX_H + GAP_Y) for i, r in enumerate(ranks)}
    return {n: (x[n] - shift, y_of[rank[n]]) for n in nodes}


def layered_svg(g: Any, title: str = "graph") -> str:
    """The graph as an SVG string with the layered layout (no Graphviz needed)."""
    pos = layout_positions(g)
    if not pos:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="200" height="40"><text x="8" y="24">empty graph</text></svg>'
    width = max(px for px, _ in pos.values()) + BOX_W + MARGIN
    height = max(py for _, py in pos.values()) + BOX_H + MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#8a94a6"/></marker></defs>',
        '<g class="edges">',
    ]
    for a, b in g.edges():
        if a not in pos or b not in pos:
            continue
        (xa, ya), (xb, yb) = pos[a], pos[b]
        x1, y1, x2, y2 = xa + BOX_W / 2, ya + BOX_H, xb + BOX_W / 2, yb
        dy = max((y2 - y1) / 2, 12)
        long = (y2 - y1) > 4 * (BOX_H + GAP_Y)
        cls = "e long" if long else "e"
        out.append(f'<path class="{cls}" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + dy:.0f} {x2:.0f},{y2 - dy:.0f} '
                   f'{x2:.0f},{y2 - 1:.0f}" marker-end="url(#arrow)"/>')
    out.append("</g><g class=\"nodes\">")
    for n, data in g.nodes(data=True):
        if n not in pos:
            continue
        px, py = pos[n]
        op = str(data.get("op", ""))
        kind = str(data.get("kind", ""))
        label = short_op(op) if kind == "call_function" else (kind if kind != "get_attr" else "weight")
        sub = " ".join(s for s in (data.get("shape", ""), data.get("dtype", "")) if s)
        tip = f"{n}\n{op}\n{sub}" + (f"\n{data['layer']}" if data.get("layer") else "")
        out.append(
            f'<g class="n {_node_class(kind, op)}" transform="translate({px:.0f},{py:.0f})"><title>{_e(tip)}</title>'
            f'<rect width="{BOX_W}" height="{BOX_H}" rx="5"/>'
            f'<text x="{BOX_W / 2:.0f}" y="14" class="op">{_e(clip(label, 26))}</text>'
            f'<text x="{BOX_W / 2:.0f}" y="27" class="sh">{_e(clip(sub, 30))}</text></g>'
        )
    out.append("</g></svg>")
    return "".join(out)


def _node_class(kind: str, op: str) -> str:
    if kind in ("placeholder", "get_attr", "output"):
        return {"placeholder": "k-in", "get_attr": "k-w", "output": "k-out"}[kind]
    if op.startswith("llmopt."):
        return "k-llm"
    if op in view_op_names():
        return "k-view"
    if is_linear_op(op):
        return "k-lin"
    if "attention" in op or "softmax" in op:
        return "k-attn"
    return "k-op"


# -- small HTML helpers ----------------------------------------------------------------------
def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _table(headers: list[str], rows: list[list[Any]], raw_cols: set[int] = frozenset(), cls: str = "",
           status_col: int | None = None) -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = str(v) if i in raw_cols else _e(v)
            klass = ""
            if i == status_col:
                klass = f' class="st st-{_e(str(v).split(",")[0].strip())}"'
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                klass = ' class="num"'
            cells.append(f"<td{klass}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
:root { --fg:#1d2430; --mut:#5b6475; --bd:#d8dde6; --bg:#f6f8fb; --good:#1f7a3a; --warn:#9a6200; --bad:#b3261e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0 auto; padding: 16px 28px 48px; max-width: 1600px; background: #fff; }
header h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--bd); }
h3 { font-size: 15px; margin: 18px 0 6px; }
h4 { font-size: 13px; margin: 4px 0 6px; }
.sub { color: var(--mut); font-size: 12.5px; margin: 2px 0; font-weight: normal; }
nav { margin: 10px 0 4px; padding: 6px 10px; background: var(--bg); border-radius: 6px; font-size: 13px; }
a { color: #1a5fb4; text-decoration: none; } a:hover { text-decoration: underline; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 6px; }
.card { border: 1px solid var(--bd); border-radius: 8px; padding: 8px 14px; min-width: 120px; background: var(--bg); }
.card .v { font-size: 20px; font-weight: 600; } .card .k { color: var(--mut); font-size: 12px; }
.card.good .v { color: var(--good); } .card.warn .v { color: var(--warn); } .card.bad .v { color: var(--bad); }
.good-text { color: var(--good); }
table { border-collapse: collapse; margin: 4px 0 10px; font-size: 12.5px; }
th, td { border: 1px solid var(--bd); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.st-ok { color: var(--good); } td.st-failed { color: var(--bad); font-weight: 600; }
td.st-not-available, td.st-disabled { color: var(--mut); }
table.layers td:first-child { white-space: nowrap; font-family: ui-monospace, Menlo, Consolas, monospace; }
table.layers td { max-width: 640px; }
.chip { display: inline-block; margin: 1px 2px; padding: 0 5px; border-radius: 4px; background: #eef1f6;
        font: 11.5px ui-monospace, Menlo, Consolas, monospace; }
.chip.llm { background: #d7f2dc; color: #10431e; }
.count { color: var(--mut); font-size: 11.5px; margin-right: 4px; }
pre { white-space: pre-wrap; margin: 2px 0; font-size: 12px; }
details { margin: 6px 0; } summary { cursor: pointer; color: #1a5fb4; }
.graphs { display: flex; flex-direction: column; gap: 12px; }
.panel { border: 1px solid var(--bd); border-radius: 8px; padding: 6px 8px; }
.panel > summary { color: var(--fg); margin-bottom: 4px; }
.scroll { overflow: auto; max-height: 80vh; background: #fbfcfe; border-radius: 4px; }
svg.graph text { font-family: ui-monospace, Menlo, Consolas, monospace; text-anchor: middle; }
svg.graph .op { font-size: 11.5px; font-weight: 600; fill: #1d2430; }
svg.graph .sh { font-size: 10px; fill: #5b6475; }
svg.graph rect { stroke: #7d8799; stroke-width: 1; fill: #fff; }
svg.graph .k-in rect { fill: #cfe3fb; } svg.graph .k-w rect { fill: #e6e8ec; stroke: #b4bac6; }
svg.graph .k-out rect { fill: #fff3c4; } svg.graph .k-llm rect { fill: #bfeccb; stroke: #2e8b57; stroke-width: 1.5; }
svg.graph .k-lin rect { fill: #ffe0c2; } svg.graph .k-attn rect { fill: #e7d7fb; }
svg.graph .k-view rect { fill: #fbfcfe; stroke-dasharray: 3 2; } svg.graph .k-view text { opacity: .7; }
svg.graph path.e { fill: none; stroke: #8a94a6; stroke-width: 1.1; }
svg.graph path.e.long { stroke: #b9c0cc; stroke-dasharray: 4 3; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; border: 1px solid #7d8799; border-radius: 4px;
               font-size: 12px; }
"""

_LEGEND_FOOT = """<footer class="legend sub"><p>Graph colours:
<span style="background:#cfe3fb">input</span><span style="background:#e6e8ec">weight (frozen constant)</span>
<span style="background:#bfeccb">llmopt kernel</span><span style="background:#ffe0c2">linear / matmul</span>
<span style="background:#e7d7fb">attention</span><span style="border-style:dashed">view (no kernel)</span>
<span style="background:#fff3c4">output</span>
— hover a box for the node name, op and module; dashed grey edges skip more than four ranks.</p></footer>"""

__all__ = ["render_html", "graph_svg", "layered_svg", "layout_positions"]
