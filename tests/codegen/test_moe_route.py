"""Specification of llmopt::moe_route: kernel (interpreter) vs the eager reference vs an fp64
truth over hypothesis-drawn experts (4..64), top-k (1..8), tokens (1..512), fp32/fp16/bf16,
both scorings and renormalization; ties; the transformers routers' math."""
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen import moe_route

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


# --------------------------------------------------------------------------- moe_route
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(
    num_experts=st.sampled_from([4, 8, 13, 60, 64]),
    top_k=st.sampled_from([1, 2, 4, 8]),
    tokens=st.sampled_from([1, 3, 17, 100, 512]),
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_route_kernel_matches_reference_and_fp64(triton_kernels, dtype, num_experts, top_k, tokens, scoring, renormalize, seed):
    top_k = min(top_k, num_experts)
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(tokens, num_experts, generator=g)).to(dtype)
    w_truth, _ = moe_route.moe_route_ref(logits.double(), top_k, scoring, renormalize)
    p_truth = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
    for name, (w, ids) in {
        "kernel": moe_route.moe_route_triton(logits, top_k, scoring, renormalize),
        "reference": moe_route.moe_route_ref(logits, top_k, scoring, renormalize),
    }.items():
        assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (tokens, top_k)
        assert_close(w, w_truth, torch.float32, what=f"{name} weights")
        # The chosen experts are the top-k (ties may pick either of equal probabilities).
        chosen = p_truth.gather(1, ids)
        torch.testing.assert_close(chosen, p_truth.topk(top_k, dim=-1).values, rtol=0, atol=0)
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token


def test_route_ties_pick_the_lowest_index(triton_kernels):
    logits = torch.zeros(3, 8)
    w, ids = moe_route.moe_route_triton(logits, 3, "softmax", False)
    assert ids.tolist() == [[0, 1, 2]] * 3
    assert_close(w, torch.full((3, 3), 1 / 8))


def test_route_is_mixtral_and_qwen_router_math():
    """Mixtral: softmax(logits.float()), topk, w /= sum; Qwen2/3-MoE: the same with
    norm_topk_prob deciding the division."""
    logits = torch.randn(6, 8, dtype=torch.bfloat16)
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, 2, dim=-1)
    w, ids = moe_route.moe_route_ref(logits, 2, "softmax", True)
    assert torch.equal(ids, idx) and torch.equal(w, top / top.sum(-1, keepdim=True))
    w, ids = moe_route.moe_route_ref(logits, 2, "softmax", False)
    assert torch.equal(w, top)
