"""The explanation data model (``llmopt.tools.explain``): layer attribution on graph views
and the text helpers both views share. The whole model, built from a real compile, is
tested through ``explain`` in test_inspection.py."""
import networkx as nx
import pytest

from llmopt.tools.explain import attribute_layers, block_of, compress_ops, short_op


# -- layers and op names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer,block", [
    ("model.layers.3.self_attn.q_proj", "model.layers.3"),
    ("transformer.h.11.mlp", "transformer.h.11"),
    ("lm_head", "lm_head"),
    ("", "(outside any module)"),
])
def test_block_of(layer, block):
    assert block_of(layer) == block


def test_short_op_and_compress():
    assert short_op("aten.mm.default") == "mm"
    assert short_op("llmopt.add_rms_norm.default") == "llmopt.add_rms_norm"
    assert short_op("getitem") == "getitem"
    assert compress_ops(["mm", "mm", "mm", "add", "mm"]) == "mm×3 add mm"
    assert compress_ops([]) == ""


def _chain(with_layers: bool) -> nx.DiGraph:
    g = nx.DiGraph()
    spec = [("x", "placeholder", ""), ("mm_a", "call_function", "layers.0.attn"),
            ("fused", "call_function", ""), ("mm_b", "call_function", "layers.1.mlp"),
            ("out", "output", "")]
    for name, kind, layer in spec:
        data = dict(op="aten.mm.default" if kind == "call_function" else kind, kind=kind)
        if with_layers:
            data["layer"] = layer
        g.add_node(name, **data)
    for a, b in zip(spec, spec[1:]):
        g.add_edge(a[0], b[0])
    return g


def test_new_nodes_inherit_the_layer_of_their_producer():
    layers = attribute_layers(_chain(with_layers=True), {})
    assert layers["fused"] == "layers.0.attn" and layers["mm_b"] == "layers.1.mlp"


def test_layers_from_report_seeds_without_a_layer_attribute():
    layers = attribute_layers(_chain(with_layers=False), {"mm_b": "layers.1.mlp"})
    # nothing before mm_b is attributed: the first nodes take the layer of their consumer
    assert layers == {"mm_a": "layers.1.mlp", "fused": "layers.1.mlp", "mm_b": "layers.1.mlp"}
