"""Shared helpers of the quantization tests: a tiny seeded Llama, its inputs, and the
suite's one table of quantization error bounds (also read by tests/passes)."""
from __future__ import annotations

import torch

VOCAB = 128

# The quantization error bounds of the whole suite, per scheme: the relative Frobenius
# error (conftest.relative_error) of a quantized model's logits against the same float
# model run eagerly, on the tests' tiny random decoders (hidden 64, 2 layers: tiny_llama
# below, tests/models/tiny.py, GPT-2), whether quantized by quantize_ or by the compiler's
# quantize_linears pass. They bound what the scheme itself loses (the kernels are held to
# conftest.TOLERANCE against fp64 on the same codes), and sit at about 2x the largest
# error observed (torch 2.13, CPU): int8 0.0094, w8a8 0.0098, int4-g32 0.111 (the Triton
# kernels inside the model), int4-g64 0.109, GPTQ int4-g32 0.085.
LOGIT_BOUNDS = {"int8": 0.02, "w8a8": 0.03, "int4-g32": 0.2, "int4-g64": 0.2, "gptq-g32": 0.2}
# The round-to-nearest schemes as quantize_ spells them (GPTQ needs calibration data).
RTN_SCHEMES = ("int8", "w8a8", "int4-g32", "int4-g64")


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
