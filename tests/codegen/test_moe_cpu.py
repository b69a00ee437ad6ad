"""Specification of the MoE CPU decompositions (llmopt/codegen/moe_cpu.py).

The decode expression (float, int8, int4 stacks) vs the ops' eager reference vs an fp64
truth over hypothesis-drawn experts (4..64), top-k (1..8), tokens (1..16), fp32/bf16,
routings with empty experts and all tokens on one expert; the one rule choosing the path;
the whole MoE (routing + experts) compiled with ``fullgraph=True`` under the Inductor
executor, prefill and decode sizes, with the code Inductor generated read back: the decode
graph reads the expert rows through an index inside its reductions, calls no experts op
and allocates no gathered ``[T k, 2I, H]`` copy.
"""
import re

import pytest
import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.moe_cases import make_experts, routing
from llmopt import compat
from llmopt.codegen import moe_cpu, moe_experts, moe_quant
from llmopt.codegen.cpu_decompositions import cpu_decompositions
from llmopt.quant import Int4WeightOnly, Int8WeightOnly
from llmopt.quant.experts import QuantizedExperts

DTYPES = [torch.float32, torch.bfloat16]
SCHEMES = {"float": None, "int8": Int8WeightOnly(), "int4-g32": Int4WeightOnly(group_size=32),
           "int4-g32-sym": Int4WeightOnly(group_size=32, symmetric=True)}


