"""The generated CPU bf16 GEMV (llmopt/codegen/bf16_gemv_cpu.py) vs F.linear and an fp64
truth, and how ``llmopt::linear`` on CPU routes bf16 calls to it (``linear.cpu_linear_kernel``):
its compiled kernel when called, its expression when traced for Inductor, ``F.linear``
above ``BF16_GEMV_MAX_M`` rows or when no kernel can be compiled.

The truth is ``F.linear`` in fp64 on the same bf16 values, tolerance the bf16 row of the
table. Each new (M, N, K, bias) signature compiles one Inductor kernel (~0.3-1 s), hence
the small hypothesis budget of the CI profile. Outputs are Inductor's own buffers (no
``out=`` to poison); ``assert_close`` fails on any non-finite element instead.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from conftest import assert_close

import llmopt.codegen.bf16_gemv_cpu as bcpu
from llmopt.codegen.int8_weight_only_cpu import CompiledCpuGemv
from llmopt.codegen.linear import cpu_linear_kernel, linear_cpu, linear_ref

BF16 = torch.bfloat16


def _f64(t):
    return None if t is None else t.to(torch.float64)


def _case(m, n, k, with_bias, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, m, generator=g).to(BF16).t() if transposed else torch.randn(m, k, generator=g).to(BF16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(BF16)
    bias = torch.randn(n, generator=g).to(BF16) if with_bias else None
    return x, w, bias


@given(m=st.integers(1, bcpu.BF16_GEMV_MAX_M), n=st.sampled_from([1, 7, 40, 130]),
       k=st.sampled_from([1, 17, 96, 768]), with_bias=st.booleans(), transposed=st.booleans())
def test_generated_gemv_matches_truth_and_f_linear(m, n, k, with_bias, transposed):
    x, w, bias = _case(m, n, k, with_bias, transposed)
    out = bcpu.bf16_gemv_cpu(x, w, bias)
    assert out is not None and out.shape == (m, n) and out.dtype == BF16
    assert_close(out, F.linear(_f64(x), _f64(w), _f64(bias)), BF16, "generated bf16 GEMV vs fp64")
    assert_close(out, F.linear(x, w, bias).double(), BF16, "generated bf16 GEMV vs F.linear")


@given(m=st.integers(1, 5), with_bias=st.booleans(), activation=st.sampled_from(["", "silu", "gelu_tanh"]),
       with_residual=st.booleans())
def test_registered_op_matches_truth_with_every_epilogue(m, with_bias, activation, with_residual):
    x, w, bias = _case(m, 64, 48, with_bias)
    x = x.view(m, 1, 48)
    n_out = 32 if activation else 64
    residual = torch.randn(m, 1, n_out).to(BF16) if with_residual else None
    out = torch.ops.llmopt.linear(x, w, bias, residual, activation, "")
    truth = linear_ref(_f64(x), _f64(w), _f64(bias), _f64(residual), activation)
    assert out.shape == (m, 1, n_out) and out.dtype == BF16
    assert_close(out, truth, BF16, f"llmopt.linear bf16 M={m} {activation or 'no activation'}")


def test_registered_op_uses_it_for_decode_rows_only():
    """bf16 with M <= BF16_GEMV_MAX_M compiles one kernel per signature, reused; more rows,
    fp32 and mixed dtypes never compile one."""
    x, w, bias = _case(1, 24, 40, True)
    before = len(bcpu.BF16_GEMVS)
    torch.ops.llmopt.linear(x, w, bias, None, "", "")
    assert len(bcpu.BF16_GEMVS) == before + 1
    torch.ops.llmopt.linear(x.clone(), w, bias, None, "", "")
    torch.ops.llmopt.linear(torch.randn(bcpu.BF16_GEMV_MAX_M + 1, 40).to(BF16), w, bias, None, "", "")
    torch.ops.llmopt.linear(x.float(), w.float(), bias.float(), None, "", "")
    assert len(bcpu.BF16_GEMVS) == before + 1, "reused for the same signature; none for prefill rows or fp32"


def test_the_rule_has_one_place():
    assert [cpu_linear_kernel(BF16, m) for m in (1, 2, 3, 4, 5, 64)] == ["bf16_gemv"] * 4 + ["mm", "mm"]
    assert bcpu.bf16_gemv_runs(BF16, 3, inlined=True) and not bcpu.bf16_gemv_runs(BF16, 3), \
        "3-4 rows: the expression inlined in Inductor's code, F.linear when called"
    # 3-4 rows only for a small weight (linear.small_gemv_weight); 1-2 rows for every weight
    assert [cpu_linear_kernel(BF16, m, 768, 2048) for m in (1, 2, 4)] == ["bf16_gemv"] * 3
    assert [cpu_linear_kernel(BF16, m, 5632, 2048) for m in (1, 2, 3, 4)] == ["bf16_gemv", "bf16_gemv", "mm", "mm"]
    assert cpu_linear_kernel(torch.float16, 1) == "mm"
    assert cpu_linear_kernel(BF16, None) == "mm", "a symbolic M (dynamic shapes) never takes the GEMV"


def test_traced_form_is_the_expression_not_a_matmul():
    """Under make_fx (what Inductor's retrace does) the decode rows become the
    multiply-and-reduce expression, so Inductor generates the loop in the graph's code; a
    prefill-sized call stays a matmul."""
    def ops_of(m):
        x, w, bias = _case(m, 16, 32, True)
        gm = make_fx(lambda x, w, bias: linear_cpu(x, w, bias, None, ""), tracing_mode="fake")(x, w, bias)
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    decode, rows, prefill = ops_of(1), ops_of(bcpu.INLINED_GEMV_MAX_M), ops_of(bcpu.INLINED_GEMV_MAX_M + 1)
    assert "aten.sum.dim_IntList" in decode and not {"aten.mm.default", "aten.addmm.default"} & decode
    assert "aten.stack.default" in rows and not {"aten.mm.default", "aten.addmm.default"} & rows
    assert {"aten.mm.default", "aten.addmm.default", "aten.linear.default"} & prefill


@given(m=st.integers(1, bcpu.INLINED_GEMV_MAX_M), n=st.sampled_from([1, 7, 40]), k=st.sampled_from([1, 17, 96]),
       with_bias=st.booleans(), dtype=st.sampled_from([BF16, torch.float32]))
def test_expression_of_every_inlined_row_count_matches_truth(m, n, k, with_bias, dtype):
    """The traced form at every row count it runs for (one reduction per row above one
    row), bf16 and fp32, against the fp64 truth."""
    x, w, bias = (None if t is None else t.to(dtype) for t in _case(m, n, k, with_bias))
    out = bcpu.bf16_gemv_expression(x, w, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, F.linear(_f64(x), _f64(w), _f64(bias)), dtype, f"GEMV expression M={m}")


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_inductor_compiles_the_rows_expression_after_a_norm(dtype):
    """What the Inductor executor compiles at batch 3: the expression after an RMSNorm-like
    producer (stored once through the expression's as_strided), as generated C++, against
    the fp64 truth."""
    from llmopt import compat

    def body(h, g, w):
        x = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * g
        return (bcpu.bf16_gemv_expression(x, w),)

    gen = torch.Generator().manual_seed(5)
    h, g = torch.randn(3, 96, generator=gen).to(dtype), torch.randn(96, generator=gen).to(dtype)
    w = (torch.randn(40, 96, generator=gen) / 96 ** 0.5).to(dtype)
    gm = make_fx(body)(h, g, w)
    assert "aten.as_strided.default" in {str(n.target) for n in gm.graph.nodes}, "the input stored once"
    run = compat.inductor_compile(gm, [h, g, w])
    (out,) = run([h, g, w])
    h64 = _f64(h)
    truth = (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * _f64(g)) @ _f64(w).T
    assert_close(out, truth, dtype, f"Inductor-compiled rows GEMV {dtype}")


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("view", ["last position", "contiguous rows at an offset"])
def test_stored_input_reads_the_right_rows_of_a_view(dtype, view):
    """The input is stored through a fresh contiguous buffer (bf16: the conversion; fp32:
    the product by 1.0) viewed onto itself: a view input at a storage offset (the last
    position's rows, or whole rows further on) still reads its own rows, in eager, under
    make_fx and compiled by Inductor."""
    from llmopt import compat

    gen = torch.Generator().manual_seed(9)
    h = torch.randn(2, 5, 64, generator=gen).to(dtype)
    w = (torch.randn(24, 64, generator=gen) / 8).to(dtype)
    rows = (lambda h: h[:, -1]) if view == "last position" else (lambda h: h.view(10, 64)[6:9])

    def body(h, w):
        return (bcpu.bf16_gemv_expression(rows(h), w),)

    assert rows(h).storage_offset() > 0
    truth = rows(_f64(h)) @ _f64(w).T
    assert_close(body(h, w)[0], truth, dtype, "eager")
    gm = make_fx(body)(h, w)
    assert_close(gm(h, w)[0], truth, dtype, "make_fx")
    assert_close(compat.inductor_compile(make_fx(body)(h, w), [h, w])([h, w])[0], truth, dtype, "Inductor")


def test_expression_matches_the_compiled_kernel():
    x, w, bias = _case(2, 40, 96, True)
    assert_close(bcpu.bf16_gemv_expression(x, w, bias), bcpu.bf16_gemv_cpu(x, w, bias).double(), BF16,
                 "traced form vs compiled kernel")


def test_compile_failure_falls_back_to_f_linear(monkeypatch, caplog):
    def no_compiler(args):
        raise RuntimeError("no C++ compiler")

    gemvs = CompiledCpuGemv(compiler=no_compiler, label="bf16")
    monkeypatch.setattr(bcpu, "BF16_GEMVS", gemvs)
    x, w, bias = _case(1, 16, 32, True)
    with caplog.at_level(logging.WARNING):
        assert bcpu.bf16_gemv_cpu(x, w, bias) is None
        y = torch.ops.llmopt.linear(x, w, bias, None, "", "")
    assert "no C++ compiler" in caplog.text and "bf16" in caplog.text and gemvs.failed
    assert_close(y, F.linear(_f64(x), _f64(w), _f64(bias)), BF16)
    assert bcpu.bf16_gemv_cpu(x, w, bias) is None, "a failed compiler is not retried on every call"


def test_an_explicit_cache_is_filled_instead_of_the_process_one():
    gemvs = CompiledCpuGemv(compiler=bcpu.compile_bf16_gemv, label="bf16")
    x, w, _ = _case(1, 8, 16, False)
    before = len(bcpu.BF16_GEMVS)
    assert_close(bcpu.bf16_gemv_cpu(x, w, gemvs=gemvs), F.linear(_f64(x), _f64(w)), BF16)
    assert len(gemvs) == 1 and len(bcpu.BF16_GEMVS) == before
    gemvs.clear()
    assert len(gemvs) == 0 and gemvs.failed is None


def test_opcheck_and_fullgraph_compile_at_decode_rows():
    x, w, bias = _case(1, 24, 32, True)
    residual = torch.randn(1, 24).to(BF16)
    torch.library.opcheck(torch.ops.llmopt.linear.default, (x, w, bias, residual, "", ""))

    def fn(x):
        return torch.ops.llmopt.linear(F.silu(x), w, bias, residual, "", "") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    truth = (F.linear(F.silu(_f64(x)), _f64(w), _f64(bias)) + _f64(residual)) * 2
    assert_close(compiled(x), truth, BF16, "fullgraph torch.compile vs fp64")
