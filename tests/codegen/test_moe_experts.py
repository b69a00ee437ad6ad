"""Specification of llmopt::fused_experts (float stacks; the routing: test_moe_route.py).

Kernels (interpreter, NaN-poisoned outputs) vs the eager reference vs an fp64 truth, over
hypothesis-drawn experts (4..64), top-k (1..8), tokens (1..512, kept small where the
interpreter runs many programs) and fp32/fp16/bf16; both kernel paths (grouped prefill GEMM,
decode GEMV) on the same routings; imbalanced routings: empty experts, all pairs to one
expert; the registration (opcheck, fullgraph compile) and the errors a user can hit.
"""
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

from codegen.moe_cases import make_experts, poisoned_empty, routing  # noqa: F401  (poisoned_empty: a fixture)
from llmopt.codegen import moe_experts, moe_kernels, moe_route

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def truth_of(x, w_gate_up, w_down, weights, ids, activation):
    """fp64 truth, correctly rounded to x.dtype (the op's output dtype)."""
    t = moe_experts.fused_experts_ref(x.double(), w_gate_up.double(), w_down.double(), weights.double(), ids, activation)
    return t.to(x.dtype).double()


def run_kernel(x, w_gate_up, w_down, weights, ids, activation, decode):
    return moe_experts.fused_experts_triton(x, w_gate_up, w_down, weights, ids, activation, decode=decode)


