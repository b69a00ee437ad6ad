"""merge_parallel_linears: Q/K/V, gate/up and any shared-input group become one matmul."""
import pytest
import torch
import torch.nn as nn

import llmopt
from conftest import assert_close
from models.tiny import tiny_model, tokens

PASS = "merge_parallel_linears"


def run(module, *inputs, only=("normalize", PASS)):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend="llmopt", options={"strict": True, "only": list(only)})(*inputs)
    return out, llmopt.last_report()


class Group(nn.Module):
    """Three linears on one input: different widths (GQA-like), bias on some."""

    def __init__(self, widths=(32, 8, 8), biases=(True, False, True), other_input=False):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(16, w, bias=b) for w, b in zip(widths, biases))
        self.other_input = other_input

    def forward(self, x, y=None):
        outs = [lin(x) for lin in self.lins]
        if self.other_input:
            outs.append(torch.nn.functional.linear(x, y))  # weight is an input, not frozen
        return [o.view(*o.shape[:-1], -1, 4) for o in outs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("biases", [(True, True, True), (False, False, False), (True, False, True)])
def test_group_merges_into_one_linear_with_views(biases, dtype):
    m = Group(biases=biases).to(dtype).eval()
    x = torch.randn(2, 5, 16, dtype=dtype)
    out, report = run(m, x)
    for a, e in zip(out, m(x)):
        assert_close(a, e.detach(), dtype)
    assert report.rewrites_by_pass()[PASS] == 1
    assert report.ops_after.get("aten.linear.default") == 1
    assert report.ops_after.get("aten.slice.Tensor") == 3  # views, no copies
    assert "aten.split_with_sizes.default" not in report.ops_after


def test_non_constant_member_is_skipped_with_reason():
    m = Group(other_input=True).eval()
    x, y = torch.randn(3, 16), torch.randn(8, 16)
    out, report = run(m, x, y)
    for a, e in zip(out, m(x, y)):
        assert_close(a, e.detach(), torch.float32)
    assert report.rewrites_by_pass()[PASS] == 1  # the three frozen ones still merge
    reasons = [nm.reason for nm in report.near_misses if nm.pass_name == PASS]
    assert any("not a frozen constant" in r for r in reasons)


def test_lone_linear_is_untouched():
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    out, report = run(m, torch.randn(2, 16))
    assert report.rewrites_by_pass()[PASS] == 0
    assert report.ops_after.get("aten.linear.default") == 2


# Expected merges per layer on real architectures: Q/K/V (1) + gate/up (1) for SwiGLU
# models; BERT: Q/K/V with biases (1); GPT-2: its c_attn is already one Conv1D (0); Phi:
# attention and MLP run in parallel on the same normed input, so q/k/v/fc1 merge (1).
EXPECTED = {"llama": 2, "mistral": 2, "qwen2": 2, "gemma": 2, "bert": 1, "gpt2": 0, "phi": 1}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_rewrite_count_on_hf_architectures(family):
    model = tiny_model(family)
    x = tokens(2, 7)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="llmopt", options={"strict": True})(x)
    report = llmopt.last_report()
    with torch.no_grad():
        assert_close(out[0], model(x)[0], torch.float32)
    layers = model.config.num_hidden_layers
    assert report.rewrites_by_pass()[PASS] == EXPECTED[family] * layers
    hits = [r.layer for r in report.rewrites if r.pass_name == PASS]
    assert all(".0." in h or ".1." in h for h in hits), hits


def test_merge_frees_each_member_before_copying_the_next(monkeypatch):
    """The merged weight is filled member by member, and each member's storage is freed as
    soon as it is a view of its rows: when member i is copied, members 0..i-1 are gone, so
    the merge holds at most one member twice, never the whole group (docs/memory.md).
    Tracked on the storages themselves (weak references), not on timing or RSS."""
    from torch.multiprocessing.reductions import StorageWeakRef

    import llmopt.passes.merge_parallel_linears as merge

    checked = []
    share = merge.share_storage

    def tracking(gm, new, parts, fill=None):
        if fill is None:
            return share(gm, new, parts, fill)
        members = [StorageWeakRef(getattr(gm, old).untyped_storage()) for old, _ in parts]

        def checked_fill(i):
            still_held = [j for j in range(i) if not members[j].expired()]
            checked.append((len(parts), i, still_held))
            fill(i)

        return share(gm, new, parts, checked_fill)

    monkeypatch.setattr(merge, "share_storage", tracking)
    model = tiny_model("llama")
    x = tokens(1, 6)
    with torch.no_grad():
        expected = model(x).logits
    out, report = run(model, x)
    assert_close(out.logits, expected, torch.float32)
    groups = sum(r.pass_name == PASS for r in report.rewrites)
    assert groups == 2 * model.config.num_hidden_layers  # Q/K/V and gate/up of every layer
    # Every member of every group was filled, and no earlier member of its group was alive.
    assert len(checked) == 5 * model.config.num_hidden_layers
    assert all(not held for _, _, held in checked), [c for c in checked if c[2]]
