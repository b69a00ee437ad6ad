"""W8A8 linear: activation quantization (bit-exact kernel), Triton (interpreter) vs reference
vs fp64 truth, registration, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codegen.quant_cases import DTYPES, assert_compiles_fullgraph, int8_call, int8_case_strategy, int8_weight
from conftest import assert_close, poisoned

import llmopt.codegen.w8a8 as w8a8


@given(**int8_case_strategy())
def test_w8a8_kernel_matches_reference_and_truth(triton_kernels, m, n, k, dtype, layout, with_bias):
    x, w, s, bias = int8_call(m, n, k, dtype, layout, with_bias)
    xq, sx = w8a8.quantize_rows_int8_ref(x)
    truth = (xq.double() @ w.double().t()) * sx.double()[:, None] * s.double()[None, :]
    if bias is not None:
        truth = truth + bias.double()
    out = w8a8.w8a8_linear_triton(x, w, s, bias, out=poisoned((m, n), dtype))
    assert_close(out, truth, dtype, "w8a8 kernel vs fp64")
    assert_close(w8a8.w8a8_linear_ref(x, w, s, bias), truth, dtype, "w8a8 reference vs fp64")
    assert_close(w8a8.w8a8_linear_cpu(x, w, s, bias), truth, dtype, "w8a8 CPU path vs fp64")


@given(m=st.sampled_from([1, 3, 17]), k=st.sampled_from([1, 7, 130, 300]), dtype=st.sampled_from(DTYPES))
def test_activation_quantization_kernel_is_bit_exact(triton_kernels, m, k, dtype):
    x = torch.randn(m, k).to(dtype) * 3
    x[0] = 0.0  # an all-zero row quantizes to zeros with a finite scale
    q_ref, s_ref = w8a8.quantize_rows_int8_ref(x)
    q, s = w8a8.quantize_rows_int8_triton(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


def test_activation_quantization_error_is_half_a_step():
    x = torch.randn(9, 64) * 5
    q, s = w8a8.quantize_rows_int8_ref(x)
    assert bool(((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6).all())


def test_opcheck(triton_kernels):
    torch.library.opcheck(torch.ops.llmopt.w8a8_linear.default, int8_call(3, 24, 64, torch.float32, "contiguous", True))


def test_op_compiles_fullgraph(triton_kernels):
    assert_compiles_fullgraph(torch.ops.llmopt.w8a8_linear, *int8_call(3, 24, 64, torch.float32, "contiguous", True))


def test_zero_rows(triton_kernels):
    w, s = int8_weight(8, 32)
    assert torch.ops.llmopt.w8a8_linear(torch.randn(0, 32), w, s).shape == (0, 8)


def test_bad_scales_raise_a_clear_error():
    w, s = int8_weight(8, 32)
    with pytest.raises(ValueError, match="scales must be"):
        torch.ops.llmopt.w8a8_linear(torch.randn(2, 32), w, s[:4])