def decode_expression(scheme, x, w_gate_up, w_down, weights, ids):
    """(the decode expression, the op's reference, fp64 truth) for one case."""
    acc = torch.float32
    inter = w_gate_up.shape[1] // 2
    if SCHEMES[scheme] is None:
        got = moe_cpu.experts_gemv(x, weights, ids, "silu", inter, moe_cpu.float_rows(w_gate_up, acc),
                                   moe_cpu.float_rows(w_down, acc))
        ref = moe_experts.fused_experts_ref(x, w_gate_up, w_down, weights, ids, "silu")
        truth = moe_experts.fused_experts_ref(x.double(), w_gate_up.double(), w_down.double(), weights.double(), ids,
                                              "silu")
        return got, ref, truth
    m = QuantizedExperts.from_stacks(w_gate_up, w_down, "silu", SCHEMES[scheme])
    if m.scheme == "int8":
        got = moe_cpu.experts_gemv(x, weights, ids, "silu", inter, moe_cpu.int8_rows(m.w_gate_up, m.gate_up_scales, acc),
                                   moe_cpu.int8_rows(m.w_down, m.down_scales, acc))
        ref = moe_quant.fused_experts_int8_ref(x, m.w_gate_up, m.gate_up_scales, m.w_down, m.down_scales, weights,
                                               ids, "silu")
        dq = moe_cpu.int8_rows
        gu, d = (dq(m.w_gate_up, m.gate_up_scales, torch.float64), dq(m.w_down, m.down_scales, torch.float64))
    else:
        g = m.group_size
        got = moe_cpu.experts_gemv(
            x, weights, ids, "silu", inter,
            moe_cpu.int4_rows(m.w_gate_up, m.gate_up_scales, m.gate_up_zeros, g, acc),
            moe_cpu.int4_rows(m.w_down, m.down_scales, m.down_zeros, g, acc),
        )
        ref = moe_quant.fused_experts_int4_ref(x, m.w_gate_up, m.gate_up_scales, m.gate_up_zeros, m.w_down,
                                               m.down_scales, m.down_zeros, weights, ids, "silu", g)
        dq = moe_cpu.int4_rows
        gu = dq(m.w_gate_up, m.gate_up_scales, m.gate_up_zeros, g, torch.float64)
        d = dq(m.w_down, m.down_scales, m.down_zeros, g, torch.float64)
    # Truth: the same quantized stacks in fp64 (the row dots are exact dequantizations there).
    truth = moe_cpu.experts_gemv(x.double(), weights.double(), ids, "silu", inter, gu, d)
    return got, ref, truth


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@given(
    scheme=st.sampled_from(sorted(SCHEMES)),
    num_experts=st.sampled_from([4, 8, 13, 64]),
    top_k=st.sampled_from([1, 2, 4, 8]),
    tokens=st.integers(1, 16),
    hidden=st.sampled_from([32, 64]),
    inter=st.sampled_from([32, 96]),
    kind=st.sampled_from(["random", "one_expert", "half_empty"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_decode_expression_matches_reference_and_fp64(dtype, scheme, num_experts, top_k, tokens, hidden, inter,
                                                      kind, seed):
    top_k = min(top_k, num_experts if kind != "half_empty" else num_experts // 2)
    x, w_gate_up, w_down = make_experts(tokens, num_experts, hidden, inter, dtype, seed)
    weights, ids = routing(tokens, num_experts, top_k, kind, seed)
    got, ref, truth = decode_expression(scheme, x, w_gate_up, w_down, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got.double(), truth.to(dtype).double(), dtype, what=f"{scheme} expression vs fp64")
    assert_close(ref.double(), truth.to(dtype).double(), dtype, what=f"{scheme} reference vs fp64")


def test_the_rule_reads_static_decode_sizes_only():
    """The generated GEMV runs when traced, with a static token count and no more pairs
    than experts (moe_experts.use_decode_path); called eagerly, never."""
    x, ids = torch.zeros(2, 8), torch.zeros(2, 2, dtype=torch.int64)
    assert not moe_cpu.experts_gemv_runs(x, ids, 8)  # a real tensor: the sorted path
    with compat.fake_tensor_mode() as mode:
        fx, fids = mode.from_tensor(x), mode.from_tensor(ids)
        assert moe_cpu.experts_gemv_runs(fx, fids, 8)
        assert moe_cpu.experts_gemv_runs(fx, fids, 4)
        assert not moe_cpu.experts_gemv_runs(fx, fids, 3)
        assert not moe_cpu.experts_gemv_runs(mode.from_tensor(torch.zeros(0, 8)),
                                             mode.from_tensor(torch.zeros(0, 2, dtype=torch.int64)), 8)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_called_decompositions_compute_what_the_ops_compute(scheme):
    """Called eagerly (the aten executor), each table entry runs the sorted path: the op's result."""
    x, w_gate_up, w_down = make_experts(3, 8, 64, 32, torch.float32)
    logits = torch.randn(3, 8)
    ops, table = torch.ops.llmopt, cpu_decompositions()
    weights, ids = table[ops.moe_route.default](logits, 2, "softmax", True)
    want_w, want_ids = ops.moe_route(logits, 2, "softmax", True)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
    if SCHEMES[scheme] is None:
        op, args = ops.fused_experts.default, (x, w_gate_up, w_down, weights, ids, "silu")
    else:
        op, args = QuantizedExperts.from_stacks(w_gate_up, w_down, "silu", SCHEMES[scheme]).call(x, weights, ids)
    assert torch.equal(table[op](*args), op(*args))


class MoeBlock(torch.nn.Module):
    """Routing + experts as the fused graph holds them (stacks frozen as constants)."""

    def __init__(self, num_experts=8, top_k=2, hidden=64, inter=96, dtype=torch.float32, config=None):
        super().__init__()
        _, w_gate_up, w_down = make_experts(1, num_experts, hidden, inter, dtype)
        self.router = torch.nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        self.top_k = top_k
        self.experts = QuantizedExperts.from_stacks(w_gate_up, w_down, "silu", config) if config else None
        self.w_gate_up, self.w_down = torch.nn.Parameter(w_gate_up), torch.nn.Parameter(w_down)

    def forward(self, x):
        weights, ids = torch.ops.llmopt.moe_route(self.router(x), self.top_k, "softmax", True)
        if self.experts is not None:
            return self.experts(x, ids, weights)
        return torch.ops.llmopt.fused_experts(x, self.w_gate_up, self.w_down, weights, ids, "silu")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(block, x):
    compiled = torch.compile(block, backend="llmopt", fullgraph=True, options={"inner": "inductor", "strict": True})
    with torch.no_grad():
        return compat.inductor_generated_code(compiled, x)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_decode_graph_reads_active_rows_without_a_gathered_copy(scheme, fresh_dynamo):
    block = MoeBlock(config=SCHEMES[scheme]).eval()
    x = torch.randn(2, 64)
    got, code = _compiled(block, x)
    with torch.no_grad():
        want = block(x)
    assert_close(got, want.double(), torch.float32, what=f"{scheme} compiled decode")
    source = "\n".join(code)
    assert "fused_experts" not in source and "moe_route" not in source, "an experts op left as an extern call"
    # The stacks are read through the routed id inside the reductions (an index bound check
    # against the number of experts) ...
    assert re.search(r"TORCH_CHECK\(\(0 <= \w+\) & \(\w+ < 8L\)", source)
    # ... and nothing of the gathered size [T k, 2I, H] (or [T k, H, I]) is ever allocated.
    compact = source.replace(" ", "")
    for gathered in ("(2,2,192,64)", "(4,192,64)", "(2,2,64,96)", "(4,64,96)"):
        assert f"empty_strided_cpu({gathered}" not in compact


def test_prefill_graph_calls_the_sorted_path_through_its_twin(fresh_dynamo):
    block = MoeBlock().eval()
    x = torch.randn(9, 64)  # 18 pairs > 8 experts
    got, code = _compiled(block, x)
    with torch.no_grad():
        want = block(x)
    assert_close(got, want.double(), torch.float32, what="compiled prefill")
    source = "\n".join(code)
    assert "llmopt_cpu.fused_experts" in source and "moe_route" not in source


def test_bf16_decode_compiled_matches_fp64(fresh_dynamo):
    block = MoeBlock(dtype=torch.bfloat16).eval()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    got, _ = _compiled(block, x)
    with torch.no_grad():
        weights, ids = torch.ops.llmopt.moe_route(block.router(x), block.top_k, "softmax", True)
        truth = moe_experts.fused_experts_ref(x.double(), block.w_gate_up.double(), block.w_down.double(),
                                              weights.double(), ids, "silu")
    assert_close(got.double(), truth.to(torch.bfloat16).double(), torch.bfloat16, what="bf16 compiled decode vs fp64")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["random", "one_expert", "half_empty"])
@pytest.mark.parametrize("tokens", [1, 9, 64])
def test_grouped_and_looped_sorted_paths_match_fp64(dtype, kind, tokens):
    """The sorted path with ``torch._grouped_mm`` (where the CPU runs it) and with the loop
    over experts: each within the tolerance of the fp64 truth, empty experts included."""
    if compat.cpu_grouped_mm(dtype) is None:
        pytest.skip("this torch has no CPU _grouped_mm: the loop is the only sorted path")
    x, w_gate_up, w_down = make_experts(tokens, 16, 64, 96, dtype)
    weights, ids = routing(tokens, 16, 4, kind)
    truth = moe_experts.fused_experts_ref(x.double(), w_gate_up.double(), w_down.double(), weights.double(), ids, "silu")
    grouped = moe_experts.grouped_experts_ref(x, w_gate_up, w_down, weights, ids, "silu", compat.cpu_grouped_mm(dtype))
    looped = moe_experts.routed_experts_ref(x, 16, lambda e: (w_gate_up[e], w_down[e]), weights, ids, "silu")
    for got, what in ((grouped, "grouped_mm"), (looped, "loop")):
        assert_close(got.double(), truth.to(dtype).double(), dtype, what=what)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # qwen2_moe: shared chunk-experts in the stacks
def test_generate_under_the_inductor_executor_gives_eager_tokens(family, fresh_dynamo):
    """Tiny real architectures, prefill (sorted path through the twin) then decode (the
    generated GEMV): greedy tokens equal eager's."""
    import llmopt
    from models.tiny import tiny_model, tokens

    model = tiny_model(family)
    x = tokens(1, 6)
    with torch.no_grad():
        expected = llmopt.generate(model, x, 6)
        compiled = torch.compile(model, backend="llmopt", options={"strict": True, "inner": "inductor"})
        actual = llmopt.generate(compiled, x, 6)
    assert llmopt.last_report().executor == "inductor"
    assert torch.equal(actual, expected)
