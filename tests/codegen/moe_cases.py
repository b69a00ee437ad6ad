"""Shared cases of the MoE kernel tests: expert stacks, routings (balanced, all to one
expert, half the experts empty) and NaN-poisoned launcher outputs."""
import pytest
import torch

from llmopt.codegen import moe_experts


def make_experts(tokens, num_experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    return x, w_gate_up, w_down


def routing(tokens, num_experts, top_k, kind, seed=0):
    """(weights fp32, ids int64) [tokens, top_k]: 'random', 'one_expert' (every token's
    first slot on expert E-1, the rest on the next ones), 'half_empty' (only even experts)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=g)
    if kind == "one_expert":
        scores[:, -1] += 10.0
    elif kind == "half_empty":
        scores[:, 1::2] -= 10.0
    weights, ids = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty in the launchers returns NaN (floats): an unwritten element fails."""
    real_empty = torch.empty

    def nan_empty(*shape, dtype=None, device=None, **kw):
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    # moe_experts.torch is the torch module: every launcher's torch.empty is patched
    monkeypatch.setattr(moe_experts.torch, "empty", nan_empty)
    yield
