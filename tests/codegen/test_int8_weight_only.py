"""int8 weight-only linear: Triton (interpreter) vs reference vs fp64 truth, registration, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

from codegen.quant_cases import assert_compiles_fullgraph, f64, int8_call, int8_case_strategy, int8_weight
from conftest import assert_close, poisoned

import llmopt.codegen.int8_weight_only as i8


@given(**int8_case_strategy())
def test_int8_weight_only_kernel_matches_reference_and_truth(triton_kernels, m, n, k, dtype, layout, with_bias):
    x, w, s, bias = int8_call(m, n, k, dtype, layout, with_bias)
    truth = i8.int8_weight_only_linear_ref(f64(x), w, f64(s), f64(bias))
    out = i8.int8_weight_only_linear_triton(x, w, s, bias, out=poisoned((m, n), dtype))
    assert_close(out, truth, dtype, "int8 kernel vs fp64")
    assert_close(i8.int8_weight_only_linear_ref(x, w, s, bias), truth, dtype, "int8 reference vs fp64")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` starting 40 bytes into an allocation (like a tensor read from a file)."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 64, dtype=torch.uint8)[40:40 + nbytes]
    out = raw.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("m", [1, 16])
def test_cpu_int8_path_survives_misaligned_tensors(m):
    # aten._weight_int8pack_mm crashes on misaligned operands (torch 2.13); the op must not
    w, s = int8_weight(128, 256)
    x = torch.randn(m, 256).to(torch.bfloat16)
    truth = i8.int8_weight_only_linear_ref(f64(x), w, f64(s))
    for args in ((_misaligned(x), w, s), (x, _misaligned(w), s), (x, w, _misaligned(s.to(torch.bfloat16)))):
        assert_close(torch.ops.llmopt.int8_weight_only_linear(*args), truth, torch.bfloat16)


@pytest.mark.parametrize("m,with_bias", [(3, True), (1, False)])
def test_opcheck(triton_kernels, m, with_bias):
    x, w, s, bias = int8_call(m, 24, 64, torch.float32, "contiguous", with_bias)
    torch.library.opcheck(torch.ops.llmopt.int8_weight_only_linear.default, (x, w, s, bias))


def test_op_compiles_fullgraph(triton_kernels):
    assert_compiles_fullgraph(torch.ops.llmopt.int8_weight_only_linear,
                              *int8_call(3, 24, 64, torch.float32, "contiguous", True))


def test_leading_dims_are_flattened(triton_kernels):
    x = torch.randn(2, 3, 32)
    w, s = int8_weight(8, 32)
    y = torch.ops.llmopt.int8_weight_only_linear(x, w, s)
    assert y.shape == (2, 3, 8)
    assert_close(y, i8.int8_weight_only_linear_ref(f64(x), w, f64(s)), torch.float32)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 32)
    w, s = int8_weight(8, 32)
    with pytest.raises(ValueError, match="K=32"):
        torch.ops.llmopt.int8_weight_only_linear(torch.randn(2, 31), w, s)
    with pytest.raises(TypeError, match="int8"):
        torch.ops.llmopt.int8_weight_only_linear(x, w.float(), s)
    with pytest.raises(ValueError, match="bias must be"):
        torch.ops.llmopt.int8_weight_only_linear(x, w, s, torch.randn(3))
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.llmopt.int8_weight_only_linear(x.to(torch.int32), w, s)


def test_bad_out_buffer(triton_kernels):
    w, s = int8_weight(8, 32)
    with pytest.raises(ValueError, match="out must be"):
        i8.int8_weight_only_linear_triton(torch.randn(2, 32), w, s, out=torch.empty(2, 9))
