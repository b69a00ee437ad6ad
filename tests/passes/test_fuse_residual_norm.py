"""fuse_residual_norm: ``h = x + residual; y = norm(h)`` becomes one llmopt op returning (y, h).

Spellings (HF Llama, Gemma's (offset + w), x*x, / sqrt, F.rms_norm, no upcast, no weight,
LayerNorm with/without affine, pre- and post-norm), exact counts on tiny HF models, the
cases that must not fire (each with its near-miss reason), numerics vs eager and vs an fp64
truth, and greedy generation identical to eager.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from compiled import check_logits, check_numerics, compile_and_report, flat, generate_eager_and_compiled, near_misses_of
from conftest import assert_close
from models.tiny import NUM_LAYERS, tiny_model, tokens

PASS = "fuse_residual_norm"
ONLY = ("normalize", PASS)
HIDDEN = 48


def compile_and_run(module, *inputs, only=ONLY):
    return compile_and_report(module, *inputs, only=only)


def near_misses(report):
    return near_misses_of(report, PASS)


def fused_ops(report):
    return {k: v for k, v in report.ops_after.items() if k.startswith("llmopt.") and "norm" in k}


# --------------------------------------------------------------------------- spellings
class ResidualRMSNorm(nn.Module):
    """``h = x + residual; y = rmsnorm(h)`` in the spellings real models use; returns (y, h)
    so that h is also the residual stream (pre-norm)."""

    def __init__(self, spelling="llama", eps=1e-6, residual=True, offset=1.0):
        super().__init__()
        self.spelling, self.eps, self.residual, self.offset = spelling, eps, residual, offset
        g = torch.Generator().manual_seed(3)
        init = torch.randn(HIDDEN, generator=g) * 0.3
        self.weight = nn.Parameter(init if spelling == "gemma" else 1.0 + init)

    def norm(self, h):
        s, eps, dtype = self.spelling, self.eps, h.dtype
        if s == "F.rms_norm":
            return F.rms_norm(h, (HIDDEN,), self.weight, eps)
        if s == "no_upcast":  # computed in the activation dtype
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * self.weight
        hf = h.to(torch.float32)
        if s == "llama":  # LlamaRMSNorm: cast back, then weight
            hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
            return self.weight * hf.to(dtype)
        if s == "x*x":
            hf = hf * torch.rsqrt((hf * hf).mean(-1, keepdim=True) + eps)
            return hf.to(dtype) * self.weight
        if s == "div_sqrt":
            hf = hf / torch.sqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
            return self.weight * hf.to(dtype)
        if s == "gemma":  # GemmaRMSNorm: weight (with offset) in fp32, then cast
            out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
            return (out * (self.offset + self.weight.float())).type_as(h)
        if s == "t5":  # T5LayerNorm: the mean square in fp32, the scaling applied to h itself
            variance = hf.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(variance + eps)
            if self.weight.dtype in (torch.float16, torch.bfloat16):
                h = h.to(self.weight.dtype)
            return self.weight * h
        if s == "no_weight":
            return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        raise ValueError(s)

    def forward(self, x, residual=None):
        if not self.residual:
            return self.norm(x)
        h = x + residual
        return self.norm(h), h


def inputs(dtype, shape=(2, 5, HIDDEN)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "spelling, eps",
    [("llama", 1e-6), ("x*x", 1e-5), ("div_sqrt", 1e-6), ("gemma", 1e-6), ("F.rms_norm", 1e-5), ("no_upcast", 1e-6), ("t5", 1e-6)],
)
def test_residual_rms_norm_spellings_fuse(spelling, eps, dtype):
    m = ResidualRMSNorm(spelling, eps).to(dtype).eval()
    x, r = inputs(dtype)
    (y, h), report = compile_and_run(m, x, r)
    assert report.rewrites_by_pass()[PASS] == 1, near_misses(report)
    assert fused_ops(report) == {"llmopt.add_rms_norm.default": 1}
    assert "aten.rsqrt.default" not in report.ops_after and "aten.sqrt.default" not in report.ops_after
    assert "aten.add.Tensor" not in report.ops_after  # the residual add went into the op
    (detail,) = [rw.detail for rw in report.rewrites if rw.pass_name == PASS]
    assert f"eps={eps:g}" in detail or spelling == "F.rms_norm"  # F.rms_norm rounds eps to fp32
    with torch.no_grad():
        assert torch.equal(h, x + r), "the residual stream must be exactly eager's x + residual"
    check_numerics((y, h), m, (x, r), dtype)


@pytest.mark.parametrize("offset", [1.0, 0.5])
def test_gemma_weight_offset_is_read_from_the_graph(offset):
    m = ResidualRMSNorm("gemma", offset=offset).to(torch.bfloat16).eval()
    x, r = inputs(torch.bfloat16)
    out, report = compile_and_run(m, x, r)
    (detail,) = [rw.detail for rw in report.rewrites if rw.pass_name == PASS]
    assert f"weight offset {offset:g}" in detail
    check_numerics(out, m, (x, r), torch.bfloat16)


def test_large_eps_is_read_from_the_graph():
    # With eps comparable to mean(h^2), a hard-coded eps would be far outside tolerance.
    m = ResidualRMSNorm("llama", eps=0.75).eval()
    x, r = inputs(torch.float32)
    out, report = compile_and_run(m, x, r)
    assert report.rewrites_by_pass()[PASS] == 1
    check_numerics(out, m, (x, r), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_norm_without_residual_becomes_rms_norm(dtype):
    m = ResidualRMSNorm("llama", residual=False).to(dtype).eval()
    x, _ = inputs(dtype)
    y, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 1
    assert fused_ops(report) == {"llmopt.rms_norm.default": 1}
    check_numerics(y, m, (x,), dtype)


def test_rms_norm_without_weight_uses_a_unit_weight():
    m = ResidualRMSNorm("no_weight").to(torch.bfloat16).eval()
    x, r = inputs(torch.bfloat16)
    out, report = compile_and_run(m, x, r)
    assert fused_ops(report) == {"llmopt.add_rms_norm.default": 1}
    check_numerics(out, m, (x, r), torch.bfloat16)


def test_broadcasting_add_is_not_fused_but_the_norm_is():
    # GPT-2/BERT embeddings: token [B, S, H] + position [1, S, H]. The add broadcasts, so
    # only the norm is fused, and the rewrite says why.
    m = ResidualRMSNorm("llama").eval()
    x, r = inputs(torch.float32)
    r = r[:1]
    out, report = compile_and_run(m, x, r)
    assert fused_ops(report) == {"llmopt.rms_norm.default": 1}
    (detail,) = [rw.detail for rw in report.rewrites if rw.pass_name == PASS]
    assert "broadcasts" in detail
    check_numerics(out, m, (x, r), torch.float32)


def test_mixed_dtype_add_is_not_fused_but_the_norm_is():
    m = ResidualRMSNorm("llama").eval()
    x, r = inputs(torch.float32)
    x = x.to(torch.bfloat16)  # bf16 + fp32 promotes: h is fp32, not x's dtype
    out, report = compile_and_run(m, x, r)
    assert fused_ops(report) == {"llmopt.rms_norm.default": 1}
    check_numerics(out, m, (x, r), torch.float32)


class ResidualLayerNorm(nn.Module):
    """Pre-norm (GPT-2: returns y and h) or post-norm (BERT: h used only by the norm)."""

    def __init__(self, affine=True, bias=True, post_norm=False, functional=False, eps=1e-5):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN, eps=eps, elementwise_affine=affine, bias=bias)
        if affine:
            with torch.no_grad():
                self.ln.weight.add_(0.3 * torch.randn(HIDDEN))
                if bias:
                    self.ln.bias.add_(0.3 * torch.randn(HIDDEN))
        self.post_norm, self.functional = post_norm, functional

    def forward(self, x, residual):
        h = x + residual
        if self.functional:
            y = F.layer_norm(h, (HIDDEN,), self.ln.weight, self.ln.bias, self.ln.eps)
        else:
            y = self.ln(h)
        return y if self.post_norm else (y, h)


LAYER_NORMS = {
    "weight+bias": {},
    "weight-only": {"bias": False},
    "no-affine": {"affine": False},
    "post-norm": {"post_norm": True},
    "F.layer_norm": {"functional": True, "eps": 1e-12},
}


@pytest.mark.parametrize(
    "kind, dtype",
    [(k, torch.float32) for k in LAYER_NORMS] + [("weight+bias", torch.bfloat16), ("post-norm", torch.bfloat16)],
)
def test_residual_layer_norm_fuses(kind, dtype):
    kwargs = LAYER_NORMS[kind]
    m = ResidualLayerNorm(**kwargs).to(dtype).eval()
    x, r = inputs(dtype)
    out, report = compile_and_run(m, x, r)
    assert report.rewrites_by_pass()[PASS] == 1, near_misses(report)
    assert fused_ops(report) == {"llmopt.add_layer_norm.default": 1}
    assert "aten.native_layer_norm.default" not in report.ops_after
    check_numerics(out, m, (x, r), dtype)


def test_layer_norm_without_residual():
    m = nn.LayerNorm(HIDDEN).eval()
    x, _ = inputs(torch.float32)
    out, report = compile_and_run(m, x)
    assert fused_ops(report) == {"llmopt.layer_norm.default": 1}
    check_numerics(out, m, (x,), torch.float32)


# --------------------------------------------------------------------------- must not fire
class Variant(nn.Module):
    """RMSNorms that are not the pattern, or whose intermediates are needed elsewhere."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(HIDDEN))

    def forward(self, x, residual, w=None):
        h = x + residual
        hf = h.to(torch.float32)
        eps, how = 1e-6, self.how
        if how == "eps_outside_rsqrt":
            return self.weight * (hf * (torch.rsqrt(hf.pow(2).mean(-1, keepdim=True)) + eps)).to(h.dtype)
        if how == "eps_outside_sqrt":
            return self.weight * (hf / (torch.sqrt(hf.pow(2).mean(-1, keepdim=True)) + eps)).to(h.dtype)
        if how == "mean_over_other_dim":
            return self.weight * (hf * torch.rsqrt(hf.pow(2).mean(1, keepdim=True) + eps)).to(h.dtype)
        if how == "scales_another_tensor":
            return self.weight * (x.float() * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
        var = hf.pow(2).mean(-1, keepdim=True)
        normed = hf * torch.rsqrt(var + eps)
        if how == "non_constant_weight":
            return w * normed.to(h.dtype)
        if how == "fp32_weight":  # fp32 weight x bf16 row promotes the output to fp32
            return self.weight.float() * normed.to(h.dtype)
        y = self.weight * normed.to(h.dtype)
        if how == "variance_reused":
            return y, var
        if how == "normalized_reused":
            return y, normed
        if how == "upcast_reused":
            return y, hf * 2
        raise ValueError(how)


NOT_FIRING = {
    "eps_outside_rsqrt": "not followed by `+ eps`",
    "eps_outside_sqrt": "not followed by `+ eps`",
    "mean_over_other_dim": "not the last dim",
    "scales_another_tensor": "does not scale the x",
    "non_constant_weight": "not a frozen constant",
    "fp32_weight": "dtype promotion",
    "variance_reused": "has another user",
    "normalized_reused": "has another user",
    "upcast_reused": "has another user",
}


@pytest.mark.parametrize("how", sorted(NOT_FIRING))
def test_variants_do_not_fire_and_say_why(how):
    dtype = torch.bfloat16
    m = Variant(how).to(dtype).eval()
    if how == "fp32_weight":
        m.float()
    x, r = inputs(dtype)
    args = (x, r, m.weight.detach().clone().to(dtype)) if how == "non_constant_weight" else (x, r)
    out, report = compile_and_run(m, *args)
    assert report.rewrites_by_pass()[PASS] == 0
    assert not fused_ops(report)
    reasons = near_misses(report)
    assert any(NOT_FIRING[how] in r for r in reasons), reasons
    with torch.no_grad():
        eager = m(*args)
    for a, e in zip(flat(out), flat(eager)):
        assert a.dtype == e.dtype
        assert torch.equal(a, e)  # untouched graph: bit-identical to eager


def test_layer_norm_with_non_constant_weight_does_not_fire():
    f = lambda h, w, b: F.layer_norm(h, (HIDDEN,), w, b, 1e-5)  # noqa: E731
    x, r = inputs(torch.float32)
    out, report = compile_and_run(f, x, r[0, 0], r[1, 0])
    assert report.rewrites_by_pass()[PASS] == 0
    assert any("not a frozen constant" in r for r in near_misses(report))
    assert_close(out, f(x, r[0, 0], r[1, 0]), torch.float32)


def test_layer_norm_over_two_dims_does_not_fire():
    m = nn.LayerNorm((5, HIDDEN)).eval()
    x, _ = inputs(torch.float32)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 0
    assert any("last dim only" in r for r in near_misses(report))
    assert_close(out, m(x).detach(), torch.float32)


def test_layer_norm_statistics_used_does_not_fire():
    class Stats(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(HIDDEN)), nn.Parameter(torch.randn(HIDDEN))

        def forward(self, x):
            y, mean, rstd = torch.native_layer_norm(x, [HIDDEN], self.w, self.b, 1e-5)
            return y, rstd

    m = Stats().eval()
    x, _ = inputs(torch.float32)
    out, report = compile_and_run(m, x)
    assert report.rewrites_by_pass()[PASS] == 0
    assert any("statistics output" in r for r in near_misses(report))


# --------------------------------------------------------------------------- tiny HF models
def randomize_vectors(model):
    """Norm weights/biases of a fresh HF model are 1 and 0 (Gemma: 0 with the +1 offset),
    which would hide a weight or bias applied wrongly: perturb every 1-D parameter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_((0.2 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model


L = NUM_LAYERS
# family: (norms fused, of which fused with their residual add) for tokens(2, 7).
EXPECTED = {
    # input_layernorm + post_attention_layernorm per layer + the final norm; the first
    # (layers.0.input_layernorm) reads the embedding output, which is not an add.
    "llama": (2 * L + 1, 2 * L),
    "mistral": (2 * L + 1, 2 * L),
    "qwen2": (2 * L + 1, 2 * L),
    # same, with the (1 + w) offset; the first norm reads embedding * sqrt(hidden) (a mul).
    "gemma": (2 * L + 1, 2 * L),
    # one LayerNorm per layer (attention and MLP in parallel) + final_layernorm.
    "phi": (L + 1, L),
    # ln_1 and ln_2 per layer + ln_f; layer 0's ln_1 reads wte(ids) + wpe(pos), whose
    # position term [1, S, H] broadcasts over the batch: a plain layer_norm.
    "gpt2": (2 * L + 1, 2 * L),
    # post-norm: attention.output.LayerNorm and output.LayerNorm per layer (h used only by
    # the norm) + embeddings.LayerNorm, whose position term broadcasts: a plain layer_norm.
    "bert": (2 * L + 1, 2 * L),
}
PIPELINES = {"default": None, "only": ONLY}  # the full pipeline, or normalize + this pass


@pytest.mark.parametrize(
    "family, pipeline, dtype",
    [
        ("llama", "default", torch.float32),
        ("llama", "only", torch.bfloat16),
        ("mistral", "only", torch.float32),
        ("qwen2", "default", torch.bfloat16),
        ("gemma", "default", torch.bfloat16),
        ("phi", "only", torch.bfloat16),
        ("gpt2", "default", torch.float32),
        ("bert", "default", torch.bfloat16),
        ("bert", "only", torch.float32),
    ],
)
def test_tiny_hf_model_counts_and_numerics(family, pipeline, dtype):
    model = randomize_vectors(tiny_model(family, dtype))
    x = tokens(2, 7)
    out, report = compile_and_run(model, x, only=PIPELINES[pipeline])
    total, with_residual = EXPECTED[family]
    assert report.rewrites_by_pass()[PASS] == total, near_misses(report)
    assert not near_misses(report)
    ops = fused_ops(report)
    assert sum(ops.values()) == total
    assert ops.get("llmopt.add_rms_norm.default", 0) + ops.get("llmopt.add_layer_norm.default", 0) == with_residual
    for leftover in ("aten.rsqrt.default", "aten.native_layer_norm.default"):
        assert leftover not in report.ops_after
    details = {rw.layer: rw.detail for rw in report.rewrites if rw.pass_name == PASS}
    assert len(details) == total, "the report names the layer of every rewrite"
    if family == "llama":
        assert details["model.layers.0.input_layernorm"].startswith("rms_norm")
        assert details["model.layers.0.post_attention_layernorm"].startswith("add_rms_norm")
        assert details["model.norm"].startswith("add_rms_norm")
    check_logits(out[0], model, x, dtype, family)


@pytest.mark.parametrize("cache", ["dynamic"])
def test_llama_generate_tokens_identical(cache):
    torch._dynamo.reset()
    model = randomize_vectors(tiny_model("llama"))
    x = tokens(1, 6)
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    expected, actual = generate_eager_and_compiled(model, x, max_new_tokens=10, **kwargs)
    assert torch.equal(actual, expected)
    assert llmopt.last_report().rewrites_by_pass()[PASS] == EXPECTED["llama"][0]
