"""reinplace_kv: a functionalized ``llmopt::paged_kv_append`` on graph inputs runs in place again.

What AOTAutograd makes of an in-place append into the pools (graph inputs) is
``auto_functionalized[_v2](paged_kv_append, ...)`` — which clones the pools — followed by
``copy_(pool, result)``. The pass turns it back into the in-place call when no node reads
a pool between the op and its write-back, and must leave it functional otherwise.

Specification:
- on the engine's compiled model it fires once per layer (one append writes K and V), in
  every graph (prefill and decode), leaves no ``auto_functionalized`` and no ``copy_``, and
  the engine's tokens equal the eager engine's;
- a pool read before the op is fine; a read of the pool (or of a view of it) between the
  op and the ``copy_`` keeps the op functional, with a near-miss naming the reader, and the
  graph still computes what eager computes;
- both spellings (``auto_functionalized`` with the pools as keyword arguments, and
  ``auto_functionalized_v2`` with ``_all_bases``) are handled.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import llmopt
from llmopt import compat, passes
from llmopt.codegen import attention_paged  # noqa: F401  (registers the llmopt::paged_* ops)
from llmopt.options import Options
from llmopt.passes import PassContext
from llmopt.passes import reinplace_kv
from llmopt.report import CompileReport

aten = torch.ops.aten
PASS = "reinplace_kv"
BS, HKV, D = 4, 2, 8


def functionalized_targets():
    return set(reinplace_kv._functionalized_targets())


def run_pass(gm: fx.GraphModule) -> tuple[int, CompileReport]:
    report = CompileReport()
    ctx = PassContext(options=Options(strict=True), report=report, device=torch.device("cpu"))
    count = passes._run_one(PASS, reinplace_kv, gm, ctx)
    return count, report


def targets_in(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class Captured:
    """``torch.compile(fn)`` whose backend keeps AOTAutograd's inference graph and runs it
    as is, so a test can rewrite the graph between two calls."""

    def __init__(self, fn):
        self.graphs: list[fx.GraphModule] = []
        torch.compiler.reset()
        self.compiled = torch.compile(fn, backend=self._backend, fullgraph=True)

    def _backend(self, gm, example_inputs):
        def fw_compiler(aten_gm, fake_inputs):
            self.graphs.append(aten_gm)

            def run(args):
                return aten_gm(*args)

            run._boxed_call = True
            return run

        return compat.aot_inference_capture(gm, example_inputs, fw_compiler)

    def __call__(self, *args):
        return self.compiled(*args)


def step_inputs(seed=0):
    """Pools with two sequences (lengths 5 and 3, blocks [0, 1] and [2]) and one new token each."""
    g = torch.Generator().manual_seed(seed)
    k_pool, v_pool = torch.randn(4, HKV, BS, D, generator=g), torch.randn(4, HKV, BS, D, generator=g)
    slots = torch.tensor([5, 3])  # token 5 of sequence 0 (block 1, offset 1), token 3 of sequence 1
    k, v = torch.randn(2, HKV, D, generator=g), torch.randn(2, HKV, D, generator=g)
    q = torch.randn(2, 2 * HKV, 1, D, generator=g)
    table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    lens = torch.tensor([6, 4], dtype=torch.int32)
    return [k_pool, v_pool, slots, k, v, q, table, lens]


def clone_all(args):
    return [a.clone() for a in args]


def append_then_attend(k_pool, v_pool, slots, k, v, q, table, lens):
    torch.ops.llmopt.paged_kv_append(k_pool, v_pool, slots, k, v)
    return torch.ops.llmopt.paged_attention_decode(q, k_pool, v_pool, table, lens, 0.25)


def read_before_append(k_pool, v_pool, slots, k, v, q, table, lens):
    before = k_pool.sum()  # the old pool, read before the write: no obstacle
    torch.ops.llmopt.paged_kv_append(k_pool, v_pool, slots, k, v)
    return torch.ops.llmopt.paged_attention_decode(q, k_pool, v_pool, table, lens, 0.25) + before


def check_equal_to_eager(fn, run):
    """``run(args)`` on fresh inputs gives ``fn``'s eager result and leaves the pools as eager does."""
    eager_args, args = step_inputs(), step_inputs()
    expected = fn(*eager_args)
    got = run(args)
    assert torch.equal(got, expected)
    assert torch.equal(args[0], eager_args[0]) and torch.equal(args[1], eager_args[1]), "pools differ from eager"


# ---------------------------------------------------------------------------------------
# the AOT graph of an append + attention
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [append_then_attend, read_before_append], ids=["plain", "read-before"])
def test_functionalized_append_becomes_in_place(fn):
    captured = Captured(fn)
    check_equal_to_eager(fn, lambda args: captured(*args))
    gm = captured.graphs[0]
    assert functionalized_targets() & set(targets_in(gm)), "the captured graph should be functionalized"
    count, report = run_pass(gm)
    # the append, and the decode attention (functionalized for its optional workspace, not
    # given here: it becomes the plain call)
    assert count == 2
    assert not functionalized_targets() & set(targets_in(gm))
    assert aten.copy_.default not in targets_in(gm), "the write-backs are gone"
    append = next(n for n in gm.graph.nodes if n.target == torch.ops.llmopt.paged_kv_append.default)
    pools = [n for n in gm.graph.nodes if n.op == "placeholder"][:2]
    assert append.kwargs["k_pool"] is pools[0] and append.kwargs["v_pool"] is pools[1]
    attention = next(n for n in gm.graph.nodes if n.target == torch.ops.llmopt.paged_attention_decode.default)
    assert attention.kwargs["k_pool"] is pools[0] and attention.kwargs["v_pool"] is pools[1], \
        "attention reads the pools themselves"
    assert [r.pass_name for r in report.rewrites] == [PASS, PASS] and not report.near_misses
    check_equal_to_eager(fn, lambda args: captured(*args))


def _insert_read(gm: fx.GraphModule, through: str) -> fx.Node:
    """Make the graph read the K pool input between the functional append and its write-back:
    the output becomes ``attention + sum(k_pool)`` (or the sum of ``k_pool[0]``, a view taken
    before the append, or of the first block of ``k_pool.split(1)``), with ``k_pool`` the old
    pool — what a functional graph means by it."""
    g = gm.graph
    af = next(n for n in g.nodes if n.target in functionalized_targets())
    k_pool = next(n for n in g.nodes if n.op == "placeholder")
    # the decode attention is functionalized too (for its optional workspace): its output is
    # item 0 of its auto_functionalized node
    decode = next(n for n in g.nodes if n.target in functionalized_targets()
                  and n.args[0] == torch.ops.llmopt.paged_attention_decode.default)
    attention = next(u for u in decode.users if u.args[1] == 0)
    read_from = k_pool
    with g.inserting_before(af):
        if through == "view":
            read_from = g.call_function(aten.select.int, (k_pool, 0, 0))
        elif through == "split":
            parts = g.call_function(aten.split.Tensor, (k_pool, 1))
            read_from = g.call_function(operator.getitem, (parts, 0))
    with g.inserting_after(attention):
        total = g.call_function(aten.sum.default, (read_from,))
    with g.inserting_after(total):
        out = g.call_function(aten.add.Tensor, (attention, total))
    attention.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    gm.recompile()
    return total


@pytest.mark.parametrize("through", ["pool", "view", "split"])
def test_read_between_op_and_write_back_stays_functional(through):
    captured = Captured(append_then_attend)
    captured(*step_inputs())
    gm = captured.graphs[0]
    reader = _insert_read(gm, through)

    def old_pool_semantics(k_pool, v_pool, slots, k, v, q, table, lens):
        old = {"pool": k_pool, "view": k_pool[0], "split": k_pool[:1]}[through].sum()
        return append_then_attend(k_pool, v_pool, slots, k, v, q, table, lens) + old

    check_equal_to_eager(old_pool_semantics, lambda args: captured(*args))
    count, report = run_pass(gm)
    assert count == 1, "only the decode attention (no workspace given: nothing it mutates) is unwrapped"
    assert sum(t in functionalized_targets() for t in targets_in(gm)) == 1, "the append stays functional"
    assert aten.copy_.default in targets_in(gm)
    [miss] = report.near_misses
    assert miss.pass_name == PASS and f"{reader.name} reads input" in miss.reason, miss.reason
    check_equal_to_eager(old_pool_semantics, lambda args: captured(*args))


