"""quantize_ on a tiny random Llama: logits vs eager per scheme, filters, SmoothQuant, save/load."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from conftest import relative_error
from quant.quant_fixtures import LOGIT_BOUNDS, RTN_SCHEMES, tiny_llama, token_batches

from llmopt.quant import (
    GPTQ, W8A8, Int4WeightOnly, Int8KVCache, Int8WeightOnly, QuantizedLinear, load_quantized, quantize_,
    save_quantized,
)
from llmopt.quant.smoothquant import find_smooth_groups, smooth_model

pytestmark = pytest.mark.filterwarnings("ignore:quantize_. weight-only")



def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))


@pytest.mark.parametrize("scheme", RTN_SCHEMES)
def test_logits_close_to_eager(scheme):
    ids = token_batches(1, batch=2, seq=12, seed=5)[0]
    ref = _logits(tiny_llama(), ids)
    model = quantize_(tiny_llama(), scheme)
    # 7 linears x 2 layers; the (untied) head too for int8 only (quantize_head's default)
    head = scheme == "int8"
    assert len(_quantized_names(model)) == 14 + head
    assert isinstance(model.lm_head, QuantizedLinear) == head
    assert relative_error(_logits(model, ids), ref) <= LOGIT_BOUNDS[scheme]


def test_head_policy():
    """quantize_head: int8 quantizes an untied head by default, never a tied one; the
    other schemes keep the head float unless asked."""
    assert isinstance(quantize_(tiny_llama(), Int8WeightOnly(quantize_head=False)).lm_head, nn.Linear)
    assert isinstance(quantize_(tiny_llama(), Int4WeightOnly(32, quantize_head=True)).lm_head, QuantizedLinear)
    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    quantize_(tied, "int8")
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_triton_kernels_inside_a_model(triton_kernels):
    ids = token_batches(1, batch=1, seq=3, seed=5)[0]
    ref = _logits(tiny_llama(), ids)
    model = quantize_(tiny_llama(), "int4-g32")
    assert relative_error(_logits(model, ids), ref) <= LOGIT_BOUNDS["int4-g32"]


def test_gptq_model_logits_and_calibration():
    ids = token_batches(1, batch=2, seq=12, seed=5)[0]
    ref = _logits(tiny_llama(), ids)
    model = quantize_(tiny_llama(), GPTQ(group_size=32, act_order=True), calibration=token_batches(3, seq=32))
    assert len(_quantized_names(model)) == 14
    assert relative_error(_logits(model, ids), ref) <= LOGIT_BOUNDS["gptq-g32"]
    with pytest.raises(ValueError, match="calibration"):
        quantize_(tiny_llama(), GPTQ())


def test_filter_fn_overrides_default():
    model = quantize_(tiny_llama(), "int8", filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "mlp" in fqn
                      or fqn == "lm_head")
    names = _quantized_names(model)
    assert "lm_head" in names and len(names) == 7
    assert not isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)


def test_incompatible_linears_are_skipped_or_rejected():
    model = tiny_llama(intermediate_size=96)  # down_proj in_features=96: not a multiple of 64
    with pytest.warns(UserWarning, match="down_proj"):
        quantize_(model, "int4-g64")
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)
    with pytest.raises(ValueError, match="down_proj"):
        quantize_(tiny_llama(intermediate_size=96), "int4-g64", filter_fn=lambda m, fqn: fqn.endswith("down_proj"))
    with pytest.raises(ValueError, match="KV cache"):
        quantize_(tiny_llama(), Int8KVCache())


def test_smoothquant_fold_preserves_the_float_model():
    ids = token_batches(1, seed=5)[0]
    model = tiny_llama()
    ref = _logits(model, ids)
    targets = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    groups = find_smooth_groups(model, targets)
    assert [g[0] for g in groups] == [f"model.layers.{i}.{n}" for i in range(2)
                                      for n in ("input_layernorm", "post_attention_layernorm")]
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    assert len(smooth_model(model, 0.5, token_batches(2), targets)) == 4
    assert not torch.equal(norm_before, model.model.layers[0].input_layernorm.weight)
    assert relative_error(_logits(model, ids), ref) <= 1e-5  # smoothing alone is exact math


def test_smoothquant_helps_with_activation_outliers():
    """An outlier channel in the norm output (as in real LLMs) ruins per-token int8; smoothing fixes it."""
    def outlier_model():
        m = tiny_llama()
        with torch.no_grad():
            for layer in m.model.layers:
                layer.input_layernorm.weight[3] = 60.0
                layer.post_attention_layernorm.weight[7] = 60.0
        return m

    ids = token_batches(1, seed=5)[0]
    ref = _logits(outlier_model(), ids)
    plain = relative_error(_logits(quantize_(outlier_model(), W8A8()), ids), ref)
    smooth = relative_error(_logits(quantize_(outlier_model(), W8A8(0.5), calibration=token_batches(2)), ids), ref)
    assert smooth < plain, f"smoothed {smooth:.3e} vs plain {plain:.3e}"


def test_save_load_round_trip(tmp_path):
    ids = token_batches(1, seed=5)[0]
    for cfg, calib in ((Int4WeightOnly(group_size=32, compute_dtype="bfloat16"), None), (W8A8(), token_batches(2)),
                       (GPTQ(group_size=32, act_order=True), token_batches(2))):
        model = quantize_(tiny_llama(), cfg, calibration=calib)
        expected = _logits(model, ids)
        path = tmp_path / type(cfg).__name__
        save_quantized(model, path)
        meta = json.loads((path / "quantization.json").read_text())
        assert len(meta["modules"]) == 14
        loaded = load_quantized(path, lambda: tiny_llama(seed=123))  # different init: everything comes from disk
        assert loaded.model.layers[0].mlp.up_proj.compute_dtype == model.model.layers[0].mlp.up_proj.compute_dtype
        assert torch.equal(_logits(loaded, ids), expected)
    assert sorted(os.listdir(path)) == ["model.safetensors", "quantization.json"]


def test_save_load_tied_embeddings(tmp_path):
    model = quantize_(tiny_llama(tie_word_embeddings=True), Int8WeightOnly(compute_dtype="bfloat16"))
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path, lambda: tiny_llama(seed=9, tie_word_embeddings=True))
    ids = token_batches(1, seed=5)[0]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_quantized"):
        load_quantized(tmp_path, tiny_llama)
    save_quantized(quantize_(tiny_llama(), "int8"), tmp_path)
    with pytest.raises(ValueError, match="wrong architecture"):
        load_quantized(tmp_path, lambda: tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))


def test_quantized_model_compiles_fullgraph():
    model = quantize_(tiny_llama(), "int4-g32")
    ids = token_batches(1, batch=1, seq=8, seed=5)[0]
    expected = _logits(model, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(ids).logits
    assert relative_error(got, expected) <= 1e-5
