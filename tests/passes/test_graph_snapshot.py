"""The pass manager's rollback snapshot: restoring gives back the graph as it was taken,
whatever a failing pass did to it in between (retargeted, rewired, erased, added nodes,
edited meta)."""
import torch
import torch.fx as fx

from llmopt.passes import GraphSnapshot


def _traced():
    def f(x, y):
        a = torch.relu(x) + y
        return torch.sigmoid(a) * 2, a.sum()

    gm = fx.symbolic_trace(f)
    for i, node in enumerate(gm.graph.nodes):
        node.meta["order"] = i
    return gm


def test_restore_undoes_every_kind_of_edit():
    gm = _traced()
    before = gm.code
    snapshot = GraphSnapshot(gm.graph)
    nodes = list(gm.graph.nodes)
    relu = next(n for n in nodes if n.target is torch.relu)
    sigmoid = next(n for n in nodes if n.target is torch.sigmoid)
    relu.target = torch.tanh                      # retargeted
    relu.meta["order"] = -1                       # meta edited
    with gm.graph.inserting_after(relu):
        extra = gm.graph.call_function(torch.neg, (relu,))
    sigmoid.replace_all_uses_with(extra)          # rewired
    gm.graph.erase_node(sigmoid)                  # erased
    gm.recompile()
    assert gm.code != before

    gm.graph = snapshot.restore()
    gm.recompile()
    assert gm.code == before
    assert [n.meta["order"] for n in gm.graph.nodes] == list(range(len(nodes)))
    assert [n.name for n in gm.graph.nodes] == [n.name for n in nodes]
    x, y = torch.randn(3), torch.randn(3)
    out, total = gm(x, y)
    torch.testing.assert_close(out, torch.sigmoid(torch.relu(x) + y) * 2)
    torch.testing.assert_close(total, (torch.relu(x) + y).sum())


def test_snapshot_of_an_unchanged_graph_restores_the_same_code():
    gm = _traced()
    gm.graph = GraphSnapshot(gm.graph).restore()
    gm.recompile()
    assert gm.code == _traced().code
