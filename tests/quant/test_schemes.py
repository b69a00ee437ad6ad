"""Weight schemes: error bounds, concat along N, act_order permutation, QuantizedLinear, KV cache."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_close

from llmopt.codegen.quant_packing import int4pack_cpu_supported
from llmopt.codegen.w8a8 import quantize_rows_int8_ref
from llmopt.quant import (
    GPTQ, W8A8, Int4WeightOnly, Int8WeightOnly, QuantizedLinear, QuantizedWeight, concat_quantized, dequantize,
    dequantize_kv, kv_head_scales, quantize_kv, quantize_weight,
)


def _weight(n, k, dtype=torch.float32, outliers=True):
    w = torch.randn(n, k) * 0.05
    if outliers:
        w[0, 0] = 1.0  # one large value per tensor, as trained weights have
    return w.to(dtype)


@given(n=st.sampled_from([1, 7, 17, 40]), k=st.sampled_from([1, 7, 64, 96]))
def test_int8_error_is_at_most_half_a_step(n, k):
    w = _weight(n, k)
    qw = quantize_weight(w, Int8WeightOnly())
    assert qw.data.dtype == torch.int8 and qw.scales.shape == (n,)
    err = (dequantize(qw) - w).abs()
    assert bool((err <= qw.scales[:, None] / 2 * (1 + 1e-6)).all())


@given(n=st.sampled_from([1, 7, 17]), groups=st.sampled_from([1, 2, 3]), group=st.sampled_from([32, 64, 128]),
       symmetric=st.booleans())
def test_int4_error_is_at_most_half_a_step(n, groups, group, symmetric):
    k = groups * group
    w = _weight(n, k)
    qw = quantize_weight(w, Int4WeightOnly(group_size=group, symmetric=symmetric))
    assert qw.data.shape == (n, k // 2) and qw.data.dtype == torch.uint8
    assert qw.scales.shape == (n, groups) and qw.zeros.shape == (n, groups)
    step = qw.scales.repeat_interleave(group, dim=1)
    assert bool(((dequantize(qw) - w).abs() <= step / 2 * (1 + 1e-6)).all())
    if symmetric:
        assert bool((qw.zeros == 8).all())


def test_int4_handles_constant_and_zero_groups():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    qw = quantize_weight(w, "int4-g32")
    assert torch.equal(dequantize(qw), w)


def test_bf16_weights_keep_bf16_scales():
    w = _weight(8, 64, torch.bfloat16)
    qw = quantize_weight(w, "int8")
    assert qw.scales.dtype == torch.bfloat16
    # codes are computed for the rounded scale actually stored: still within half a step
    assert bool(((dequantize(qw) - w.float()).abs() <= qw.scales.float()[:, None] / 2 * (1 + 1e-3)).all())


def test_concat_quantized_equals_quantizing_each_part():
    parts = [_weight(n, 64) for n in (8, 4, 4)]
    for cfg in (Int8WeightOnly(), Int4WeightOnly(group_size=32), W8A8()):
        merged = concat_quantized([quantize_weight(p, cfg) for p in parts])
        assert merged.out_features == 16 and merged.scheme == quantize_weight(parts[0], cfg).scheme
        assert torch.equal(dequantize(merged), torch.cat([dequantize(quantize_weight(p, cfg)) for p in parts]))


def test_concat_quantized_rejects_mismatches():
    a = quantize_weight(_weight(4, 64), "int4-g32")
    with pytest.raises(ValueError, match="group_size"):
        concat_quantized([a, quantize_weight(_weight(4, 64), "int4-g64")])
    with pytest.raises(ValueError, match="scheme"):
        concat_quantized([a, quantize_weight(_weight(4, 64), "int8")])
    with pytest.raises(ValueError, match="in_features"):
        concat_quantized([a, quantize_weight(_weight(4, 32), "int4-g32")])
    permuted = QuantizedWeight("int4", a.data, a.scales, a.zeros, 32, torch.randperm(64))
    with pytest.raises(ValueError, match="permutation"):
        concat_quantized([a, permuted])
    with pytest.raises(ValueError, match="at least one"):
        concat_quantized([])


def test_perm_layout_dequantizes_to_original_order():
    w = _weight(6, 64)
    perm = torch.randperm(64)
    qw = quantize_weight(w[:, perm], "int4-g32")  # columns stored in permuted order
    permuted = QuantizedWeight("int4", qw.data, qw.scales, qw.zeros, 32, perm)
    assert torch.allclose(dequantize(permuted)[:, perm], dequantize(qw))
    layer = QuantizedLinear(permuted)
    x = torch.randn(3, 64)
    assert_close(layer(x), x.double() @ dequantize(permuted, torch.float64).t(), torch.float32)


def test_quantize_weight_errors():
    with pytest.raises(ValueError, match="2-D float"):
        quantize_weight(torch.randn(4), "int8")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(torch.full((2, 32), float("nan")), "int8")
    with pytest.raises(ValueError, match="divisible"):
        quantize_weight(torch.randn(2, 48), "int4-g32")
    with pytest.raises(ValueError, match="calibration"):
        quantize_weight(torch.randn(2, 64), GPTQ())
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight("int8", torch.zeros(2, 4, dtype=torch.int8), torch.ones(3))


CONFIGS = [Int8WeightOnly(), Int4WeightOnly(group_size=32), Int4WeightOnly(group_size=64, symmetric=True), W8A8()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("kernels", ["triton_kernels", "reference_kernels"])
def test_quantized_linear_matches_dequantized_matmul(cfg, kernels, request):
    request.getfixturevalue(kernels)
    linear = torch.nn.Linear(64, 24)
    layer = QuantizedLinear.from_linear(linear, cfg)
    x = torch.randn(2, 5, 64)
    if cfg.name == "w8a8":
        xq, sx = quantize_rows_int8_ref(x.reshape(-1, 64))
        truth = ((xq.double() * sx.double()[:, None]) @ dequantize(layer.qweight, torch.float64).t()).reshape(2, 5, 24)
    else:
        truth = x.double() @ dequantize(layer.qweight, torch.float64).t()
    truth = truth + linear.bias.double()
    assert_close(layer(x), truth, torch.float32, str(cfg))


@pytest.mark.skipif(not int4pack_cpu_supported(32, 64, 32), reason="torch has no CPU int4 weight-pack kernel")
def test_bf16_int4_module_uses_the_cpu_layout_and_matches(reference_kernels):
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), Int4WeightOnly(group_size=32)).to(torch.bfloat16)
    assert layer.cpu_int4_packed is not None
    assert "cpu_int4_packed" not in layer.state_dict()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    truth = x.double() @ dequantize(layer.qweight, torch.float64).t() + layer.bias.double()
    assert_close(layer(x), truth, torch.bfloat16)
    assert layer.float().cpu_int4_packed is None  # float32 scales: the portable path


def test_compute_dtype_bf16_on_a_float32_layer(reference_kernels):
    """A float32 model computing its int8/int4 linears in bf16 (the fast CPU kernels):
    the output stays float32 and within bf16 tolerance of the exact quantized linear."""
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    for cfg in (Int8WeightOnly(compute_dtype="bfloat16"), Int4WeightOnly(32, compute_dtype="bfloat16")):
        layer = QuantizedLinear.from_linear(linear, cfg)
        assert layer.compute_dtype == torch.bfloat16 and layer.scales.dtype == torch.float32
        y = layer(x)
        assert y.dtype == torch.float32
        truth = x.double() @ dequantize(layer.qweight, torch.float64).t() + linear.bias.double()
        assert_close(y, truth, torch.bfloat16, str(cfg))
    if int4pack_cpu_supported(32, 64, 32):
        assert layer.cpu_int4_packed is not None


def test_kv_cache_round_trip_per_head():
    x = torch.randn(2, 4, 9, 16) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (4,)
    err = (dequantize_kv(q, s, torch.float32) - x).abs()
    assert bool((err <= s.view(1, 4, 1, 1) / 2 * (1 + 1e-6)).all())
    # appending with fixed scales: the same codes as quantizing the whole tensor at once
    q_tail, _ = quantize_kv(x[:, :, 5:], s)
    assert torch.equal(q_tail, q[:, :, 5:])
    wide = kv_head_scales(x, margin=1.5)
    assert torch.allclose(wide, s * 1.5)


def test_kv_cache_errors():
    with pytest.raises(ValueError, match="B, H, S, D"):
        quantize_kv(torch.randn(4, 9, 16))
    with pytest.raises(ValueError, match=r"\[H\]"):
        quantize_kv(torch.randn(1, 4, 2, 8), torch.ones(3))
    with pytest.raises(TypeError, match="int8"):
        dequantize_kv(torch.zeros(1, 4, 2, 8), torch.ones(4))
