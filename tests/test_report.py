"""CompileReport: table, stable JSON, DOT export, layer attribution."""
import json

import networkx as nx
import pytest
import torch

import llmopt
from models.tiny import tiny_model, tokens


@pytest.fixture(scope="module")
def report():
    torch._dynamo.reset()
    llmopt.clear_reports()
    model = tiny_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"strict": True})(tokens(1, 5))
    return llmopt.last_report()


def test_table_lists_every_pass(report):
    text = str(report)
    for p in report.passes:
        assert p.name in text
    assert "nodes:" in text


def test_json_is_stable_and_complete(report):
    a, b = report.to_json(), report.to_json()
    assert a == b
    d = json.loads(a)
    assert d["schema_version"] == 1
    for key in ("nodes_before", "nodes_after", "passes", "rewrites", "near_misses", "fallbacks", "kernel_choices"):
        assert key in d
    assert d["nodes_after"] <= d["nodes_before"]


def test_dot_export(report):
    dot = report.to_dot("after")
    assert dot.startswith("digraph") and "->" in dot
    assert isinstance(report.graph_after, nx.DiGraph)
    with pytest.raises(ValueError):
        report.to_dot("sideways")


def test_rewrites_name_their_layer(report):
    layers = {r.layer for r in report.rewrites if r.layer}
    assert any("layers.0" in l for l in layers), layers
