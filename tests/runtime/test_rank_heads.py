"""runtime/rank_heads.py: which KV heads a rank holds, and the per-rank cache's marker ops.

The rule is checked against its definition (split when ``W`` divides ``Hkv``, the one head
``r·Hkv/W`` when ``Hkv`` divides ``W``); the markers against ``narrow`` (``tp_local_heads``)
and against their contract (``tp_full_heads`` traces to the full shape and refuses to run);
``opcheck`` checks both registrations. The 2-rank behaviour (a ``StaticKVCache`` of the
rank's heads under a sharded graph) is in tests/distributed.
"""
from __future__ import annotations

import pytest
import torch

from llmopt.runtime.distributed import TensorParallelError
from llmopt.runtime.rank_heads import RankLocalCacheError, kv_heads_of_rank


@pytest.mark.parametrize("kv_heads, world, expected", [
    (8, 2, [(0, 4), (4, 8)]),
    (2, 2, [(0, 1), (1, 2)]),
    (1, 2, [(0, 1), (0, 1)]),  # replicated
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # each head on 2 ranks
    (3, 2, None),
    (2, 3, None),
])
def test_kv_heads_of_rank(kv_heads, world, expected):
    got = [kv_heads_of_rank(kv_heads, world, r) for r in range(world)]
    assert got == (expected or [None] * world)


def test_tp_local_heads_is_narrow_and_passes_opcheck():
    x = torch.randn(2, 4, 3, 5)
    out = torch.ops.llmopt.tp_local_heads(x, 1, 1, 3)
    assert torch.equal(out, x[:, 1:3]) and out.is_contiguous()
    torch.library.opcheck(torch.ops.llmopt.tp_local_heads.default, (x, 1, 1, 3))


def test_tp_full_heads_traces_to_all_heads_and_refuses_to_run():
    x = torch.randn(2, 1, 3, 5)
    with pytest.raises(RankLocalCacheError, match="holds only heads 1..1 of 2.*compile the model"):
        torch.ops.llmopt.tp_full_heads(x, 1, 2, 1)
    out = torch.ops.llmopt.tp_full_heads(x.to("meta"), 1, 2, 1)  # the fake implementation
    assert tuple(out.shape) == (2, 2, 3, 5)


def test_static_cache_tensor_parallel_needs_a_process_group():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    from llmopt.runtime.static_cache import StaticKVCache

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=64)
    with pytest.raises(TensorParallelError, match="no torch.distributed process group is initialized"):
        StaticKVCache(config, batch_size=1, max_seq_len=8, tensor_parallel="auto")
    assert StaticKVCache(config, batch_size=1, max_seq_len=8).shape == (1, 2, 8, 8)
