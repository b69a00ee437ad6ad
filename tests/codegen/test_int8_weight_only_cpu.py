"""The generated CPU int8 GEMV (llmopt/codegen/int8_weight_only_cpu.py) vs an fp64 truth, and
how ``int8_weight_only_linear`` routes CPU calls to it, to aten's int8 kernel, to the
reference or to the Triton interpreter (``quant_launch.implementation``).

The truth is the reference run in fp64 on the same codes, scales and activations. Each
new (M, N, K, dtype, bias) signature compiles one Inductor kernel (~0.3-1 s), hence the
small hypothesis budget of the CI profile.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codegen.quant_cases import f64 as _f64
from codegen.quant_cases import int8_weight as _int8_weight
from conftest import assert_close

import llmopt.codegen.int8_weight_only as ql
import llmopt.codegen.int8_weight_only_cpu as qcpu


@given(m=st.integers(1, qcpu.CPU_GEMV_MAX_M), n=st.sampled_from([1, 7, 40, 130]), k=st.sampled_from([1, 17, 96, 768]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), with_bias=st.booleans(),
       transposed=st.booleans())
def test_generated_gemv_matches_truth(m, n, k, dtype, with_bias, transposed):
    x = torch.randn(k, m).to(dtype).t() if transposed else torch.randn(m, k).to(dtype)
    w, s = _int8_weight(n, k)
    bias = torch.randn(n) if with_bias else None
    out = qcpu.int8_gemv_cpu(x, w, s, bias)
    assert out is not None and out.shape == (m, n) and out.dtype == dtype
    truth = ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s), _f64(bias))
    assert_close(out, truth, dtype, "generated int8 GEMV vs fp64")


def test_registered_op_uses_it_for_few_float32_rows():
    """On CPU (kernel mode auto) a float32 decode-sized call goes to the generated GEMV; a
    prefill-sized one (M > CPU_GEMV_MAX_M) to the reference; bf16 to aten's int8 kernel."""
    n, k = 48, 64
    w, s = _int8_weight(n, k)
    x = torch.randn(2, 1, k)
    before = len(qcpu.COMPILED_GEMVS)
    y = torch.ops.llmopt.int8_weight_only_linear(x, w, s)
    assert len(qcpu.COMPILED_GEMVS) == before + 1 and y.shape == (2, 1, n)
    assert_close(y, ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)), torch.float32)
    torch.ops.llmopt.int8_weight_only_linear(torch.randn(qcpu.CPU_GEMV_MAX_M + 1, k), w, s)
    torch.ops.llmopt.int8_weight_only_linear(torch.randn(1, k, dtype=torch.bfloat16), w, s)
    assert len(qcpu.COMPILED_GEMVS) == before + 1, "no kernel compiled for prefill sizes or bf16"
    torch.ops.llmopt.int8_weight_only_linear(torch.randn(2, 1, k), w, s)
    assert len(qcpu.COMPILED_GEMVS) == before + 1, "same signature: the compiled kernel is reused"


def test_reference_mode_bypasses_it(reference_kernels):
    w, s = _int8_weight(24, 32)
    before = len(qcpu.COMPILED_GEMVS)
    torch.ops.llmopt.int8_weight_only_linear(torch.randn(3, 32), w, s)
    assert len(qcpu.COMPILED_GEMVS) == before


def test_compile_failure_falls_back_to_the_reference(monkeypatch, caplog):
    def no_compiler(args):
        raise RuntimeError("no C++ compiler")

    gemvs = qcpu.CompiledCpuGemv(compiler=no_compiler)
    monkeypatch.setattr(qcpu, "COMPILED_GEMVS", gemvs)
    w, s = _int8_weight(16, 32)
    x = torch.randn(1, 32)
    with caplog.at_level(logging.WARNING, logger=qcpu.__name__):
        assert qcpu.int8_gemv_cpu(x, w, s) is None
        y = torch.ops.llmopt.int8_weight_only_linear(x, w, s)
    assert "no C++ compiler" in caplog.text and gemvs.failed
    assert_close(y, ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)), torch.float32)
    assert qcpu.int8_gemv_cpu(x, w, s) is None, "a failed compiler is not retried on every call"


def test_out_of_contract_calls_are_declined():
    w, s = _int8_weight(8, 16)
    assert qcpu.int8_gemv_cpu(torch.randn(qcpu.CPU_GEMV_MAX_M + 1, 16), w, s) is None
    assert qcpu.int8_gemv_cpu(torch.randn(0, 16), w, s) is None
    assert qcpu.int8_gemv_cpu(torch.randn(1, 16, dtype=torch.float64), w, s) is None


def test_an_explicit_cache_is_filled_instead_of_the_process_one():
    gemvs = qcpu.CompiledCpuGemv()
    w, s = _int8_weight(8, 16)
    before = len(qcpu.COMPILED_GEMVS)
    x = torch.randn(1, 16)
    assert_close(qcpu.int8_gemv_cpu(x, w, s, gemvs=gemvs), ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)),
                 torch.float32)
    assert len(gemvs) == 1 and len(qcpu.COMPILED_GEMVS) == before
    gemvs.clear()
    assert len(gemvs) == 0 and gemvs.failed is None


