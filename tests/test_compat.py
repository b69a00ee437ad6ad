"""Each private-API wrapper of llmopt.compat works on the installed torch."""
import pytest
import torch

from llmopt import compat


def test_version_tuple():
    assert compat.TORCH_VERSION >= (2, 6)


def _capturing_backend(inspect):
    """A Dynamo backend that captures with compat.aot_inference_capture, calls
    ``inspect(aten_gm, fake_inputs)`` inside the fw_compiler and runs the ATen graph."""

    def fw(gm, inputs):
        inspect(gm, inputs)

        def run(args):
            return gm(*args)

        run._boxed_call = True
        return run

    def backend(gm, inputs):
        return compat.aot_inference_capture(gm, inputs, fw)

    return backend


def test_aot_capture_gives_aten_graph():
    seen = {}

    def inspect(gm, inputs):
        seen["targets"] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    f = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, backend=_capturing_backend(inspect))
    with torch.no_grad():
        f(torch.randn(4))
    assert all(t.startswith("aten.") for t in seen["targets"])


def test_module_state_kind_marks_parameters():
    kinds = []

    def backend(gm, inputs):
        kinds.extend(compat.module_state_kind(t) for t in inputs)
        return gm.forward

    m = torch.nn.Linear(3, 3)
    torch.compile(m, backend=backend)(torch.randn(1, 3))
    assert "unguarded" in kinds or len(list(m.parameters())) == 2


def test_statically_true():
    assert compat.statically_true(True)
    assert not compat.statically_true(False)


def test_real_tensor_mode_is_a_context_manager():
    with compat.real_tensor_mode():
        assert torch.ones(2).sum().item() == 2


