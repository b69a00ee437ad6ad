"""The HTML report: self-contained, parses, holds the tables and both graphs; the layout
stays readable on a 300-node graph; with Chromium installed, the page renders with the
graph visible (skipped otherwise: CI does not depend on a browser)."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import networkx as nx
import pytest
import torch

from llmopt.tools import html_report
from llmopt.tools.inspection import explain
from llmopt.tools.html_report import BOX_H, BOX_W, graph_svg, layered_svg, layout_positions, render_html


class Block(torch.nn.Module):
    """Pre-norm attention + MLP: enough structure for every section of the page."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


@pytest.fixture(scope="module")
def explanation():
    torch.manual_seed(0)
    return explain(Block().eval(), torch.randn(1, 8, 32), options={"inner": "aten"})


@pytest.fixture(scope="module")
def page(explanation):
    return render_html(explanation, layout="python")


class Outline(HTMLParser):
    """Tags, table headers and text of a page; fails on unbalanced tables or svgs."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.headers: list[str] = []
        self.text: list[str] = []
        self.depth = {"table": 0, "svg": 0}
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in self.depth:
            self.depth[tag] += 1
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        if tag in self.depth:
            self.depth[tag] -= 1
            assert self.depth[tag] >= 0, f"unbalanced </{tag}>"
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_th:
            self.headers.append(data.strip())


def outline(page: str) -> Outline:
    o = Outline()
    o.feed(page)
    o.close()
    assert o.depth == {"table": 0, "svg": 0}
    return o


def test_page_parses_and_has_every_section(page):
    o = outline(page)
    text = " ".join(o.text)
    for section in ("Summary", "Graph breaks", "Recompiles", "Rewrites per pass", "Passes", "Near-misses",
                    "Per layer: operations before → after", "Linear kernels", "Graph before / after"):
        assert section in text, section
    for header in ("pass", "status", "rewrites", "near-misses", "layer", "before", "after", "kernel", "why"):
        assert header in o.headers, header
    assert o.tags.count("svg") == 2
    assert o.tags.count("rect") > 20  # one box per node


def test_page_is_self_contained(page):
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert page.count("http") == page.count("http://www.w3.org/2000/svg")


def test_page_escapes_user_text(explanation):
    explanation.model["name"] = "<img src=x onerror=alert(1)>"
    try:
        page = render_html(explanation, layout="python")
    finally:
        explanation.model.pop("name")
    assert "<img" not in page and "&lt;img" in page


def test_graphviz_used_when_installed_else_python_layout(explanation, monkeypatch):
    g = explanation.reports[0].graph_after
    monkeypatch.setattr(html_report.shutil, "which", lambda name: None)
    svg, how = graph_svg(g, layout="auto")
    assert svg.startswith("<svg") and how == "Python layered layout"
    _, how = graph_svg(g, layout="graphviz")
    assert "Graphviz not installed" in how
    monkeypatch.undo()
    if shutil.which("dot") is None:
        pytest.skip("graphviz (dot) is not installed")
    svg, how = graph_svg(g, layout="graphviz", report=explanation.reports[0], which="after")
    assert how == "Graphviz dot" and svg.lstrip().startswith("<svg")


def test_bad_layout_name(explanation):
    with pytest.raises(ValueError, match="layout"):
        render_html(explanation, layout="spring")


# -- layout on a large graph ------------------------------------------------------------------
def transformer_like(layers: int = 12) -> nx.DiGraph:
    """~300 nodes shaped like a decoder: per layer a chain with weights and a residual."""
    g = nx.DiGraph()

    def add(name, kind="call_function", op="aten.mul.Tensor", *inputs):
        g.add_node(name, kind=kind, op=op, shape="(1, 16, 64)", dtype="float32")
        for i in inputs:
            g.add_edge(i, name)

    add("x", "placeholder", "placeholder")
    h = "x"
    for i in range(layers):
        add(f"w{i}", "get_attr", "get_attr")
        add(f"wo{i}", "get_attr", "get_attr")
        add(f"norm{i}", "call_function", "llmopt.rms_norm.default", h)
        add(f"qkv{i}", "call_function", "aten.linear.default", f"norm{i}", f"w{i}")
        add(f"q{i}", "call_function", "aten.slice.Tensor", f"qkv{i}")
        add(f"k{i}", "call_function", "aten.slice.Tensor", f"qkv{i}")
        add(f"v{i}", "call_function", "aten.slice.Tensor", f"qkv{i}")
        add(f"rope{i}", "call_function", "llmopt.rope.default", f"q{i}", f"k{i}")
        add(f"attn{i}", "call_function", "llmopt.attention_prefill.default", f"rope{i}", f"v{i}")
        add(f"o{i}", "call_function", "aten.linear.default", f"attn{i}", f"wo{i}")
        add(f"res{i}", "call_function", "aten.add.Tensor", h, f"o{i}")
        add(f"mlp{i}", "call_function", "llmopt.gated_activation.default", f"res{i}")
        add(f"res2_{i}", "call_function", "aten.add.Tensor", f"res{i}", f"mlp{i}")
        add(f"pad{i}a", "call_function", "aten.view.default", f"res2_{i}")
        h = f"pad{i}a"
        for j in range(8):  # side ops that hang off the main chain
            add(f"side{i}_{j}", "call_function", "aten.neg.default", f"norm{i}")
            add(f"side{i}_{j}b", "call_function", "aten.neg.default", f"side{i}_{j}")
            g.add_edge(f"side{i}_{j}b", f"attn{i}")
    add("output", "output", "output", h)
    return g


def test_layout_of_300_nodes_is_readable():
    g = transformer_like()
    assert 300 <= g.number_of_nodes() <= 400
    pos = layout_positions(g)
    assert set(pos) == set(g.nodes)
    rows: dict[float, list[float]] = {}
    for x, y in pos.values():
        rows.setdefault(y, []).append(x)
    for xs in rows.values():  # boxes of one rank never overlap
        xs.sort()
        assert all(b - a >= BOX_W for a, b in zip(xs, xs[1:]))
    for a, b in g.edges():  # every edge points down
        assert pos[b][1] > pos[a][1]
    for i in range(12):  # a weight sits right above its user, not on the first row
        assert pos[f"qkv{i}"][1] - pos[f"w{i}"][1] == pytest.approx(BOX_H + html_report.GAP_Y)
    width = max(x for x, _ in pos.values()) + BOX_W
    assert width < 30 * BOX_W  # at most as wide as the widest rank, not as the graph is long
    svg = layered_svg(g, "big")
    assert svg.count("<rect") == g.number_of_nodes() and svg.count("<path class=") == g.number_of_edges()


def test_layout_of_an_empty_graph():
    assert "empty graph" in layered_svg(nx.DiGraph())


# -- in a browser -----------------------------------------------------------------------------
def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on PATH (apt-get install chromium)")
def test_page_renders_with_the_graph_visible(page, tmp_path):
    image = pytest.importorskip("PIL.Image")
    html_path, png = tmp_path / "report.html", tmp_path / "shot.png"
    html_path.write_text(page, encoding="utf-8")
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--hide-scrollbars", "--window-size=1400,4000", f"--screenshot={png}", html_path.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=180, check=False)
    assert png.exists() and png.stat().st_size > 20_000, "the browser produced no (or an empty) screenshot"
    img = image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and drawings, not a blank page
    # Node fills of the drawing (inputs light blue, weights grey, llmopt kernels green):
    fills = {(207, 227, 251), (230, 232, 236), (191, 236, 203), (255, 224, 194)}
    drawn = sum(count for count, rgb in colors if rgb in fills)
    assert drawn > 2_000, "no graph boxes visible in the rendered page"
