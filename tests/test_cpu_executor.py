"""The shipped CPU default: ``inner="auto"`` is Inductor, with llmopt's ops inlined as ATen.

The rest of the suite runs the aten executor (``LLMOPT_CPU_EXECUTOR=aten`` in conftest:
Inductor's C++ compile of every test model would take the suite past its time budget);
this module unsets it and checks, on real Hugging Face architectures, what a user gets:
the executor chosen, the decomposition applied (no ``llmopt`` row-wise op or linear left
as an extern call in the code Inductor generated), and numerics — logits against eager
and an fp64 truth within the tolerance table, greedy tokens equal over a static cache.
"""
from __future__ import annotations

import pytest
import torch

import llmopt
from conftest import assert_close
from llmopt.backend import CPU_EXECUTOR_ENV, default_executor
from llmopt.codegen.cpu_decompositions import cpu_decompositions
from models.tiny import tiny_model, tokens

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture
def shipped_default(monkeypatch):
    monkeypatch.delenv(CPU_EXECUTOR_ENV, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_auto_is_inductor_on_cpu_and_the_variable_overrides_it(monkeypatch):
    monkeypatch.delenv(CPU_EXECUTOR_ENV, raising=False)
    assert default_executor("cpu") == "inductor"
    monkeypatch.setenv(CPU_EXECUTOR_ENV, "aten")
    assert default_executor("cpu") == "aten"
    monkeypatch.setenv(CPU_EXECUTOR_ENV, "fast")
    with pytest.raises(ValueError, match="LLMOPT_CPU_EXECUTOR='fast' is not an executor; use 'aten' or 'inductor'"):
        default_executor("cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_executor_matches_eager_and_fp64(family, shipped_default):
    model = tiny_model(family)
    x = tokens(2, 9)
    with torch.no_grad():
        expected = model(x).logits
        truth = tiny_model(family).double()(x).logits  # same seed: same weights
        got = torch.compile(model, backend="llmopt", options={"strict": True})(x).logits
    report = llmopt.last_report()
    assert report.executor == "inductor", report.fallbacks
    assert_close(got, truth, torch.float32, what=f"{family} vs fp64")
    assert_close(got, expected.double(), torch.float32, what=f"{family} vs eager")


def _greedy(model, forward, prompt, steps=6):
    """Greedy tokens of ``forward`` over a fresh static cache: one prefill, ``steps`` decodes."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    n = prompt.shape[1]
    with torch.no_grad():
        out = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(n), use_cache=True)
        tok, seq = out.logits[:, -1:].argmax(-1), []
        for pos in range(n, n + steps):
            seq.append(int(tok))
            out = forward(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([pos]), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
    return seq


@pytest.mark.parametrize("attention", ["full_capacity", "twin"])
def test_decode_over_a_static_cache_gives_eager_tokens(attention, shipped_default, monkeypatch):
    """Decode attention as Inductor-fused ATen over the 32-slot cache's whole capacity, and
    (bound lowered to 0) as the CPU twin over the valid prefix: eager's greedy tokens."""
    if attention == "twin":
        monkeypatch.setattr("llmopt.codegen.attention_decode_masked.FULL_CAPACITY_MAX_SLOTS", 0)
    model = tiny_model("llama")
    prompt = tokens(1, 7)

    def greedy(forward):
        return _greedy(model, forward, prompt)

    expected = greedy(model.forward)
    assert greedy(torch.compile(model.forward, backend="llmopt", options={"strict": True})) == expected
    report = llmopt.last_report()
    assert report.executor == "inductor"
    # The decode graph still calls llmopt's attention and cache ops (run-time lengths), and
    # nothing the CPU table inlines.
    inlined = {f"llmopt.{op.name().split('::')[1]}.default" for op in cpu_decompositions()}
    assert "llmopt.attention_decode.default" in report.ops_after or "llmopt.attention_prefill.default" in report.ops_after
    assert inlined & set(report.ops_after), "the report lists the ops before Inductor inlines them"


def test_decompositions_compute_what_the_ops_compute():
    """Each table entry against its op on random inputs (the op's own CPU path)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(16, generator=g)
    r = torch.randn(3, 5, 16, generator=g)
    W = torch.randn(24, 16, generator=g)
    b = torch.randn(24, generator=g)
    ops, table = torch.ops.llmopt, cpu_decompositions()
    cases = [
        (ops.rms_norm.default, (x, w, 1e-6, 0.0)),
        (ops.add_rms_norm.default, (x, r, w, 1e-6, 1.0)),
        (ops.layer_norm.default, (x, w, w, 1e-5)),
        (ops.add_layer_norm.default, (x, r, w, None, 1e-5)),
        (ops.gated_activation.default, (x, r, "silu")),
        (ops.linear.default, (x, W, b, None, "gelu_tanh", "")),
        (ops.linear.default, (x, W[:16], None, r, "", "1:mm,inf:mm")),
    ]
    for op, args in cases:
        want, got = op(*args), table[op](*args)
        for a, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert_close(a, e, torch.float32, what=str(op))


@pytest.mark.parametrize("capacity", [16, 200])
def test_decode_attention_is_inlined_for_small_caches_only(capacity):
    """Retraced for Inductor (make_fx with the CPU table), ``attention_decode`` over a cache
    of at most ``FULL_CAPACITY_MAX_SLOTS`` slots becomes ATen (no call left), over a larger
    one a call to its CPU twin; called (the aten executor), it is the op's CPU function.
    All three against the op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmopt.codegen.attention_decode_masked import FULL_CAPACITY_MAX_SLOTS

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 1, 16, generator=g)
    kc, vc = (torch.randn(2, 2, capacity, 16, generator=g) for _ in range(2))
    lens = torch.tensor([capacity // 2, capacity // 2])
    mask = torch.ones(2, 1, 1, capacity, dtype=torch.bool)
    op, table = torch.ops.llmopt.attention_decode.default, cpu_decompositions()

    def run(q, kc, vc, lens, mask):
        return op(q, kc, vc, lens, mask, 0.25)

    gm = make_fx(run, decomposition_table=table, tracing_mode="fake")(q, kc, vc, lens, mask)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    twin_called = any("llmopt_cpu.attention_decode" in t for t in targets)
    assert twin_called == (capacity > FULL_CAPACITY_MAX_SLOTS)
    assert not any(t.startswith("llmopt.") for t in targets)
    want = op(q, kc, vc, lens, mask, 0.25)
    assert_close(gm(q, kc, vc, lens, mask), want, torch.float32, what="retraced")
    assert_close(table[op](q, kc, vc, lens, mask, 0.25), want, torch.float32, what="called")


def test_cache_write_decompositions_write_what_the_ops_write():
    """The KV-cache writes inline as ``index_put_`` (an in-place scatter in Inductor's code):
    the caches after the decomposition equal the caches after the op, the rotated q too."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hk, S, S_max, D = 2, 4, 2, 3, 16, 8
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hk, Hk))
    cos, sin = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    positions = torch.tensor([3, 4, 5])
    ops, table = torch.ops.llmopt, cpu_decompositions()
    caches = [torch.randn(B, Hk, S_max, D, generator=g) for _ in range(2)]
    want = [c.clone() for c in caches]
    got = [c.clone() for c in caches]
    ops.kv_cache_append(want[0], want[1], positions, k, v)
    table[ops.kv_cache_append.default](got[0], got[1], positions, k, v)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    q_want = ops.rope_kv_cache_append(q, k, v, cos, sin, D, False, want[0], want[1], positions)
    q_got = table[ops.rope_kv_cache_append.default](q, k, v, cos, sin, D, False, got[0], got[1], positions)
    assert_close(q_got, q_want, torch.float32, what="rotated q")
    for a, e in zip(got, want):
        assert_close(a, e, torch.float32, what="cache after rope + append")


def test_cpu_twins_share_the_schema_and_run_the_cpu_function():
    """An opaque op's twin has the op's schema under ``llmopt_cpu`` and computes (and
    mutates) what the op does; decompositions route only llmopt ops that have one."""
    import llmopt.codegen.int8_weight_only  # noqa: F401 - registers the op
    from llmopt.codegen.cpu_decompositions import TWIN_NAMESPACE, cpu_twin, twin_calls

    ops = torch.ops.llmopt
    for op in (ops.attention_decode.default, ops.kv_cache_append.default, ops.int8_weight_only_linear.default):
        twin = cpu_twin(op)
        assert str(twin._schema) == str(op._schema).replace("llmopt::", f"{TWIN_NAMESPACE}::", 1)
        assert cpu_twin(op) is twin  # registered once
    assert cpu_twin(torch.ops.aten.mm.default) is None
    assert set(twin_calls([ops.attention_decode.default, torch.ops.aten.mm.default])) == {ops.attention_decode.default}

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1, 8, generator=g)
    kc, vc = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    lens = torch.tensor([5, 12])
    want = ops.attention_decode(q, kc, vc, lens, None, 0.3)
    assert torch.equal(cpu_twin(ops.attention_decode.default)(q, kc, vc, lens, None, 0.3), want)
    same = torch.tensor([9, 9])  # the decode case: the twin's traced path (SDPA, no checks)
    assert torch.equal(cpu_twin(ops.attention_decode.default)(q, kc, vc, same, None, 0.3),
                       ops.attention_decode(q, kc, vc, same, None, 0.3))
    with pytest.raises(ValueError, match="kv_lens must lie in"):  # value checks stay per call
        cpu_twin(ops.attention_decode.default)(q, kc, vc, torch.tensor([13, 13]), None, 0.3)
    k, v = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    cpu_twin(ops.kv_cache_append.default)(kc, vc, torch.tensor([7]), k, v)
    assert torch.equal(kc[:, :, 7:8], k) and torch.equal(vc[:, :, 7:8], v)
    from torch._subclasses.fake_tensor import FakeTensorMode

    short_lens = lens[:1]
    with pytest.raises(ValueError, match="kv_lens"):  # the op's own contract, through the fake too
        with FakeTensorMode() as mode:
            fq, fk, fv, fl = (mode.from_tensor(t) for t in (q, kc, vc, short_lens))
            cpu_twin(ops.attention_decode.default)(fq, fk, fv, fl, None, 0.3)


def test_prefill_attention_twin_runs_sdpa_in_the_input_dtype():
    """``attention_prefill``'s twin runs ``attention_prefill_cpu_traced`` (the op's contract
    checked at trace time): in bf16 no fp32 copy of q, k, v, within the bf16 tolerance of
    the fp64 truth; the fake (the op's own) still checks the contract."""
    from llmopt.codegen.attention_prefill_ref import attention_prefill_cpu_traced, attention_prefill_ref
    from llmopt.codegen.cpu_decompositions import TRACED_CPU_IMPLS, cpu_twin

    assert TRACED_CPU_IMPLS["attention_prefill"] is attention_prefill_cpu_traced
    twin = cpu_twin(torch.ops.llmopt.attention_prefill.default)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 6, 16, generator=g).transpose(1, 2).bfloat16()
    kc, vc = (torch.randn(2, 2, 20, 16, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(20)[None, :] <= torch.arange(9)[:, None])[None, None].expand(2, 1, 9, 20)
    lens, offsets = torch.tensor([9, 9], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)
    args = (mask, lens, offsets, 0.25, False, 0, 0.0)
    with torch.profiler.profile() as prof:
        got = twin(q, kc, vc, *args)
    assert "aten::_to_copy" not in {e.key for e in prof.key_averages()}
    truth = attention_prefill_ref(q.double(), kc.double(), vc.double(), *args)
    assert_close(got, truth, torch.bfloat16, what="prefill twin")
    from torch._subclasses.fake_tensor import FakeTensorMode

    short_lens = lens[:1]
    with pytest.raises(ValueError, match="kv_lens"):
        with FakeTensorMode() as mode:
            fq, fk, fv, fm, fl, fo = (mode.from_tensor(t) for t in (q, kc, vc, mask, short_lens, offsets))
            twin(fq, fk, fv, fm, fl, fo, 0.25, False, 0, 0.0)


def test_quantized_model_runs_its_ops_through_twins(shipped_default):
    """int8 weight-only under the shipped executor: the generated code calls the twins (no
    ``llmopt::`` op through the custom-op wrapper), logits equal the aten executor's."""
    model = tiny_model("llama")
    x = tokens(1, 5)
    with torch.no_grad():
        got = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": "int8"})(x).logits
        assert llmopt.last_report().executor == "inductor"
        torch._dynamo.reset()
        want = torch.compile(tiny_model("llama"), backend="llmopt",
                             options={"strict": True, "quantize": "int8", "inner": "aten"})(x).logits
    assert_close(got, want, torch.float32, what="int8, inductor vs aten executor")


@pytest.mark.parametrize("executor", ["aten", "inductor"])
def test_bf16_decode_gives_eager_tokens(executor, shipped_default, monkeypatch):
    """bf16 decode (M = 1) runs the generated bf16 GEMV (codegen/bf16_gemv_cpu.py): its
    compiled kernel under the aten executor, its expression inlined under Inductor; both
    give eager's greedy tokens."""
    import llmopt.codegen.bf16_gemv_cpu as bcpu
    from llmopt.codegen.int8_weight_only_cpu import CompiledCpuGemv

    monkeypatch.setenv(CPU_EXECUTOR_ENV, executor)
    monkeypatch.setattr(bcpu, "BF16_GEMVS", CompiledCpuGemv(compiler=bcpu.compile_bf16_gemv, label="bf16"))  # counts this test's kernels
    model = tiny_model("llama", dtype=torch.bfloat16)
    prompt = tokens(1, 7)
    expected = _greedy(model, model.forward, prompt)
    assert _greedy(model, torch.compile(model.forward, backend="llmopt", options={"strict": True}), prompt) == expected
    assert llmopt.last_report().executor == executor
    if executor == "aten":
        assert len(bcpu.BF16_GEMVS) > 0, "the decode linears ran the compiled bf16 GEMV"
    else:
        assert len(bcpu.BF16_GEMVS) == 0, "Inductor generates the GEMV in the graph's code"


def test_fp32_decode_row_is_the_generated_gemv_under_inductor_only():
    """fp32 at M <= 4 (linear.FP32_GEMV_MAX_M): under Inductor's retrace (make_fx) the linear
    is the GEMV's multiply-and-reduce expression, which Inductor generates in the graph's
    C++ (above one row with the input stored once: a fresh product by 1.0 viewed onto
    itself); more rows, and a call (aten executor, eager), stay oneDNN's linear. Both forms
    against the fp64 truth, epilogue included."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmopt import compat
    from llmopt.codegen.linear import FP32_GEMV_MAX_M, cpu_linear_kernel, linear_cpu

    if not compat.onednn_linear_available():
        pytest.skip("torch built without oneDNN: fp32 CPU linears run F.linear")
    assert [cpu_linear_kernel(torch.float32, m) for m in (1, 2, 4, 5, None)] == ["fp32_gemv"] * 3 + ["onednn"] * 2
    # large K (llama-1b's 2048 / 5632) stays on oneDNN: measured faster there (FP32_GEMV_MAX_K),
    # except a small weight (FP32_GEMV_SMALL_WEIGHT: llama-100m's down_proj, llama-1b's o_proj)
    assert [cpu_linear_kernel(torch.float32, 1, k) for k in (768, 1024, 2048)] == ["fp32_gemv", "fp32_gemv", "onednn"]
    shapes = [(768, 2048), (2048, 2048), (2560, 1536), (2560, 2048), (11264, 2048), (768, 5632), (256, 4096)]
    assert [cpu_linear_kernel(torch.float32, 1, k, n) for n, k in shapes] == \
        ["fp32_gemv", "fp32_gemv", "fp32_gemv", "onednn", "onednn", "onednn", "onednn"]
    assert cpu_linear_kernel(torch.float32, FP32_GEMV_MAX_M + 1, 2048, 768) == "onednn"
    assert FP32_GEMV_MAX_M == 4
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(2 * 24, 40, generator=g), torch.randn(2 * 24, generator=g)
    r = torch.randn(1, 1, 24, generator=g)

    def run(x, w, b, r):
        return linear_cpu(x, w, b, r.expand(*x.shape[:-1], 24), "silu")

    def targets(m):
        gm = make_fx(run, tracing_mode="fake")(torch.randn(m, 1, 40), w, b, r)
        return gm, {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    decode_gm, decode = targets(1)
    assert "aten.sum.dim_IntList" in decode and not any("linear_pointwise" in t for t in decode)
    assert "aten.as_strided.default" not in decode, "one row: the input is read once per weight row anyway"
    rows_gm, rows = targets(FP32_GEMV_MAX_M)
    assert {"aten.as_strided.default", "aten.sum.dim_IntList"} <= rows and not any("linear_pointwise" in t for t in rows)
    assert any("linear_pointwise" in t for t in targets(FP32_GEMV_MAX_M + 1)[1])
    for m, gm in ((1, decode_gm), (FP32_GEMV_MAX_M, rows_gm)):
        x = torch.randn(m, 1, 40, generator=g)
        y = (x.double() @ w.double().T + b.double())
        truth = torch.nn.functional.silu(y[..., :24]) * y[..., 24:] + r.double()
        assert_close(gm(x, w, b, r), truth, torch.float32, what=f"traced fp32 GEMV vs fp64, M={m}")
        assert_close(run(x, w, b, r), truth, torch.float32, what=f"called (oneDNN) vs fp64, M={m}")
