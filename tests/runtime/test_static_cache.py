"""StaticKVCache: layout, lengths, capacity errors, and use as a Hugging Face ``Cache``.

Oracle: Hugging Face's own eager ``generate`` (its default ``DynamicCache``). A model driven
through ``StaticKVCache`` — by ``model.generate(past_key_values=...)``, by hand through
``model(...)``, and with a compiled forward — must produce the same greedy tokens / logits.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import assert_close, needs_transformers  # noqa: E402

from transformers import LlamaConfig  # noqa: E402

from llmopt.runtime import generate  # noqa: E402
from runtime.tiny_lm import PAD, VOCAB, ragged_prompts, tiny_model  # noqa: E402,F401
from llmopt.runtime.static_cache import KVCacheFullError, StaticKVCache, kv_cache_shape  # noqa: E402

# GPT-2 of transformers 4.48 keeps its cache as per-layer tuples; it takes Cache objects by 4.57.
TUPLE_CACHE_GPT2 = needs_transformers("4.57", "GPT-2 keeps a tuple cache and cannot take a StaticKVCache")
# 4.48's models build the mask to the cache's length before the cache sees the write, so a
# forward that overflows fails in the model's mask code with a size mismatch (still an error).
MASK_BEFORE_WRITE = needs_transformers(
    "4.57", "the model's mask code fails on an overflowing forward before the cache can say KV cache full"
)
GPT2 = pytest.param("gpt2", marks=TUPLE_CACHE_GPT2)


# -- layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, heads, dim", [("llama", 2, 16), ("mistral", 2, 16), ("gpt2", 4, 16)])
def test_layout_is_batch_kvheads_seq_headdim_per_layer(kind, heads, dim):
    model = tiny_model(kind)
    cache = StaticKVCache(model.config, batch_size=3, max_seq_len=40, dtype=torch.float16)
    assert len(cache.layers) == 2
    assert cache.shape == (3, heads, 40, dim) == kv_cache_shape(model.config, 3, 40)
    for layer in cache.layers:
        for buffer in (layer.keys, layer.values):
            assert buffer.shape == (3, heads, 40, dim) and buffer.dtype == torch.float16
            assert buffer.is_contiguous() and buffer.device.type == "cpu"
    assert isinstance(cache, transformers.StaticCache) and cache.is_compileable
    assert cache.num_tokens == 0 and int(cache.slots_written()) == 0


def test_large_cpu_buffers_are_lazily_zeroed_pages():
    """A buffer of at least zero_pages.MIN_BYTES is fresh anonymous memory (the kernel zeroes
    a page on first write): building a large cache touches almost none of it."""
    import resource

    from llmopt.codegen import zero_pages

    config = tiny_model("llama").config  # 2 layers, 2 KV heads of 16: 128 B per slot and row in fp32
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cache = StaticKVCache(config, batch_size=8, max_seq_len=8192, dtype=torch.float32)  # 8 MiB per buffer
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert faults < 8 * 4 * 2048 // 20, f"{faults} page faults: the buffers were written, not mapped"
    for layer in cache.layers:
        for buffer in (layer.keys, layer.values):
            assert zero_pages.lazily_zeroed(buffer.shape, buffer.dtype)
            assert not buffer.untyped_storage().resizable() and buffer.is_contiguous()
            assert buffer.shape == (8, 2, 8192, 16) and not buffer[:, :, ::512].any()
    small = StaticKVCache(config, batch_size=1, max_seq_len=16)
    assert small.layers[0].keys.untyped_storage().resizable()  # below MIN_BYTES: torch.zeros


def test_generate_over_lazily_zeroed_buffers_equals_eager(monkeypatch):
    from llmopt.codegen import zero_pages

    monkeypatch.setattr(zero_pages, "MIN_BYTES", 1)
    model = tiny_model("llama")
    ids, mask = ragged_prompts(3)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    cache = StaticKVCache(model.config, batch_size=3, max_seq_len=32)
    assert not cache.layers[0].keys.untyped_storage().resizable()
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    assert torch.equal(generate(model, ids, 8, attention_mask=mask, stop_token_ids=()), expected)


def test_overrides_and_bad_arguments():
    config = tiny_model("llama").config
    assert StaticKVCache(config, 1, 8, num_kv_heads=3, head_dim=5).shape == (1, 3, 8, 5)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        StaticKVCache(config, 0, 8)
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
        StaticKVCache(config, 1, 0)
    with pytest.raises(ValueError, match="floating torch.dtype"):
        StaticKVCache(config, 1, 8, dtype=torch.int8)
    hybrid = LlamaConfig(**{**config.to_dict(), "layer_types": ["full_attention", "linear_attention"]})
    with pytest.raises(NotImplementedError, match=r"layer types \['linear_attention'\]"):
        StaticKVCache(hybrid, 1, 8)


def test_lengths_padding_and_block_table():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(3)
    cache = StaticKVCache(model.config, batch_size=3, max_seq_len=32)
    cache.set_left_padding(mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.num_tokens == 8 and int(cache.slots_written()) == 8
    assert cache.valid_lengths().tolist() == mask.sum(-1).tolist() == [8, 5, 3]
    table = cache.block_table(8)
    assert table.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="must divide max_seq_len=32"):
        cache.block_table(5)
    cache.reset(zero_memory=False)
    assert cache.num_tokens == 0 and int(cache.slots_written()) == 0
    assert cache.layers[0].keys.abs().sum() > 0  # rewound, memory left as is
    cache.reset()
    assert cache.layers[0].keys.abs().sum() == 0


# -- as a Hugging Face cache --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral", GPT2])
@pytest.mark.parametrize("batch", [1, 4])
def test_hf_generate_with_static_kv_cache_equals_eager(kind, batch):
    model = tiny_model(kind)
    ids, mask = ragged_prompts(batch)
    new = 16  # > mistral's sliding window of 5: the window is exercised
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    cache = StaticKVCache(model.config, batch_size=batch, max_seq_len=ids.shape[1] + new)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["llama", GPT2])
def test_forward_by_hand_prefill_then_decode_matches_full_forward(kind):
    model = tiny_model(kind)
    ids, mask = ragged_prompts(2, length=10)
    full_mask = torch.ones(2, 12, dtype=torch.int64)
    full_mask[:, :10] = mask
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        extra = torch.tensor([[5, 6], [7, 8]])
        whole = torch.cat([ids, extra], dim=1)
        expected = model(input_ids=whole, attention_mask=full_mask, position_ids=positions).logits
        cache = StaticKVCache(model.config, batch_size=2, max_seq_len=16)
        out = [model(input_ids=ids, attention_mask=full_mask[:, :10], position_ids=positions[:, :10],
                     past_key_values=cache, use_cache=True).logits]
        for step in range(2):
            col = 10 + step
            out.append(model(input_ids=whole[:, col:col + 1], attention_mask=full_mask[:, : col + 1],
                             position_ids=positions[:, col:col + 1], past_key_values=cache, use_cache=True).logits)
    got = torch.cat(out, dim=1)
    real = full_mask.bool()  # logits at padding positions are not defined by either path
    assert_close(got[real], expected[real], what=f"{kind} cached vs full forward")
    assert cache.num_tokens == 12


def test_hf_generate_with_compiled_forward_and_static_kv_cache_equals_eager():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(4)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    torch.compiler.reset()  # compiled code is cached per code object across tests
    compiled = tiny_model("llama")
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager")
    cache = StaticKVCache(compiled.config, batch_size=4, max_seq_len=24)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)


# -- capacity and contract errors ---------------------------------------------------------
@MASK_BEFORE_WRITE
def test_capacity_error_message_from_hf_generate():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    cache = StaticKVCache(model.config, batch_size=2, max_seq_len=12)
    # 8 prompt tokens, then one slot per decode forward: the 13th write does not fit.
    with pytest.raises(KVCacheFullError) as info:
        model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert str(info.value) == "KV cache full: 12 tokens reserved, 13 needed; pass max_seq_len >= 13"
    assert (info.value.reserved, info.value.needed) == (12, 13)


@MASK_BEFORE_WRITE
def test_capacity_error_message_from_prefill():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(1, length=10)
    cache = StaticKVCache(model.config, batch_size=1, max_seq_len=8)
    full = r"^KV cache full: 8 tokens reserved, 10 needed; pass max_seq_len >= 10$"
    with pytest.raises(KVCacheFullError, match=full):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


def test_capacity_error_message_from_reserve():
    config = tiny_model("llama").config
    with pytest.raises(KVCacheFullError, match="4096 tokens reserved, 4100 needed; pass max_seq_len >= 4100"):
        StaticKVCache(config, 1, 4096, dtype=torch.float16).reserve(4100)


def test_tuple_cache_models_are_refused_with_the_versions():
    """On a transformers whose GPT-2 keeps a tuple cache, llmopt.generate refuses before any
    forward, naming the installed version and the one needed; elsewhere GPT-2 just runs."""
    model = tiny_model("gpt2")
    ids, mask = ragged_prompts(2)
    if getattr(model, "_supports_static_cache", True) is not False:
        assert generate(model, ids, 2, attention_mask=mask).shape == (2, 10)
        return
    with pytest.raises(NotImplementedError, match=rf"transformers {transformers.__version__} .*>= 4.57"):
        generate(model, ids, 2, attention_mask=mask)
    with pytest.raises(TypeError, match=rf"tuple cache .*transformers {transformers.__version__}.*>=4.57"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=StaticKVCache(model.config, 2, 16),
                  use_cache=True)


def test_capacity_error_from_llmopt_generate_before_any_forward():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(KVCacheFullError, match="KV cache full: 16 tokens reserved, 27 needed; pass max_seq_len >= 27"):
        generate(model, ids, 20, attention_mask=mask, max_seq_len=16)
    assert calls == []


def test_wrong_batch_or_dtype_says_what_to_build():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"built for keys \[batch=3, kv_heads=2, seq, head_dim=16\]"):
            model(input_ids=ids, attention_mask=mask, past_key_values=StaticKVCache(model.config, 3, 16),
                  use_cache=True)
        with pytest.raises(ValueError, match="holds torch.float16 on cpu, the model wrote torch.float32"):
            model(input_ids=ids, attention_mask=mask,
                  past_key_values=StaticKVCache(model.config, 2, 16, dtype=torch.float16), use_cache=True)


def test_gemma2_of_a_hybrid_cache_transformers_is_refused_with_the_versions():
    """Gemma 2 of transformers 4.48 slices its sliding layers' masks for a window-sized
    HybridCache: StaticKVCache refuses it there, naming the versions; later versions build
    those masks from the cache's sizes and it is accepted."""
    config = transformers.Gemma2Config(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    if getattr(config, "layer_types", None) is not None:
        assert StaticKVCache(config, 1, 8).shape == (1, 2, 8, 8)
        return
    with pytest.raises(NotImplementedError, match=rf"transformers {transformers.__version__} .*>= 4.57"):
        StaticKVCache(config, 1, 8)
