"""Shared helpers of the quantization tests: a tiny seeded Llama and its inputs."""
from __future__ import annotations

import torch

VOCAB = 128

# Relative Frobenius error of the logits vs the float model, per scheme (tiny random Llama,
# hidden 64). Observed: int8 0.007, w8a8 0.009, int4-g32 0.08, GPTQ int4-g32 0.08.
LOGIT_BOUNDS = {"int8": 0.02, "w8a8": 0.03, "int4-g32": 0.2, "int4-g64": 0.2}


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised tiny Llama (eval mode); same seed, same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def token_batches(n: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(n)]