def test_custom_op_python_impl_is_what_the_dispatcher_runs():
    import llmopt.codegen  # noqa: F401  registers the llmopt ops
    from llmopt.codegen.residual_norm import add_rms_norm_ref

    fn = compat.custom_op_python_impl(torch.ops.llmopt.add_rms_norm.default, "cpu")
    assert fn is not None, "torch.library.custom_op's registry moved: update compat.custom_op_python_impl"
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    for got, want in zip(fn(x, r, w, 1e-6), torch.ops.llmopt.add_rms_norm(x, r, w, 1e-6)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(fn(x, r, w, 1e-6), add_rms_norm_ref(x, r, w, 1e-6)):
        torch.testing.assert_close(got, want)
    assert compat.custom_op_python_impl(torch.ops.aten.add.Tensor, "cpu") is None


def test_inductor_compile_of_a_make_fx_graph_with_real_inputs():
    """What the CPU int8 GEMV does (llmopt/codegen/int8_weight_only_cpu.py): trace an eager
    expression with make_fx on real tensors, compile it with Inductor, call it boxed."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def body(x, w):
        return ((x[:, None, :] * w.to(torch.float32)).sum(-1),)

    x, w = torch.randn(2, 8), torch.randint(-5, 5, (3, 8), dtype=torch.int8)
    run = compat.inductor_compile(make_fx(body)(x, w), [x, w])
    assert getattr(run, "_boxed_call", False)
    (out,) = run([x, w])
    torch.testing.assert_close(out, x @ w.float().t())


def test_op_overloads_and_what_make_fx_splits():
    aten = torch.ops.aten
    assert compat.has_composite_implicit_kernel(aten.linear.default)
    assert compat.has_composite_implicit_kernel(aten.reshape.default)
    assert not compat.has_composite_implicit_kernel(aten.mm.default)
    assert not compat.has_composite_implicit_kernel(aten.silu.default)
    assert compat.is_op_overload(aten.mm.default) and not compat.is_op_overload(torch.nn.functional.silu)


def test_dynamo_control_flow_exceptions_are_recognized():
    import torch._dynamo.exc as dynamo_exc

    assert compat.is_dynamo_control_flow(dynamo_exc.RestartAnalysis())
    tensorify = getattr(dynamo_exc, "TensorifyScalarRestartAnalysis", None)
    if tensorify is not None:
        assert compat.is_dynamo_control_flow(tensorify())
    assert compat.is_dynamo_control_flow(dynamo_exc.SkipFrame("skip"))
    assert not compat.is_dynamo_control_flow(RuntimeError("a real failure"))


def test_the_dynamic_output_shapes_flag_that_messages_name_exists():
    """fuse_moe's hint tells users to set this flag: it must be a real config entry here."""
    import torch._dynamo.config as dynamo_config

    module, _, name = compat.DYNAMIC_OUTPUT_SHAPES_FLAG.rpartition(".")
    assert module == "torch._dynamo.config"
    assert isinstance(getattr(dynamo_config, name), bool)


def test_mark_static_address_is_what_module_state_kind_reads():
    t = torch.zeros(3)
    assert compat.module_state_kind(t) is None
    compat.mark_static_address(t)
    assert compat.module_state_kind(t) in ("guarded", "unguarded")  # what HF's own marks give


def test_fake_tensor_mode_makes_tensors_without_memory():
    with compat.fake_tensor_mode():
        t = torch.empty(1 << 40, dtype=torch.uint8)  # a terabyte: fine without memory
    assert t.shape == (1 << 40,) and t.dtype == torch.uint8


def test_onednn_linear_matches_f_linear_and_traces():
    import pytest
    from torch.fx.experimental.proxy_tensor import make_fx

    if not compat.onednn_linear_available():
        pytest.skip("torch built without oneDNN")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = compat.onednn_linear(x, w, b)
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5
    assert ((compat.onednn_linear(x, w.t().contiguous().t(), None).double() - (want - b.double())).norm()
            / want.norm()).item() <= 1e-5  # a strided (transposed-view) weight works too
    traced = make_fx(compat.onednn_linear, tracing_mode="fake")(x, w, b)  # has a meta kernel: traces
    assert any("_linear_pointwise" in str(n.target) for n in traced.graph.nodes)


def test_compile_options_read_back_from_the_wrapper():
    module = torch.nn.Linear(2, 2)
    options = {"strict": True, "tensor_parallel": None}
    assert compat.compile_options(torch.compile(module, backend="llmopt", options=options)) == options
    assert compat.compile_options(torch.compile(module, backend="llmopt")) == {}
    assert compat.compile_options(torch.compile(module.forward, backend="llmopt", options=options)) == options
    assert compat.compile_options(torch.compile(module, backend="eager")) is None
    assert compat.compile_options(module) is None


def test_is_traced_under_make_fx_and_for_fake_tensors_only():
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []

    def record(x):
        seen.append(compat.is_traced(x))
        return x + 1

    x = torch.randn(3)
    record(x)
    make_fx(record)(x)  # real tensors, proxy mode
    make_fx(record, tracing_mode="fake")(x)
    with compat.fake_tensor_mode() as mode:
        record(mode.from_tensor(x))
    assert seen == [False, True, True, True]


def test_cpu_grouped_mm_multiplies_each_group_by_its_matrix_or_is_absent():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        fn = compat.cpu_grouped_mm(dtype)
        if fn is None:
            continue
        x, w = torch.randn(5, 16).to(dtype), torch.randn(3, 8, 16).to(dtype).transpose(1, 2)
        offs = torch.tensor([2, 2, 5], dtype=torch.int32)  # the middle group is empty
        want = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
        assert torch.allclose(fn(x, w, offs=offs).double(), want.double(), rtol=1e-2, atol=1e-2)


def test_inductor_generated_code_returns_the_result_and_the_source():
    fn = torch.compile(lambda x: (x * 2).sum(), backend="inductor")
    result, code = compat.inductor_generated_code(fn, torch.ones(4))
    assert result.item() == 8 and any("def call" in c for c in code)


# -- the capture cache's wrappers (llmopt/capture_cache.py) -------------------------------
def test_aot_output_plan_inside_the_fw_compiler():
    plans = []
    backend = _capturing_backend(lambda gm, inputs: plans.append(compat.aot_output_plan(len(inputs))))

    def step(x, buf):
        buf.add_(x)
        return x * 2, buf

    with torch.no_grad():
        torch.compile(step, backend=backend)(torch.randn(3), torch.zeros(3))
        torch.compile(lambda x: (x.view(3), x + 1), backend=backend)(torch.randn(3))
    # Dynamo returns ``buf`` itself; the graph writes it in place and bumps its version.
    assert plans[0] is not None and plans[0]["outputs"] == [None] and len(plans[0]["versions"]) == 1
    assert plans[1] is None  # an output aliasing an input: the wrapper regenerates it
    assert compat.aot_output_plan(1) is None  # outside a capture


def test_inductor_cache_dir_and_switch():
    import os

    assert os.path.isdir(compat.inductor_cache_dir())
    assert isinstance(compat.caches_force_disabled(), bool)


def test_functorch_config_items_are_plain_and_sorted():
    items = compat.functorch_config_items()
    assert items and items == sorted(items)
    assert all(isinstance(v, (bool, int, float, str, type(None))) for _, v in items)


def test_op_overload_parts_round_trip():
    op = torch.ops.aten.add.Tensor
    assert compat.op_overload_parts(op) == ("aten", "add", "Tensor")
    assert compat.resolve_op_overload(*compat.op_overload_parts(op)) is op
    try:
        compat.resolve_op_overload("aten", "no_such_op_anywhere", "default")
    except AttributeError:
        pass
    else:
        raise AssertionError("an unknown op resolved")
    assert compat.operator_namespace(op) == "aten"
    assert compat.operator_namespace(torch.ops.aten.add) == "aten"
    assert compat.operator_namespace(len) is None


def test_any_autocast_enabled():
    assert not compat.any_autocast_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compat.any_autocast_enabled()


def test_fake_tensors_from_meta_and_from_inputs():
    mode = compat.fake_tensor_mode()
    base = torch.empty(12, device="meta")
    a = compat.fake_tensor_over_meta(mode, base.as_strided((2, 3), (3, 1), 0), torch.device("cpu"))
    b = compat.fake_tensor_over_meta(mode, base.as_strided((3,), (1,), 6), torch.device("cpu"))
    assert a.device.type == "cpu" and b.storage_offset() == 6
    assert a.untyped_storage()._cdata == b.untyped_storage()._cdata
    f = compat.fake_input(mode, torch.randn(4, 5))
    assert compat.detect_fake_mode([f]) is mode and f.shape == (4, 5)
    assert compat.fx_tensor_metadata(f).shape == (4, 5)


def test_fx_name_state_round_trip():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    for _ in range(3):
        g.erase_node(g.call_function(torch.relu, (x,)))
    state = compat.fx_name_state(g)
    fresh = torch.fx.Graph()
    fresh.placeholder("x")
    compat.restore_fx_name_state(fresh, state)
    assert fresh.call_function(torch.relu, (x,)).name == g.call_function(torch.relu, (x,)).name == "relu_3"


def test_aot_compile_context_makes_factories_fake():
    mode = compat.fake_tensor_mode()
    with compat.aot_compile_context(mode):
        t = torch.arange(4)
    assert compat.detect_fake_mode([t]) is mode


def test_aot_compile_context_leaves_what_it_entered_when_entering_fails(monkeypatch):
    import contextlib

    left = []

    @contextlib.contextmanager
    def recorded(enabled):
        try:
            yield
        finally:
            left.append(enabled)

    class Broken:
        def __enter__(self):
            raise RuntimeError("cannot enter")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.autograd, "set_multithreading_enabled", recorded)
    with pytest.raises(RuntimeError, match="cannot enter"):
        with compat.aot_compile_context(Broken()):
            pass
    assert left == [False]


