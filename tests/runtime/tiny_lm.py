"""Tiny random-weight causal LMs and prompts shared by the runtime tests.

A 2-layer, hidden-64 model per family (fp32, eval mode), with the special tokens the
generate loops need (PAD/EOS/BOS) and a small vocabulary, so a test runs in milliseconds.
"""
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 160
PAD, EOS, BOS = 0, 1, 2


def tiny_model(kind: str, seed: int = 0, *, max_positions: int = 256, sliding_window: int = 5, **overrides):
    """``kind`` in llama, mistral (sliding window), qwen2, gpt2; ``overrides`` go to the config."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, **overrides)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_positions, **common)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama_like))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **llama_like))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**llama_like))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **common))
    else:
        raise ValueError(kind)
    return model.eval()


def ragged_prompts(batch: int, length: int = 8, seed: int = 1):
    """Left-padded prompts with different amounts of padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 5, 1, 6, 2, 4, 7][:batch]):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask
