"""The backend foundation: registration, options, capture/freeze, pass manager, fallbacks."""
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

import llmopt
from llmopt import passes
from llmopt.options import Options


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    llmopt.clear_reports()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_registered_without_import_via_entry_point():
    code = (
        "import torch, torch._dynamo\n"
        "assert 'llmopt' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
        "m = torch.nn.Linear(4, 4)\n"
        "f = torch.compile(m, backend='llmopt')\n"
        "with torch.no_grad():\n"
        "    x = torch.randn(2, 4); assert torch.allclose(f(x), m(x))\n"
        "import sys; assert 'llmopt' in sys.modules  # loaded by dynamo through the entry point\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_unknown_option_is_rejected_with_valid_keys():
    m = torch.compile(MLP(), backend="llmopt", options={"stirct": True})
    with pytest.raises(Exception, match="valid options: .*strict"):
        with torch.no_grad():
            m(torch.randn(2, 16))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"inner": "tvm"}, "inner.*'aten'"),
        ({"disable": ["no_such_pass"]}, "valid passes: normalize"),
        ({"strict": "yes"}, "strict.*True or False"),
        ({"autotune": "always"}, "autotune.*'cached'"),
        ({"cuda_graphs": 1}, "cuda_graphs"),
    ],
)
def test_bad_option_values_name_the_valid_ones(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Options.from_user(options)


def test_llmopt_compile_validates_eagerly():
    with pytest.raises(ValueError, match="valid options"):
        llmopt.compile(MLP(), options={"nope": 1})


def test_mode_maps_to_options():
    o = Options.from_user({}, mode="max-autotune")
    assert o.cuda_graphs is True and o.autotune == "on"
    with pytest.raises(ValueError, match="mode"):
        Options.from_user({}, mode="fastest")


@pytest.mark.parametrize("inner", ["aten", "inductor"])
def test_executors_match_eager(inner):
    m = MLP().eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out = torch.compile(m, backend="llmopt", options={"inner": inner, "strict": True})(x)
    torch.testing.assert_close(out, m(x))
    r = llmopt.last_report()
    assert r.executor == inner
    assert r.frozen_constants == 3  # a.weight, a.bias, b.weight


def test_frozen_weights_are_constants_read_in_place_and_replacement_is_detected():
    m = MLP().eval()
    f = torch.compile(m, backend="llmopt")
    x = torch.randn(2, 16)
    with torch.no_grad():
        f(x)
        r = llmopt.last_report()
        assert r.ops_after.get("llmopt.linear.default") == 2  # on CPU: oneDNN through llmopt.linear
        m.a.weight.mul_(2.0)  # in place: the graph reads this storage (tests/test_weight_storage.py)
        torch.testing.assert_close(f(x), m(x))
        m.a.weight.data = m.a.weight.data * 2.0  # new storage: the graph cannot see it
        with pytest.raises(RuntimeError, match="weight changed after compilation: a.weight was given new storage"):
            f(x)


def test_freeze_off_sees_weight_changes():
    m = MLP().eval()
    f = torch.compile(m, backend="llmopt", options={"freeze": False})
    x = torch.randn(2, 16)
    with torch.no_grad():
        f(x)
        m.a.weight.mul_(2.0)
        torch.testing.assert_close(f(x), m(x))


def test_mutated_buffer_stays_an_input_with_in_place_semantics():
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.zeros(4, 8))
            self.w = nn.Linear(8, 8)

        def forward(self, x, pos):
            self.k.index_copy_(0, pos, self.w(x))
            return self.k.sum(0)

    m = Cache().eval()
    ref = Cache().eval()
    ref.load_state_dict(m.state_dict())
    f = torch.compile(m, backend="llmopt", options={"strict": True})
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(1, 8)
            pos = torch.tensor([i])
            torch.testing.assert_close(f(x, pos), ref(x, pos))
        torch.testing.assert_close(m.k, ref.k)
    assert len(llmopt.last_report().mutated_inputs) == 1


def test_failing_pass_is_logged_and_skipped(monkeypatch):
    def boom(gm, ctx):
        for node in list(gm.graph.nodes):  # leave a half-done rewrite behind
            if node.op == "call_function":
                node.target = torch.ops.aten.neg.default
                break
        raise RuntimeError("pass exploded")

    real = passes.available_passes
    monkeypatch.setattr(passes, "available_passes", lambda: {**real(), "fuse_rope": types.SimpleNamespace(run=boom)})
    m = MLP().eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = torch.compile(m, backend="llmopt")(x)
    torch.testing.assert_close(out, m(x))  # rolled back: still correct
    rec = {p.name: p for p in llmopt.last_report().passes}["fuse_rope"]
    assert rec.status == "failed" and "pass exploded" in rec.error

    torch._dynamo.reset()
    with pytest.raises(Exception, match="pass exploded"):
        with torch.no_grad():
            torch.compile(m, backend="llmopt", options={"strict": True})(x)


def test_disabled_pass_is_reported():
    m = MLP().eval()
    with torch.no_grad():
        torch.compile(m, backend="llmopt", options={"disable": ["normalize"]})(torch.randn(2, 16))
    rec = {p.name: p for p in llmopt.last_report().passes}
    assert rec["normalize"].status == "disabled"


def test_graph_breaks_compile_piecewise():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            print("", end="")  # a graph break
            return self.b(y)

    m = Breaks().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="llmopt")(x), m(x))
    assert len(llmopt.reports()) == 2


