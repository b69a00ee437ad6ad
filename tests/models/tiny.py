"""Tiny random-weight Hugging Face models built from configs (no download, seeded).

Each factory returns an eval-mode model small enough for CPU tests but with every
architectural feature of its family (GQA, sliding window, partial rotary, biases...).
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 256
NUM_LAYERS = 2


def _common(**kw):
    base = dict(vocab_size=VOCAB, num_hidden_layers=NUM_LAYERS, max_position_embeddings=256)
    base.update(kw)
    return base


CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_common(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": lambda: tf.MistralConfig(**_common(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "qwen2": lambda: tf.Qwen2Config(**_common(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)),
    "gemma": lambda: tf.GemmaConfig(**_common(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "phi": lambda: tf.PhiConfig(**_common(hidden_size=64, intermediate_size=160, num_attention_heads=4, partial_rotary_factor=0.5)),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=NUM_LAYERS, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    # Mixture of experts: 4 experts, top-2, every layer sparse (Qwen2-MoE with its shared expert).
    "mixtral": lambda: tf.MixtralConfig(**_common(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_common(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_common(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)),
    "bert": lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, intermediate_size=128, max_position_embeddings=256),
}

CAUSAL = {
    "llama": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "gemma": tf.GemmaForCausalLM,
    "phi": tf.PhiForCausalLM,
    "gpt2": tf.GPT2LMHeadModel,
}
# Mixture-of-experts families: their end-to-end tests are in tests/passes/test_fuse_moe.py.
MOE_CAUSAL = {
    "mixtral": tf.MixtralForCausalLM,
    "qwen2_moe": tf.Qwen2MoeForCausalLM,
    "qwen3_moe": tf.Qwen3MoeForCausalLM,
}


def tiny_model(
    name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, seed: int = 0,
    experts_implementation: str | None = None,
):
    """A seeded tiny model of family ``name`` (see CONFIGS), in eval mode; MoE families take
    transformers' ``experts_implementation`` (default: its own choice, "grouped_mm")."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    cls = {**CAUSAL, **MOE_CAUSAL}.get(name, tf.BertModel)
    model = cls(config).to(dtype).eval()
    return model


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)
