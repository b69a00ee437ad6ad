"""graph.move_users_after: users that a rewrite left before their new input move after it."""
import operator

import pytest
import torch
import torch.fx as fx

from llmopt.graph import move_users_after

aten = torch.ops.aten


def _graph():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(aten.neg.default, (x,))
    size = g.call_function(aten.sym_size.int, (a, 0))   # an early reader of a's size
    twice = g.call_function(operator.mul, (size, 2))
    late = g.call_function(aten.relu.default, (x,))     # the node that will replace a
    g.output((late, twice))
    return g, a, size, twice, late


def test_early_users_move_after_their_new_input_in_order():
    g, a, size, twice, late = _graph()
    a.replace_all_uses_with(late)
    with pytest.raises(RuntimeError):
        g.lint()
    assert move_users_after(late) == 2
    g.lint()
    order = list(g.nodes)
    assert order.index(late) < order.index(size) < order.index(twice)


def test_a_mutating_early_user_is_not_moved():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.placeholder("y")
    a = g.call_function(aten.neg.default, (x,))
    g.call_function(aten.copy_.default, (y, a))
    late = g.call_function(aten.relu.default, (x,))
    g.output(late)
    a.replace_all_uses_with(late)
    with pytest.raises(RuntimeError, match="writes memory"):
        move_users_after(late)
