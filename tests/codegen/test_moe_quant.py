"""Specification of llmopt::fused_experts_int8 and llmopt::fused_experts_int4.

Kernels (interpreter, NaN-poisoned outputs) vs the eager reference vs an fp64 truth (the
same quantized stacks dequantized in fp64), over hypothesis-drawn experts (4..64), top-k
(1..8), tokens, int4 group sizes and symmetric / asymmetric codes, fp32/fp16/bf16; both
kernel paths; empty experts and all tokens to one expert; opcheck and a fullgraph compile;
the errors a user can hit.
"""
import pytest
import torch
from conftest import assert_close, relative_error
from hypothesis import given
from hypothesis import strategies as st

from codegen.moe_cases import make_experts, poisoned_empty, routing  # noqa: F401  (poisoned_empty: a fixture)
from quant.quant_fixtures import LOGIT_BOUNDS
from llmopt.codegen import moe_experts, moe_quant
from llmopt.quant import Int4WeightOnly, Int8WeightOnly
from llmopt.quant.experts import QuantizedExperts, quantize_stack
from llmopt.quant.schemes import QuantizedWeight, dequantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def quantized(w_gate_up, w_down, config):
    return QuantizedExperts.from_stacks(w_gate_up, w_down, "silu", config)


def dequantized_stack(data, scales, zeros, group_size, scheme, dtype=torch.float64):
    return torch.stack([
        dequantize(QuantizedWeight(scheme, data[e], scales[e], None if zeros is None else zeros[e], group_size), dtype)
        for e in range(data.shape[0])
    ])


def truth_of(module: QuantizedExperts, x, weights, ids, activation="silu"):
    """fp64 experts on the dequantized stacks, correctly rounded to x.dtype."""
    m = module
    w_gu = dequantized_stack(m.w_gate_up, m.gate_up_scales, m.gate_up_zeros, m.group_size, m.scheme)
    w_d = dequantized_stack(m.w_down, m.down_scales, m.down_zeros, m.group_size, m.scheme)
    out = moe_experts.fused_experts_ref(x.double(), w_gu, w_d, weights.double(), ids, activation)
    return out.to(x.dtype).double()


def launch(module: QuantizedExperts, x, weights, ids, decode, activation="silu"):
    _, args = module.call(x, weights, ids)
    args = args[:-1] + (activation,) if module.scheme == "int8" else args[:-2] + (activation, args[-1])
    if module.scheme == "int8":
        return moe_quant.fused_experts_int8_triton(*args, decode=decode)
    return moe_quant.fused_experts_int4_triton(*args, decode=decode)


def reference(module: QuantizedExperts, x, weights, ids):
    _, args = module.call(x, weights, ids)
    fn = moe_quant.fused_experts_int8_ref if module.scheme == "int8" else moe_quant.fused_experts_int4_ref
    return fn(*args)


