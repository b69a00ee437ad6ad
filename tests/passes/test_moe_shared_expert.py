"""moe_shared_expert: a shared expert joins fused_experts as ceil(I_s / I) chunk-experts.

The chunk math itself (I_s not a multiple of I: the last chunk zero-padded) against the dense
MLP in fp64; on tiny Qwen2-MoE (sigmoid-gated shared expert, I_s = 80 over I = 48: 2 chunks)
one fused_experts per layer and no dense shared MLP left, logits vs eager and the int8 path;
on a hand-written block an ungated (DeepSeek-style) shared expert, one of exactly I units
(its weights become views of the stacks), and one whose activation differs (a near-miss,
still correct). The routed experts' parameters become views of the new stacks (held once).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt

from conftest import assert_close
from llmopt.codegen.gated_activation import gated_activation_ref
from llmopt.codegen.moe_experts import chunk_experts, zero_preserving
from models.tiny import NUM_LAYERS, tiny_model, tokens
from passes.moe_compile import PASS, fresh_dynamo, compile_and_run, details, fused_once_and_equal, near_misses  # noqa: F401  (the fixture)

HIDDEN, INTER, EXPERTS, TOP_K = 32, 24, 4, 2
EXP_Q = 4  # tiny Qwen2-MoE: experts per layer


@pytest.mark.parametrize("i_s, inter", [(80, 48), (72, 24), (5, 7), (13, 4)])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_chunk_experts_sum_to_the_dense_mlp(i_s, inter, activation):
    g = torch.Generator().manual_seed(i_s)
    h = 16
    wg, wu = torch.randn(i_s, h, generator=g, dtype=torch.float64), torch.randn(i_s, h, generator=g, dtype=torch.float64)
    wd = torch.randn(h, i_s, generator=g, dtype=torch.float64)
    x = torch.randn(9, h, generator=g, dtype=torch.float64)
    dense = gated_activation_ref(x @ wg.t(), x @ wu.t(), activation) @ wd.t()
    gu, dn = chunk_experts(wg, wu, wd, inter)
    c = -(-i_s // inter)
    assert gu.shape == (c, 2 * inter, h) and dn.shape == (c, h, inter)
    chunks = sum(gated_activation_ref(x @ gu[j, :inter].t(), x @ gu[j, inter:].t(), activation) @ dn[j].t() for j in range(c))
    assert_close(chunks, dense)
    pad = c * inter - i_s
    if pad:  # the padding is zeros: rows of gate and up, columns of down
        assert not gu[-1, inter - pad:inter].any() and not gu[-1, 2 * inter - pad:].any() and not dn[-1, :, inter - pad:].any()


def test_zero_preserving_activations():
    assert all(zero_preserving(a) for a in ("silu", "gelu", "gelu_tanh"))


def test_qwen2_moe_shared_expert_is_one_fused_call_per_layer():
    model = tiny_model("qwen2_moe")
    x = tokens(2, 7)
    with torch.no_grad():  # before compiling: the shared experts' own weights are released
        eager = model(x).logits
    out, report = compile_and_run(model, x)
    assert report.rewrites_by_pass()[PASS] == NUM_LAYERS, near_misses(report)
    assert all(d.endswith("+ sigmoid-gated shared expert (I=80) fused as 2 chunk-experts") for d in details(report))
    assert report.ops_after.get("llmopt.fused_experts.default") == NUM_LAYERS
    # No dense shared MLP left: no gated activation, no sigmoid (the gate is the chunk-experts' weight).
    assert "llmopt.gated_activation.default" not in report.ops_after
    assert_close(out.logits, eager, torch.float32, what="qwen2_moe logits vs eager")
    experts = model.model.layers[0].mlp.experts
    stack = experts.gate_up_proj
    # The routed stack is the head of the fused [E + 2, 2I, H] stack: held once.
    assert stack.untyped_storage().nbytes() == (EXPERTS + 2) * stack[0].numel() * stack.element_size()


def _held_bytes(model) -> int:
    """Bytes of the distinct storages behind the parameters (a released one holds 0)."""
    return sum({id(p.untyped_storage()): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def test_qwen2_moe_shared_expert_is_held_once_after_prefill_and_decode(monkeypatch):
    """I_s = 80 over I = 48: the chunks are a copy in the stacks, so the shared expert's own
    weights are released (derived from three sources); a decode recompile reuses the stacks."""
    import llmopt.passes.moe_shared_expert as shared_pass
    from llmopt.weight_release import ReleasedWeightError, released

    model = tiny_model("qwen2_moe")
    x = tokens(1, 6)
    layers = [layer.mlp for layer in model.model.layers]
    size = next(model.parameters()).element_size()
    c = 2
    stacks = sum(((EXP_Q + c) * m.experts.gate_up_proj[0].numel() + (EXP_Q + c) * m.experts.down_proj[0].numel()) * size
                 for m in layers)
    mlp_owned = {id(p) for m in layers for p in (*m.experts.parameters(), *m.shared_expert.parameters())}
    rest = sum(p.numel() * size for p in model.parameters() if id(p) not in mlp_owned)
    with torch.no_grad():
        prefill = model(x, use_cache=True)
        step = model(x[:, -1:] + 1, past_key_values=prefill.past_key_values).logits
        eager_prefill = prefill.logits
    compiled = torch.compile(model, backend="llmopt", options={"strict": True})
    with torch.no_grad():
        out = compiled(x, use_cache=True)
        assert_close(out.logits, eager_prefill, torch.float32, what="qwen2_moe prefill vs eager")
        # the newest report, not the count: the registry keeps the last 64 (a full suite fills it)
        chunked, last_report = [], (llmopt.reports() or [None])[-1]
        monkeypatch.setattr(shared_pass, "chunk_experts", lambda *a: chunked.append(a) or chunk_experts(*a))
        got = compiled(x[:, -1:] + 1, past_key_values=out.past_key_values).logits  # decode: a recompile
        assert_close(got, step, torch.float32, what="qwen2_moe decode vs eager")
    assert llmopt.reports()[-1] is not last_report  # the decode step did recompile
    assert not chunked, "the decode recompile re-chunked the (released) shared expert"
    for m in layers:
        for p in m.shared_expert.parameters():
            assert released(p) is not None and p.untyped_storage().nbytes() == 0
    assert _held_bytes(model) == stacks + rest  # no second copy of the shared expert
    with pytest.raises(ReleasedWeightError, match="called eagerly.*released after torch.compile.*release_weights"):
        model(x)
    with pytest.raises(ReleasedWeightError, match="load_state_dict.*release_weights"):
        model.load_state_dict(model.state_dict())


def test_qwen2_moe_int8_experts_include_the_shared_chunks():
    model = tiny_model("qwen2_moe")
    x = tokens(1, 6)
    with torch.no_grad():  # before compiling: quantizing releases the float weights
        eager = model(x).logits
    out, report = compile_and_run(model, x, quantize="int8")
    assert report.ops_after.get("llmopt.fused_experts_int8.default") == NUM_LAYERS
    assert "llmopt.gated_activation.default" not in report.ops_after
    err = ((out.logits - eager).norm() / eager.norm()).item()
    assert err < 2e-2, err  # the int8 bound tests/quant uses


class SharedMoE(nn.Module):
    """A transformers-5 batched-spelling MoE block plus a shared expert of ``shared_inter``
    units added to its output, gated by a sigmoid or not (DeepSeek-style)."""

    def __init__(self, shared_inter, gated=True, shared_act=F.silu):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN) / HIDDEN**0.5)
        self.down = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER) / INTER**0.5)
        self.s_gate = nn.Linear(HIDDEN, shared_inter, bias=False)
        self.s_up = nn.Linear(HIDDEN, shared_inter, bias=False)
        self.s_down = nn.Linear(shared_inter, HIDDEN, bias=False)
        self.s_router = nn.Linear(HIDDEN, 1, bias=False) if gated else None
        self.shared_act = shared_act

    def forward(self, hidden):
        b, s, h = hidden.shape
        x = hidden.view(-1, h)
        weights, ids = torch.topk(torch.softmax(self.router(x).float(), -1), TOP_K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(TOP_K, dim=0)
        gate, up = torch.bmm(self.gate_up[flat], xs.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(self.down[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        out = (y * weights.reshape(-1, 1)).view(-1, TOP_K, h).sum(1).to(hidden.dtype)
        shared = self.s_down(self.shared_act(self.s_gate(x)) * self.s_up(x))
        if self.s_router is not None:
            shared = torch.sigmoid(self.s_router(x)) * shared
        return (out + shared).view(b, s, h)


@pytest.mark.parametrize("gated", [True, False], ids=["sigmoid_gate", "ungated"])
def test_shared_expert_of_any_width_is_fused(gated):
    m = SharedMoE(shared_inter=2 * INTER + 5, gated=gated).eval()
    x = torch.randn(2, 5, HIDDEN)
    report = fused_once_and_equal(m, x)
    assert details(report)[0].endswith(f"{'sigmoid-gated ' if gated else ''}shared expert (I={2 * INTER + 5}) fused as 3 chunk-experts")
    # One linear left: the router (merged with the shared gate's [1, H] row when gated).
    assert report.ops_after.get("aten.linear.default", 0) + report.ops_after.get("llmopt.linear.default", 0) == 1


def test_a_shared_expert_of_exactly_one_chunk_becomes_views_of_the_stacks():
    m = SharedMoE(shared_inter=INTER).eval()
    x = torch.randn(1, 3, HIDDEN)
    report = fused_once_and_equal(m, x)
    assert "fused as 1 chunk-experts" in details(report)[0]
    whole = m.gate_up.untyped_storage()
    for p in (m.s_gate.weight, m.s_up.weight):
        assert p.untyped_storage().data_ptr() == whole.data_ptr()
    assert m.s_down.weight.untyped_storage().data_ptr() == m.down.untyped_storage().data_ptr()


def test_a_shared_expert_with_another_activation_is_a_near_miss():
    m = SharedMoE(shared_inter=INTER + 3, shared_act=F.gelu).eval()
    x = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        want = m(x)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 1  # the routed experts still fuse
    assert any("its activation gelu is not the routed experts' silu" in r for r in near_misses(report)), near_misses(report)
    assert "chunk-experts" not in details(report)[0]
    assert_close(out, want)
