"""``llmopt.explain``: graphs, graph breaks with reasons, recompiles, reports, per-layer ops, kernels.

Small hand-written modules pin the Dynamo facts (a data-dependent branch breaks the graph;
a rank change recompiles); the tiny Llama shows the per-layer and per-linear views on a
real architecture.
"""
from __future__ import annotations

import json

import pytest
import torch

from llmopt import compat
from llmopt.tools.explain import validate
from llmopt.tools.inspection import Explanation, explain
from llmopt.report import CompileReport
from models.tiny import tiny_model, tokens


def Mlp():
    """Linear, GELU, linear: one graph, no breaks."""
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


class Branchy(torch.nn.Sequential):
    """Two linears with a Python branch on a tensor value between them: Dynamo must break
    the graph there."""

    def __init__(self):
        super().__init__(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    def forward(self, x):
        h = self[0](x)
        if h.sum().item() > 0:  # graph break: the value decides the control flow
            h = h * 2
        return self[1](h)


@pytest.fixture(scope="module")
def llama_explanation() -> Explanation:
    model = tiny_model("llama")
    return explain(model, tokens(1, 6), options={"inner": "aten"})


def test_one_graph_no_breaks_on_tiny_llama(llama_explanation):
    e = llama_explanation
    assert e.dynamo_graph_count == 1 and e.graph_breaks == [] and e.recompiles == []
    assert len(e.graphs) == 1 and isinstance(e.reports[0], CompileReport)
    assert e.calls == ["forward"] and e.graphs[0].call == "forward"
    t = e.totals()
    assert t["graphs"] == 1 and t["nodes_after"] <= t["nodes_before"]
    assert t["rewrites"] == sum(e.rewrites_by_pass().values()) > 0
    assert e.graphs[0].inputs == ["(1, 6) int64"]  # the weights are frozen, the tokens remain


def test_per_layer_ops_before_and_after(llama_explanation):
    layers = {layer.layer: layer for layer in llama_explanation.graphs[0].layers}
    assert "model.layers.0" in layers and "model.layers.1" in layers
    block = layers["model.layers.1"]
    assert block.after, "a decoder block runs operations after the passes"
    assert len(block.after) <= len(block.before) or not block.before  # the passes never add work
    assert all(isinstance(op, str) and op for op in block.after)


def test_every_linear_has_a_kernel(llama_explanation):
    linears = llama_explanation.graphs[0].linears
    assert linears, "the tiny Llama has linears"
    layers = {lin.layer for lin in linears}
    assert any("layers.0" in layer for layer in layers) and any("lm_head" in layer for layer in layers)
    for lin in linears:
        assert lin.kernel and lin.reason and lin.weight_shape.startswith("(")


def test_json_is_valid_and_stable(llama_explanation):
    a = llama_explanation.to_json()
    assert a == llama_explanation.to_json()
    data = json.loads(a)
    assert validate(data) == []
    assert data["graphs"][0]["report"]["schema_version"] == 1
    broken = json.loads(a)
    del broken["graphs"][0]["layers"]
    assert validate(broken) == ["graphs[0].layers: expected list, got NoneType"]


def test_text_table(llama_explanation):
    text = str(llama_explanation)
    assert "graphs compiled: 1" in text and "graph breaks: 0" in text
    assert "normalize" in text and "model.layers.0" in text


def test_graph_break_is_explained_with_its_reason_and_place():
    e = explain(Branchy(), torch.randn(2, 8), options={"inner": "aten"})
    assert e.dynamo_graph_count >= 2 and len(e.graph_breaks) >= 1
    brk = e.graph_breaks[0]
    assert "item" in brk.reason.lower()
    assert "test_inspection.py" in brk.location  # points at the user's line
    assert len(e.graphs) >= 2  # llmopt compiled each piece
    assert "graph break at" in str(e)


def test_recompiles_are_recorded_per_call():
    model = Mlp()
    calls = [("rank 2", lambda m: m(torch.randn(3, 8))), ("rank 3", lambda m: m(torch.randn(2, 3, 8)))]
    e = explain(model, torch.randn(3, 8), calls=calls, graph_breaks=False)
    assert e.dynamo_graph_count is None  # analysis skipped
    assert len(e.recompiles) == 1 and "rank" in e.recompiles[0].lower()
    assert [g.call for g in e.graphs] == ["rank 2", "rank 3"]


def test_bad_option_fails_before_any_work():
    with pytest.raises(ValueError, match="valid options"):
        explain(Mlp(), torch.randn(2, 8), options={"no_such_option": 1})


def test_explain_leaves_no_recompile_logging_behind():
    import logging

    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    before = (list(logger.handlers), logger.level, logger.propagate)
    with compat.recording_recompiles() as rec:
        f = torch.compile(lambda x: x + 1, backend="eager")
        f(torch.ones(2))
        f(torch.ones(2, 2))
    assert rec.available and len(rec.messages) == 1
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    compat.reset_dynamo()


def test_compat_explain_graph_breaks_plain_data():
    found = compat.explain_graph_breaks(Branchy(), (torch.randn(2, 8),))
    assert found["graph_count"] == found["graph_break_count"] + 1 >= 2
    assert json.dumps(found)  # plain data