# --------------------------------------------------------------------------- fused_experts
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(
    num_experts=st.sampled_from([4, 8, 13, 64]),
    top_k=st.sampled_from([1, 2, 4, 8]),
    tokens=st.sampled_from([1, 2, 5, 17]),
    hidden=st.sampled_from([16, 24, 40]),
    inter=st.sampled_from([8, 24, 33]),
    kind=st.sampled_from(["random", "one_expert", "half_empty"]),
    seed=st.integers(0, 2**16),
)
def test_fused_experts_kernels_match_reference_and_fp64(
    triton_kernels, poisoned_empty, dtype, num_experts, top_k, tokens, hidden, inter, kind, seed
):
    top_k = min(top_k, num_experts // 2 if kind == "half_empty" else num_experts)
    x, w_gu, w_d = make_experts(tokens, num_experts, hidden, inter, dtype, seed)
    weights, ids = routing(tokens, num_experts, top_k, kind, seed)
    truth = truth_of(x, w_gu, w_d, weights, ids, "silu")
    assert_close(moe_experts.fused_experts_ref(x, w_gu, w_d, weights, ids, "silu"), truth, dtype, what="reference")
    # The decode path runs one program row per pair: only where decode sizes are (the
    # interpreter is slow per program), the grouped path on every routing.
    for decode in (True, False) if tokens * top_k <= 16 else (False,):
        out = run_kernel(x, w_gu, w_d, weights, ids, "silu", decode)
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(out, truth, dtype, what=f"kernel (decode={decode})")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_other_activations(triton_kernels, poisoned_empty, activation):
    x, w_gu, w_d = make_experts(6, 8, 24, 16, torch.float32)
    weights, ids = routing(6, 8, 2, "random")
    truth = truth_of(x, w_gu, w_d, weights, ids, activation)
    for decode in (True, False):
        assert_close(run_kernel(x, w_gu, w_d, weights, ids, activation, decode), truth, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_many_tokens_all_to_one_expert_and_empty_experts(triton_kernels, poisoned_empty, dtype):
    """512 tokens, top-1, every token on expert 3 of 16: one long run of BLOCK_M tiles, 15
    empty experts, tiles past the padded end."""
    x, w_gu, w_d = make_experts(512, 16, 16, 16, dtype)
    ids = torch.full((512, 1), 3)
    weights = torch.rand(512, 1)
    out = run_kernel(x, w_gu, w_d, weights, ids, "silu", decode=False)
    truth = truth_of(x, w_gu, w_d, weights, ids, "silu")
    assert_close(out, truth, dtype, what="kernel")
    assert_close(moe_experts.fused_experts_ref(x, w_gu, w_d, weights, ids, "silu"), truth, dtype, what="reference")


def test_routing_weights_in_x_dtype_and_strided_inputs(triton_kernels, poisoned_empty):
    """Qwen casts the routing weights to the model dtype; x a strided view; int32 ids."""
    x_full, w_gu, w_d = make_experts(9, 8, 32, 16, torch.bfloat16)
    x = torch.cat([x_full, x_full], dim=1)[:, ::2]  # column stride 2
    weights, ids = routing(9, 8, 2, "random")
    weights, ids = weights.to(torch.bfloat16), ids.to(torch.int32)
    weights, ids = weights.t().contiguous().t(), ids.t().contiguous().t()  # slot-major layouts
    truth = truth_of(x, w_gu, w_d, weights, ids.long(), "silu")
    for decode in (True, False):
        assert_close(run_kernel(x, w_gu, w_d, weights, ids, "silu", decode), truth, torch.bfloat16)


def test_align_block_size_pads_each_expert_to_whole_tiles():
    ids = torch.tensor([[2, 0], [2, 3], [2, 0]])  # expert 0: 2 pairs, 2: 3, 3: 1, 1: none
    sorted_pairs, block_expert = moe_experts.align_block_size(ids, num_experts=4, block_m=4)
    s = ids.numel()
    assert sorted_pairs.numel() == 20  # the bound S + E (BLOCK_M - 1) = 18, in whole tiles
    tiles = sorted_pairs.view(-1, 4).tolist()
    assert tiles[0] == [1, 5, s, s]  # expert 0, pairs in token order, padding
    assert tiles[1] == [0, 2, 4, s]  # expert 2
    assert tiles[2] == [3, s, s, s]  # expert 3
    assert block_expert.tolist()[:3] == [0, 2, 3] and all(e == -1 for e in block_expert.tolist()[3:])
    assert all(p == s for tile in tiles[3:] for p in tile)
    exact_pairs, exact_experts = moe_experts.align_block_size(ids, num_experts=4, block_m=4, exact=True)
    assert exact_pairs.tolist() == sorted_pairs[:12].tolist() and exact_experts.tolist() == [0, 2, 3]


def test_decode_reads_only_the_active_experts():
    _, w_gu, w_d = make_experts(1, 8, 32, 16, torch.bfloat16)
    ids = torch.tensor([[5, 1]])
    per_expert = (2 * 16 * 32 + 32 * 16) * 2
    assert moe_experts.active_expert_bytes(w_gu, w_d, ids) == 2 * per_expert
    assert moe_experts.use_decode_path(tokens=1, top_k=2, num_experts=8)
    assert not moe_experts.use_decode_path(tokens=64, top_k=2, num_experts=8)


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("dtype, tokens", [(torch.float32, 1), (torch.bfloat16, 6)], ids=["fp32-decode", "bf16-prefill"])
def test_opcheck(triton_kernels, dtype, tokens):
    x, w_gu, w_d = make_experts(tokens, 4, 16, 16, dtype)
    weights, ids = routing(tokens, 4, 2, "random")
    torch.library.opcheck(torch.ops.llmopt.fused_experts.default, (x, w_gu, w_d, weights, ids, "silu"))
    logits = torch.randn(tokens, 4, dtype=dtype)
    torch.library.opcheck(torch.ops.llmopt.moe_route.default, (logits, 2, "softmax", True))


def test_op_paths_agree(monkeypatch):
    x, w_gu, w_d = make_experts(5, 8, 16, 24, torch.float32)
    logits = torch.randn(5, 8)
    outs = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("LLMOPT_KERNELS", mode)
        w, ids = torch.ops.llmopt.moe_route(logits, 2, "softmax", True)
        outs[mode] = (w, ids, torch.ops.llmopt.fused_experts(x, w_gu, w_d, w, ids, "silu"))
    assert torch.equal(outs["triton"][1], outs["reference"][1])
    assert_close(outs["triton"][0], outs["reference"][0].double())
    assert_close(outs["triton"][2], outs["reference"][2].double())
    # fp64 goes to the reference even with the kernels forced
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    w, ids = torch.ops.llmopt.moe_route(logits.double(), 2, "sigmoid", False)
    assert w.dtype == torch.float64
    out = torch.ops.llmopt.fused_experts(x.double(), w_gu.double(), w_d.double(), w, ids, "silu")
    assert out.dtype == torch.float64


def test_inside_torch_compile_fullgraph(triton_kernels):
    def block(x, w_router, w_gu, w_d):
        weights, ids = torch.ops.llmopt.moe_route(x @ w_router.t(), 2, "softmax", True)
        return torch.ops.llmopt.fused_experts(x, w_gu, w_d, weights, ids, "silu") + x

    x, w_gu, w_d = make_experts(7, 4, 16, 8, torch.float32)
    w_router = torch.randn(4, 16)
    got = torch.compile(block, backend="aot_eager", fullgraph=True)(x, w_router, w_gu, w_d)
    weights, ids = moe_route.moe_route_ref(x @ w_router.t(), 2, "softmax", True)
    assert_close(got, moe_experts.fused_experts_ref(x, w_gu, w_d, weights, ids, "silu") + x)


def test_bad_inputs_raise_clear_errors():
    x, w_gu, w_d = make_experts(3, 4, 16, 8, torch.float32)
    weights, ids = routing(3, 4, 2, "random")
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\), got ids in \[0, 7\]"):
        torch.ops.llmopt.fused_experts(x, w_gu, w_d, weights, torch.tensor([[0, 7]] * 3), "silu")
    with pytest.raises(ValueError, match="w_down .* must be \\[E, 16, I\\]"):
        torch.ops.llmopt.fused_experts(x, w_gu, w_d[:, :, :4], weights, ids, "silu")
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        torch.ops.llmopt.fused_experts(x, w_gu, w_d, weights, ids, "relu")
    with pytest.raises(TypeError, match="share a dtype"):
        torch.ops.llmopt.fused_experts(x.half(), w_gu, w_d, weights, ids, "silu")
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\]"):
        torch.ops.llmopt.moe_route(torch.randn(3, 4), 5, "softmax", True)
    with pytest.raises(ValueError, match="unknown scoring 'relu'; valid: softmax, sigmoid"):
        torch.ops.llmopt.moe_route(torch.randn(3, 4), 2, "relu", True)


