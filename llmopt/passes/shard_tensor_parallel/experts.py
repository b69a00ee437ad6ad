"""Mixture-of-experts blocks under tensor parallelism (``shard_tensor_parallel``): expert stacks split along I.

``fuse_moe`` leaves each sparse MoE block as ``llmopt::moe_route`` (the router, replicated:
every rank routes every token the same way) and ``llmopt::fused_experts(x, w_gate_up
[E, 2I, H], w_down [E, H, I], weights, ids, act)``. Each expert is a gated MLP, so the
Megatron split of an MLP applies to every expert at once (vLLM's and SGLang's "TP MoE"):

- ``w_gate_up``: rank ``r`` keeps, of every expert, gate rows ``[r·I/W, (r+1)·I/W)`` and the
  same rows of the up half: column-parallel along the intermediate dimension;
- ``w_down``: the matching input columns ``[r·I/W, (r+1)·I/W)``: row-parallel;
- the op's output (already the routing-weighted combine over the top-k experts) is then a
  partial sum over this rank's features, completed by one ``all_reduce(sum)``; the weighted
  combine commutes with the sum over ranks, so it stays inside the op.

Every expert keeps its place (no expert-parallel placement, no token exchange): the routing
ids and weights, the decode path's bytes per step (now ``k`` experts' ``1/W`` shares) and
the kernels are unchanged, only ``I`` is smaller. A stack whose ``I`` is not divisible by
``W`` stays replicated with a near-miss. Stacks are sharded before ``quantize_linears``, so
``quantize="int8"`` / ``"int4-..."`` quantizes each rank's shards (per-channel scales of a
gate/up shard are those of the whole stack; down shards get their own, as row-parallel
linears do).

Memory: the shards are derived from the full stacks (``weight_release.derived``), so each
rank releases the full stacks after compiling and keeps its shards; with ``quantize=`` the
float shards are released in turn, and the rank holds only its quantized shards.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...graph import add_constant, is_constant, real_tensors, tensor_meta
from ...weight_release import derived
from .collectives import SHARDED, reduce_after

__all__ = ["FUSED_EXPERTS", "shard_experts"]

FUSED_EXPERTS = torch.ops.llmopt.fused_experts.default


def shard_experts(gm, node: fx.Node, tp, ctx, all_reduce, wait) -> list[str] | None:
    """Shard one ``fused_experts`` node's stacks along I and all-reduce its output; returns the
    replaced stacks' attribute names (None, with a near-miss, when it stays replicated)."""
    gate_up, down = node.args[1], node.args[2]
    if not (is_constant(gm, gate_up) and is_constant(gm, down)):
        ctx.near_miss(node, "experts replicated: the expert stacks are not frozen weights")
        return None
    experts, two_i, hidden = (int(d) for d in tensor_meta(gate_up).shape)
    inter, world, rank = two_i // 2, tp.world_size, tp.rank
    if inter % world:
        ctx.near_miss(node, f"experts replicated: intermediate size {inter} is not divisible by {world} ranks")
        return None
    per = inter // world
    lo, hi = rank * per, (rank + 1) * per
    # Shards derived from the full stacks (weight_release.derived): the full stacks are
    # released after compiling and a recompile reuses the shards. A clone, not
    # .contiguous(): a slice that is already contiguous (one rank) would keep the stack alive.
    with real_tensors():
        gate_up_local = derived(gm, gate_up, ("tp_experts_gate_up", rank, world), lambda w: torch.cat(
            [w[:, lo:hi], w[:, inter + lo:inter + hi]], dim=1), SHARDED)
        down_local = derived(gm, down, ("tp_experts_down", rank, world),
                             lambda w: w[:, :, lo:hi].clone(memory_format=torch.contiguous_format), SHARDED)
    node.args = (node.args[0], add_constant(gm, "tp_experts_gate_up", gate_up_local, node),
                 add_constant(gm, "tp_experts_down", down_local, node), *node.args[3:])
    reduce_after(gm, node, tp, all_reduce, wait)
    ctx.rewrite(node, f"experts tensor-parallel: {experts} experts, intermediate {inter} → {per} "
                      f"(gate/up rows and down columns {lo}..{hi - 1}), then all_reduce(sum) over {world} ranks")
    return [gate_up.target, down.target]
