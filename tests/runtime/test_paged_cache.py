"""``PagedKVCache``: layout, growth, copy-on-write forks, exhaustion, per-step metadata."""
from __future__ import annotations

import pytest
import torch

from llmopt.codegen.attention_paged import gather_kv
from llmopt.runtime.paged_cache import (
    KVCacheExhaustedError,
    PagedAttentionMetadata,
    PagedCacheLayout,
    PagedKVCache,
)

transformers = pytest.importorskip("transformers")


def small_cache(num_blocks=8, block_size=4, layers=2, heads=2, dim=3, max_blocks_per_seq=None):
    layout = PagedCacheLayout(num_layers=layers, num_blocks=num_blocks, num_kv_heads=heads, head_dim=dim,
                              block_size=block_size)
    return PagedKVCache(layout, max_blocks_per_seq=max_blocks_per_seq)


def write(cache, slots, value):
    """Fill the given slots of every layer with ``value`` (K) and ``-value`` (V)."""
    for layer in range(cache.num_layers):
        for s in slots:
            cache.k_pools[layer][s // cache.block_size, :, s % cache.block_size] = value
            cache.v_pools[layer][s // cache.block_size, :, s % cache.block_size] = -value


def read(cache, sid, layer=0):
    table = torch.tensor([cache.block_table(sid)], dtype=torch.int32)
    lens = torch.tensor([cache.seq_len(sid)])
    return gather_kv(cache.k_pools[layer], table, lens)[0, 0, : cache.seq_len(sid), 0].tolist()


def test_layout_from_hf_configs():
    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     num_hidden_layers=3)
    layout = PagedCacheLayout.from_config(llama, num_blocks=10, block_size=8, dtype=torch.bfloat16)
    assert layout.pool_shape == (10, 2, 8, 16)
    assert layout.num_layers == 3
    assert layout.bytes_per_block == 2 * 3 * 2 * 8 * 16 * 2
    gpt2 = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2)
    assert PagedCacheLayout.from_config(gpt2, num_blocks=4).pool_shape == (4, 4, 16, 16)
    cache = PagedKVCache.from_config(llama, num_blocks=10, block_size=8, max_blocks_per_seq=3)
    assert len(cache.k_pools) == 3 and cache.k_pools[0].shape == (10, 2, 8, 16)
    assert cache.max_seq_len == 24


def test_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        PagedCacheLayout(num_layers=1, num_blocks=4, num_kv_heads=1, head_dim=8, block_size=0)
    with pytest.raises(ValueError, match="floating"):
        PagedCacheLayout(num_layers=1, num_blocks=4, num_kv_heads=1, head_dim=8, dtype=torch.int8)


def test_growth_allocates_one_block_at_a_time():
    cache = small_cache(block_size=4)
    cache.add_sequence("a")
    assert cache.append_slots("a", 3) == [0, 1, 2]  # block 0
    assert cache.append_slots("a", 1) == [3]
    assert cache.block_table("a") == [0]
    assert cache.append_slots("a", 2) == [4, 5]  # block 1
    assert cache.block_table("a") == [0, 1] and cache.seq_len("a") == 6
    assert cache.num_free_blocks == 6
    cache.free("a")
    assert cache.num_free_blocks == 8 and "a" not in cache


def test_fork_shares_full_blocks_and_copies_the_partial_one_on_write():
    cache = small_cache(block_size=4)
    cache.add_sequence("parent")
    slots = cache.append_slots("parent", 6)  # one full block + 2 tokens
    for i, s in enumerate(slots):
        write(cache, [s], float(i))
    cache.fork("parent", "child")
    assert cache.block_table("child") == cache.block_table("parent")
    assert cache.num_free_blocks == 6, "a fork allocates nothing"
    assert cache.blocks_needed("child", 1) == 1  # the shared partial block must be copied
    child_slot = cache.append_slots("child", 1)
    write(cache, child_slot, 100.0)
    full, partial = cache.block_table("parent")
    assert cache.block_table("child")[0] == full, "the full block stays shared"
    assert cache.block_table("child")[1] != partial, "the partial block was copied"
    assert cache.allocator.ref_count(full) == 2 and cache.allocator.ref_count(partial) == 1
    assert read(cache, "child") == [0, 1, 2, 3, 4, 5, 100]
    assert read(cache, "parent") == [0, 1, 2, 3, 4, 5], "the parent does not see the child's token"
    # the copy covers every layer and V as well
    assert read(cache, "child", layer=1) == [0, 1, 2, 3, 4, 5, 100]
    # now the parent owns its partial block alone: it writes in place
    assert cache.blocks_needed("parent", 2) == 0
    write(cache, cache.append_slots("parent", 2), 7.0)
    assert cache.block_table("parent")[1] == partial
    assert read(cache, "parent") == [0, 1, 2, 3, 4, 5, 7, 7]
    assert read(cache, "child") == [0, 1, 2, 3, 4, 5, 100]
    cache.free("parent")
    assert cache.allocator.ref_count(full) == 1
    cache.free("child")
    assert cache.num_free_blocks == 8