CONFIGS = {
    "int8": Int8WeightOnly(),
    "int4-g32": Int4WeightOnly(group_size=32),
    "int4-g32-sym": Int4WeightOnly(group_size=32, symmetric=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(
    scheme=st.sampled_from(sorted(CONFIGS)),
    num_experts=st.sampled_from([4, 8, 13, 64]),
    top_k=st.sampled_from([1, 2, 4, 8]),
    tokens=st.sampled_from([1, 2, 5, 17]),
    hidden=st.sampled_from([32, 64]),
    inter=st.sampled_from([32, 96]),
    kind=st.sampled_from(["random", "one_expert", "half_empty"]),
    seed=st.integers(0, 2**16),
)
def test_quantized_kernels_match_reference_and_fp64(
    triton_kernels, poisoned_empty, dtype, scheme, num_experts, top_k, tokens, hidden, inter, kind, seed
):
    top_k = min(top_k, num_experts // 2 if kind == "half_empty" else num_experts)
    x, w_gu, w_d = make_experts(tokens, num_experts, hidden, inter, dtype, seed)
    module = quantized(w_gu, w_d, CONFIGS[scheme])
    weights, ids = routing(tokens, num_experts, top_k, kind, seed)
    truth = truth_of(module, x, weights, ids)
    assert_close(reference(module, x, weights, ids), truth, dtype, what="reference")
    for decode in (True, False) if tokens * top_k <= 16 else (False,):
        out = launch(module, x, weights, ids, decode)
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(out, truth, dtype, what=f"kernel (decode={decode})")


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_many_tokens_all_to_one_expert_and_empty_experts(triton_kernels, poisoned_empty, scheme):
    """512 tokens, top-1, every token on expert 3 of 16 (15 empty experts)."""
    x, w_gu, w_d = make_experts(512, 16, 32, 32, torch.bfloat16)
    module = quantized(w_gu, w_d, CONFIGS[scheme])
    ids = torch.full((512, 1), 3)
    weights = torch.rand(512, 1)
    truth = truth_of(module, x, weights, ids)
    assert_close(launch(module, x, weights, ids, decode=False), truth, torch.bfloat16, what="kernel")
    assert_close(reference(module, x, weights, ids), truth, torch.bfloat16, what="reference")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_other_activations(triton_kernels, poisoned_empty, activation):
    x, w_gu, w_d = make_experts(6, 8, 64, 32, torch.float32)
    weights, ids = routing(6, 8, 2, "random")
    for config in CONFIGS.values():
        module = quantized(w_gu, w_d, config)
        truth = truth_of(module, x, weights, ids, activation)
        for decode in (True, False):
            assert_close(launch(module, x, weights, ids, decode, activation), truth, torch.float32)


def test_quantization_error_is_within_the_schemes_bounds():
    """Against the float experts, within the logit bounds tests/quant uses for quantized
    models (relative Frobenius error: int8 2 %, int4 g32 20 %)."""
    x, w_gu, w_d = make_experts(16, 8, 64, 64, torch.float32)
    weights, ids = routing(16, 8, 2, "random")
    exact = moe_experts.fused_experts_ref(x, w_gu, w_d, weights, ids, "silu")
    for scheme in ("int8", "int4-g32"):
        got = reference(quantized(w_gu, w_d, CONFIGS[scheme]), x, weights, ids)
        assert relative_error(got, exact) <= LOGIT_BOUNDS[scheme], scheme


def test_stack_layout_is_per_expert_linear_quantization():
    """Each expert's slice is what quantize_weight makes of that expert's matrix."""
    from llmopt.quant.schemes import quantize_weight

    _, w_gu, _ = make_experts(1, 4, 64, 32, torch.float32)
    for config in CONFIGS.values():
        stack = quantize_stack(w_gu, config)
        one = quantize_weight(w_gu[2], config)
        assert torch.equal(stack.data[2], one.data) and torch.equal(stack.scales[2], one.scales)
        if one.zeros is not None:
            assert torch.equal(stack.zeros[2], one.zeros)


@pytest.mark.parametrize("dtype, tokens", [(torch.float32, 1), (torch.bfloat16, 6)], ids=["fp32-decode", "bf16-prefill"])
def test_opcheck(triton_kernels, dtype, tokens):
    x, w_gu, w_d = make_experts(tokens, 4, 64, 32, dtype)
    weights, ids = routing(tokens, 4, 2, "random")
    for config in (CONFIGS["int8"], CONFIGS["int4-g32"]):
        op, args = quantized(w_gu, w_d, config).call(x, weights, ids)
        torch.library.opcheck(op, args)


def test_inside_torch_compile_fullgraph(triton_kernels):
    x, w_gu, w_d = make_experts(7, 4, 64, 32, torch.float32)
    weights, ids = routing(7, 4, 2, "random")
    for config in (CONFIGS["int8"], CONFIGS["int4-g32"]):
        module = quantized(w_gu, w_d, config)
        got = torch.compile(lambda x, i, w: module(x, i, w) + x, backend="aot_eager", fullgraph=True)(x, ids, weights)
        assert_close(got, reference(module, x, weights, ids).double() + x.double())


def test_op_paths_agree(monkeypatch):
    x, w_gu, w_d = make_experts(5, 8, 64, 32, torch.float32)
    weights, ids = routing(5, 8, 2, "random")
    for config in (CONFIGS["int8"], CONFIGS["int4-g32"]):
        module = quantized(w_gu, w_d, config)
        outs = {}
        for mode in ("triton", "reference"):
            monkeypatch.setenv("LLMOPT_KERNELS", mode)
            outs[mode] = module(x, ids, weights)
        assert_close(outs["triton"], outs["reference"].double())


def test_bad_inputs_raise_clear_errors():
    x, w_gu, w_d = make_experts(3, 4, 64, 32, torch.float32)
    weights, ids = routing(3, 4, 2, "random")
    m8 = quantized(w_gu, w_d, CONFIGS["int8"])
    with pytest.raises(TypeError, match="the stacks must be int8 codes"):
        torch.ops.llmopt.fused_experts_int8(x, w_gu, m8.gate_up_scales, m8.w_down, m8.down_scales, weights, ids, "silu")
    with pytest.raises(ValueError, match=r"down_scales must be a float tensor of shape \[4, 64\]"):
        torch.ops.llmopt.fused_experts_int8(x, m8.w_gate_up, m8.gate_up_scales, m8.w_down, m8.down_scales[:, :3],
                                            weights, ids, "silu")
    m4 = quantized(w_gu, w_d, CONFIGS["int4-g32"])
    with pytest.raises(ValueError, match="group_size 48 must be a power of two"):
        torch.ops.llmopt.fused_experts_int4(x, m4.w_gate_up, m4.gate_up_scales, m4.gate_up_zeros, m4.w_down,
                                            m4.down_scales, m4.down_zeros, weights, ids, "silu", 48)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        m4(x, torch.tensor([[0, 9]] * 3), weights)
