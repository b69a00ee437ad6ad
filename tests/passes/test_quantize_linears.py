"""quantize_linears: options={"quantize": ...} quantizes frozen weights inside the graph."""
import pytest
import torch

import llmopt
from conftest import relative_error
from models.tiny import tiny_model, tokens

PASS = "quantize_linears"

# Relative logit error against fp32 eager that each scheme stays within on a tiny random
# Llama (measured ~1e-3 for int8, ~3e-2 for int4-g32); bounds leave a 3-5x margin.
BOUNDS = {"int8": 1e-2, "int4-g32": 1e-1, "w8a8": 5e-2}


@pytest.mark.parametrize("scheme", sorted(BOUNDS))
def test_compile_time_quantization_of_llama(scheme):
    model = tiny_model("llama")
    x = tokens(2, 9)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x).logits
        out = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": scheme})(x).logits
    report = llmopt.last_report()
    layers = model.config.num_hidden_layers
    # merged QKV, o_proj, merged gate/up, down per layer; lm_head stays float
    assert report.rewrites_by_pass()[PASS] == 4 * layers
    assert any("output head" in m.reason for m in report.near_misses if m.pass_name == PASS)
    assert relative_error(out, expected) < BOUNDS[scheme]


def test_gptq_needs_calibration_and_says_so():
    model = tiny_model("llama")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"quantize": "gptq"})(tokens(1, 4))
    assert any("calibration" in f.reason for f in llmopt.last_report().fallbacks)


def test_bad_quantize_value_is_rejected():
    with pytest.raises(ValueError, match="int8"):
        llmopt.Options(quantize="int3")
