"""Quantized linear kernels: Triton (interpreter) vs reference vs fp64 truth, registration, errors.

The truth of a weight-only linear is the reference run in fp64 on the same codes, scales
and (float-rounded) activations; for W8A8 it is the fp64 product of the same per-token
int8 activations (quantized in fp32 by ``quantize_rows_int8_ref``) and int8 weights.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_close, poisoned

import llmopt.codegen.quant_linear as ql

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_VALUES = [1, 2, 3, 7, 17, 33]
N_VALUES = [1, 7, 17, 40]


def _activations(m, k, dtype, layout):
    """``[m, k]`` activations: contiguous, transposed (stride (1, m)) or a strided slice."""
    if layout == "contiguous":
        return torch.randn(m, k).to(dtype)
    if layout == "transposed":
        return torch.randn(k, m).to(dtype).t()
    return torch.randn(m, 2 * k).to(dtype)[:, ::2]


def _int8_weight(n, k):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.02 + 1e-3


def _int4_weight(n, k, group):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, k // group) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (n, k // group)).float()
    return ql.pack_int4(q), scales, zeros


def _f64(t):
    return None if t is None else t.to(torch.float64)


layouts = st.sampled_from(["contiguous", "transposed", "strided"])


# --------------------------------------------------------------------------- int8 weight-only
@given(m=st.sampled_from(M_VALUES), n=st.sampled_from(N_VALUES), k=st.sampled_from([7, 16, 17, 48, 96]),
       dtype=st.sampled_from(DTYPES), layout=layouts, with_bias=st.booleans())
def test_int8_weight_only_kernel_matches_reference_and_truth(triton_kernels, m, n, k, dtype, layout, with_bias):
    x = _activations(m, k, dtype, layout)
    w, s = _int8_weight(n, k)
    bias = torch.randn(n) if with_bias else None
    truth = ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s), _f64(bias))
    out = ql.int8_weight_only_linear_triton(x, w, s, bias, out=poisoned((m, n), dtype))
    assert_close(out, truth, dtype, "int8 kernel vs fp64")
    assert_close(ql.int8_weight_only_linear_ref(x, w, s, bias), truth, dtype, "int8 reference vs fp64")


# --------------------------------------------------------------------------- int4 weight-only
@given(m=st.sampled_from(M_VALUES), n=st.sampled_from(N_VALUES), kg=st.sampled_from([(32, 32), (64, 32), (96, 32), (128, 64), (128, 128)]),
       dtype=st.sampled_from(DTYPES), layout=layouts, with_bias=st.booleans())
def test_int4_weight_only_kernel_matches_reference_and_truth(triton_kernels, m, n, kg, dtype, layout, with_bias):
    k, group = kg
    x = _activations(m, k, dtype, layout)
    wp, s, z = _int4_weight(n, k, group)
    bias = torch.randn(n) if with_bias else None
    truth = ql.int4_weight_only_linear_ref(_f64(x), wp, _f64(s), _f64(z), group, _f64(bias))
    out = ql.int4_weight_only_linear_triton(x, wp, s, z, group, bias, out=poisoned((m, n), dtype))
    assert_close(out, truth, dtype, "int4 kernel vs fp64")
    assert_close(ql.int4_weight_only_linear_ref(x, wp, s, z, group, bias), truth, dtype, "int4 reference vs fp64")


def test_int4_kernel_reads_strided_scales(triton_kernels):
    # scales / zeros as column slices of wider tensors: the kernel must use their strides
    n, k, group = 17, 64, 32
    x = torch.randn(3, k)
    wp, _, _ = _int4_weight(n, k, group)
    s = (torch.rand(n, 2 * (k // group)) * 0.02)[:, ::2]
    z = torch.randint(0, 16, (n, 2 * (k // group))).float()[:, 1::2]
    truth = ql.int4_weight_only_linear_ref(_f64(x), wp, _f64(s), _f64(z), group)
    assert_close(ql.int4_weight_only_linear_triton(x, wp, s, z, group), truth, torch.float32)


# --------------------------------------------------------------------------- W8A8
@given(m=st.sampled_from(M_VALUES), n=st.sampled_from(N_VALUES), k=st.sampled_from([7, 16, 17, 48, 96]),
       dtype=st.sampled_from(DTYPES), layout=layouts, with_bias=st.booleans())
def test_w8a8_kernel_matches_reference_and_truth(triton_kernels, m, n, k, dtype, layout, with_bias):
    x = _activations(m, k, dtype, layout)
    w, s = _int8_weight(n, k)
    bias = torch.randn(n) if with_bias else None
    xq, sx = ql.quantize_rows_int8_ref(x)
    truth = (xq.double() @ w.double().t()) * sx.double()[:, None] * s.double()[None, :]
    if bias is not None:
        truth = truth + bias.double()
    out = ql.w8a8_linear_triton(x, w, s, bias, out=poisoned((m, n), dtype))
    assert_close(out, truth, dtype, "w8a8 kernel vs fp64")
    assert_close(ql.w8a8_linear_ref(x, w, s, bias), truth, dtype, "w8a8 reference vs fp64")


@given(m=st.sampled_from([1, 3, 17]), k=st.sampled_from([1, 7, 130, 300]), dtype=st.sampled_from(DTYPES))
def test_activation_quantization_kernel_is_bit_exact(triton_kernels, m, k, dtype):
    x = torch.randn(m, k).to(dtype) * 3
    x[0] = 0.0  # an all-zero row quantizes to zeros with a finite scale
    q_ref, s_ref = ql.quantize_rows_int8_ref(x)
    q, s = ql.quantize_rows_int8_triton(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


def test_activation_quantization_error_is_half_a_step():
    x = torch.randn(9, 64) * 5
    q, s = ql.quantize_rows_int8_ref(x)
    assert bool(((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6).all())


# --------------------------------------------------------------------------- CPU int4 layout
@pytest.mark.skipif(not ql.int4pack_cpu_supported(32, 128, 64), reason="torch has no CPU int4 weight-pack kernel")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5])
def test_cpu_int4_layout_op_matches_truth(dtype, m):
    n, k, group = 32, 128, 64
    wp, s, z = _int4_weight(n, k, group)
    packed, sz = ql.pack_int4_for_cpu(wp, s, z, group)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    truth = ql.int4_weight_only_linear_ref(_f64(x), wp, _f64(s), _f64(z), group, _f64(bias))
    out = torch.ops.llmopt.int4_weight_only_linear_cpu(x, packed, sz, group, bias)
    assert_close(out, truth, dtype if dtype != torch.float32 else torch.bfloat16, "cpu int4 kernel")


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
    w, s = _int8_weight(128, 256)
    x = torch.randn(m, 256).to(torch.bfloat16)
    truth = ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s))
    for args in ((_misaligned(x), w, s), (x, _misaligned(w), s), (x, w, _misaligned(s.to(torch.bfloat16)))):
        assert_close(torch.ops.llmopt.int8_weight_only_linear(*args), truth, torch.bfloat16)


def test_pack_int4_round_trip_and_layout():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = ql.pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    assert torch.equal(ql.unpack_int4(packed), q)


# --------------------------------------------------------------------------- registration
def _op_cases():
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    w, s = _int8_weight(24, 64)
    wp, s4, z4 = _int4_weight(24, 64, 32)
    bias = torch.randn(24)
    return [
        (torch.ops.llmopt.int8_weight_only_linear.default, (x, w, s, bias)),
        (torch.ops.llmopt.int8_weight_only_linear.default, (x[:1], w, s, None)),
        (torch.ops.llmopt.int4_weight_only_linear.default, (x, wp, s4, z4, 32, bias)),
        (torch.ops.llmopt.int4_weight_only_linear.default, (x[:1], wp, s4, z4, 32, None)),
        (torch.ops.llmopt.w8a8_linear.default, (x, w, s, bias)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(triton_kernels, case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not ql.int4pack_cpu_supported(32, 64, 32), reason="torch has no CPU int4 weight-pack kernel")
def test_opcheck_and_compile_cpu_int4_layout():
    wp, s, z = _int4_weight(32, 64, 32)
    packed, sz = ql.pack_int4_for_cpu(wp, s, z, 32)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    op = torch.ops.llmopt.int4_weight_only_linear_cpu.default
    torch.library.opcheck(op, (x, packed, sz, 32, None))
    compiled = torch.compile(lambda x: op(x * 2, packed, sz, 32, None), fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), op(x * 2, packed, sz, 32, None), torch.bfloat16)


@pytest.mark.parametrize("case", [0, 2, 4])
def test_ops_compile_fullgraph(triton_kernels, case):
    op, args = _op_cases()[case]
    x, rest = args[0], args[1:]

    def fn(x):
        return op(torch.nn.functional.silu(x), *rest) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), fn(x), torch.float32, "compiled")


def test_leading_dims_are_flattened(triton_kernels):
    x = torch.randn(2, 3, 32)
    w, s = _int8_weight(8, 32)
    y = torch.ops.llmopt.int8_weight_only_linear(x, w, s)
    assert y.shape == (2, 3, 8)
    assert_close(y, ql.int8_weight_only_linear_ref(_f64(x), w, _f64(s)), torch.float32)


def test_zero_rows(triton_kernels):
    w, s = _int8_weight(8, 32)
    assert torch.ops.llmopt.w8a8_linear(torch.randn(0, 32), w, s).shape == (0, 8)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 32)
    w, s = _int8_weight(8, 32)
    with pytest.raises(ValueError, match="K=32"):
        torch.ops.llmopt.int8_weight_only_linear(torch.randn(2, 31), w, s)
    with pytest.raises(TypeError, match="int8"):
        torch.ops.llmopt.int8_weight_only_linear(x, w.float(), s)
    with pytest.raises(ValueError, match="scales must be"):
        torch.ops.llmopt.w8a8_linear(x, w, s[:4])
    with pytest.raises(ValueError, match="bias must be"):
        torch.ops.llmopt.int8_weight_only_linear(x, w, s, torch.randn(3))
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.llmopt.int8_weight_only_linear(x.to(torch.int32), w, s)
    wp, s4, z4 = _int4_weight(8, 64, 32)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.llmopt.int4_weight_only_linear(torch.randn(2, 64), wp, s4, z4, 48)
    with pytest.raises(ValueError, match="zeros must be"):
        torch.ops.llmopt.int4_weight_only_linear(torch.randn(2, 64), wp, s4, z4[:, :1], 32)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.llmopt.int4_weight_only_linear(torch.randn(2, 64), wp.to(torch.int8), s4, z4, 32)
    with pytest.raises(ValueError, match="codes must lie"):
        ql.pack_int4(torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="N % 16"):
        ql.pack_int4_for_cpu(wp, s4, z4, 32)


def test_bad_out_buffer(triton_kernels):
    w, s = _int8_weight(8, 32)
    with pytest.raises(ValueError, match="out must be"):
        ql.int8_weight_only_linear_triton(torch.randn(2, 32), w, s, out=torch.empty(2, 9))


def test_m_bucket_is_bounded():
    assert [ql.m_bucket(m) for m in (1, 2, 3, 17, 64, 65, 4096)] == [1, 2, 4, 32, 64, 64, 64]
