"""More Hugging Face decoder families than ``tests/models/tiny.py`` builds: each compiles
without a fallback and matches eager.

Tiny random-weight configs of families the rest of the suite does not build: rotary
variants (partial, interleaved GPT-J style, Llama-3 scaling), parallel attention and MLP
blocks (GPT-J, GPT-NeoX, Falcon, Cohere), ALiBi (Bloom), multi-query attention
(GPTBigCode, Falcon), QK norms (Qwen3, OLMo2), logit soft-capping and sliding windows
(Gemma 2/3), scaled residuals (Granite), tied heads, LayerNorm with and without bias.
For each, in float32:

- the compiled prefill (the shipped CPU default, the Inductor executor, ``strict``: a
  pass that fails or an executor that falls back raises) against the fp64 truth, the same
  weights run in float64 (Bloom's prefill once fell back to the aten executor:
  ``llmopt/decompose.py``, layouts of decompositions);
- greedy ``generate`` over a static cache with the compiled forward (the suite's aten
  executor, for time), token for token against eager.

A family whose config class this transformers lacks is skipped.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import llmopt
from conftest import assert_close
from llmopt.backend import CPU_EXECUTOR_ENV
from models.tiny import VOCAB, tokens

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)
_SIZES = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4)

# family: (config class name, keyword arguments)
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(**_COMMON, **_SIZES, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(**_COMMON, **_SIZES, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(**_COMMON, **_SIZES, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "phi3": ("Phi3Config", dict(**_COMMON, **_SIZES, num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(**_COMMON, **_SIZES, rotary_pct=0.25)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=160, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=64)),
    "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=True, num_kv_heads=2)),
    "stablelm": ("StableLmConfig", dict(**_COMMON, **_SIZES, num_key_value_heads=2)),
    "starcoder2": ("Starcoder2Config", dict(**_COMMON, **_SIZES, num_key_value_heads=2)),
    "cohere": ("CohereConfig", dict(**_COMMON, **_SIZES, num_key_value_heads=2)),
    "olmo2": ("Olmo2Config", dict(**_COMMON, **_SIZES, num_key_value_heads=2)),
    "granite": ("GraniteConfig", dict(**_COMMON, **_SIZES, num_key_value_heads=2)),
    "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)),
    "llama3_rope_scaling": ("LlamaConfig", dict(**_COMMON, **_SIZES, num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2_tied": ("Qwen2Config", dict(**_COMMON, **_SIZES, num_key_value_heads=2, tie_word_embeddings=True)),
}


def _model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    config_class = getattr(tf, name, None)
    if config_class is None:
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    config = config_class(**kwargs)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2  # inside the tiny vocabulary
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # every family's forward is transformers' same decorated wrapper
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_on_the_inductor_executor_matches_the_fp64_truth(family, fresh_dynamo, monkeypatch):
    monkeypatch.delenv(CPU_EXECUTOR_ENV, raising=False)
    model = _model(family)
    prompt = tokens(2, 11)
    truth_model = _model(family, torch.float64)
    with torch.no_grad():
        truth = truth_model(prompt).logits
        got = torch.compile(model.forward, backend="llmopt", options={"strict": True})(input_ids=prompt).logits
    report = llmopt.last_report()
    assert report.executor == "inductor" and not report.fallbacks, report.fallbacks
    assert_close(got, truth, torch.float32, what=f"{family} compiled prefill vs fp64")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_static_cache_generation_matches_eager(family, fresh_dynamo):
    model = _model(family)
    prompt = tokens(2, 7)
    settings = dict(max_new_tokens=5, do_sample=False, cache_implementation="static",
                    attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        expected = model.generate(prompt, **settings)
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, backend="llmopt", options={"strict": True})
        try:
            got = model.generate(prompt, **settings)
        finally:
            model.forward = eager_forward
    assert not llmopt.last_report().fallbacks
    assert torch.equal(got, expected), f"{family}: {got.tolist()} vs eager {expected.tolist()}"
