"""``llmopt.decompose``: the decompositions applied node by node give the whole-graph retrace.

On the post-pass graphs of real Hugging Face architectures (prefill and decode over a
static cache, a MoE family included), the shortcut must apply (no fallback) and give the
same graph as ``make_fx`` over the whole graph: the same op histogram, and the same outputs
and cache writes when both are run on the same real inputs. Graphs it cannot prove equal
(symbolic shapes, a Python call, a decomposition that changes a layout) are retraced whole.
"""
from __future__ import annotations

import collections
import operator

import pytest
import torch
import torch.fx as fx

import llmopt.backend as backend
from conftest import assert_close
from llmopt import decompose as decompose_module
from llmopt.backend import CPU_EXECUTOR_ENV
from models.tiny import tiny_model, tokens


def _histogram(gm: fx.GraphModule) -> collections.Counter:
    gm.graph.eliminate_dead_code()
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _real(value: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if value.dtype.is_floating_point:
        data = torch.randn(value.shape, dtype=value.dtype, generator=g)
    else:
        data = torch.zeros(value.shape, dtype=value.dtype)  # token ids, positions: 0 is valid
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype).copy_(data)


def _run(gm: fx.GraphModule, fake_inputs) -> list:
    args = [_real(v, i) if isinstance(v, torch.Tensor) else v for i, v in enumerate(fake_inputs)]
    with torch.no_grad():
        out = gm(*args)
    return [*(out if isinstance(out, (tuple, list)) else [out]), *args]  # outputs, then written inputs


# GPT-2's prefill graph concatenates an empty dynamic-cache tensor with a permuted one:
# Inductor's ``cat`` decomposition returns the permuted operand as it is where the captured
# graph recorded a contiguous result, so the shortcut copies it into the recorded layout
# (the users' recorded strides would be stale otherwise): an ``empty_strided`` and a
# ``copy`` per concatenation that the whole retrace does not have.
LAYOUT_COPIES = {"gpt2"}


@pytest.fixture
def compared(monkeypatch, request):
    """Compiles with the Inductor executor (which gets the shortcut's graph); each graph's
    decomposition is also kept, and done whole: yields the list of (selective, whole,
    inputs) it saw."""
    monkeypatch.delenv(CPU_EXECUTOR_ENV, raising=False)
    seen = []

    def fallback(gm, inputs, table):
        raise AssertionError("the shortcut fell back to the whole-graph retrace")

    def checked(gm, inputs, table):
        with monkeypatch.context() as m:
            m.setattr(decompose_module, "whole_graph", fallback)
            selective = decompose_module.decompose(gm, inputs, table)
            compiled = decompose_module.decompose(gm, inputs, table)  # Inductor rewrites what it compiles
        whole = decompose_module.whole_graph(gm, inputs, table)
        seen.append((selective, whole, list(inputs)))
        return compiled

    monkeypatch.setattr(backend, "decompose", checked)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_selected_nodes_give_the_whole_graph_retrace(family, compared):
    from transformers import StaticCache

    model = tiny_model(family)
    forward = torch.compile(model.forward, backend="llmopt", options={"strict": True})
    prompt = tokens(1, 7)
    with torch.no_grad():
        if family == "gpt2":
            forward(prompt)
        else:
            cache = StaticCache(config=model.config, max_cache_len=16)
            out = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(7), use_cache=True)
            forward(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, cache_position=torch.tensor([7]),
                    use_cache=True)
    assert compared, "the Inductor executor was not used"
    copies = 0
    for selective, whole, inputs in compared:
        added = _histogram(selective) - _histogram(whole)
        assert not _histogram(whole) - _histogram(selective)
        assert set(added) <= {"aten.empty_strided.default", "aten.copy.default"}
        assert added["aten.empty_strided.default"] == added["aten.copy.default"]
        copies += added["aten.copy.default"]
        for got, expected in zip(_run(selective, inputs), _run(whole, inputs)):
            if got.dtype.is_floating_point:
                assert_close(got, expected.double(), got.dtype, what=f"{family}: selective vs whole retrace")
            else:
                assert torch.equal(got, expected)
    assert (copies > 0) == (family in LAYOUT_COPIES)


def _traced(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args)