def test_make_graph_module():
    g = torch.fx.Graph()
    g.output(g.call_function(torch.neg, (g.placeholder("x"),)))
    gm = compat.make_graph_module(torch.nn.Module(), g)
    assert isinstance(gm, torch.fx.GraphModule)
    assert torch.equal(gm(torch.ones(2)), -torch.ones(2))


def test_custom_op_fake_source():
    @torch.library.custom_op("llmopt_test_compat::noop", mutates_args=())
    def noop(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @noop.register_fake
    def _(x):
        return torch.empty_like(x)

    source = compat.custom_op_fake_source(torch.ops.llmopt_test_compat.noop)
    assert source is not None and "def test_custom_op_fake_source" in source  # this module
    assert compat.custom_op_fake_source(torch.ops.llmopt_test_compat.noop.default) == source
    assert compat.custom_op_fake_source(torch.ops.aten.add.Tensor) is None  # not a custom_op


def test_constants_by_reference_flattens_submodule_constants():
    """Inductor's FX-graph-cache hit path reads constants with a flat getattr: a get_attr
    of a submodule's buffer gets a top-level alias (the same tensor, no copy)."""
    root = torch.nn.Module()
    root.sub = torch.nn.Module()
    root.sub.register_buffer("qdata", torch.arange(4.0))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    once = g.call_function(torch.add, (x, g.get_attr("sub.qdata")))
    g.output(g.call_function(torch.add, (once, g.get_attr("sub.qdata"))))
    gm = torch.fx.GraphModule(root, g)
    compat._constants_by_reference(gm)
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert len(targets) == 1, "one alias per constant, however many nodes read it"
    (target,) = targets
    assert "." not in target and getattr(gm, target) is root.sub.qdata
    assert getattr(gm, target)._is_frozen_param
    assert torch.equal(gm(torch.ones(4)), 2 * torch.arange(4.0) + 1)
