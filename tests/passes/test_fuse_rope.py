"""fuse_rope: the rotary embedding of q and k becomes one ``llmopt.rope`` per layer."""
import pytest
import torch
import torch.nn as nn

import llmopt
from compiled import generate_eager_and_compiled
from conftest import assert_close
from models.tiny import NUM_LAYERS, tiny_model, tokens

PASSES = ["normalize", "fuse_rope"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_and_run(fn, *inputs, only=PASSES):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend="llmopt", options={"strict": True, "only": only})(*inputs)
    return out, llmopt.last_report()


def rope_count(report) -> int:
    return report.rewrites_by_pass()["fuse_rope"]


# --------------------------------------------------------------------------- spellings
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def cos_sin(seq, dim, batch=1, interleaved=False, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.arange(seq).float()[:, None] + torch.arange(batch).float()[:, None, None]  # [B, S, 1]
    freqs = pos * inv  # [B, S, dim/2]
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, (rotate_half(k) * sin) + (k * cos)


def partial(q, k, cos, sin):  # Phi / GPT-NeoX: rotate the first rd dims only
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_rot, q_pass = q[..., :rd], q[..., rd:]
    k_rot, k_pass = k[..., :rd], k[..., rd:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


def upcast(q, k, cos, sin):  # rotate in fp32, cast back
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    qf, kf = q.float(), k.float()
    return (qf * cos + rotate_half(qf) * sin).to(q.dtype), (kf * cos + rotate_half(kf) * sin).to(k.dtype)


def gptj(q, k, cos, sin):  # [B, S, H, D] layout, cos/sin given per pair and repeated
    half_cos, half_sin = cos[..., ::2], sin[..., ::2]
    cos = torch.repeat_interleave(half_cos[:, :, None, :], 2, 3)
    sin = torch.repeat_interleave(half_sin[:, :, None, :], 2, 3)
    return q * cos + rotate_every_two(q) * sin, k * cos + rotate_every_two(k) * sin


def complex_meta(q, k, cos, sin):  # Meta Llama: view_as_complex, [B, S, H, D]
    freqs = torch.polar(torch.ones_like(cos[0, :, ::2]), torch.atan2(sin[0, :, ::2], cos[0, :, ::2]))

    def rot(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        f = freqs.view(1, xc.shape[1], 1, xc.shape[-1])
        return torch.view_as_real(xc * f).flatten(3).type_as(x)

    return rot(q), rot(k)


SPELLINGS = {
    # name: (function, layout, interleaved cos/sin, rotary dim or None = head dim)
    "hf_rotate_half": (hf, "bhsd", False, None),
    "partial_rotary": (partial, "bhsd", False, 8),
    "fp32_upcast": (upcast, "bhsd", False, None),
    "gptj_interleaved": (gptj, "bshd", True, None),
    "complex": (complex_meta, "bshd", True, None),
}


def inputs(layout, interleaved, rd, dtype, batch=2, seq=7, hq=4, hk=2, d=16):
    shape = (batch, hq, seq, d) if layout == "bhsd" else (batch, seq, hq, d)
    kshape = (batch, hk, seq, d) if layout == "bhsd" else (batch, seq, hk, d)
    q, k = torch.randn(shape, dtype=dtype), torch.randn(kshape, dtype=dtype)
    cos, sin = cos_sin(seq, rd or d, batch=1, interleaved=interleaved, dtype=dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_becomes_one_rope(name, dtype):
    fn, layout, interleaved, rd = SPELLINGS[name]
    q, k, cos, sin = inputs(layout, interleaved, rd, dtype)
    if name == "complex":
        q, k = q.float(), k.float()  # complex64 needs fp32 tables; the cast back is tested by fp32_upcast
        cos, sin = cos.float(), sin.float()
    (qo, ko), report = compile_and_run(fn, q, k, cos, sin)
    qe, ke = fn(q, k, cos, sin)
    assert_close(qo, qe, dtype=q.dtype, what=f"{name} q")
    assert_close(ko, ke, dtype=q.dtype, what=f"{name} k")
    assert rope_count(report) == 1, report
    assert report.ops_after.get("llmopt.rope.default") == 1
    for op in ("aten.neg.default", "aten.cat.default", "aten.view_as_complex.default"):
        assert op not in report.ops_after, (op, report.ops_after)
    detail = next(r.detail for r in report.rewrites if r.pass_name == "fuse_rope")
    assert f"interleaved={interleaved}" in detail and f"layout {layout}" in detail


def test_partial_rotary_folds_the_trailing_cat():
    q, k, cos, sin = inputs("bhsd", False, 8, torch.float32)
    _, report = compile_and_run(partial, q, k, cos, sin)
    assert "rotary_dim=8" in report.rewrites[-1].detail
    assert "aten.cat.default" not in report.ops_after  # q_pass/k_pass are copied by the op


def test_per_batch_positions():
    q, k, _, _ = inputs("bhsd", False, None, torch.float32)
    cos, sin = cos_sin(7, 16, batch=2)  # [B, S, D]: each sequence at its own offset
    (qo, ko), report = compile_and_run(hf, q, k, cos, sin)
    qe, ke = hf(q, k, cos, sin)
    assert_close(qo, qe, torch.float32)
    assert_close(ko, ke, torch.float32)
    assert rope_count(report) == 1


# --------------------------------------------------------------------------- must not fire
def test_q_without_k_is_a_near_miss():
    def only_q(q, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin

    q, _, cos, sin = inputs("bhsd", False, None, torch.float32)
    out, report = compile_and_run(only_q, q, cos, sin)
    assert_close(out, only_q(q, cos, sin), torch.float32)
    assert rope_count(report) == 0
    assert any("without a partner" in m.reason for m in report.near_misses)


def test_rotate_half_with_another_user_is_left_alone():
    def leaky(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rq = rotate_half(q)
        return q * cos + rq * sin, k * cos + rotate_half(k) * sin, rq.sum()

    q, k, cos, sin = inputs("bhsd", False, None, torch.float32)
    (qo, ko, s), report = compile_and_run(leaky, q, k, cos, sin)
    qe, ke, se = leaky(q, k, cos, sin)
    assert_close(qo, qe, torch.float32)
    assert_close(ko, ke, torch.float32)
    assert rope_count(report) == 0
    assert any("another user" in m.reason for m in report.near_misses)


def test_q_and_k_with_different_tables_are_not_paired():
    def two_tables(q, k, cos, sin, cos2, sin2):
        return hf(q, q, cos, sin)[0], hf(k, k, cos2, sin2)[0]

    q, k, cos, sin = inputs("bhsd", False, None, torch.float32)
    cos2, sin2 = cos_sin(7, 16, batch=1)
    cos2, sin2 = cos2 * 0.5, sin2 * 0.5
    (qo, ko), report = compile_and_run(two_tables, q, k, cos, sin, cos2, sin2)
    qe, ke = two_tables(q, k, cos, sin, cos2, sin2)
    assert_close(qo, qe, torch.float32)
    assert_close(ko, ke, torch.float32)
    assert rope_count(report) == 0


def test_not_a_rotation():
    def almost(q, k, cos, sin):  # the sin term uses q un-rotated: not RoPE
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin

    q, k, cos, sin = inputs("bhsd", False, None, torch.float32)
    (qo, _), report = compile_and_run(almost, q, k, cos, sin)
    assert_close(qo, almost(q, k, cos, sin)[0], torch.float32)
    assert rope_count(report) == 0


# --------------------------------------------------------------------------- real models
@pytest.mark.parametrize("family, rotary", [("llama", 16), ("mistral", 16), ("qwen2", 16), ("gemma", 16), ("phi", 8)])
def test_one_rope_per_layer_on_hf_models(family, rotary):
    model = tiny_model(family)
    x = tokens(2, 9)
    with torch.no_grad():
        expected = model(x).logits
        actual = torch.compile(model, backend="llmopt", options={"strict": True})(x).logits
    report = llmopt.last_report()
    assert_close(actual, expected, torch.float32, what=f"{family} logits")
    assert rope_count(report) == NUM_LAYERS
    details = [r.detail for r in report.rewrites if r.pass_name == "fuse_rope"]
    assert all(f"rotary_dim={rotary}" in d for d in details), details
    assert report.ops_after.get("llmopt.rope.default") == NUM_LAYERS


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_models_without_rope(family):
    model = tiny_model(family)
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"strict": True, "only": PASSES})(tokens(1, 5))
    assert rope_count(llmopt.last_report()) == 0


def test_llama_bf16_logits():
    model = tiny_model("llama", torch.bfloat16)
    x = tokens(2, 9)
    with torch.no_grad():
        expected = model(x).logits
        actual = torch.compile(model, backend="llmopt", options={"strict": True, "only": PASSES})(x).logits
    assert_close(actual, expected, torch.bfloat16)
    assert rope_count(llmopt.last_report()) == NUM_LAYERS


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_tokens_equal_eager(cache):
    model = tiny_model("llama")
    x = tokens(1, 6)
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    options = {"strict": True, "only": PASSES}
    expected, actual = generate_eager_and_compiled(model, x, options, max_new_tokens=8, **kwargs)
    assert torch.equal(actual, expected)
    assert rope_count(llmopt.last_report()) == NUM_LAYERS  # the decode graph too
