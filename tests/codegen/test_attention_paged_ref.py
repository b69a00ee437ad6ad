"""attention_paged_ref (llmopt/codegen/attention_paged_ref.py): the paged references
against the dense ones, on the same keys gathered into a contiguous cache.

Specification: ``gather_kv`` lays each sequence's blocks (in block-table order) out as a
dense ``[B, Hkv, S, D]`` cache; ``paged_kv_append_ref`` writes row ``i`` at slot
``slot_mapping[i]`` (block ``slot // block_size``, offset ``slot % block_size``) and skips
slots < 0; the paged decode and prefill references equal the dense decode and prefill
references on the gathered cache (new tokens are the last ``q_len`` of ``seq_len``
positions), in fp64 within the suite's fp64 tolerance.
"""
import pytest
import torch
from conftest import assert_close

from llmopt.codegen.attention_decode_ref import attention_decode_ref
from llmopt.codegen.attention_paged_ref import (
    gather_kv, paged_attention_decode_ref, paged_attention_prefill_ref, paged_kv_append_ref,
)
from llmopt.codegen.attention_prefill_ref import attention_prefill_ref

HKV, BS, D, NUM_BLOCKS = 2, 4, 16, 12
SEQ_LENS = [6, 11, 1]


def paged_case(seed=0, dtype=torch.float64):
    """Pools with random contents and a shuffled block table for SEQ_LENS."""
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(NUM_BLOCKS, HKV, BS, D, generator=g).to(dtype)
    v_pool = torch.randn(NUM_BLOCKS, HKV, BS, D, generator=g).to(dtype)
    per_seq = -(-max(SEQ_LENS) // BS)
    table = torch.randperm(NUM_BLOCKS, generator=g)[: len(SEQ_LENS) * per_seq].view(len(SEQ_LENS), per_seq)
    return k_pool, v_pool, table.to(torch.int32), torch.tensor(SEQ_LENS, dtype=torch.int32)


def test_gather_follows_the_block_table():
    k_pool, _, table, lens = paged_case()
    dense = gather_kv(k_pool, table, lens)
    for b, n in enumerate(SEQ_LENS):
        for j in range(n):
            assert torch.equal(dense[b, :, j], k_pool[table[b, j // BS], :, j % BS])


def test_append_writes_its_slots_and_skips_negative_ones():
    k_pool, v_pool, _, _ = paged_case()
    before_k, before_v = k_pool.clone(), v_pool.clone()
    k, v = torch.randn(3, HKV, D, dtype=torch.float64), torch.randn(3, HKV, D, dtype=torch.float64)
    slots = torch.tensor([5, -1, 17])
    paged_kv_append_ref(k_pool, v_pool, slots, k, v)
    for row, slot in ((0, 5), (2, 17)):
        assert torch.equal(k_pool[slot // BS, :, slot % BS], k[row])
        assert torch.equal(v_pool[slot // BS, :, slot % BS], v[row])
        before_k[slot // BS, :, slot % BS] = k[row]
        before_v[slot // BS, :, slot % BS] = v[row]
    assert torch.equal(k_pool, before_k) and torch.equal(v_pool, before_v), "nothing else written"


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (3, 0.0), (0, 4.0)])
def test_decode_equals_dense_decode_on_the_gathered_cache(window, softcap):
    k_pool, v_pool, table, lens = paged_case()
    q = torch.randn(len(SEQ_LENS), 2 * HKV, 1, D, dtype=torch.float64)
    paged = paged_attention_decode_ref(q, k_pool, v_pool, table, lens, 0.25, window, softcap)
    k, v = gather_kv(k_pool, table, lens), gather_kv(v_pool, table, lens)
    dense = attention_decode_ref(q, k, v, lens, None, 0.25, window, softcap)
    assert_close(paged, dense, what="paged vs dense decode")


@pytest.mark.parametrize("q_lens", [[2, 11, 1], [6, 3, 1]], ids=["prompt-and-decode", "chunk-after-prefix"])
def test_prefill_equals_dense_causal_prefill_per_sequence(q_lens):
    k_pool, v_pool, table, lens = paged_case(seed=1)
    q = torch.randn(sum(q_lens), 2 * HKV, D, dtype=torch.float64)
    qsl = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    paged = paged_attention_prefill_ref(q, k_pool, v_pool, table, lens, qsl, 0.25)
    k, v = gather_kv(k_pool, table, lens), gather_kv(v_pool, table, lens)
    for b, (n, t) in enumerate(zip(SEQ_LENS, q_lens)):
        rows = q[qsl[b]:qsl[b + 1]].transpose(0, 1)[None]  # [1, Hq, t, D]
        dense = attention_prefill_ref(rows, k[b:b + 1, :, :n], v[b:b + 1, :, :n], None, None,
                                      torch.tensor([n - t]), 0.25, True)
        assert_close(paged[qsl[b]:qsl[b + 1]], dense[0].transpose(0, 1), what=f"sequence {b}")
