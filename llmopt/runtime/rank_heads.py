"""Which key/value heads a tensor-parallel rank holds, and how a per-rank KV cache says so in the graph.

Under tensor parallelism (docs/tensor_parallel.md) rank ``r`` of ``W`` computes K/V heads
``[r·Hkv/W, (r+1)·Hkv/W)`` when ``Hkv >= W`` (and ``W`` divides ``Hkv``), and otherwise the
one head its query heads read, ``r·Hkv/W`` (KV replicated over ``W/Hkv`` ranks):
:func:`kv_heads_of_rank` is that rule, shared by the sharding pass and the caches, so both
always agree.

A cache that allocates only those heads (``StaticKVCache(..., tensor_parallel=...)``)
meets a model that, as Dynamo traces it, still computes all heads: the sharding pass runs
later, on the captured graph. The cache bridges the two with two marker ops:

- ``llmopt::tp_local_heads(x, dim, start, end)``: this rank's heads of the new K/V before
  they are written (``x.narrow(dim, start, end - start)``, a copy);
- ``llmopt::tp_full_heads(x, dim, heads, start)``: the rank's cache read back as if it
  held all ``heads``, for the attention code that expects them.

``shard_tensor_parallel`` replaces both by their input once the attention is sharded (the
rank's graph then computes exactly the cache's heads). A graph in which that did not
happen would attend over heads this rank does not have, so ``tp_full_heads`` refuses to
run: it raises :class:`RankLocalCacheError` saying to compile with ``tensor_parallel``.
Its fake implementation gives the full shape, which is all tracing needs.
"""
from __future__ import annotations

import torch

__all__ = ["RankLocalCacheError", "kv_heads_of_rank", "rank_kv_heads", "tp_full_heads", "tp_local_heads"]


class RankLocalCacheError(RuntimeError):
    """A per-rank (tensor-parallel) KV cache was read by a graph that is not sharded."""


def kv_heads_of_rank(kv_heads: int, world_size: int, rank: int) -> tuple[int, int] | None:
    """``(start, end)`` of the K/V heads rank ``rank`` of ``world_size`` holds, or None when
    the heads cannot be split over ``world_size`` (neither count divides the other)."""
    if kv_heads % world_size == 0:
        per = kv_heads // world_size
        return rank * per, (rank + 1) * per
    if world_size % kv_heads == 0:
        head = rank * kv_heads // world_size
        return head, head + 1
    return None


def rank_kv_heads(tensor_parallel, kv_heads: int, what: str) -> tuple[int, int, int] | None:
    """``(start, end, kv_heads)`` of the K/V heads a cache built with ``tensor_parallel=`` (the
    compile option's value) holds on this rank, or None when it holds all of them (no
    tensor parallelism, one rank, or a single KV head replicated on every rank). ``what``
    names the cache in the error raised when the heads cannot be split."""
    if tensor_parallel is None:
        return None
    from .distributed import TensorParallelError, resolve_tensor_parallel

    tp = resolve_tensor_parallel(tensor_parallel)
    if tp.world_size == 1:
        return None
    heads = kv_heads_of_rank(kv_heads, tp.world_size, tp.rank)
    if heads is None:
        raise TensorParallelError(
            f"{what}: {kv_heads} key/value heads cannot be split over the world size {tp.world_size}; "
            "use a world size that divides the heads or is a multiple of them"
        )
    if heads[1] - heads[0] == kv_heads:  # one KV head replicated on every rank: nothing to save
        return None
    return (*heads, kv_heads)


@torch.library.custom_op("llmopt::tp_local_heads", mutates_args=())
def tp_local_heads(x: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    """This rank's heads ``[start, end)`` of ``x`` along ``dim`` (a copy)."""
    return x.narrow(dim, start, end - start).clone()


@tp_local_heads.register_fake
def _(x, dim, start, end):
    return x.narrow(dim, start, end - start).clone()


@torch.library.custom_op("llmopt::tp_full_heads", mutates_args=())
def tp_full_heads(x: torch.Tensor, dim: int, heads: int, start: int) -> torch.Tensor:
    """The rank-local ``x`` standing for all ``heads`` along ``dim``: never computed (see module doc)."""
    raise RankLocalCacheError(
        f"this KV cache holds only heads {start}..{start + x.shape[dim] - 1} of {heads} (it was built with "
        "tensor_parallel=...), but the model reading it is not sharded over the same ranks: compile the model "
        "with torch.compile(model, backend='llmopt', options={'tensor_parallel': ...}) and check the compile "
        "report's near-misses of shard_tensor_parallel, or build the cache without tensor_parallel"
    )


@tp_full_heads.register_fake
def _(x, dim, heads, start):
    shape = list(x.shape)
    shape[dim] = heads
    return x.new_empty(shape)