def test_pool_that_is_not_written_back_stays_functional():
    """Without the ``copy_`` into the input (e.g. a graph that mutates a temporary), the
    functional result is not the input's new value: nothing to re-inplace."""
    captured = Captured(append_then_attend)
    captured(*step_inputs())
    gm = captured.graphs[0]
    copies = [n for n in gm.graph.nodes if n.target == aten.copy_.default]
    gm.graph.erase_node(copies[0])
    gm.recompile()
    count, report = run_pass(gm)
    assert count == 1, "only the decode attention, which mutates nothing here"
    assert functionalized_targets() & set(targets_in(gm)), "the append stays functional"
    assert "not written back exactly once" in report.near_misses[0].reason


# ---------------------------------------------------------------------------------------
# a chain: every layer's decode attention writes the step's one split workspace
# ---------------------------------------------------------------------------------------


def layers_on_one_workspace(k_pool, v_pool, slots, k, v, q, table, lens, workspace):
    """A decode step of three layers on one pool: the append, then three attentions
    writing the step's one workspace."""
    torch.ops.llmopt.paged_kv_append(k_pool, v_pool, slots, k, v)
    h = q
    for _ in range(3):
        h = torch.ops.llmopt.paged_attention_decode(h, k_pool, v_pool, table, lens, 0.25, 0, 0.0, workspace)
    return h


def chain_inputs():
    args = step_inputs()
    q = args[5]
    return args + [torch.zeros(q.shape[0], q.shape[1], 2, attention_paged.decode_workspace_pitch(q.shape[3]))]


def test_chain_of_ops_mutating_one_input_runs_in_place():
    """The captured chain ``af(ws) -> af(new ws) -> af(newer ws) -> copy_(ws, newest)``
    becomes three in-place calls on the workspace input; the result is eager's."""
    captured = Captured(layers_on_one_workspace)
    eager = layers_on_one_workspace(*chain_inputs())
    assert torch.equal(captured(*chain_inputs()), eager)
    gm = captured.graphs[0]
    assert sum(t in functionalized_targets() for t in targets_in(gm)) == 4
    count, report = run_pass(gm)
    assert count == 4 and not report.near_misses
    assert not functionalized_targets() & set(targets_in(gm))
    assert aten.copy_.default not in targets_in(gm)
    workspace = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    attentions = [n for n in gm.graph.nodes if n.target == torch.ops.llmopt.paged_attention_decode.default]
    assert [n.kwargs["workspace"] for n in attentions] == [workspace] * 3
    assert torch.equal(captured(*chain_inputs()), eager)


