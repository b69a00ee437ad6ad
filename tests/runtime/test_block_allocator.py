"""Property tests of the block allocator and the paged cache's block bookkeeping.

Random sequences of add / grow / fork / finish operations (hypothesis) never leak a block,
never hand out a block twice, keep every reference count equal to the number of block
tables holding the block, reuse freed blocks, and never let one sequence see another's
tokens: each token written is the value ``sequence id * 1000 + position`` and every
sequence's gathered cache must read back exactly its own history (copy-on-write included).
"""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, strategies as st

from llmopt.codegen.attention_paged import gather_kv
from llmopt.runtime.paged_cache import BlockAllocator, KVCacheExhaustedError, PagedCacheLayout, PagedKVCache


# ---------------------------------------------------------------------------------------
# BlockAllocator alone
# ---------------------------------------------------------------------------------------


@given(num_blocks=st.integers(1, 12), ops=st.lists(st.tuples(st.sampled_from("asf"), st.integers(0, 50)), max_size=60))
def test_allocator_never_leaks_or_double_allocates(num_blocks, ops):
    alloc = BlockAllocator(num_blocks)
    owners = collections.Counter()  # block -> owners we believe it has
    for op, pick in ops:
        held = sorted(owners)
        if op == "a":
            if len(held) == num_blocks:
                with pytest.raises(KVCacheExhaustedError, match="KV cache exhausted"):
                    alloc.allocate()
                continue
            block = alloc.allocate()
            assert owners[block] == 0, f"block {block} handed out while still owned"
            owners[block] = 1
        elif op == "s" and held:
            block = held[pick % len(held)]
            alloc.share(block)
            owners[block] += 1
        elif op == "f" and held:
            block = held[pick % len(held)]
            alloc.free(block)
            owners[block] -= 1
            if owners[block] == 0:
                del owners[block]
        assert alloc.num_used == len(owners)
        assert alloc.num_free == num_blocks - len(owners)
        for block in range(num_blocks):
            assert alloc.ref_count(block) == owners.get(block, 0)
        assert sorted(alloc.used_blocks()) == sorted(owners)


def test_freed_blocks_are_reused_first():
    alloc = BlockAllocator(8)
    first = [alloc.allocate() for _ in range(3)]
    assert first == [0, 1, 2]
    alloc.free(1)
    assert alloc.allocate() == 1, "the most recently freed block comes back first"
    for block in (0, 1, 2):
        alloc.free(block)
    assert alloc.num_free == 8
    assert sorted(alloc.allocate() for _ in range(8)) == list(range(8))


def test_allocator_errors():
    alloc = BlockAllocator(2)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(0)
    block = alloc.allocate()
    alloc.free(block)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(block)
    with pytest.raises(ValueError, match="only an allocated block can be shared"):
        alloc.share(block)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


# ---------------------------------------------------------------------------------------
# PagedKVCache under random workloads
# ---------------------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["add", "grow", "grow", "grow", "fork", "finish"]), st.integers(0, 1000),
              st.integers(1, 20)),
    min_size=1, max_size=40,
)


def write_tokens(cache: PagedKVCache, slots: list[int], values: list[float]) -> None:
    """What the model's forward does: the new tokens' K and V into their slots."""
    if not slots:
        return
    k = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)
    for layer in range(cache.num_layers):
        torch.ops.llmopt.paged_kv_append(cache.k_pools[layer], cache.v_pools[layer], torch.tensor(slots), k, -k)


@given(block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(1, 16), ops=OPS)
def test_random_add_grow_fork_finish(block_size, num_blocks, ops):
    layout = PagedCacheLayout(num_layers=2, num_blocks=num_blocks, num_kv_heads=1, head_dim=1,
                              block_size=block_size)
    cache = PagedKVCache(layout, max_blocks_per_seq=num_blocks)
    history: dict[int, list[float]] = {}  # what each sequence must read back
    next_id = 0
    ever_allocated: set[int] = set()
    for op, pick, n in ops:
        alive = sorted(history)
        if op == "add" or not alive:
            cache.add_sequence(next_id)
            history[next_id] = []
            next_id += 1
            continue
        sid = alive[pick % len(alive)]
        if op == "grow":
            length = cache.seq_len(sid)
            n = min(n, cache.max_seq_len - length)
            needed = cache.blocks_needed(sid, n)
            free_before = cache.num_free_blocks
            tables_before = {s: cache.block_table(s) for s in history}
            if needed > free_before:
                with pytest.raises(KVCacheExhaustedError):
                    cache.append_slots(sid, n)
                # all or nothing: the failed call changed nothing
                assert cache.num_free_blocks == free_before
                assert {s: cache.block_table(s) for s in history} == tables_before
                continue
            slots = cache.append_slots(sid, n)
            assert cache.num_free_blocks == free_before - needed
            assert len(slots) == n and len(set(slots)) == n
            values = [sid * 1000 + length + i for i in range(n)]
            write_tokens(cache, slots, values)
            history[sid].extend(values)
        elif op == "fork":
            cache.fork(sid, next_id)
            history[next_id] = list(history[sid])
            next_id += 1
        elif op == "finish":
            cache.free(sid)
            del history[sid]
        check_invariants(cache, history)
        ever_allocated |= set(cache.allocator.used_blocks())
    for sid in list(history):
        cache.free(sid)
    assert cache.num_free_blocks == num_blocks, "blocks leaked"
    assert cache.tokens_stored() == 0
    # freed blocks are handed out again
    if ever_allocated:
        cache.add_sequence("again")
        cache.append_slots("again", min(block_size * num_blocks, cache.max_seq_len))
        assert set(cache.block_table("again")) == set(range(num_blocks))


def check_invariants(cache: PagedKVCache, history: dict[int, list[float]]) -> None:
    tables = {sid: cache.block_table(sid) for sid in history}
    holders = collections.Counter(b for t in tables.values() for b in t)
    alloc = cache.allocator
    assert sorted(holders) == sorted(alloc.used_blocks()), "a used block no table holds (leak) or vice versa"
    for block, count in holders.items():
        assert alloc.ref_count(block) == count
    assert alloc.num_free + alloc.num_used == alloc.num_blocks
    for sid, values in history.items():
        assert cache.seq_len(sid) == len(values)
        assert len(tables[sid]) == cache.blocks_for(len(values))
        if not values:
            continue
        table = torch.tensor([tables[sid]], dtype=torch.int32)
        lens = torch.tensor([len(values)])
        for layer in range(cache.num_layers):
            got = gather_kv(cache.k_pools[layer], table, lens)[0, 0, : len(values), 0]
            assert got.tolist() == values, f"sequence {sid} reads {got.tolist()}, wrote {values}"
            got_v = gather_kv(cache.v_pools[layer], table, lens)[0, 0, : len(values), 0]
            assert got_v.tolist() == [-x for x in values]
