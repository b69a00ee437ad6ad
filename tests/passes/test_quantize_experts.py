"""quantize_experts (the MoE part of quantize_linears) and quantize_'s experts.

Tiny random-weight Mixtral compiled with quantize="int8" / int4: exactly one quantized
experts op per MoE layer, no float stack left in the graph, the router kept float, logits
within the bounds tests/quant uses for quantized models, greedy tokens equal to the same
model quantized eagerly with llmopt.quantize_ (same codes, same scales). quantize_ swaps
the experts modules for QuantizedExperts (float stacks released) and the result compiles.
A scheme without expert kernels (W8A8) leaves them float with its reason. Qwen2-MoE
(batched spelling, shared expert) and Qwen3-MoE are quantized the same way.
"""
import copy

import pytest
import torch

import llmopt
from conftest import relative_error
from models.tiny import NUM_LAYERS, tiny_model, tokens
from quant.quant_fixtures import LOGIT_BOUNDS

from llmopt.quant import Int4WeightOnly
from llmopt.quant.experts import QuantizedExperts

SCHEMES = {"int8": ("int8", "llmopt.fused_experts_int8.default"),
           "int4-g32": (Int4WeightOnly(group_size=32), "llmopt.fused_experts_int4.default")}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_and_run(model, x, quantize):
    with torch.no_grad():
        out = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": quantize})(x)
    return out.logits, llmopt.last_report()


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_compiled_mixtral_quantizes_each_experts_block_once(scheme, monkeypatch):
    from passes.final_graphs import capture_final_graphs

    config, op = SCHEMES[scheme]
    graphs = capture_final_graphs(monkeypatch)
    model = tiny_model("mixtral")
    x = tokens(2, 7)
    with torch.no_grad():
        eager = model(x).logits  # before compiling: the quantized floats are released then
    logits, report = compile_and_run(model, x, config)
    assert report.rewrites_by_pass()["fuse_moe"] == NUM_LAYERS
    assert report.ops_after.get(op) == NUM_LAYERS
    assert "llmopt.fused_experts.default" not in report.ops_after
    routers = [nm for nm in report.near_misses if "MoE router kept in floating point" in nm.reason]
    assert len(routers) == NUM_LAYERS
    (gm,) = graphs
    stacks = {tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 3}
    for node in gm.graph.nodes:  # memory-lean: the graph reads no float expert stack
        if node.op == "get_attr":
            v = node.meta.get("val")
            assert not (v is not None and v.is_floating_point() and tuple(v.shape) in stacks), node
    assert relative_error(logits, eager) <= LOGIT_BOUNDS[scheme]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_greedy_tokens_equal_the_eagerly_quantized_model(scheme):
    config, _ = SCHEMES[scheme]
    model = tiny_model("mixtral")
    eager = llmopt.quantize_(copy.deepcopy(model), config)
    x = tokens(1, 6)
    with torch.no_grad():
        expected = llmopt.generate(eager, x, 8)
        compiled = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": config})
        actual = llmopt.generate(compiled, x, 8)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantize_swaps_the_experts_and_the_result_compiles(scheme):
    config, op = SCHEMES[scheme]
    model = tiny_model("mixtral")
    x = tokens(2, 5)
    with torch.no_grad():
        ref = model(x).logits
    llmopt.quantize_(model, config)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert len(experts) == NUM_LAYERS
    assert not any(p.dim() == 3 for p in model.parameters())  # the float stacks are gone
    with torch.no_grad():
        eager = model(x).logits
    assert relative_error(eager, ref) <= LOGIT_BOUNDS[scheme]
    logits, report = compile_and_run(model, x, None)
    assert report.ops_after.get(op) == NUM_LAYERS
    assert relative_error(logits, eager) <= 1e-5


def test_w8a8_leaves_experts_in_float_with_the_reason():
    model = tiny_model("mixtral")
    _, report = compile_and_run(model, tokens(1, 4), "w8a8")
    assert report.ops_after.get("llmopt.fused_experts.default") == NUM_LAYERS
    assert sum("W8A8 has no expert kernels" in nm.reason for nm in report.near_misses) == NUM_LAYERS
    with pytest.warns(UserWarning, match=f"left {NUM_LAYERS} MoE experts module"):
        llmopt.quantize_(tiny_model("mixtral"), "w8a8")


@pytest.mark.parametrize("family, impl", [("qwen2_moe", "batched_mm"), ("qwen3_moe", None)],
                         ids=["qwen2_moe-batched_mm", "qwen3_moe"])
def test_qwen_moe_experts_are_quantized_too(family, impl):
    """Qwen2-MoE (shared expert folded into the stacks as chunk-experts, quantized with them;
    batched spelling) and Qwen3-MoE."""
    model = tiny_model(family, experts_implementation=impl)
    x = tokens(2, 5)
    with torch.no_grad():
        eager = model(x).logits  # before compiling: the quantized floats are released then
    logits, report = compile_and_run(model, x, "int8")
    assert report.ops_after.get("llmopt.fused_experts_int8.default") == NUM_LAYERS
    assert relative_error(logits, eager) <= LOGIT_BOUNDS["int8"]
