"""The Engine's paged attention under tensor parallelism (``shard_tensor_parallel``).

Under ``llmopt.Engine`` every attention is the ``"llmopt_paged"`` function
(runtime/paged_model.py): ``llmopt::paged_kv_append`` writes the new K/V into the layer's
pools ``[blocks, Hkv, block_size, D]``, then ``llmopt::paged_attention_prefill`` or
``llmopt::paged_attention_decode`` (which also writes the step's split workspace
``[N, Hq, splits, pitch]``) reads them. AOTAutograd functionalizes the two mutating ops into
``auto_functionalized_v2(op, ..., _all_bases=[...])`` whose results are ``getitem``s, with a
``copy_`` of each updated base back into its graph input. All three act on each head
independently, so they are head-local like SDPA; what the pass must add is:

- :func:`untangle_workspaces`: the decode workspace is scratch (each layer overwrites what
  it reads), but functionalization chains it from layer to layer (layer ``l + 1`` reads
  layer ``l``'s result) and writes the last one back: a value that crosses layers, which a
  pair may not have. Every layer's call is pointed at the graph input itself and the
  write-back dropped (before the pairs are found; nothing reads a workspace's content
  after the layer that wrote it).
- :func:`shard_paged_bases`: a base that holds all heads (the decode workspace
  ``[N, Hq, ...]``; pools of all heads, built without ``tensor_parallel``) is read and
  written at this rank's heads, a slice along dim 1 by the head fraction of the ``k``
  (append) or ``q`` (decode) it is given; the pools' write-backs then go to the same slices
  (``rewrite.shard_pair``'s ``slice_cache``).

The Engine builds pools of the rank's heads only (``PagedCacheLayout.from_config(...,
tensor_parallel=)``) and its attention marks them as the static cache does
(``tp_local_heads`` on the new K/V, ``tp_full_heads`` on the pools it reads; removed by
``rewrite._rank_cache_marker``): the pools are then graph inputs of the local size, not
slices, so ``reinplace_kv`` writes them in place as on one device. Torch releases without
``auto_functionalized_v2`` leave the attention replicated (and such pools then raise
``RankLocalCacheError``, saying so).
"""
from __future__ import annotations

import operator

import torch.fx as fx

from .pairs import AF_V2, PAGED_APPEND, PAGED_DECODE, NotShardable, aten, as_int, is_paged_call
from .region import evaluate

__all__ = ["shard_paged_bases", "untangle_workspaces"]

def untangle_workspaces(gm: fx.GraphModule) -> int:
    """Every decode attention reads the workspace graph input itself; the chain's write-back is
    dropped (see module doc). Returns the number of calls re-pointed."""
    roots: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if not (is_paged_call(n) and n.args[0] is PAGED_DECODE):
            continue
        bases = list(n.kwargs["_all_bases"])
        i = n.kwargs["_workspace_base_index"]
        b = bases[i]
        if b.op == "call_function" and b.target is operator.getitem and b.args[0] in roots:
            b = roots[b.args[0]]
        roots[n] = bases[i] = b
        n.update_kwarg("_all_bases", bases)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target == aten.copy_.default:
            src = n.args[1]
            if (isinstance(src, fx.Node) and src.target is operator.getitem and src.args[0] in roots
                    and n.args[0] is roots[src.args[0]] and not n.users):
                gm.graph.erase_node(n)
    return len(roots)


def shard_paged_bases(gm: fx.GraphModule, n: fx.Node, full: dict, frac: dict, slice_cache: dict) -> None:
    """Point a functionalized paged call's bases that hold all heads at this rank's heads of
    them (dim 1). Pools of the rank's heads (``rank_heads``: the ``k`` given is the
    ``tp_local_heads`` marker's, already local before sharding) are left as they are."""
    if n.target is not AF_V2:
        return
    src = n.kwargs["k"] if n.args[0] is PAGED_APPEND else n.kwargs["q"]
    if src not in frac or src not in full:
        return
    lo, hi = frac[src]
    all_heads = as_int(full[src].shape[1])
    if all_heads == as_int(src.meta["val"].shape[1]):
        return  # the input was not cut here: the bases are the rank's already
    bases = []
    for b in n.kwargs["_all_bases"]:
        heads = as_int(b.meta["val"].shape[1])
        if heads != all_heads:
            bases.append(b)
            continue
        start, end = lo * heads, hi * heads
        if start.denominator != 1 or end.denominator != 1:
            raise NotShardable(f"{n.name}: {b.name} cannot be cut at this rank's heads")
        key = (b, 1, int(start), int(end))
        if key not in slice_cache:
            with gm.graph.inserting_after(b):
                view = gm.graph.call_function(aten.slice.Tensor, key)
            view.meta["val"] = evaluate(view)
            slice_cache[key] = view
        bases.append(slice_cache[key])
    n.update_kwarg("_all_bases", bases)
