"""quantize_linears: options={"quantize": ...} quantizes frozen weights inside the graph."""
import pytest
import torch

import llmopt
from conftest import relative_error
from models.tiny import tiny_model, tokens
from quant.quant_fixtures import LOGIT_BOUNDS

PASS = "quantize_linears"


@pytest.mark.parametrize("scheme", ["int4-g32", "int8", "w8a8"])
def test_compile_time_quantization_of_llama(scheme):
    model = tiny_model("llama")
    x = tokens(2, 9)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x).logits
        out = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": scheme})(x).logits
    report = llmopt.last_report()
    layers = model.config.num_hidden_layers
    # merged QKV, o_proj, merged gate/up, down per layer; the untied lm_head for int8 only
    head = scheme == "int8"
    assert report.rewrites_by_pass()[PASS] == 4 * layers + head
    assert any("output head" in m.reason for m in report.near_misses if m.pass_name == PASS) != head
    assert relative_error(out, expected) <= LOGIT_BOUNDS[scheme]


def test_tied_head_stays_float():
    model = tiny_model("gemma")  # Gemma ties lm_head to the input embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(tokens(1, 5)).logits
        out = torch.compile(model, backend="llmopt", options={"quantize": "int8"})(tokens(1, 5)).logits
    misses = [m.reason for m in llmopt.last_report().near_misses if m.pass_name == PASS]
    assert any("tied to the input embedding" in r for r in misses), misses
    assert relative_error(out, expected) <= LOGIT_BOUNDS["int8"]


def test_quantized_linear_is_a_direct_op_call():
    """The pass emits the registered op itself (not a call_module): the aten executor
    then calls its Python implementation directly."""
    model = tiny_model("llama")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"quantize": "int8"})(tokens(1, 4))
    hist = llmopt.last_report().ops_after
    assert hist.get("llmopt.int8_weight_only_linear.default", 0) == 4 * model.config.num_hidden_layers + 1, hist


def test_gptq_needs_calibration_and_says_so():
    model = tiny_model("llama")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"quantize": "gptq"})(tokens(1, 4))
    assert any("calibration" in f.reason for f in llmopt.last_report().fallbacks)


def test_bad_quantize_value_is_rejected():
    with pytest.raises(ValueError, match="int8"):
        llmopt.Options(quantize="int3")
