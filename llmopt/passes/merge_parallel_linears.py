"""merge_parallel_linears: linears that read the same input become one matmul + views.

    q = x @ Wq^T + bq;  k = x @ Wk^T;  v = x @ Wv^T + bv
      →  qkv = x @ cat(Wq, Wk, Wv)^T + cat(bq, 0, bv);  q, k, v = qkv[..., slices]

One read of ``x`` and one launch instead of three (Q/K/V, including GQA/MQA where K and
V are narrower than Q), two for gate/up of a SwiGLU MLP, and any other group sharing an
input (BERT's Q/K/V with biases). The outputs are ``aten.slice`` views of the merged
output along its last dimension — no copies; the gated-activation fusion reads the two
halves of a merged gate/up through their strides.

Grouping follows DESIGN.md's horizontal-fusion shape: ``group_key(node)`` returns a key or
None (with the reason), ``fuse(gm, nodes)`` merges one group. The key includes the
weight's storage *scheme* ("dense" today) so quantized members (the quantization pass
attaches ``meta["llmopt_scheme"]``) only merge with members of the same scheme and group
size, through that scheme's own concatenation.

Memory: the merged weight becomes the members' storage (``frozen_weights.share_storage``):
the model's parameters are rebound as row views into it and their old memory is freed —
member by member as the merged weight is filled, so that even while merging at most one
member is held twice (not the group; docs/memory.md) — so each weight is held once and in-place writes to a member (``load_state_dict``,
``p.data.copy_``) reach the merged matmul. A recompile of the same model (a new shape)
finds the members already adjacent in one storage and merges them without a copy
(``frozen_weights.reusable_storage``), so every compiled graph reads the same memory.
Members without a bias get zero rows in the merged bias.
"""
from __future__ import annotations

import collections

import torch
import torch.fx as fx

from ..frozen_weights import reusable_storage, share_storage
from ..graph import add_constant, constant_value, is_constant, real_tensors, tensor_meta
from ..weight_release import check_readable

aten = torch.ops.aten


def group_key(gm: fx.GraphModule, node: fx.Node):
    """(key, None) when ``node`` can join a merge group, (None, reason) otherwise."""
    if node.op != "call_function" or node.target != aten.linear.default:
        return None, None
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not is_constant(gm, w):
        return None, "weight is not a frozen constant"
    if bias is not None and not is_constant(gm, bias):
        return None, "bias is not a frozen constant"
    wv = tensor_meta(w)
    if wv is None or wv.dim() != 2:
        return None, "weight is not 2-D"
    scheme = node.meta.get("llmopt_scheme", "dense")
    return (x, wv.dtype, wv.device, int(wv.shape[1]), scheme), None


def run(gm: fx.GraphModule, ctx) -> int:
    groups: dict = collections.defaultdict(list)
    reasons = {}
    for node in gm.graph.nodes:
        key, reason = group_key(gm, node)
        if key is not None:
            groups[key].append(node)
        elif reason is not None:
            reasons[node] = reason
    # A non-constant member of a group that would otherwise merge is a near-miss worth
    # reporting; a lone linear is not.
    shared_inputs = collections.Counter(k[0] for k, v in groups.items() for _ in v)
    for node, reason in reasons.items():
        if shared_inputs.get(node.args[0], 0) >= 1:
            ctx.near_miss(node, f"not merged with the linears sharing its input: {reason}")
    count = 0
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        if key[4] != "dense":
            ctx.near_miss(nodes[0], f"merging {key[4]} weights is not supported yet")
            continue
        fuse(gm, nodes, ctx)
        count += 1
    return count


def fuse(gm: fx.GraphModule, nodes: list[fx.Node], ctx) -> fx.Node:
    """Replace the linears ``nodes`` (same input, frozen weights) by one linear + slices."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(nodes, key=order.__getitem__)
    first = nodes[0]
    x = first.args[0]
    bias_nodes = [n.args[2] if len(n.args) > 2 else None for n in nodes]
    weights = [constant_value(gm, n.args[1], layout_only=True) for n in nodes]
    biases = [constant_value(gm, b, layout_only=True) if b is not None else None for b in bias_nodes]
    widths = [int(w.shape[0]) for w in weights]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    fill = None
    with real_tensors():
        merged_w = reusable_storage(weights, widths)
        if merged_w is None:
            for i in range(len(weights)):  # a copy reads the values: never of a released weight's freed memory
                check_readable(weights[i], "merge_parallel_linears")
            # Built member by member while share_storage rebinds them (below): the empty
            # rows are not resident until written, and each member's storage is freed as
            # soon as it is a view of its rows, so the merge holds one member twice at most,
            # not the whole group (a torch.cat would hold every member beside the result).
            merged_w = weights[0].new_empty((sum(widths), *weights[0].shape[1:]))
            fill = _row_filler(merged_w, weights, starts, widths)
        weights = None  # the filler holds the only reference left to the members
        merged_b = None
        if any(b is not None for b in biases):
            merged_b = reusable_storage(biases, widths)
            if merged_b is None:
                ref = next(b for b in biases if b is not None)
                merged_b = torch.cat(
                    [b.detach() if b is not None else torch.zeros(n, dtype=ref.dtype, device=ref.device) for b, n in zip(biases, widths)]
                )
    w_node = add_constant(gm, "merged_weight", merged_w, first)
    b_node = add_constant(gm, "merged_bias", merged_b, first) if merged_b is not None else None
    share_storage(gm, w_node.target, [(n.args[1].target, _rows(s, w)) for n, s, w in zip(nodes, starts, widths)],
                  fill=fill)
    if b_node is not None:
        share_storage(gm, b_node.target, [(b.target, _rows(s, w)) for b, s, w in zip(bias_nodes, starts, widths) if b is not None])
    with gm.graph.inserting_before(first):
        merged = gm.graph.call_function(aten.linear.default, (x, w_node, b_node))
    merged.meta = dict(first.meta)
    merged.meta["val"] = aten.linear.default(tensor_meta(x), tensor_meta(w_node), tensor_meta(b_node) if b_node else None)
    start = 0
    for node, width in zip(nodes, widths):
        with gm.graph.inserting_before(node):
            piece = gm.graph.call_function(aten.slice.Tensor, (merged, -1, start, start + width))
        piece.meta = dict(node.meta)
        piece.meta["val"] = aten.slice.Tensor(merged.meta["val"], -1, start, start + width)
        node.replace_all_uses_with(piece)
        gm.graph.erase_node(node)
        start += width
    names = ", ".join(_short(n) for n in nodes)
    ctx.rewrite(merged, f"merged {len(nodes)} linears ({names}) → N={sum(widths)}, K={int(merged_w.shape[1])}")
    return merged


def _row_filler(merged: torch.Tensor, members: list[torch.Tensor], starts: list[int], widths: list[int]):
    """``fill(i)``: copy member ``i`` into its rows of ``merged`` and drop the reference to it."""
    members = list(members)

    def fill(i: int) -> None:
        with real_tensors():
            merged[starts[i]:starts[i] + widths[i]].copy_(members[i].detach())
        members[i] = None

    return fill


def _rows(start: int, width: int):
    return lambda merged: merged.narrow(0, start, width)


def _short(node: fx.Node) -> str:
    from ..report import layer_of

    return layer_of(node).split(".")[-1] or node.name
