"""select_linear_kernel: kernels per M bucket from the tuning table, epilogues fused on CUDA.

How the CUDA branch is tested without a GPU: the pass branches on ``ctx.device`` only and
reads the device name through its module's ``device_name``. The ``cuda_branch`` fixture
compiles the model through the real backend on CPU with every earlier pass, then runs
this pass with a copy of the same ``PassContext`` whose device is ``cuda`` (and a fake
GPU name), inside the same fake mode; the rewritten graph then runs on CPU, where
``llmopt.linear`` executes its PyTorch reference — or, with the ``triton_kernels``
fixture, the chosen GEMV / flat GEMM Triton kernels in the interpreter.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from conftest import assert_close
from llmopt.codegen import linear as linear_module
from llmopt.codegen.tuning_table import (
    M_BUCKETS,
    TuningEntry,
    TuningTable,
    format_kernels,
    get_active_table,
    heuristic_kernel,
    parse_kernels,
)
from llmopt.passes import select_linear_kernel as slk
from models.tiny import NUM_LAYERS, tiny_model, tokens
from passes.final_graphs import capture_final_graphs

PASS = "select_linear_kernel"
GPU = "NVIDIA Test GPU"
BEFORE = ["normalize", "merge_parallel_linears", "fuse_residual_norm", "fuse_gated_activation"]
LINEAR = torch.ops.llmopt.linear.default


# No test reads or writes the user's tuning table (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("isolated_tuning_tables")


@pytest.fixture
def cuda_branch(monkeypatch):
    """Run this pass as on CUDA (see the module docstring); returns the final graphs, the
    last compiled one last."""
    return capture_final_graphs(monkeypatch, as_cuda=True, gpu_name=GPU)


def compile_run(module, *inputs, only=BEFORE, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend="llmopt", options={"strict": True, "only": list(only), **options})(*inputs)
    return out, llmopt.last_report()


def write_table(path, shapes, dtype, choice, device=GPU, config=None):
    """A hand-written table: ``choice`` {bucket: kernel} for every (N, K) in ``shapes``, each
    entry with ``config`` (default: none, the kernel's heuristic config)."""
    table = TuningTable(path, device_name=device)
    for N, K in shapes:
        for bucket, kernel in choice.items():
            table.put(device, dtype, N, K, bucket, TuningEntry(kernel, dict(config or {}), 1.0, 2.0))
    table.save(path)
    return str(path)


ALL_TRITON = {b: ("gemv" if b == "1" else "flat_gemm") for b in M_BUCKETS}


def linear_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == LINEAR]


