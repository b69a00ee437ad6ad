"""lower_attention: every spelling of attention becomes one ``llmopt.attention_prefill``.

Read as a specification: SDPA and explicit ("eager") attention, GQA through
``repeat_kv`` / ``repeat_interleave`` / a broadcasting matmul, masks that are proven
(causal, sliding window, an offset into the keys) and masks that are not (passed to the
kernel as they are), and the cases that must be left alone with a reason. The pass is
the package ``llmopt/passes/attention``; its mask proofs are also tested on their own in
test_attention_masks.py.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from conftest import assert_close
from models.tiny import CONFIGS, NUM_LAYERS, tiny_model, tokens
from passes.final_graphs import capture_final_graphs

PASS = "lower_attention"
PASSES = ["normalize", PASS]
ATTENTION = "llmopt.attention_prefill.default"
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def graphs(monkeypatch):
    """The final (post-pass) FX graph of each compile, in compile order."""
    return capture_final_graphs(monkeypatch)


def compile_and_run(fn, *inputs, only=PASSES, **kwargs):
    torch._dynamo.reset()
    options = {"strict": True} if only is None else {"strict": True, "only": list(only)}
    with torch.no_grad():
        out = torch.compile(fn, backend="llmopt", options=options)(*inputs, **kwargs)
    return out, llmopt.last_report()


def lowered(report) -> int:
    return report.rewrites_by_pass()[PASS]


def details(report) -> list[str]:
    return [r.detail for r in report.rewrites if r.pass_name == PASS]


def reasons(report) -> list[str]:
    return [m.reason for m in report.near_misses if m.pass_name == PASS]


def attention_calls(gm) -> list[SimpleNamespace]:
    """The arguments of every ``llmopt.attention_prefill`` in a graph, by name."""
    names = ("q", "k", "v", "mask", "kv_lens", "q_offsets", "scale", "causal", "window", "softcap")
    calls = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.llmopt.attention_prefill.default:
            call = SimpleNamespace(**dict(zip(names, n.args)))
            call.k_heads = call.k.meta["val"].shape[1]
            call.q_heads = call.q.meta["val"].shape[1]
            calls.append(call)
    return calls


def no_repeat_left(gm) -> bool:
    """No K/V head repeat (``[B, Hkv, n, S, D]`` expand, ``repeat_interleave``) in the graph."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.repeat_interleave.self_int or n.target == aten.repeat.default:
            return False
        if n.target == aten.expand.default and n.meta["val"].dim() == 5:
            return False
    return True


# --------------------------------------------------------------------------- spellings
B, HQ, HKV, S, D = 2, 4, 2, 7, 16


def qkv(dtype, hkv=HKV, sq=S, skv=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, sq, D, generator=g).to(dtype)
    k = torch.randn(B, hkv, skv, D, generator=g).to(dtype)
    v = torch.randn(B, hkv, skv, D, generator=g).to(dtype)
    return q, k, v