def test_grad_mode_falls_back_with_a_reason(monkeypatch, caplog):
    from llmopt import backend

    monkeypatch.setattr(backend, "_WARNED", set())
    x = torch.randn(2, 16)
    with caplog.at_level("WARNING", logger="llmopt"):
        for _ in range(2):  # two models: two graphs, one warning
            torch._dynamo.reset()
            m = MLP()
            out = torch.compile(m, backend="llmopt")(x)
            out.sum().backward()  # autograd still works
            assert m.a.weight.grad is not None
            assert "inference only" in llmopt.last_report().fallbacks[0].reason
    lines = [r.getMessage() for r in caplog.records if "runs unoptimized" in r.getMessage()]
    assert len(lines) == 1 and "torch.no_grad()" in lines[0] and "autograd is recording" in lines[0], lines


def test_unsupported_dtype_falls_back_without_crash():
    m = MLP().double().eval()
    x = torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="llmopt")(x), m(x))


def test_integer_only_graph_runs():
    f = torch.compile(lambda a: (a * 3 + 1) // 2, backend="llmopt")
    a = torch.arange(10)
    assert torch.equal(f(a), (a * 3 + 1) // 2)


def test_log_prints_report(capsys):
    with torch.no_grad():
        torch.compile(MLP().eval(), backend="llmopt", options={"log": True})(torch.randn(2, 16))
    assert "llmopt compile report" in capsys.readouterr().err


def test_aten_executor_on_cpu_calls_llmopt_ops_directly():
    """The report still names the llmopt ops; the executed module calls their CPU code."""
    from models.tiny import tiny_model, tokens

    torch._dynamo.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="llmopt", options={"inner": "aten", "strict": True})
    with torch.no_grad():
        got = compiled(tokens(1, 5)).logits
        want = model(tokens(1, 5)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = llmopt.last_report()
    assert any(op.startswith("llmopt.") for op in report.ops_after)
    assert any("run their CPU implementation directly" in note for note in report.notes)


def test_failed_pass_logs_one_line_and_keeps_the_detail_in_the_report(monkeypatch, caplog):
    graph_dump = "\n".join(f"    %n{i} = call_function[...]" for i in range(700))

    def boom(gm, ctx):
        raise RuntimeError("Argument 'x' was used before it has been defined!\n" + graph_dump)

    real = passes.available_passes
    monkeypatch.setattr(passes, "available_passes", lambda: {**real(), "fuse_rope": types.SimpleNamespace(run=boom)})
    m = MLP().eval()
    x = torch.randn(2, 16)
    with caplog.at_level("WARNING", logger="llmopt"), torch.no_grad():
        torch.compile(m, backend="llmopt")(x)
    lines = [r.getMessage() for r in caplog.records if "fuse_rope" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 400, lines
    rec = {p.name: p for p in llmopt.last_report().passes}["fuse_rope"]
    assert rec.error == "RuntimeError: Argument 'x' was used before it has been defined!"
    assert "%n699" in rec.detail and "Traceback" in rec.detail


def test_dynamo_control_flow_exceptions_propagate_from_a_pass(monkeypatch):
    import torch._dynamo.exc as dynamo_exc

    calls = []

    def restart(gm, ctx):
        calls.append(1)
        if len(calls) == 1:
            raise dynamo_exc.RestartAnalysis("restart")  # Dynamo re-traces; never a pass failure
        return 0

    real = passes.available_passes
    monkeypatch.setattr(passes, "available_passes", lambda: {**real(), "fuse_rope": types.SimpleNamespace(run=restart)})
    with pytest.raises(dynamo_exc.RestartAnalysis):
        passes._run_one("fuse_rope", types.SimpleNamespace(run=restart), torch.fx.symbolic_trace(MLP()),
                        passes.PassContext(options=Options(), report=llmopt.CompileReport(), device=torch.device("cpu")))


def test_dynamic_true_end_to_end_is_optimized_not_a_capture_fallback():
    # dynamic=True makes AOTAutograd raise TensorifyScalarRestartAnalysis on the first
    # attempt; swallowing it as a capture failure ran the graph unoptimized.
    import sys as _sys
    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from models.tiny import tiny_model, tokens

    torch._dynamo.reset()
    llmopt.clear_reports()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="llmopt", dynamic=True)
    with torch.no_grad():
        for batch, seq in ((1, 6), (2, 9)):
            ids = tokens(batch, seq)
            assert torch.equal(llmopt.generate(compiled, ids, max_new_tokens=4), llmopt.generate(model, ids, max_new_tokens=4))
    reports = llmopt.reports()
    assert reports and all(not r.fallbacks for r in reports), [r.fallbacks for r in reports]
    assert all(r.executor == "aten" for r in reports)
    for report in reports[:2]:  # the prefill and decode graphs of the first call
        by_pass = report.rewrites_by_pass()
        assert by_pass["merge_parallel_linears"] == 4 and by_pass["lower_attention"] == 2 and by_pass["kv_cache"] == 2


class BrokenLayer(nn.Module):
    """A layer whose forward breaks the graph: Dynamo compiles its two halves once and runs
    them for every layer, each time with that layer's weights as graph inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.a(x)
        torch._dynamo.graph_break()
        return x + self.b(x)


def test_a_graph_reused_for_every_layer_gets_each_layers_weights():
    torch._dynamo.reset()
    llmopt.clear_reports()
    model = nn.Sequential(BrokenLayer(), BrokenLayer(), BrokenLayer()).eval()
    x = torch.randn(2, 16)
    compiled = torch.compile(model, backend="llmopt")
    with torch.no_grad():
        for _ in range(2):  # the second call reuses every variant
            torch.testing.assert_close(compiled(x), model(x))
    assert len(llmopt.reports()) == 6  # two graphs, each frozen once per layer's weights
    # Replacing one weight of a compiled set is still the frozen-weight contract's error.
    model[1].a.weight = nn.Parameter(torch.randn(16, 16))
    with pytest.raises(RuntimeError, match="a model weight changed after compilation"), torch.no_grad():
        compiled(x)
