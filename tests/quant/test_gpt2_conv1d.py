"""quantize_ on GPT-2, whose linears are Hugging Face ``Conv1D`` modules (weight ``[in, out]``).

Before Conv1D support, ``quantize_(gpt2, Int8WeightOnly())`` quantized nothing and said
nothing, while the compiler's ``quantize="int8"`` quantized the same model's 8 linears.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import relative_error
from models.tiny import NUM_LAYERS, tiny_model, tokens
from quant.quant_fixtures import LOGIT_BOUNDS

from llmopt.quant import GPTQ, W8A8, QuantizedLinear, load_quantized, quantize_, save_quantized


CONV1D_PER_LAYER = 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _gpt2():
    return tiny_model("gpt2")


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "w8a8"])
def test_gpt2_conv1d_quantized_logits_and_round_trip(scheme, tmp_path):
    ids = tokens(2, 12, seed=5)
    ref = _logits(_gpt2(), ids)
    model = quantize_(_gpt2(), scheme)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == CONV1D_PER_LAYER * NUM_LAYERS
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    # the head is tied to the token embedding: it stays float, shared
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    got = _logits(model, ids)
    assert relative_error(got, ref) <= LOGIT_BOUNDS[scheme]

    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, lambda: tiny_model("gpt2", seed=3))
    assert torch.equal(_logits(loaded, ids), got)


def test_conv1d_is_quantized_from_its_transposed_weight():
    """The QuantizedLinear computes x @ W + b for the Conv1D's W [in, out]."""
    torch.manual_seed(0)
    conv = Conv1D(48, 64)
    with torch.no_grad():
        conv.bias.normal_()
    holder = nn.Sequential(conv)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = conv(x)
    quantize_(holder, "int8")
    layer = holder[0]
    assert isinstance(layer, QuantizedLinear) and (layer.out_features, layer.in_features) == (48, 64)
    with torch.no_grad():
        assert relative_error(layer(x), expected) <= LOGIT_BOUNDS["int8"]
        assert torch.equal(layer.bias, conv.bias)


def test_conv1d_float_weights_are_released():
    """Quantizing keeps no second float copy of a Conv1D weight (no transposed clone)."""
    model = _gpt2()
    refs = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, Conv1D)]
    assert len(refs) == CONV1D_PER_LAYER * NUM_LAYERS
    quantize_(model, "int8")
    gc.collect()
    assert all(r() is None for r in refs)


def test_gptq_on_gpt2():
    ids = tokens(2, 12, seed=5)
    ref = _logits(_gpt2(), ids)
    calibration = [tokens(2, 32, seed=s) for s in range(2)]
    model = quantize_(_gpt2(), GPTQ(group_size=32), calibration=calibration)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == CONV1D_PER_LAYER * NUM_LAYERS
    assert relative_error(_logits(model, ids), ref) <= LOGIT_BOUNDS["gptq-g32"]


def test_nothing_quantized_warns_with_the_count_and_the_reasons():
    # group size 128 divides none of this GPT-2's in_features (64, 96); the head is tied
    import transformers as tf

    config = tf.GPT2Config(vocab_size=256, n_embd=64, n_inner=96, n_layer=NUM_LAYERS, n_head=4, n_positions=64)
    model = tf.GPT2LMHeadModel(config).eval()
    with pytest.warns(UserWarning, match=r"quantized 0 of 9 candidate modules") as record:
        quantize_(model, "int4-g128")
    text = " ".join(str(w.message) for w in record)
    assert "Conv1D" in text and "group size 128" in text
    assert "tied" in text and "lm_head" in text

    class MyLinear(nn.Linear):
        pass

    custom = nn.Sequential(MyLinear(32, 32), nn.ReLU())
    with pytest.warns(UserWarning, match=r"quantized 0 of 1 candidate modules.*MyLinear.*filter_fn"):
        quantize_(custom, "int8")
    with pytest.warns(UserWarning, match=r"filter_fn selected none of the 1 candidate modules"):
        quantize_(custom, "int8", filter_fn=lambda m, fqn: False)


def test_save_warns_when_nothing_is_quantized(tmp_path):
    with pytest.warns(UserWarning, match="no quantized modules"):
        save_quantized(_gpt2(), tmp_path)


def test_smoothquant_folds_into_gpt2_layernorms():
    """ln_1 -> attn.c_attn and ln_2 -> mlp.c_fc: the fold alone leaves the float model's logits."""
    from llmopt.quant.quantize import select_linears
    from llmopt.quant.smoothquant import find_smooth_groups, smooth_model

    ids = tokens(2, 12, seed=5)
    model = _gpt2()
    ref = _logits(model, ids)
    targets = select_linears(model, W8A8())
    groups = find_smooth_groups(model, targets)
    assert [g[0] for g in groups] == [f"transformer.h.{i}.{n}" for i in range(NUM_LAYERS) for n in ("ln_1", "ln_2")]
    assert len(smooth_model(model, 0.5, [tokens(2, 16, seed=1)], targets)) == 2 * NUM_LAYERS
    assert relative_error(_logits(model, ids), ref) <= 1e-5
    quantize_(model, "w8a8")
    assert relative_error(_logits(model, ids), ref) <= LOGIT_BOUNDS["w8a8"]