def repeat_kv(x, n):
    """Hugging Face's ``repeat_kv``: [B, Hkv, S, D] -> [B, Hkv * n, S, D]."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def causal_bool(sq, skv):
    """Bottom-right aligned causal mask (query i sits at key position skv - sq + i)."""
    return torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)


class Sdpa(nn.Module):
    """``F.scaled_dot_product_attention`` with a constant mask buffer or a mask input."""

    def __init__(self, mask=None, repeat=False, **sdpa_kwargs):
        super().__init__()
        self.sdpa_kwargs, self.repeat = sdpa_kwargs, repeat
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, q, k, v, mask=None):
        if self.repeat:
            k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        if self.mask is not None:
            mask = self.mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)


class Eager(nn.Module):
    """``matmul -> scale -> (softcap) -> mask -> softmax (fp32, cast back) -> dropout(0) -> matmul``.

    gqa: "repeat_kv", "repeat_interleave" or None (K/V used as given; one KV head broadcasts
    over the query heads in the matmul). causal: "where" (GPT-2: a tril buffer sliced
    ``[k - q : k, :k]``, masked scores set to ``finfo.min``), "masked_fill" (-inf) or None.
    """

    def __init__(self, gqa="repeat_kv", causal="where", softcap=0.0, upcast=True, scale_by="mul",
                 window=0, return_weights=False):
        super().__init__()
        self.gqa, self.causal, self.softcap, self.upcast = gqa, causal, softcap, upcast
        self.scale_by, self.return_weights = scale_by, return_weights
        bias = torch.ones(16, 16, dtype=torch.bool).tril()
        if window:
            bias &= ~torch.ones(16, 16, dtype=torch.bool).tril(-window)
        self.register_buffer("bias", bias.view(1, 1, 16, 16), persistent=False)

    def forward(self, q, k, v, mask=None):
        n = q.shape[1] // k.shape[1]
        if self.gqa == "repeat_kv":
            k, v = repeat_kv(k, n), repeat_kv(v, n)
        elif self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        if self.scale_by == "mul":
            scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        q_len, k_len = q.shape[-2], k.shape[-2]
        keep = self.bias[:, :, k_len - q_len : k_len, :k_len]
        if self.causal == "where":
            fill = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype)
            scores = torch.where(keep, scores, fill)
        elif self.causal == "masked_fill":
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores + mask
        if self.upcast:
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            probs = F.softmax(scores, dim=-1)
        probs = F.dropout(probs, p=0.0, training=False)
        out = torch.matmul(probs, v)
        return (out, probs) if self.return_weights else out


def additive_mask(dtype, sq=S, skv=S):
    return torch.randn(B, 1, sq, skv, generator=torch.Generator().manual_seed(1)).to(dtype)


def bool_mask(sq=S, skv=S):
    m = torch.rand(B, 1, sq, skv, generator=torch.Generator().manual_seed(2)) > 0.4
    m[..., 0] = True  # every row keeps a key: a fully masked row has no eager answer to compare
    return m


HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

# name: (module factory, inputs(dtype), what the kernel must be told)
#   expected: causal, window, q_offset, softcap, mask (a mask tensor reaches the kernel),
#   scale, text (in the report line), kv_heads (of the op's k/v: the un-repeated count)
SPELLINGS = {
    "sdpa_is_causal": (
        lambda: Sdpa(is_causal=True), lambda dt: qkv(dt, hkv=HQ),
        dict(causal=True, text="is_causal", kv_heads=HQ)),
    "sdpa_custom_scale": (
        lambda: Sdpa(is_causal=True, scale=0.3), lambda dt: qkv(dt, hkv=HQ),
        dict(causal=True, scale=0.3, kv_heads=HQ)),
    "sdpa_enable_gqa": (
        lambda: Sdpa(is_causal=True, enable_gqa=True), lambda dt: qkv(dt),
        dict(causal=True, text="GQA 4/2 heads", kv_heads=HKV)),
    "sdpa_after_repeat_kv": (
        lambda: Sdpa(is_causal=True, repeat=True), lambda dt: qkv(dt),
        dict(causal=True, text="(repeat removed)", kv_heads=HKV)),
    "sdpa_bool_causal_buffer": (
        lambda: Sdpa(mask=causal_bool(S, S)), lambda dt: qkv(dt, hkv=HQ),
        dict(causal=True, text="proven causal", kv_heads=HQ)),
    "sdpa_additive_causal_buffer": (
        lambda: Sdpa(mask=torch.zeros(S, S).masked_fill(~causal_bool(S, S), float("-inf"))),
        lambda dt: qkv(dt, hkv=HQ),
        dict(causal=True, text="proven causal", kv_heads=HQ)),
    "sdpa_additive_mask_input": (
        lambda: Sdpa(), lambda dt: (*qkv(dt, hkv=HQ), additive_mask(dt)),
        dict(causal=False, mask=True, text="additive, passed through", kv_heads=HQ)),
    "sdpa_bool_mask_input": (
        lambda: Sdpa(), lambda dt: (*qkv(dt, hkv=HQ), bool_mask()),
        dict(causal=False, mask=True, text="bool mask", kv_heads=HQ)),
    "eager_fp32_softmax_additive_mask": (
        lambda: Eager(causal=None), lambda dt: (*qkv(dt), additive_mask(dt)),
        dict(causal=False, mask=True, text="additive, passed through", kv_heads=HKV)),
    "eager_gpt2_where_causal_buffer": (
        lambda: Eager(scale_by="div"), lambda dt: qkv(dt),
        dict(causal=True, text="proven causal", kv_heads=HKV)),
    "eager_masked_fill_causal_buffer": (
        lambda: Eager(causal="masked_fill", upcast=False), lambda dt: qkv(dt),
        dict(causal=True, text="proven causal", kv_heads=HKV)),
    "eager_repeat_interleave": (
        lambda: Eager(gqa="repeat_interleave"), lambda dt: qkv(dt),
        dict(causal=True, text="(repeat removed)", kv_heads=HKV)),
    "eager_mqa_broadcast_matmul": (
        lambda: Eager(gqa=None), lambda dt: qkv(dt, hkv=1),
        dict(causal=True, text="GQA 4/1 heads", kv_heads=1)),
    "eager_softcap": (
        lambda: Eager(softcap=5.0), lambda dt: qkv(dt),
        dict(causal=True, softcap=5.0, text="softcap=5", kv_heads=HKV)),
    "eager_sliding_window_buffer": (
        lambda: Eager(window=3), lambda dt: qkv(dt),
        dict(causal=True, window=3, text="proven causal + window 3", kv_heads=HKV)),
    "eager_queries_at_an_offset": (  # chunked prefill: 3 new queries after 6 cached keys
        lambda: Eager(), lambda dt: qkv(dt, sq=3, skv=9),
        dict(causal=True, q_offset=6, text="q_offset=6", kv_heads=HKV)),
}


def expected_out(module, inputs):
    with torch.no_grad():
        return module(*inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_becomes_one_attention_op(name, dtype, graphs):
    make, make_inputs, want = SPELLINGS[name]
    if name == "sdpa_enable_gqa" and not HAS_ENABLE_GQA:
        pytest.skip("this torch has no enable_gqa")
    module, inputs = make().to(dtype).eval(), make_inputs(dtype)
    out, report = compile_and_run(module, *inputs)
    assert_close(out, expected_out(module, inputs), dtype, what=name)
    assert lowered(report) == 1, (report.rewrites, reasons(report))
    assert report.ops_after.get(ATTENTION) == 1
    for op in ("aten._softmax.default", "aten.bmm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default"):
        assert op not in report.ops_after, (op, report.ops_after)
    (call,) = attention_calls(graphs[-1])
    assert call.causal is want["causal"]
    assert call.window == want.get("window", 0)
    assert call.softcap == want.get("softcap", 0.0)
    assert (call.mask is not None) == want.get("mask", False)
    assert call.q_offsets is None if "q_offset" not in want else call.q_offsets.op == "get_attr"
    assert call.scale == pytest.approx(want.get("scale", D ** -0.5))
    assert call.k_heads == want["kv_heads"] and call.q_heads == HQ
    assert no_repeat_left(graphs[-1])
    assert want.get("text", "") in details(report)[0], details(report)


def test_query_offset_reaches_the_kernel(graphs):
    module, inputs = Eager(), qkv(torch.float32, sq=3, skv=9)
    compile_and_run(module, *inputs)
    (call,) = attention_calls(graphs[-1])
    offsets = getattr(graphs[-1], call.q_offsets.target)
    assert offsets.tolist() == [6] * B


def test_sdpa_output_view_gets_one_copy():
    """SDPA on CPU returns [B, S, H, D] memory, so HF's ``transpose(1, 2).contiguous()``
    is traced as no copy and the ``view(B, S, -1)`` reads it directly; the op returns
    [B, H, S, D] contiguous, so exactly one copy goes in front of that view."""

    def hf_layout(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).contiguous().view(q.shape[0], q.shape[2], -1)

    q, k, v = qkv(torch.float32, hkv=HQ)
    out, report = compile_and_run(hf_layout, q, k, v)
    assert_close(out, hf_layout(q, k, v), torch.float32)
    assert lowered(report) == 1
    assert report.ops_after.get("aten.clone.default") == 1, report.ops_after

    q1, k1, v1 = qkv(torch.float32, hkv=HQ, sq=1)  # decode: both layouts coincide, no copy
    out, report = compile_and_run(hf_layout, q1, k1, v1)
    assert_close(out, hf_layout(q1, k1, v1), torch.float32)
    assert "aten.clone.default" not in report.ops_after, report.ops_after


@pytest.mark.parametrize("name", ["eager_fp32_softmax_additive_mask", "sdpa_bool_mask_input",
                                  "eager_softcap", "eager_queries_at_an_offset"])
def test_lowered_op_runs_its_triton_kernel(name, triton_kernels):
    make, make_inputs, _ = SPELLINGS[name]
    module, inputs = make().eval(), make_inputs(torch.float32)
    out, report = compile_and_run(module, *inputs)
    assert lowered(report) == 1
    assert_close(out, expected_out(module, inputs), torch.float32, what=name)


# --------------------------------------------------------------------------- masks not proven
def test_random_constant_mask_is_passed_not_assumed_causal(graphs):
    mask = torch.rand(S, S, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[:, 0] = True
    module, inputs = Sdpa(mask=mask).eval(), qkv(torch.float32, hkv=HQ)
    out, report = compile_and_run(module, *inputs)
    assert_close(out, expected_out(module, inputs), torch.float32)
    assert lowered(report) == 1
    (call,) = attention_calls(graphs[-1])
    assert call.causal is False and call.mask is not None
    assert "causal" not in details(report)[0] and "not proven" in details(report)[0]


def test_causal_mask_with_one_hole_is_not_causal(graphs):
    mask = causal_bool(S, S)
    mask[5, 2] = False
    module, inputs = Sdpa(mask=mask).eval(), qkv(torch.float32, hkv=HQ)
    out, report = compile_and_run(module, *inputs)
    assert_close(out, expected_out(module, inputs), torch.float32)
    (call,) = attention_calls(graphs[-1])
    assert call.causal is False and call.mask is not None
    assert "causal" not in details(report)[0]


def test_anti_causal_mask_is_not_called_causal(graphs):
    """``triu`` (each query sees itself and the keys after it) is exactly the window rule
    ``i + off - j < window`` with ``off = S - 1``, ``window = S``: lowered, never as causal."""
    module = Sdpa(mask=torch.ones(S, S, dtype=torch.bool).triu()).eval()
    inputs = qkv(torch.float32, hkv=HQ)
    out, report = compile_and_run(module, *inputs)
    assert_close(out, expected_out(module, inputs), torch.float32)
    (call,) = attention_calls(graphs[-1])
    assert not (call.causal and call.q_offsets is None and call.window == 0)
    assert "proven causal" not in details(report)[0] and "is_causal" not in details(report)[0]


def test_bidirectional_padding_mask_is_not_causal(graphs):
    """A padding mask from an input stays a mask; nothing causal is added."""
    module, inputs = Eager(causal=None).eval(), qkv(torch.float32)
    pad = torch.zeros(B, 1, 1, S)
    pad[1, ..., 4:] = torch.finfo(torch.float32).min
    out, report = compile_and_run(module, *inputs, pad)
    assert_close(out, expected_out(module, (*inputs, pad)), torch.float32)
    (call,) = attention_calls(graphs[-1])
    assert call.causal is False and call.mask is not None


# --------------------------------------------------------------------------- must not fire
def test_attention_weights_returned_are_left_alone():
    module, inputs = Eager(return_weights=True).eval(), qkv(torch.float32)
    (out, probs), report = compile_and_run(module, *inputs)
    out_e, probs_e = expected_out(module, inputs)
    assert_close(out, out_e, torch.float32)
    assert_close(probs, probs_e, torch.float32)
    assert lowered(report) == 0
    assert any("returned as attention weights" in r for r in reasons(report)), reasons(report)
    assert report.ops_after.get("aten._softmax.default") == 1 and ATTENTION not in report.ops_after


def test_scores_with_another_user_are_left_alone():
    def leaky(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        return torch.matmul(scores.softmax(-1), v), scores.amax(-1)

    q, k, v = qkv(torch.float32, hkv=HQ)
    (out, peak), report = compile_and_run(leaky, q, k, v)
    out_e, peak_e = leaky(q, k, v)
    assert_close(out, out_e, torch.float32)
    assert_close(peak, peak_e, torch.float32)
    assert lowered(report) == 0
    assert any("users" in r for r in reasons(report)), reasons(report)


def test_mask_added_before_scaling_is_left_alone():
    def early_mask(q, k, v, mask):
        scores = (torch.matmul(q, k.transpose(-1, -2)) + mask) * 0.25
        return torch.matmul(scores.softmax(-1), v)

    q, k, v = qkv(torch.float32, hkv=HQ)
    mask = additive_mask(torch.float32)
    out, report = compile_and_run(early_mask, q, k, v, mask)
    assert_close(out, early_mask(q, k, v, mask), torch.float32)
    assert lowered(report) == 0
    assert any("before the scaling" in r for r in reasons(report)), reasons(report)


def test_masked_fill_with_a_non_negative_value_is_left_alone():
    class ZeroFill(Eager):
        def forward(self, q, k, v):
            scores = torch.matmul(q, k.transpose(-1, -2)) * 0.25
            scores = scores.masked_fill(~self.bias[:, :, : q.shape[2], : k.shape[2]], 0.0)
            return torch.matmul(scores.softmax(-1), v)

    module, inputs = ZeroFill(gqa=None).eval(), qkv(torch.float32, hkv=HQ)
    out, report = compile_and_run(module, *inputs)
    assert_close(out, expected_out(module, inputs), torch.float32)
    assert lowered(report) == 0
    assert any("filled with 0.0" in r for r in reasons(report)), reasons(report)


def test_sdpa_with_dropout_is_not_lowered():
    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    q, k, v = qkv(torch.float32, hkv=HQ)
    _, report = compile_and_run(dropped, q, k, v)
    assert lowered(report) == 0 and ATTENTION not in report.ops_after


# --------------------------------------------------------------------------- real models
# (family, attn_implementation, what the kernel is told: causal / window)
DECODERS = [
    ("llama", "sdpa", 0), ("llama", "eager", 0), ("gpt2", "sdpa", 0), ("gpt2", "eager", 0),
    ("mistral", "sdpa", 8), ("mistral", "eager", 8), ("qwen2", "sdpa", 0), ("gemma", "eager", 0),
]


def kv_heads(family):
    config = CONFIGS[family]()
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@pytest.mark.parametrize("family, impl, window", DECODERS)
def test_one_attention_op_per_layer_on_hf_decoders(family, impl, window, graphs):
    model = tiny_model(family, attn_implementation=impl)
    x = tokens(2, 9)  # 9 > sliding_window 8: Mistral's window binds
    expected = model(x).logits.detach()
    out, report = compile_and_run(model, x, only=None)
    assert_close(out.logits, expected, torch.float32, what=f"{family}/{impl} logits")
    assert lowered(report) == NUM_LAYERS, (details(report), reasons(report))
    assert report.ops_after.get(ATTENTION) == NUM_LAYERS
    assert "aten._softmax.default" not in report.ops_after
    calls = attention_calls(graphs[-1])
    assert len(calls) == NUM_LAYERS
    for call in calls:
        assert call.causal is True and call.window == window and call.mask is None
        assert call.k_heads == kv_heads(family), "K/V must reach the op un-repeated"
    assert no_repeat_left(graphs[-1])
    layers = [r.layer for r in report.rewrites if r.pass_name == PASS]
    assert len(set(layers)) == NUM_LAYERS and all(layer for layer in layers)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_padding_mask_is_not_causal(impl, graphs):
    model = tiny_model("bert", attn_implementation=impl)
    x = tokens(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    expected = model(x, attention_mask=mask).last_hidden_state.detach()
    out, report = compile_and_run(model, x, only=None, attention_mask=mask)
    assert_close(out.last_hidden_state, expected, torch.float32, what=f"bert/{impl}")
    assert lowered(report) == NUM_LAYERS, reasons(report)
    for call in attention_calls(graphs[-1]):
        assert call.causal is False and call.window == 0, "BERT is bidirectional"
        assert call.mask is not None, "the padding mask must reach the kernel"
    assert all("causal" not in d for d in details(report)), details(report)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_llama_keeps_the_padding_mask(impl, graphs):
    model = tiny_model("llama", attn_implementation=impl)
    x = tokens(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    expected = model(x, attention_mask=mask).logits.detach()
    out, report = compile_and_run(model, x, only=None, attention_mask=mask)
    assert_close(out.logits, expected, torch.float32)
    assert lowered(report) == NUM_LAYERS
    for call in attention_calls(graphs[-1]):
        assert call.mask is not None and call.k_heads == HKV


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_eager_attention_logits(family):
    model = tiny_model(family, torch.bfloat16, attn_implementation="eager")
    x = tokens(2, 9)
    expected = model(x).logits.detach()
    out, report = compile_and_run(model, x, only=None)
    assert_close(out.logits, expected, torch.bfloat16)
    assert lowered(report) == NUM_LAYERS


def test_llama_returning_attentions_is_left_alone():
    model = tiny_model("llama", attn_implementation="eager")
    x = tokens(1, 6)
    expected = model(x, output_attentions=True)
    out, report = compile_and_run(model, x, only=None, output_attentions=True)
    assert_close(out.logits, expected.logits.detach(), torch.float32)
    for a, e in zip(out.attentions, expected.attentions):
        assert_close(a, e.detach(), torch.float32)
    assert lowered(report) == 0
    assert sum("attention weights" in r for r in reasons(report)) == NUM_LAYERS


def test_llama_eager_generate_tokens_equal_eager():
    model = tiny_model("llama", attn_implementation="eager")
    x = tokens(2, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # ragged batch, left-padded
    with torch.no_grad():
        expected = llmopt.generate(model, x, 6, attention_mask=mask)
        hf_expected = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        compiled = torch.compile(model, backend="llmopt", options={"strict": True})
        actual = llmopt.generate(compiled, x, 6, attention_mask=mask)
        model.forward = torch.compile(model.forward, backend="llmopt", options={"strict": True})
        hf_actual = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(actual, expected)
    assert torch.equal(hf_actual, hf_expected)


# --------------------------------------------------------------------------- strict regressions
def test_complex_rope_pairs_out_of_graph_order_then_attention():
    """Regression (strict): fuse_rope derives cos/sin from complex ``freqs`` once per freqs;
    when the rotation pairs are fused in an order other than the graph order of their
    inputs, the second op used to be placed before those derived nodes ("used before it
    has been defined"). Two attentions share freqs; B's rotations come first in the graph,
    A's tensors were computed first."""

    def rot(x, freqs):  # Meta Llama / gpt-fast, [B, S, H, D]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs.view(1, xc.shape[1], 1, xc.shape[-1])).flatten(3).type_as(x)

    def two_heads(qa, ka, va, qb, kb, vb, freqs):
        qa, ka, qb, kb = qa * 2, ka * 2, qb * 2, kb * 2
        qb, kb = rot(qb, freqs), rot(kb, freqs)
        qa, ka = rot(qa, freqs), rot(ka, freqs)
        outs = [F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
                for q, k, v in ((qa, ka, va), (qb, kb, vb))]
        return outs[0] + outs[1]

    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, 5, 2, 8, generator=g) for _ in range(6)]
    freqs = torch.polar(torch.ones(5, 4), torch.randn(5, 4, generator=g))
    out, report = compile_and_run(two_heads, *xs, freqs, only=None)
    assert_close(out, two_heads(*xs, freqs), torch.float32)
    assert report.rewrites_by_pass()["fuse_rope"] == 2
    assert lowered(report) == 2