def test_chain_with_a_reader_of_an_intermediate_value_stays_functional():
    """A node reading the workspace's value between two links (here: its sum, returned)
    would see a later layer's write if the chain ran in place: the chain stays functional,
    and the graph computes what it computed before the pass."""
    captured = Captured(layers_on_one_workspace)
    captured(*chain_inputs())
    gm = captured.graphs[0]
    g = gm.graph
    first = next(n for n in g.nodes if n.target in functionalized_targets()
                 and n.args[0] == torch.ops.llmopt.paged_attention_decode.default)
    new_ws = next(u for u in first.users if u.args[1] == 1)
    output = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(output):
        total = g.call_function(aten.sum.default, (new_ws,))
    output.args = (tuple(output.args[0]) + (total,),)
    gm.recompile()
    before = gm(*chain_inputs())
    count, report = run_pass(gm)
    assert count == 1, "only the append"
    assert sum(t in functionalized_targets() for t in targets_in(gm)) == 3
    assert report.near_misses and all(m.pass_name == PASS for m in report.near_misses)
    after = gm(*chain_inputs())
    assert all(torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------------------------------
# auto_functionalized (v1): the mutated tensors as keyword arguments
# ---------------------------------------------------------------------------------------


def v1_graph() -> fx.GraphModule:
    """The v1 spelling, written out: ``auto_functionalized(op, k_pool=..., v_pool=..., ...)``
    returns ``(None, new_k_pool, new_v_pool)``; the result is the sum of the new pools."""
    v1 = getattr(torch.ops.higher_order, "auto_functionalized", None)
    if v1 is None:  # pragma: no cover - every supported torch has it
        pytest.skip("this torch has no auto_functionalized")
    g = fx.Graph()
    k_pool, v_pool, slots, k, v = (g.placeholder(name) for name in ("k_pool", "v_pool", "slots", "k", "v"))
    af = g.call_function(v1, (torch.ops.llmopt.paged_kv_append.default,),
                         {"k_pool": k_pool, "v_pool": v_pool, "slot_mapping": slots, "k": k, "v": v})
    new_k = g.call_function(operator.getitem, (af, 1))
    new_v = g.call_function(operator.getitem, (af, 2))
    total = g.call_function(aten.add.Tensor, (g.call_function(aten.sum.default, (new_k,)),
                                              g.call_function(aten.sum.default, (new_v,))))
    g.call_function(aten.copy_.default, (k_pool, new_k))
    g.call_function(aten.copy_.default, (v_pool, new_v))
    g.output(total)
    return fx.GraphModule(torch.nn.Module(), g)


def test_auto_functionalized_v1_is_handled():
    gm = v1_graph()

    def run(args):
        return gm(*args[:5])

    def eager(k_pool, v_pool, slots, k, v, *_):
        torch.ops.llmopt.paged_kv_append(k_pool, v_pool, slots, k, v)
        return k_pool.sum() + v_pool.sum()

    check_equal_to_eager(eager, run)
    count, _ = run_pass(gm)
    assert count == 1
    assert targets_in(gm).count(torch.ops.llmopt.paged_kv_append.default) == 1
    assert aten.copy_.default not in targets_in(gm)
    check_equal_to_eager(eager, run)


# ---------------------------------------------------------------------------------------
# the engine's compiled model
# ---------------------------------------------------------------------------------------


def test_engine_compiled_model_appends_in_place(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from llmopt.runtime import SamplingParams
    from llmopt.runtime.engine import Engine

    if PASS not in passes.PIPELINE:  # until the pass is in the pipeline: right after kv_cache
        at = passes.PIPELINE.index("kv_cache") + 1
        monkeypatch.setattr(passes, "PIPELINE", passes.PIPELINE[:at] + (PASS,) + passes.PIPELINE[at:])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = [[5, 9, 17, 33, 2, 8], [40, 41, 42, 7, 7, 100, 3, 3, 90, 12, 1]]
    params = SamplingParams(max_new_tokens=4, stop_token_ids=())
    with Engine(model, max_num_seqs=2, block_size=4, max_model_len=32) as engine:
        expected = engine.generate(prompts, params)

    llmopt.clear_reports()
    torch.compiler.reset()
    compiled = torch.compile(model, backend="llmopt", options={"strict": True})
    with Engine(compiled, max_num_seqs=2, block_size=4, max_model_len=32) as engine:
        assert engine.generate(prompts, params) == expected
    torch.compiler.reset()
    reports = llmopt.reports()
    assert len(reports) >= 2, "a prefill and a decode graph"
    layers = config.num_hidden_layers
    decode_graphs = 0
    for report in reports:
        # one append (K and V) per layer; in a decode graph also one decode attention per
        # layer, all writing the step's one split workspace (a chain ending in one copy_)
        decodes = report.ops_after.get("llmopt.paged_attention_decode.default", 0)
        decode_graphs += decodes == layers
        assert decodes in (0, layers)
        assert report.rewrites_by_pass()[PASS] == layers + decodes
        assert report.ops_after.get("llmopt.paged_kv_append.default") == layers
        assert not [op for op in report.ops_after if "auto_functionalized" in op or op == "aten.copy_.default"]
    assert decode_graphs >= 1