def test_dead_tiles_past_the_padded_end_write_nothing(triton_kernels, poisoned_empty, monkeypatch):
    """On CUDA the launch covers the upper bound S + E (BLOCK_M - 1) (no host sync): the
    tiles past the real padded end (expert -1) must mask every load and store."""
    real = moe_experts.align_block_size
    monkeypatch.setattr(moe_experts, "align_block_size", lambda ids, e, bm, exact=False: real(ids, e, bm, exact=False))
    x, w_gu, w_d = make_experts(9, 8, 16, 16, torch.float16)
    weights, ids = routing(9, 8, 2, "one_expert")
    out = run_kernel(x, w_gu, w_d, weights, ids, "silu", decode=False)
    assert_close(out, truth_of(x, w_gu, w_d, weights, ids, "silu"), torch.float16)


def test_autotune_pruning_keeps_tiles_that_fit():
    """The CUDA autotuner's space: tiles no wider than N / deeper than K (BLOCK_M arrives by
    keyword, from the routing), never empty."""
    kept = moe_kernels.prune_grouped_configs(moe_kernels.grouped_configs(), {"N": 48, "K": 20}, BLOCK_M=16)
    assert kept and all(c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_K"] <= 32 for c in kept)
    assert all(c.num_warps == 4 for c in kept)  # 8 warps on a 16 x 64 tile would idle
    big = moe_kernels.prune_grouped_configs(moe_kernels.grouped_configs(), {"N": 14336, "K": 4096}, BLOCK_M=64)
    tiles = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in moe_kernels.grouped_configs()}
    assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in big} == tiles  # large shapes keep every tile
    assert moe_experts.grouped_block_m(pairs=2, num_experts=8) == 16 and moe_experts.grouped_block_m(4096, 8) == 64
