"""int4 weight-only linear: Triton (interpreter) vs reference vs fp64 truth, the CPU-layout
op, registration, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codegen.quant_cases import (
    DTYPES, M_VALUES, N_VALUES, activations, assert_compiles_fullgraph, f64, int4_weight, layouts,
)
from conftest import assert_close, poisoned

import llmopt.codegen.int4_weight_only as i4
from llmopt.codegen.quant_packing import int4pack_cpu_supported, pack_int4_for_cpu


@given(m=st.sampled_from(M_VALUES), n=st.sampled_from(N_VALUES),
       kg=st.sampled_from([(32, 32), (64, 32), (96, 32), (128, 64), (128, 128)]),
       dtype=st.sampled_from(DTYPES), layout=layouts, with_bias=st.booleans())
def test_int4_weight_only_kernel_matches_reference_and_truth(triton_kernels, m, n, kg, dtype, layout, with_bias):
    k, group = kg
    x = activations(m, k, dtype, layout)
    wp, s, z = int4_weight(n, k, group)
    bias = torch.randn(n) if with_bias else None
    truth = i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group, f64(bias))
    out = i4.int4_weight_only_linear_triton(x, wp, s, z, group, bias, out=poisoned((m, n), dtype))
    assert_close(out, truth, dtype, "int4 kernel vs fp64")
    assert_close(i4.int4_weight_only_linear_ref(x, wp, s, z, group, bias), truth, dtype, "int4 reference vs fp64")


def test_int4_kernel_reads_strided_scales(triton_kernels):
    # scales / zeros as column slices of wider tensors: the kernel must use their strides
    n, k, group = 17, 64, 32
    x = torch.randn(3, k)
    wp, _, _ = int4_weight(n, k, group)
    s = (torch.rand(n, 2 * (k // group)) * 0.02)[:, ::2]
    z = torch.randint(0, 16, (n, 2 * (k // group))).float()[:, 1::2]
    truth = i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group)
    assert_close(i4.int4_weight_only_linear_triton(x, wp, s, z, group), truth, torch.float32)


# --------------------------------------------------------------------------- CPU int4 layout
@pytest.mark.skipif(not int4pack_cpu_supported(32, 128, 64), reason="torch has no CPU int4 weight-pack kernel")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5])
def test_cpu_int4_layout_op_matches_truth(dtype, m):
    n, k, group = 32, 128, 64
    wp, s, z = int4_weight(n, k, group)
    packed, sz = pack_int4_for_cpu(wp, s, z, group)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    truth = i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group, f64(bias))
    out = torch.ops.llmopt.int4_weight_only_linear_cpu(x, packed, sz, group, bias)
    assert_close(out, truth, dtype if dtype != torch.float32 else torch.bfloat16, "cpu int4 kernel")


@pytest.mark.skipif(not int4pack_cpu_supported(32, 64, 32), reason="torch has no CPU int4 weight-pack kernel")
def test_opcheck_and_compile_cpu_int4_layout():
    wp, s, z = int4_weight(32, 64, 32)
    packed, sz = pack_int4_for_cpu(wp, s, z, 32)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    op = torch.ops.llmopt.int4_weight_only_linear_cpu.default
    torch.library.opcheck(op, (x, packed, sz, 32, None))
    compiled = torch.compile(lambda x: op(x * 2, packed, sz, 32, None), fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), op(x * 2, packed, sz, 32, None), torch.bfloat16)


# --------------------------------------------------------------------------- registration
def _call(m, with_bias):
    wp, s, z = int4_weight(24, 64, 32)
    return torch.randn(m, 64), wp, s, z, 32, torch.randn(24) if with_bias else None


@pytest.mark.parametrize("m,with_bias", [(3, True), (1, False)])
def test_opcheck(triton_kernels, m, with_bias):
    torch.library.opcheck(torch.ops.llmopt.int4_weight_only_linear.default, _call(m, with_bias))


def test_op_compiles_fullgraph(triton_kernels):
    assert_compiles_fullgraph(torch.ops.llmopt.int4_weight_only_linear, *_call(3, True))


def test_bad_inputs_raise_clear_errors():
    wp, s4, z4 = int4_weight(8, 64, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.llmopt.int4_weight_only_linear(x, wp, s4, z4, 48)
    with pytest.raises(ValueError, match="zeros must be"):
        torch.ops.llmopt.int4_weight_only_linear(x, wp, s4, z4[:, :1], 32)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.llmopt.int4_weight_only_linear(x, wp.to(torch.int8), s4, z4, 32)