def test_second_prompt_length_recompiles_with_symbolic_sizes():
    """Regression (strict): a new prompt length recompiles with a symbolic sequence length;
    fuse_rope keyed its pairing on the cos/sin shape and failed hashing a SymInt."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="llmopt", options={"strict": True})
    with torch.no_grad():
        for seq in (5, 7):
            x = tokens(2, seq)
            assert_close(compiled(x).logits, model(x).logits, torch.float32, what=f"seq {seq}")
            report = llmopt.last_report()
            assert report.rewrites_by_pass()["fuse_rope"] == NUM_LAYERS
            assert lowered(report) == NUM_LAYERS


def test_symbolic_head_dim_is_a_near_miss_not_a_failure():
    """Regression (strict): SDPA's default scale 1/sqrt(D) with a symbolic D raised."""

    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(torch.float32, hkv=HQ)
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 3)
    out, report = compile_and_run(plain, q, k, v)
    assert_close(out, plain(q, k, v), torch.float32)
    assert lowered(report) == 0
    assert any("symbolic head dim" in r for r in reasons(report)), reasons(report)


def test_fully_dynamic_shapes_are_left_alone_with_a_reason():
    """``dynamic=True`` makes the head counts symbolic: the GQA grouping cannot be proven."""

    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(torch.float32, hkv=HQ)
    with torch.no_grad():
        out = torch.compile(plain, backend="llmopt", options={"strict": True, "only": PASSES}, dynamic=True)(q, k, v)
    report = llmopt.last_report()
    assert_close(out, plain(q, k, v), torch.float32)
    assert lowered(report) == 0
    assert any("symbolic head counts" in r for r in reasons(report)), reasons(report)
