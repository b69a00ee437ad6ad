"""passes/near_miss.py: the loop every node-by-node pass runs its candidates through."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from llmopt.passes.near_miss import NearMiss, rewrite_each, try_rewrite

aten = torch.ops.aten


class Recorder:
    """The two PassContext methods a pass reports through."""

    def __init__(self):
        self.rewrites, self.near_misses = [], []

    def rewrite(self, node, detail):
        self.rewrites.append((node.name, detail))

    def near_miss(self, node, reason):
        self.near_misses.append((node.name, reason))


def graph():
    return make_fx(lambda x: (x.neg(), x.relu().neg()), tracing_mode="real")(torch.randn(3))


def neg_to_abs(gm, node):
    """Rewrites a neg; a neg of a relu is a near-miss."""
    if node.args[0].target == aten.relu.default:
        raise NearMiss(node, "neg of a relu")
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(aten.abs.default, (node.args[0],))
    node.replace_all_uses_with(new)
    return new, "neg → abs"


def test_hits_and_near_misses_are_recorded_and_dead_nodes_dropped():
    gm, ctx = graph(), Recorder()
    assert rewrite_each(gm, ctx, {aten.neg.default: neg_to_abs}) == 1
    assert [detail for _, detail in ctx.rewrites] == ["neg → abs"]
    assert ctx.near_misses == [("neg_1", "neg of a relu")]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(aten.neg.default) == 1
    gm.graph.lint()


def test_a_rewrite_that_declines_records_nothing():
    gm, ctx = graph(), Recorder()
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    assert try_rewrite(ctx, lambda gm, node: None, gm, relu) == 0
    assert ctx.rewrites == ctx.near_misses == []