def test_decomposed_ops_are_replaced_and_others_copied():
    gm = _traced(lambda x, w: torch.nn.functional.silu(x @ w.t()).sum(-1), torch.randn(3, 4), torch.randn(5, 4))
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    table = {torch.ops.aten.silu.default: lambda x: x * torch.sigmoid(x)}
    out = decompose_module.decompose(gm, inputs, table)
    ops = _histogram(out)
    assert "aten.silu.default" not in ops and ops["aten.sigmoid.default"] == 1
    assert ops == _histogram(decompose_module.whole_graph(gm, inputs, table))
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.equal(out(x, w), gm(x, w))
    assert "aten.silu.default" in _histogram(gm), "the input graph is left as it was"


def test_graphs_it_cannot_prove_equal_are_retraced_whole(monkeypatch):
    calls = []
    real_whole = decompose_module.whole_graph
    monkeypatch.setattr(decompose_module, "whole_graph", lambda *a: calls.append(1) or real_whole(*a))
    table = {torch.ops.aten.silu.default: lambda x: x * torch.sigmoid(x)}

    # Symbolic shapes.
    gm = _traced(lambda x: torch.nn.functional.silu(x), torch.randn(3, 4))
    from torch.fx.experimental.proxy_tensor import make_fx

    dynamic = make_fx(lambda x: torch.nn.functional.silu(x), tracing_mode="symbolic")(torch.randn(3, 4))
    inputs = [n.meta["val"] for n in dynamic.graph.nodes if n.op == "placeholder"]
    decompose_module.decompose(dynamic, inputs, table)
    assert len(calls) == 1

    # A Python call (not an op overload).
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    y = graph.call_function(torch.nn.functional.silu, (x,))
    graph.output(graph.call_function(operator.neg, (y,)))
    decompose_module.decompose(fx.GraphModule({}, graph), [x.meta["val"]], table)
    assert len(calls) == 2


def test_an_output_in_another_layout_is_copied_into_the_recorded_one(monkeypatch):
    """A decomposition may give another layout than the eager kernel the graph was traced
    on: Inductor's ``cat`` returns a lone non-empty operand as it is (Bloom's and GPT-2's
    prefill: an empty dynamic-cache tensor and a transposed one), where eager ``cat``
    returned a contiguous tensor that the graph then ``view``s. The shortcut copies the
    output into the recorded layout; the whole-graph retrace failed on the ``view``.
    Bloom end to end on the Inductor executor: tests/models/test_more_architectures.py."""
    monkeypatch.setattr(decompose_module, "whole_graph", lambda *a: pytest.fail("retraced whole"))
    lone_operand = {torch.ops.aten.cat.default: lambda tensors, dim=0: next(t for t in tensors if t.numel()).clone()}

    def attention_keys(past, new):
        return torch.cat([past, new.transpose(1, 2)], -2).view(8, 11, 16) * 2

    past, new = torch.zeros(2, 4, 0, 16), torch.randn(2, 11, 4, 16)
    gm = _traced(attention_keys, past, new)
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    out = decompose_module.decompose(gm, inputs, lone_operand)
    ops = _histogram(out)
    assert "aten.cat.default" not in ops and ops["aten.copy.default"] == 1
    copy = next(n for n in out.graph.nodes if n.target is torch.ops.aten.copy.default)
    assert copy.meta["val"].stride() == (704, 176, 16, 1), "the recorded (eager cat's) layout"
    assert torch.equal(out(past, new), attention_keys(past, new))

    # A recorded value that is not dense (an expanded tensor): no buffer to copy into, so
    # the graph is retraced whole as before.
    calls = []
    monkeypatch.setattr(decompose_module, "whole_graph", lambda *a: calls.append(1) or a[0])
    materialized = {torch.ops.aten.expand.default: lambda x, size, implicit=False: x.repeat(1, size[1] // x.shape[1])}
    broadcast = _traced(lambda x: x.expand(3, 4) * 1, torch.randn(3, 1))
    broadcast_inputs = [n.meta["val"] for n in broadcast.graph.nodes if n.op == "placeholder"]
    decompose_module.decompose(broadcast, broadcast_inputs, materialized)
    assert calls == [1]

    # Both layouts the same: nothing added.
    same = {torch.ops.aten.cat.default: lambda tensors, dim=0: next(t for t in tensors if t.numel()).contiguous()}
    assert "aten.copy.default" not in _histogram(decompose_module.decompose(gm, inputs, same))

