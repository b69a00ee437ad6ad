"""GPTQ: Hessian accumulation, lower layer reconstruction error than round-to-nearest."""
from __future__ import annotations

import pytest
import torch

from llmopt.quant import (
    GPTQ, HessianAccumulator, Int4WeightOnly, Int8WeightOnly, dequantize, gptq_quantize, quantize_weight,
    reconstruction_error,
)


def _layer(n=48, k=128, tokens=512, seed=0):
    """A weight and correlated calibration inputs with uneven channel scales (like real activations)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    mix = torch.randn(k, k, generator=gen) / k**0.5
    scale = torch.exp(torch.randn(k, generator=gen))
    x = (torch.randn(tokens, k, generator=gen) @ mix + 0.3 * torch.randn(tokens, k, generator=gen)) * scale
    return w, x


def _hessian(x, chunks=4):
    acc = HessianAccumulator(x.shape[-1])
    for part in x.chunk(chunks):
        acc.add(part.reshape(2, -1, x.shape[-1]))  # leading dims are flattened
    return acc.hessian


def test_hessian_accumulator_is_the_mean_outer_product():
    _, x = _layer(tokens=96)
    expected = 2.0 / x.shape[0] * x.double().t() @ x.double()
    torch.testing.assert_close(_hessian(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg, rtn", [
    (GPTQ(bits=4, group_size=32), Int4WeightOnly(group_size=32)),
    (GPTQ(bits=4, group_size=128), Int4WeightOnly(group_size=128)),
    (GPTQ(bits=4, group_size=32, act_order=True), Int4WeightOnly(group_size=32)),
    (GPTQ(bits=4, group_size=64, symmetric=True), Int4WeightOnly(group_size=64, symmetric=True)),
    (GPTQ(bits=8, group_size=None, act_order=True), Int8WeightOnly()),
], ids=["g32", "g128", "g32-act-order", "g64-sym", "int8-act-order"])
def test_gptq_beats_round_to_nearest(cfg, rtn):
    w, x = _layer()
    qw = gptq_quantize(w, _hessian(x), cfg)
    err_gptq = reconstruction_error(w, dequantize(qw), x)
    err_rtn = reconstruction_error(w, dequantize(quantize_weight(w, rtn)), x)
    assert err_gptq < err_rtn, f"GPTQ {err_gptq:.3e} >= RTN {err_rtn:.3e}"
    assert (qw.perm is not None) == (cfg.act_order and cfg.group_size is not None)


def test_gptq_result_is_a_valid_int4_weight_within_its_grid():
    w, x = _layer(n=8, k=64)
    qw = gptq_quantize(w, _hessian(x), GPTQ(group_size=32))
    assert qw.scheme == "int4" and qw.group_size == 32 and qw.data.shape == (8, 32)
    # the codes are on the group grid: dequantized values are (integer - zero) * scale
    codes = dequantize(qw) / qw.scales.repeat_interleave(32, 1) + qw.zeros.repeat_interleave(32, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)


def test_gptq_handles_dead_inputs():
    w, x = _layer(n=8, k=64)
    x[:, 5] = 0.0  # an input channel that never fires: H[5, 5] = 0
    qw = gptq_quantize(w, _hessian(x), GPTQ(group_size=32))
    assert bool(torch.isfinite(dequantize(qw)).all())
    assert float(dequantize(qw)[:, 5].abs().max()) <= float(qw.scales.max()) * 16  # zeroed, then quantized


def test_gptq_per_row_groups_and_block_sizes_agree():
    w, x = _layer(n=8, k=64)
    h = _hessian(x)
    a = dequantize(gptq_quantize(w, h, GPTQ(group_size=32, block_size=32)))
    b = dequantize(gptq_quantize(w, h, GPTQ(group_size=32, block_size=128)))
    assert torch.allclose(a, b, atol=1e-5)  # lazy batching is an exact reformulation
    assert gptq_quantize(w, h, GPTQ(group_size=None)).group_size == 64


def test_gptq_shape_errors():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16))
