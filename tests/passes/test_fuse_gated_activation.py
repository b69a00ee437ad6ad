"""fuse_gated_activation: ``act(gate) * up`` becomes one llmopt op; spelled-out tanh GELU
becomes one ``aten.gelu(approximate="tanh")``.

Spellings (SiLU/GELU/tanh-GELU, both operand orders, halves of one merged matmul, every
``transformers`` tanh-GELU spelling), exact counts on tiny HF models, the cases that must
not fire (each with its near-miss reason), numerics vs eager and vs an fp64 truth. (Greedy
generation with the whole pipeline is checked in test_fuse_residual_norm.py.)
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from compiled import check_logits, check_numerics, compile_and_report, flat, near_misses_of
from models.tiny import NUM_LAYERS, tiny_model, tokens

PASS = "fuse_gated_activation"
ONLY = ("normalize", PASS)
HIDDEN, INTER = 32, 48
DTYPES = [torch.float32, torch.bfloat16]


def compile_and_run(module, *inputs, only=ONLY):
    return compile_and_report(module, *inputs, only=only)


def near_misses(report):
    return near_misses_of(report, PASS)


def details(report):
    return [rw.detail for rw in report.rewrites if rw.pass_name == PASS]


def x_input(dtype, shape=(2, 5, HIDDEN)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype)


# --------------------------------------------------------------------------- act(gate) * up
class GLU(nn.Module):
    """``down(act(gate(x)) * up(x))`` with ``act`` any callable; ``merged`` computes gate and
    up with one linear and slices its output (what merge_parallel_linears produces)."""

    def __init__(self, act, up_first=False, merged=False):
        super().__init__()
        self.act, self.up_first, self.merged = act, up_first, merged
        self.gate = nn.Linear(HIDDEN, INTER, bias=False)
        self.up = nn.Linear(HIDDEN, INTER, bias=False)
        self.gate_up = nn.Linear(HIDDEN, 2 * INTER, bias=False)
        self.down = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        if self.merged:
            gu = self.gate_up(x)
            g, u = gu[..., :INTER], gu[..., INTER:]
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(u * self.act(g) if self.up_first else self.act(g) * u)


ACTS = {
    "silu": (F.silu, "silu"),
    "gelu": (F.gelu, "gelu"),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh"),
}


@pytest.mark.parametrize(
    "act, up_first, dtype",
    [(act, False, dtype) for act in sorted(ACTS) for dtype in DTYPES] + [(act, True, torch.float32) for act in sorted(ACTS)],
)
def test_gated_activation_spellings_fuse(act, up_first, dtype):
    fn, name = ACTS[act]
    m = GLU(fn, up_first=up_first).to(dtype).eval()
    x = x_input(dtype)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 1, near_misses(report)
    assert report.ops_after.get("llmopt.gated_activation.default") == 1
    assert "aten.silu.default" not in report.ops_after and "aten.gelu.default" not in report.ops_after
    assert "aten.mul.Tensor" not in report.ops_after
    assert details(report) == [f"{name}(gate) * up → gated_activation({name!r})"]
    check_numerics(out, m, (x,), dtype)


def _gated_inputs(report):
    g = report.graph_after
    (node,) = [n for n, d in g.nodes(data=True) if d["op"] == "llmopt.gated_activation.default"]
    return [g.nodes[p]["op"] for p in g.predecessors(node)], node


@pytest.mark.parametrize("dtype", DTYPES)
def test_halves_of_a_merged_matmul_are_read_in_place(dtype):
    m = GLU(F.silu, merged=True).to(dtype).eval()
    x = x_input(dtype)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 1
    preds, _ = _gated_inputs(report)
    assert preds == ["aten.slice.Tensor", "aten.slice.Tensor"]  # views, no copy in between
    assert "aten.clone.default" not in report.ops_after and "aten.contiguous.default" not in report.ops_after
    assert "in place" in details(report)[0]
    check_numerics(out, m, (x,), dtype)


def test_after_merge_parallel_linears_gate_and_up_are_slices():
    pytest.importorskip("llmopt.passes.merge_parallel_linears")
    m = GLU(F.silu).eval()
    x = x_input(torch.float32)
    out, report = compile_and_run(m, x, only=("normalize", "merge_parallel_linears", PASS))
    assert report.rewrites_by_pass()["merge_parallel_linears"] == 1
    assert report.rewrites_by_pass()[PASS] == 1
    preds, _ = _gated_inputs(report)
    assert preds == ["aten.slice.Tensor", "aten.slice.Tensor"]
    check_numerics(out, m, (x,), torch.float32)


# --------------------------------------------------------------------------- tanh GELU spelled out
def gelu_hand_written(t):
    # Another arrangement of the same products: x³ as x*x*x, the 1/2 as a division.
    return t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * t + math.sqrt(2.0 / math.pi) * 0.044715 * t * t * t)) / 2


# gelu_new: GPT-2, GPT-J, Phi (NewGELUActivation); gelu_fast: x * 0.7978845608 * (1 + 0.044715 x²);
# gelu_python_tanh (transformers >= 4.5x): x * 0.5 * (1 + tanh(.)) with pow(x, 3.0);
# gelu_accurate: 1 + tanh with integer 1 and pow(x, 3). Each spelling the installed
# transformers has.
TANH_GELUS = {
    **{name: ACT2FN[name] for name in ("gelu_new", "gelu_fast", "gelu_python_tanh", "gelu_accurate") if name in ACT2FN},
    "hand_written": gelu_hand_written,
}


@pytest.mark.parametrize(
    "spelling, dtype", [(s, torch.float32) for s in sorted(TANH_GELUS)] + [("gelu_new", torch.bfloat16)]
)
def test_spelled_out_tanh_gelu_collapses(spelling, dtype):
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj, self.act = nn.Linear(HIDDEN, INTER), nn.Linear(INTER, HIDDEN), TANH_GELUS[spelling]

        def forward(self, x):
            return self.proj(self.act(self.fc(x)))

    m = MLP().to(dtype).eval()
    x = x_input(dtype)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 1, near_misses(report)
    assert report.ops_after.get("aten.gelu.default") == 1
    assert "aten.tanh.default" not in report.ops_after and "aten.pow.Tensor_Scalar" not in report.ops_after
    assert "→ aten.gelu(approximate='tanh')" in details(report)[0]
    check_numerics(out, m, (x,), dtype)


def test_spelled_out_geglu_collapses_then_fuses():
    # gelu_new(gate) * up: the collapse makes it a gelu, which then fuses with up (2 rewrites).
    m = GLU(ACT2FN["gelu_new"]).eval()
    x = x_input(torch.float32)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 2
    assert report.ops_after.get("llmopt.gated_activation.default") == 1
    assert "aten.gelu.default" not in report.ops_after
    check_numerics(out, m, (x,), torch.float32)


# --------------------------------------------------------------------------- must not fire
def gelu_wrong_cubic(t):
    return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.045 * torch.pow(t, 3.0))))


def gelu_wrong_scale(t):
    return 0.5 * t * (1.0 + torch.tanh(0.8 * (t + 0.044715 * torch.pow(t, 3.0))))


def gelu_extra_term(t):
    return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0) + 0.01 * t * t)))


class Variant(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.scale = nn.Parameter(torch.randn(HIDDEN))

    def forward(self, g, u):
        how = self.how
        if how == "activation_reused":
            a = F.silu(g)
            return a * u, a
        if how == "broadcast_up":
            return F.silu(g) * u[:1]
        if how == "dtype_promotion":
            return F.silu(g) * u.float()
        if how == "gelu_intermediate_reused":
            inner = g + 0.044715 * torch.pow(g, 3.0)
            return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * inner)) * u, inner
        if how == "wrong_cubic":
            return gelu_wrong_cubic(g)
        if how == "wrong_scale":
            return gelu_wrong_scale(g)
        if how == "extra_term":
            return gelu_extra_term(g)
        raise ValueError(how)


NOT_FIRING = {
    "activation_reused": "has another user",
    "broadcast_up": "broadcast",
    "dtype_promotion": "differ in dtype",
    "gelu_intermediate_reused": "has another user",
    "wrong_cubic": "constants differ",
    "wrong_scale": "constants differ",
    "extra_term": "constants differ",
}


@pytest.mark.parametrize("how", sorted(NOT_FIRING))
def test_variants_do_not_fire_and_say_why(how):
    dtype = torch.bfloat16
    g, u = x_input(dtype), x_input(dtype, (2, 5, HIDDEN)) * 0.5
    m = Variant(how).eval()
    out, report = compile_and_run(m, g, u)
    assert report.rewrites_by_pass()[PASS] == 0
    assert "llmopt.gated_activation.default" not in report.ops_after
    assert report.ops_after.get("aten.gelu.default") is None
    reasons = near_misses(report)
    assert any(NOT_FIRING[how] in r for r in reasons), reasons
    with torch.no_grad():
        eager = m(g, u)
    for a, e in zip(flat(out), flat(eager)):
        assert torch.equal(a, e)  # untouched graph: bit-identical to eager


@pytest.mark.parametrize(
    "fn",
    [ACT2FN["quick_gelu"], torch.tanh, lambda t: F.relu(t) * t, lambda t: torch.tanh(t) + 1.0],
    ids=["quick_gelu", "tanh", "relu*x", "1+tanh"],
)
def test_other_functions_are_left_alone_silently(fn):
    x = x_input(torch.float32)
    out, report = compile_and_run(fn, x)
    assert report.rewrites_by_pass()[PASS] == 0
    assert not near_misses(report)
    assert torch.equal(out, fn(x))


# --------------------------------------------------------------------------- tiny HF models
L = NUM_LAYERS
# family: (rewrites, fused gated ops, aten.gelu left) for tokens(2, 7).
EXPECTED = {
    "llama": (L, L, 0),  # SwiGLU: silu(gate) * up per layer
    "mistral": (L, L, 0),
    "qwen2": (L, L, 0),
    "gemma": (L, L, 0),  # GeGLU with gelu_pytorch_tanh: aten.gelu(tanh) * up per layer
    "gpt2": (L, 0, L),  # gelu_new spelled out, no gate: one collapse per layer
    "phi": (L, 0, L),  # gelu_new spelled out, no gate: one collapse per layer
    "bert": (0, 0, L),  # exact aten.gelu, no gate: nothing to do
}


@pytest.mark.parametrize(
    "family, pipeline, dtype",
    [
        ("llama", "default", torch.float32),
        ("llama", "only", torch.bfloat16),
        ("mistral", "default", torch.bfloat16),
        ("qwen2", "only", torch.float32),
        ("gemma", "default", torch.bfloat16),
        ("gpt2", "only", torch.float32),
        ("phi", "default", torch.bfloat16),
        ("bert", "only", torch.float32),
    ],
)
def test_tiny_hf_model_counts_and_numerics(family, pipeline, dtype):
    model = tiny_model(family, dtype)
    x = tokens(2, 7)
    out, report = compile_and_run(model, x, only=None if pipeline == "default" else ONLY)
    rewrites, gated, gelus = EXPECTED[family]
    assert report.rewrites_by_pass()[PASS] == rewrites, near_misses(report)
    assert not near_misses(report)
    # select_linear_kernel folds a gated activation into the merged gate/up linear that
    # feeds it (its epilogue), on CPU as on CUDA: count both spellings.
    folded = sum(1 for rw in report.rewrites if rw.pass_name == "select_linear_kernel" and "gated" in rw.detail)
    assert report.ops_after.get("llmopt.gated_activation.default", 0) + folded == gated
    assert report.ops_after.get("aten.gelu.default", 0) == gelus
    assert "aten.tanh.default" not in report.ops_after or family == "bert"  # BERT's pooler tanh stays
    assert "aten.silu.default" not in report.ops_after
    layers = {rw.layer for rw in report.rewrites if rw.pass_name == PASS}
    assert len(layers) == rewrites, "the report names the layer of every rewrite"
    if gated and pipeline == "default" and "merge_parallel_linears" in report.rewrites_by_pass():
        if report.rewrites_by_pass()["merge_parallel_linears"]:
            assert all("in place" in d for d in details(report))  # merged gate/up halves, no copy
    check_logits(out[0], model, x, dtype, family)