def test_cpu_kernel_follows_the_triton_mode(monkeypatch):
    """``LLMOPT_KERNELS=triton`` sends CPU calls to the Triton launcher, which needs the
    interpreter: without it the op says so instead of silently running the CPU path."""
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w, s = _int8_weight(8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.llmopt.int8_weight_only_linear(torch.randn(1, 16), w, s)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_is_part_of_the_key(threads):
    w, s = _int8_weight(8, 16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(1, 16)
        assert_close(qcpu.int8_gemv_cpu(x, w, s), ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)), torch.float32)
        assert any(key[0] == threads for key in qcpu.COMPILED_GEMVS.keys())
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_converts_the_weight_in_blocks(dtype):
    """Prefill-sized float calls convert the int8 weight a block of rows at a time
    (``DEQUANT_BLOCK_BYTES``): a ragged last block, same result as the fp64 truth."""
    k = 4096
    rows = max(64, ql.DEQUANT_BLOCK_BYTES // (torch.tensor([], dtype=dtype).element_size() * k))
    n = 2 * rows + 37
    w, s = _int8_weight(n, k)
    x = torch.randn(qcpu.CPU_GEMV_MAX_M + 3, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = ql.int8_weight_only_linear_ref(x, w, s, bias)
    truth = x.double() @ (w.double() * s.double()[:, None]).t() + bias.double()
    assert_close(out, truth, dtype, "blockwise int8 reference vs fp64")


# ---------------------------------------------------------------------------- prefill
@given(m=st.integers(qcpu.CPU_GEMV_MAX_M + 1, 70), n=st.sampled_from([1, 7, 40, 130]),
       k=st.sampled_from([1, 17, 96, 768]), with_bias=st.booleans(), transposed=st.booleans(),
       block_bytes=st.sampled_from([64, 4096, qcpu.PREFILL_BLOCK_BYTES]))
def test_prefill_matches_truth(m, n, k, with_bias, transposed, block_bytes):
    """The float32 prefill (blocks of converted rows through oneDNN, the scale on the
    output) against the fp64 truth: several blocks, a remainder block, one block."""
    x = torch.randn(k, m).t() if transposed else torch.randn(m, k)
    w, s = _int8_weight(n, k)
    bias = torch.randn(n) if with_bias else None
    saved = qcpu.PREFILL_BLOCK_BYTES
    qcpu.PREFILL_BLOCK_BYTES = block_bytes
    try:
        out = qcpu.int8_prefill_cpu(x, w, s, bias)
    finally:
        qcpu.PREFILL_BLOCK_BYTES = saved
    if not qcpu.compat.onednn_linear_available():
        assert out is None
        return
    assert out is not None and out.shape == (m, n) and out.dtype == torch.float32
    assert_close(out, ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s), _f64(bias)), torch.float32,
                 "int8 prefill vs fp64")


def test_registered_op_routes_float32_prefill_to_it(monkeypatch):
    calls = []
    real = qcpu.int8_prefill_cpu

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(ql, "int8_prefill_cpu", spy)
    w, s = _int8_weight(40, 64)
    x = torch.randn(2, qcpu.CPU_GEMV_MAX_M + 3, 64)
    y = torch.ops.llmopt.int8_weight_only_linear(x, w, s)
    assert calls == [(2 * (qcpu.CPU_GEMV_MAX_M + 3), 64)]
    assert_close(y, ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)), torch.float32)


def test_prefill_declines_what_it_does_not_handle(monkeypatch):
    w, s = _int8_weight(8, 64)
    assert qcpu.int8_prefill_cpu(torch.randn(0, 64), w, s) is None
    assert qcpu.int8_prefill_cpu(torch.randn(20, 64, dtype=torch.float64), w, s) is None
    assert qcpu.int8_prefill_cpu(torch.randn(20, 64, dtype=torch.bfloat16), w, s) is None
    monkeypatch.setattr(qcpu.compat, "onednn_linear_available", lambda: False)
    assert qcpu.int8_prefill_cpu(torch.randn(20, 64), w, s) is None, "no oneDNN: the reference"
    x = torch.randn(20, 64)
    assert_close(torch.ops.llmopt.int8_weight_only_linear(x, w, s),
                 ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)), torch.float32)


def test_prefill_nan_in_activations_stays_in_its_row():
    w, s = _int8_weight(16, 64)
    x = torch.randn(qcpu.CPU_GEMV_MAX_M + 4, 64)
    x[3, 1] = float("nan")
    out = qcpu.int8_prefill_cpu(x, w, s)
    if out is not None:
        assert out[3].isnan().all() and not out[torch.arange(len(x)) != 3].isnan().any()