def ops(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


# --------------------------------------------------------------------------- modules
class Wide(nn.Module):
    """One linear big enough (N*K >= 2**18) for the heuristic to pick Triton kernels."""

    def __init__(self, n=1024, k=512):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.lin(x)


class Residual(nn.Module):
    """``x + lin(x)`` in either order; ``extra_user`` gives the linear output a second user."""

    def __init__(self, d=32, order="residual_first", extra_user=False, broadcast=False):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.order, self.extra_user, self.broadcast = order, extra_user, broadcast
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        y = self.lin(x)
        r = self.shift if self.broadcast else x
        out = r + y if self.order == "residual_first" else y + r
        return (out, y * 2) if self.extra_user else out


class GatedMLP(nn.Module):
    """Llama's MLP plus the residual: ``x + down(act(gate(x)) * up(x))``."""

    def __init__(self, d=32, inter=48, act="silu", bias=False, leak_gate=False):
        super().__init__()
        self.gate = nn.Linear(d, inter, bias=bias)
        self.up = nn.Linear(d, inter, bias=bias)
        self.down = nn.Linear(inter, d, bias=bias)
        self.act, self.leak_gate = act, leak_gate

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        a = {"silu": F.silu(g), "gelu": F.gelu(g), "gelu_tanh": F.gelu(g, approximate="tanh")}[self.act]
        out = x + self.down(a * u)
        return (out, g.sum()) if self.leak_gate else out


# --------------------------------------------------------------------------- CPU branch
def test_cpu_rewrites_every_linear_to_the_op_and_reports_it():
    model = tiny_model("llama")
    x = tokens(2, 7)
    out, report = compile_run(model, x, only=[*BEFORE, PASS])
    assert_close(out.logits, model(x).logits.detach(), torch.float32)
    # Merged QKV, o_proj, merged gate/up, down_proj per layer, and lm_head.
    assert report.rewrites_by_pass()[PASS] == 4 * NUM_LAYERS + 1 == report.ops_after["llmopt.linear.default"]
    assert "aten.linear.default" not in report.ops_after
    choices = [k for k in report.kernel_choices if k.op == "linear"]
    assert len(choices) == 4 * NUM_LAYERS + 1
    assert all(set(parse_kernels(k.kernel).values()) == {"mm"} and "CPU: oneDNN linear" in k.reason for k in choices)
    if linear_module.onednn_runs(torch.float32):  # decode rows: the generated GEMV under Inductor (FP32_GEMV_MAX_M)
        for k in choices:
            reasons = {b.m_bucket: b.reason for b in k.buckets}
            assert all("generated fp32 GEMV" in reasons[m] for m in ("1", "2", "4"))
            assert reasons["8"] == "CPU: oneDNN linear on the plain weight"
    shapes = sorted(slk.parse_shape_prefix(k.reason)[:2] for k in choices)
    assert shapes == sorted([(128, 64), (64, 64), (320, 64), (64, 160)] * NUM_LAYERS + [(256, 64)])
    assert {k.layer for k in choices} >= {"lm_head", "model.layers.0.mlp.down_proj"}
    assert "kernels:" in str(report)


def test_cpu_bf16_reports_the_generated_gemv_for_decode_buckets():
    """bf16 on CPU: same rewrite count as fp32; buckets M <= 4 say the generated bf16 GEMV
    runs (codegen/bf16_gemv_cpu.py; M 3-4 only inlined in Inductor's code), larger ones the
    PyTorch op (linear.cpu_linear_kernel)."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    x = tokens(1, 1)
    out, report = compile_run(model, x, only=[*BEFORE, PASS])
    truth = copy.deepcopy(model).double()(x).logits.detach()  # the same bf16 weights, in fp64
    assert_close(out.logits, truth, torch.bfloat16)
    assert report.rewrites_by_pass()[PASS] == 4 * NUM_LAYERS + 1
    for k in (k for k in report.kernel_choices if k.op == "linear"):
        reasons = {b.m_bucket: b.reason for b in k.buckets}
        assert all("generated bf16 GEMV" in reasons[b] for b in ("1", "2", "4")), reasons
        assert "Inductor executor's code" in reasons["4"] and "Inductor" not in reasons["2"], reasons
        assert all(reasons[b] == "CPU: the PyTorch op" for b in ("8", "64", "inf")), reasons


def test_quantized_linears_are_left_alone_and_listed():
    from llmopt.codegen import int4_weight_only, int8_weight_only, w8a8  # noqa: F401  registers the quantized ops

    class Int8Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randint(-127, 128, (24, 32), dtype=torch.int8))
            self.register_buffer("s", torch.rand(24) / 100)

        def forward(self, x):
            return torch.ops.llmopt.int8_weight_only_linear(x, self.w, self.s, None)

    m = Int8Linear().eval()
    x = torch.randn(3, 32)
    out, report = compile_run(m, x, only=[PASS])
    assert_close(out, m(x), torch.float32)
    (choice,) = report.kernel_choices
    assert choice.kernel == "int8_weight_only_linear" and "quantized" in choice.reason


# --------------------------------------------------------------------------- the table
def test_dispatch_per_bucket_follows_the_table(cuda_branch, tmp_path):
    # Unusual choices, so a match cannot come from the heuristic; buckets 32..inf missing.
    table = {"1": "flat_gemm", "2": "gemv", "4": "mm", "8": "gemv", "16": "flat_gemm"}
    path = write_table(tmp_path / "t.json", [(1024, 512)], torch.float32, table)
    m = Wide().eval()
    x = torch.randn(3, 512)
    out, report = compile_run(m, x, tuning_table=path)
    assert_close(out, m(x).detach(), torch.float32)
    (node,) = linear_nodes(cuda_branch[-1])
    expected = {b: table.get(b) or heuristic_kernel(GPU, torch.float32, 1024, 512, b)[0] for b in M_BUCKETS}
    assert parse_kernels(node.args[5]) == expected
    (choice,) = report.kernel_choices
    assert choice.kernel == node.args[5] == format_kernels(expected)
    assert "M 1: flat_gemm (tuning table" in choice.reason and "M 32: flat_gemm (heuristic" in choice.reason
    assert report.rewrites_by_pass()[PASS] == 1


def test_each_compiled_graph_keeps_its_own_table(cuda_branch, tmp_path, monkeypatch):
    """Compiling model B with another table changes neither model A's kernels nor the
    configs A launches, nor the process-wide table (issue 21: the option used to call
    set_active_table, so B's compile silently retuned A)."""
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")  # the flat GEMM runs in the interpreter
    monkeypatch.setattr(linear_module, "device_name", lambda device: GPU)  # the op's table key, as on the GPU
    launched = []
    launch = linear_module.flat_gemm_triton
    monkeypatch.setattr(linear_module, "flat_gemm_triton",
                        lambda *a, **k: launched.append(k.get("config")) or launch(*a, **k))
    config_a = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
    config_b = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}
    path_a = write_table(tmp_path / "a.json", [(1024, 512)], torch.float32, {"2": "flat_gemm"}, config=config_a)
    path_b = write_table(tmp_path / "b.json", [(1024, 512)], torch.float32, {"2": "flat_gemm"}, config=config_b)
    default = get_active_table()
    a, b = Wide().eval(), Wide().eval()
    x = torch.randn(2, 512)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled_a = torch.compile(a, backend="llmopt", options={"strict": True, "only": BEFORE,
                                                                 "tuning_table": path_a})
        compiled_a(x)
        (choice_a,) = llmopt.last_report().kernel_choices
        compiled_b = torch.compile(b, backend="llmopt", options={"strict": True, "only": BEFORE,
                                                                 "tuning_table": path_b})
        compiled_b(x)
        (choice_b,) = llmopt.last_report().kernel_choices
        launched.clear()
        out_a, out_b = compiled_a(x), compiled_b(x)
    assert launched == [config_a, config_b]
    assert_close(out_a, a(x).detach(), torch.float32)
    assert_close(out_b, b(x).detach(), torch.float32)
    assert "2:flat_gemm[BLOCK_M=16,BLOCK_N=64," in choice_a.kernel and "BLOCK_N=128" in choice_b.kernel
    assert get_active_table() is default  # the process-wide table is left alone


def test_the_table_is_resolved_per_compile_and_never_installed(tmp_path, monkeypatch):
    """resolve_tuning_table (what the backend puts in PassContext.tuning_table): no table
    off CUDA or with autotune="off"; the file of tuning_table= loaded for this compile only;
    else the default table. Resolving never changes the process-wide table."""
    from llmopt.options import Options

    monkeypatch.setattr(slk, "device_name", lambda device: GPU)
    path = write_table(tmp_path / "t.json", [(1024, 512)], torch.float32, {"1": "gemv"})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default = get_active_table()
    assert slk.resolve_tuning_table(Options(tuning_table=path), cpu) is None
    assert slk.resolve_tuning_table(Options(tuning_table=path, autotune="off"), cuda) is None
    assert slk.resolve_tuning_table(Options(), cuda) is default
    mine = slk.resolve_tuning_table(Options(tuning_table=path), cuda)
    assert mine is not default and mine.get(GPU, torch.float32, 1024, 512, "1").kernel == "gemv"
    assert get_active_table() is default


def _heuristic_string(N, K, dtype=torch.float32):
    return format_kernels({b: heuristic_kernel(GPU, dtype, N, K, b)[0] for b in M_BUCKETS})


@pytest.mark.parametrize("damage", ["bad json", "not utf-8", "malformed entry", "other device", "other version"])
def test_unusable_table_falls_back_to_the_heuristic_with_a_warning(cuda_branch, tmp_path, damage):
    path = tmp_path / "t.json"
    write_table(path, [(1024, 512)], torch.float32, {b: "mm" for b in M_BUCKETS},
                device="Some Other GPU" if damage == "other device" else GPU)
    data = json.loads(path.read_text())
    if damage == "bad json":
        path.write_text('{"format": "llmopt-tuning-table", "entries": [')
    elif damage == "not utf-8":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "malformed entry":  # every entry (each is skipped with its own warning)
        for entry in data["entries"]:
            entry["N"] = "many"
        path.write_text(json.dumps(data))
    elif damage == "other version":
        data["triton_version"] = "0.0.1"
        path.write_text(json.dumps(data))
    m = Wide().eval()
    x = torch.randn(2, 512)
    match = "entry 0 .*skipped" if damage == "malformed entry" else "ignoring the tuning table"
    with pytest.warns(RuntimeWarning, match=match):
        out, report = compile_run(m, x, tuning_table=str(path))
    assert_close(out, m(x).detach(), torch.float32)
    (choice,) = report.kernel_choices
    assert choice.kernel == _heuristic_string(1024, 512)
    assert "tuning table" not in choice.reason and "heuristic" in choice.reason


def test_autotune_off_uses_the_heuristic_only(cuda_branch, tmp_path):
    path = write_table(tmp_path / "t.json", [(1024, 512)], torch.float32, {b: "mm" for b in M_BUCKETS})
    _, report = compile_run(Wide().eval(), torch.randn(2, 512), tuning_table=path, autotune="off")
    assert report.kernel_choices[0].kernel == _heuristic_string(1024, 512)


def test_autotune_on_times_missing_buckets_and_saves(cuda_branch, tmp_path, monkeypatch):
    calls = []

    def fake_tune_shape(N, K, M, dtype, device="cuda", *, sweep=True, **kw):
        assert type(torch.ones(1)) is torch.Tensor, "timing must run outside the compiler's fake mode"
        assert sweep is False  # compile-time tuning times the heuristic configs only
        calls.append((N, K, M))
        return TuningEntry("gemv" if M == 1 else "mm", {}, 5.0, 10.0)

    monkeypatch.setattr(slk, "tune_shape", fake_tune_shape)
    path = write_table(tmp_path / "t.json", [(1024, 512)], torch.float32, {"2": "flat_gemm"})
    _, report = compile_run(Wide().eval(), torch.randn(2, 512), tuning_table=path, autotune="on")
    assert sorted(M for _, _, M in calls) == [1, 4, 8, 16, 32, 64, 256]  # bucket "2" was in the table
    assert report.kernel_choices[0].kernel == "1:gemv,2:flat_gemm,4:mm,8:mm,16:mm,32:mm,64:mm,inf:mm"
    assert len(TuningTable.load(path, device_name=GPU)) == 8
    assert any("timed 7" in n for n in report.notes)


# --------------------------------------------------------------------------- CUDA branch rewrites
def test_all_mm_linears_stay_aten_on_cuda(cuda_branch):
    m = Residual().eval()  # 32 x 32: tiny weight, the heuristic says mm for every bucket
    x = torch.randn(4, 32)
    out, report = compile_run(m, x)
    assert_close(out, m(x).detach(), torch.float32)
    assert report.rewrites_by_pass()[PASS] == 0 and not linear_nodes(cuda_branch[-1])
    (choice,) = report.kernel_choices
    assert choice.kernel == "mm" and "tiny weight" in choice.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_cuda_branch(cuda_branch, tmp_path, dtype):
    """Every linear becomes llmopt.linear; gate/up absorbs the gated activation; residual
    adds stay in add_rms_norm (fuse_residual_norm took them)."""
    model = tiny_model("llama", dtype)
    shapes = [(128, 64), (64, 64), (320, 64), (64, 160), (256, 64)]
    path = write_table(tmp_path / "t.json", shapes, dtype, ALL_TRITON)
    x = tokens(2, 7)
    out, report = compile_run(model, x, tuning_table=path)
    assert_close(out.logits, model(x).logits.detach(), dtype)
    gm = cuda_branch[-1]
    lins = linear_nodes(gm)
    assert report.rewrites_by_pass()[PASS] == len(lins) == 4 * NUM_LAYERS + 1
    assert sum(n.args[4] == "silu" for n in lins) == NUM_LAYERS  # gated epilogue per layer
    assert sum(n.args[3] is not None for n in lins) == 0  # residuals stay in add_rms_norm
    assert ops(gm, torch.ops.llmopt.gated_activation.default) == 0
    assert ops(gm, torch.ops.llmopt.add_rms_norm.default) == 2 * NUM_LAYERS
    assert ops(gm, torch.ops.aten.linear.default) == 0
    assert all(k.kernel == format_kernels(ALL_TRITON) for k in report.kernel_choices)
    assert len(report.kernel_choices) == len(lins)


@pytest.mark.parametrize(
    "act,dtype,kernels",
    [("silu", torch.float32, "triton"), ("silu", torch.bfloat16, "triton"), ("gelu", torch.float32, "reference"),
     ("gelu_tanh", torch.bfloat16, "reference")],
)
def test_gated_and_residual_epilogues(cuda_branch, tmp_path, monkeypatch, act, dtype, kernels):
    monkeypatch.setenv("LLMOPT_KERNELS", kernels)  # "triton": GEMV / flat GEMM in the interpreter
    launched = []
    for name in ("gemv_triton", "flat_gemm_triton"):
        launch = getattr(linear_module, name)
        monkeypatch.setattr(linear_module, name, lambda *a, _f=launch, _n=name, **k: launched.append(_n) or _f(*a, **k))
    m = GatedMLP(act=act, bias=True).to(dtype).eval()
    path = write_table(tmp_path / "t.json", [(96, 32), (32, 48)], dtype, ALL_TRITON)
    x = torch.randn(1, 3, 32, dtype=dtype)  # M = 3: flat_gemm
    out, report = compile_run(m, x, tuning_table=path)
    assert_close(out, m(x).detach(), dtype)
    gate_up, down = linear_nodes(cuda_branch[-1])
    assert gate_up.args[4] == act and gate_up.args[3] is None  # [gate; up] rows, output width I
    assert down.args[4] == "" and down.args[3] is not None  # + x in the epilogue
    assert report.rewrites_by_pass()[PASS] == 2
    assert ops(cuda_branch[-1], torch.ops.aten.add.Tensor) == 0
    assert ops(cuda_branch[-1], torch.ops.llmopt.gated_activation.default) == 0
    details = [r.detail for r in report.rewrites if r.pass_name == PASS]
    assert f"gated {act}" in details[0] and "+ residual" in details[1]
    if kernels == "reference":
        assert launched == []
        return
    assert launched == ["flat_gemm_triton"] * 2
    x1 = torch.randn(1, 1, 32, dtype=dtype)  # a decode step: M = 1 takes the GEMV
    out1, _ = compile_run(m, x1, tuning_table=path)
    assert_close(out1, m(x1).detach(), dtype)
    assert launched[2:] == ["gemv_triton"] * 2


@pytest.mark.parametrize("order", ["residual_first", "linear_first"])
def test_residual_add_in_either_order(cuda_branch, tmp_path, order):
    m = Residual(order=order).eval()
    path = write_table(tmp_path / "t.json", [(32, 32)], torch.float32, ALL_TRITON)
    x = torch.randn(5, 32)
    out, _ = compile_run(m, x, tuning_table=path)
    assert_close(out, m(x).detach(), torch.float32)
    (node,) = linear_nodes(cuda_branch[-1])
    assert node.args[3] is not None
    assert ops(cuda_branch[-1], torch.ops.aten.add.Tensor) == 0


@pytest.mark.parametrize("case", ["extra_user", "broadcast", "promotion"])
def test_residual_not_fused_when_the_graph_forbids(cuda_branch, tmp_path, case):
    m = Residual(extra_user=case == "extra_user", broadcast=case == "broadcast").eval()
    path = write_table(tmp_path / "t.json", [(32, 32)], torch.float32, ALL_TRITON)
    x = torch.randn(5, 32)
    if case == "promotion":  # a bf16 linear added to an fp32 stream promotes the sum
        m = m.to(torch.bfloat16)
        path = write_table(tmp_path / "t.json", [(32, 32)], torch.bfloat16, ALL_TRITON)

        class Promote(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x, r):
                return r + self.inner.lin(x)

        m, args = Promote(m).eval(), (x.to(torch.bfloat16), torch.randn(5, 32))
    else:
        args = (x,)
    out, report = compile_run(m, *args, tuning_table=path)
    expected = m(*args)
    if not isinstance(out, tuple):
        out, expected = (out,), (expected,)
    for a, e in zip(out, expected):
        assert_close(a, e.detach(), a.dtype)
    (node,) = linear_nodes(cuda_branch[-1])
    assert node.args[3] is None
    assert report.rewrites_by_pass()[PASS] == 1
    if case != "extra_user":
        assert any(nm.pass_name == PASS and "residual add" in nm.reason for nm in report.near_misses)


def test_gated_not_fused_when_a_half_has_another_user(cuda_branch, tmp_path):
    m = GatedMLP(leak_gate=True).eval()
    path = write_table(tmp_path / "t.json", [(96, 32), (32, 48)], torch.float32, ALL_TRITON)
    x = torch.randn(2, 32)
    out, report = compile_run(m, x, tuning_table=path)
    for a, e in zip(out, m(x)):
        assert_close(a, e.detach(), torch.float32)
    gate_up = linear_nodes(cuda_branch[-1])[0]
    assert gate_up.args[4] == ""
    assert ops(cuda_branch[-1], torch.ops.llmopt.gated_activation.default) == 1
    assert any(nm.pass_name == PASS and "other users" in nm.reason for nm in report.near_misses)


def test_unfrozen_weight_is_a_near_miss(cuda_branch):
    class Functional(nn.Module):
        def forward(self, x, w):
            return F.linear(x, w)

    x, w = torch.randn(2, 512), torch.randn(1024, 512)
    out, report = compile_run(Functional(), x, w)
    assert_close(out, F.linear(x, w), torch.float32)
    assert report.kernel_choices[0].kernel == "mm" and "not a frozen constant" in report.kernel_choices[0].reason
    assert any("not a frozen constant" in nm.reason for nm in report.near_misses)


def test_dynamic_rows_keep_one_graph(cuda_branch, tmp_path):
    m = GatedMLP().eval()
    path = write_table(tmp_path / "t.json", [(96, 32), (32, 48)], torch.float32, ALL_TRITON)
    torch._dynamo.reset()
    f = torch.compile(m, backend="llmopt", dynamic=True, options={"strict": True, "only": BEFORE, "tuning_table": path})
    with torch.no_grad():
        for seq in (3, 5, 9):
            x = torch.randn(2, seq, 32)
            assert_close(f(x), m(x), torch.float32)
    gate_up, down = linear_nodes(cuda_branch[-1])
    assert gate_up.args[4] == "silu" and down.args[3] is not None


def test_shape_prefix_round_trips():
    assert slk.parse_shape_prefix(slk.shape_prefix(12288, 4096, torch.bfloat16) + "; M 1: gemv") == (
        12288, 4096, "bfloat16")
    assert slk.parse_shape_prefix("no shape here") is None
