"""llmopt/graph.py: the node predicates every pass matches with, node insertion with valid
metadata, and ``propagate_layout`` after a replacement changed strides."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from llmopt.graph import (
    call_with_meta, is_call, is_cast, other_operand, propagate_layout, same_shape, single_user, statically_equal,
)

aten = torch.ops.aten


def traced(fn, *inputs):
    return make_fx(fn, tracing_mode="real")(*inputs)


def nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


@pytest.mark.parametrize("spelling,floating_ok", [
    (lambda x: x.to(torch.float16), True),
    (lambda x: x.float().to(torch.bfloat16), True),
    (lambda x: x.to(torch.int32), False),
])
def test_a_dtype_conversion_is_a_cast(spelling, floating_ok):
    gm = traced(spelling, torch.ones(3, 4))
    casts = nodes(gm, aten._to_copy.default)
    assert casts and all(is_cast(c) for c in casts)
    assert is_cast(casts[-1], floating=True) == floating_ok


def test_a_copy_that_changes_memory_format_is_no_cast_nor_is_another_op():
    gm = traced(lambda x: x.to(torch.float16, memory_format=torch.channels_last), torch.ones(1, 2, 3, 4))
    (copy,) = nodes(gm, aten._to_copy.default)
    assert not is_cast(copy)
    gm = traced(lambda x: x.neg(), torch.ones(3))
    assert not is_cast(nodes(gm, aten.neg.default)[0])


def test_single_user_and_other_operand():
    gm = traced(lambda x, y: ((x + y) * 2, x.neg()), torch.ones(3), torch.ones(3))
    (add,) = nodes(gm, aten.add.Tensor)
    (mul,) = nodes(gm, aten.mul.Tensor)
    x, y = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert single_user(add) is mul
    assert single_user(add, lambda u: u.target == aten.mul.Tensor) is mul
    assert single_user(add, lambda u: u.target == aten.div.Tensor) is None
    assert single_user(x) is None  # two users
    assert single_user(mul) is None  # its user is the output, not a call
    assert other_operand(add, x) is y and other_operand(add, y) is x
    assert other_operand(mul, x) is None
    assert is_call(add, aten.add.Tensor) and not is_call(add, aten.mul.Tensor) and not is_call(None, aten.add.Tensor)


def test_same_shape_and_statically_equal():
    v = torch.empty(2, 3, 4)
    assert same_shape(v, (2, 3, 4)) and same_shape(v, torch.Size([2, 3, 4]))
    assert not same_shape(v, (2, 3)) and not same_shape(v, (2, 3, 5)) and not same_shape(None, (2, 3, 4))
    assert statically_equal(4, 4) and not statically_equal(4, 5)


def test_call_with_meta_records_the_fake_value():
    gm = traced(lambda x: x * 2, torch.ones(2, 3))
    (mul,) = nodes(gm, aten.mul.Tensor)
    with gm.graph.inserting_after(mul):
        t = call_with_meta(gm.graph, aten.transpose.int, (mul, 0, 1))
        c = call_with_meta(gm.graph, aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
    assert tuple(t.meta["val"].shape) == (3, 2) and t.meta["val"].stride() == (1, 3)
    assert c.meta["val"].stride() == (2, 1)


def test_propagate_layout_puts_one_copy_before_a_view_the_new_strides_break():
    # Hugging Face after SDPA on CPU: the output is laid out [B, S, H, D], so
    # transpose(1, 2).view(B, S, H * D) is a view. A contiguous [B, H, S, D] replacement
    # makes that view impossible: one copy goes in front of it.
    def attention_output(x):  # x: [B, S, H, D]
        out = x.transpose(1, 2) * 2  # [B, H, S, D] with x's strides
        return out.transpose(1, 2).view(2, 5, 12)

    x = torch.randn(2, 5, 3, 4)
    gm = traced(attention_output, x)
    (mul,) = nodes(gm, aten.mul.Tensor)
    with gm.graph.inserting_after(mul):
        new = call_with_meta(gm.graph, aten.clone.default, (mul,), {"memory_format": torch.contiguous_format})
    mul.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    propagate_layout(gm.graph, {mul: new})
    gm.graph.lint()
    gm.recompile()
    (view,) = nodes(gm, aten.view.default)
    assert view.args[0] is not nodes(gm, aten.transpose.int)[-1]  # a copy was put in front
    assert view.meta["val"].shape == (2, 5, 12)
    torch.testing.assert_close(gm(x), attention_output(x), rtol=0, atol=0)


def test_propagate_layout_leaves_a_graph_with_unchanged_strides_alone():
    gm = traced(lambda x: (x * 2).neg().view(6), torch.randn(2, 3))
    (mul,) = nodes(gm, aten.mul.Tensor)
    with gm.graph.inserting_after(mul):
        new = call_with_meta(gm.graph, aten.clone.default, (mul,))
    mul.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    before = len(gm.graph.nodes)
    propagate_layout(gm.graph, {mul: new})
    assert len(gm.graph.nodes) == before