def test_fork_at_a_block_boundary_copies_nothing():
    cache = small_cache(block_size=4)
    cache.add_sequence("p")
    cache.append_slots("p", 8)
    cache.fork("p", "c")
    assert cache.blocks_needed("c", 1) == 1  # a new block for the growth, no copy
    cache.append_slots("c", 1)
    assert cache.block_table("c")[:2] == cache.block_table("p")


def test_exhaustion_raises_and_changes_nothing():
    cache = small_cache(num_blocks=3, block_size=4)
    cache.add_sequence("a")
    cache.append_slots("a", 10)  # 3 blocks
    cache.add_sequence("b")
    with pytest.raises(KVCacheExhaustedError, match=r"KV cache exhausted: 1 blocks needed by sequence 'b', 0 of 3 free"):
        cache.append_slots("b", 1)
    assert cache.seq_len("b") == 0 and cache.block_table("b") == []
    cache.fork("a", "a2")
    with pytest.raises(KVCacheExhaustedError):
        cache.append_slots("a2", 1)  # needs a copy of the shared partial block
    assert cache.block_table("a2") == cache.block_table("a") and cache.seq_len("a2") == 10


def test_max_seq_len_is_enforced():
    cache = small_cache(num_blocks=8, block_size=4, max_blocks_per_seq=2)
    cache.add_sequence(0)
    with pytest.raises(ValueError, match="more than max_seq_len=8"):
        cache.append_slots(0, 9)


def test_utilization_counts_shared_blocks_once():
    cache = small_cache(block_size=4)
    assert cache.utilization() == 1.0
    cache.add_sequence("a")
    cache.append_slots("a", 6)
    assert cache.tokens_stored() == 6 and cache.utilization() == 6 / 8
    cache.fork("a", "b")
    assert cache.utilization() == 6 / 8, "a fork stores nothing new"
    cache.append_slots("b", 1)  # copy of the partial block + 1 token
    assert cache.tokens_stored() == 6 + 3
    assert cache.utilization() == 9 / 12


def test_plan_builds_the_step_metadata_once():
    cache = small_cache(block_size=4, max_blocks_per_seq=3)
    cache.add_sequence("p")
    cache.add_sequence("d")
    cache.append_slots("d", 5)  # an earlier prompt; now decoding
    s_p = cache.append_slots("p", 6)
    s_d = cache.append_slots("d", 1)
    meta = cache.plan(["p", "d"], [6, 1], [s_p, s_d])
    assert isinstance(meta, PagedAttentionMetadata)
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.shape == (2, 3)
    assert meta.block_tables.tolist() == [cache.block_table("p") + [0], cache.block_table("d") + [0]]
    assert meta.seq_lens.tolist() == [6, 6] and meta.seq_lens.dtype == torch.int32
    assert meta.query_start_loc.tolist() == [0, 6, 7]
    assert meta.slot_mapping.tolist() == s_p + s_d
    assert not meta.decode_only and meta.num_seqs == 2 and meta.num_tokens == 7
    assert meta.k_pools is cache.k_pools
    # slots recomputed from the tables when not given
    assert cache.plan(["p", "d"], [6, 1]).slot_mapping.tolist() == s_p + s_d


def test_plan_pads_a_decode_batch_to_its_bucket():
    cache = small_cache(block_size=4, max_blocks_per_seq=2)
    cache.add_sequence(1)
    slots = cache.append_slots(1, 1)
    meta = cache.plan([1], [1], [slots], pad_to=4)
    assert meta.decode_only
    assert meta.seq_lens.tolist() == [1, 0, 0, 0]
    assert meta.slot_mapping.tolist() == slots + [-1, -1, -1]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables.shape == (4, 2)
    cache.add_sequence(2)
    s2 = cache.append_slots(2, 3)
    with pytest.raises(ValueError, match="only a decode-only step can be padded"):
        cache.plan([2], [3], [s2], pad_to=4)


def test_duplicate_and_unknown_sequences():
    cache = small_cache()
    cache.add_sequence(0)
    with pytest.raises(ValueError, match="already in the cache"):
        cache.add_sequence(0)
    with pytest.raises(ValueError, match="already in the cache"):
        cache.fork(0, 0)
    with pytest.raises(KeyError):
        cache.append_slots(1, 1)
