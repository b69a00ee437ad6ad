"""Planning for ``shard_tensor_parallel``: find each column/row pair and choose this rank's heads.

A *pair* is found from its row linear (``o_proj``, ``down_proj``, ``c_proj``): walking back
from its input without crossing another linear reaches the column linears (all reading one
input) and the *region* between them (views, RoPE, attention, activation, cache writes).
Each column output is cut into its segments (the slices ``merge_parallel_linears`` left, or
a ``split``); a segment viewed as ``[..., heads, head_dim]`` is split per head, the one with
most heads being Q. :func:`assign_heads` then picks this rank's heads (GQA: K/V split when
``Hkv >= W``, else the one KV head this rank's Q heads read) or MLP features. Nothing here
changes the graph; :mod:`.rewrite` does.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...graph import DIMENSION_VIEW_OPS, RESHAPE_OPS, is_constant, tensor_meta
from ..kv_cache import FRESH_ALLOCATIONS
from ...runtime.distributed import TensorParallelError
from ...codegen import attention_paged as _paged_ops  # noqa: F401  (registers the llmopt::paged_* ops)
from ...runtime.rank_heads import kv_heads_of_rank  # also registers the ops of RANK_CACHE_OPS

aten = torch.ops.aten
# The markers a per-rank KV cache puts around its write and read (runtime/rank_heads.py).
TP_LOCAL_HEADS = torch.ops.llmopt.tp_local_heads.default
TP_FULL_HEADS = torch.ops.llmopt.tp_full_heads.default
RANK_CACHE_OPS = {TP_LOCAL_HEADS, TP_FULL_HEADS}

# The Engine's paged attention (runtime/paged_model.py; sharded by .paged).
AF_V2 = getattr(torch.ops.higher_order, "auto_functionalized_v2", None)
PAGED_APPEND = torch.ops.llmopt.paged_kv_append.default
PAGED_DECODE = torch.ops.llmopt.paged_attention_decode.default
PAGED_PREFILL = torch.ops.llmopt.paged_attention_prefill.default

VIEW_SIZE_OPS = frozenset(RESHAPE_OPS)  # views given a new size (the head split's views)

SDPA_OPS = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "scaled_dot_product_attention",
    )
    if hasattr(aten, name)
}

# Ops that act on each head independently whatever the sharded dimension (elementwise,
# layout), and ops checked per call in check_dims (a dimension argument must not be the
# sharded one).
HEAD_LOCAL_OPS = {
    *DIMENSION_VIEW_OPS, aten.clone.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.silu.default, aten.gelu.default, aten.tanh.default, aten.pow.Tensor_Scalar,
    aten.sigmoid.default, aten.relu.default, aten.exp.default, aten.where.self,
    aten._to_copy.default, aten.rsqrt.default, aten.add.Scalar, aten.mul.Scalar,
    aten.bmm.default, aten.index_copy.default, aten.index_put.default, operator.getitem,
    aten.cat.default, aten._softmax.default, *VIEW_SIZE_OPS, *SDPA_OPS, *RANK_CACHE_OPS,
}



class NotShardable(Exception):
    """A candidate pair cannot be sharded (recorded as a near-miss)."""



@dataclass
class Segment:
    col: fx.Node
    node: fx.Node  # the node that carries the segment: a slice / getitem of col, or col itself
    start: int
    width: int
    heads: int
    unit: int  # head_dim for attention, 1 for an MLP
    keep: tuple[int, int] = (0, 0)  # this rank's heads [lo, hi)
    stream: str = "mlp"



@dataclass
class Pair:
    row: fx.Node
    cols: list[fx.Node]
    region: list[fx.Node]
    segments: list[Segment]
    write_backs: list[fx.Node] = field(default_factory=list)
    # cache writes into an allocation made in this graph and returned by it (Hugging Face's
    # StaticCache initializes lazily, inside the prefill graph): returned with all heads
    fresh_outputs: list[fx.Node] = field(default_factory=list)
    kind: str = "mlp"
    q_heads: int = 0
    kv_heads: int = 0



def is_fresh_cache_write(n: fx.Node) -> bool:
    """``index_copy(zeros(...), dim, pos, new)``: the first write into a cache allocated in this graph."""
    cache = n.args[0] if n.target == aten.index_copy.default else None
    return isinstance(cache, fx.Node) and cache.op == "call_function" and cache.target in FRESH_ALLOCATIONS



def is_paged_call(n: fx.Node) -> bool:
    """The Engine's paged attention ops (``llmopt::paged_attention_prefill``, and the
    functionalized ``paged_kv_append`` / ``paged_attention_decode``): head-local, see .paged."""
    if n.op != "call_function":
        return False
    if n.target == PAGED_PREFILL:
        return True
    return AF_V2 is not None and n.target is AF_V2 and n.args[0] in (PAGED_APPEND, PAGED_DECODE)



def is_const_linear(gm, node) -> bool:
    return (
        node.op == "call_function"
        and node.target == aten.linear.default
        and is_constant(gm, node.args[1])
        and (len(node.args) < 3 or node.args[2] is None or is_constant(gm, node.args[2]))
        and tensor_meta(node.args[1]) is not None
        and tensor_meta(node.args[1]).dim() == 2
    )



def find_pair(gm, row: fx.Node, claimed: set) -> Pair | None:
    back, cols, stack = set(), [], [row.args[0]]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in back:
            continue
        back.add(n)
        if is_const_linear(gm, n):
            cols.append(n)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n.all_input_nodes)
    if not cols:
        return None
    if len({c.args[0] for c in cols}) != 1:
        raise NotShardable("")  # e.g. the LM head, whose input mixes several layers
    if any(c in claimed for c in cols) or row in claimed:
        raise NotShardable("")  # the column is another pair's row: this is a residual boundary
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region_set = set(cols)
    for n in sorted(back, key=order.__getitem__):
        if n not in region_set and any(i in region_set for i in n.all_input_nodes):
            region_set.add(n)
    region = [n for n in sorted(region_set, key=order.__getitem__) if n not in cols]
    if row.args[0] not in region_set:
        return None
    write_backs, fresh_outputs = [], []
    for n in region:
        if n.op != "call_function" or (n.target not in HEAD_LOCAL_OPS and not is_paged_call(n)):
            raise NotShardable(f"{node_name(n)} ({n.target}) between the column and row linears is not known to be head-local")
        for user in n.users:
            if user in region_set or user is row:
                continue
            if user.target == aten.copy_.default and user.args[1] is n and user.args[0].op == "placeholder":
                write_backs.append(user)  # a functionalized cache update written back
                continue
            if user.op == "output" and is_fresh_cache_write(n):
                fresh_outputs.append(n)  # a cache allocated in this graph (lazy StaticCache), returned
                continue
            raise NotShardable(f"{node_name(n)} is also used outside the layer by {node_name(user)}")
    segments = []
    for col in cols:
        segments.extend(_segments(col, region_set))
    return Pair(row, cols, region, segments, write_backs, fresh_outputs)



def _segments(col: fx.Node, region_set: set) -> list[Segment]:
    width = int(tensor_meta(col).shape[-1])
    last = tensor_meta(col).dim() - 1
    users = list(col.users)
    segs = []
    if users and all(u.target == aten.slice.Tensor and u.args[1] in (-1, last) for u in users):
        for u in users:
            start, end = int(u.args[2]), min(int(u.args[3]), width)
            if len(u.args) > 4 and u.args[4] != 1:
                raise NotShardable(f"{node_name(u)} slices with a step")
            segs.append((u, start, end - start))
    elif len(users) == 1 and users[0].target in (aten.split.Tensor, aten.split_with_sizes.default) and users[0].args[2] in (-1, last):
        split = users[0]
        sizes = split.args[1]
        sizes = [sizes] * (width // sizes) if isinstance(sizes, int) else list(sizes)
        if sum(sizes) != width:
            raise NotShardable(f"{node_name(split)} does not split the whole output")
        getitems = {u.args[1]: u for u in split.users}
        start = 0
        for i, size in enumerate(sizes):
            if i not in getitems:
                raise NotShardable(f"part {i} of {node_name(split)} is unused")
            segs.append((getitems[i], start, size))
            start += size
    else:
        segs.append((col, 0, width))
    segs.sort(key=lambda s: s[1])
    if [s[1] for s in segs] != [sum(x[2] for x in segs[:i]) for i in range(len(segs))] or sum(s[2] for s in segs) != width:
        raise NotShardable(f"the slices of {node_name(col)} do not tile its output")
    out = []
    for node, start, size in segs:
        heads, unit = _heads_of(node, size)
        out.append(Segment(col, node, start, size, heads, unit))
    return out



def _heads_of(node: fx.Node, width: int) -> tuple[int, int]:
    """(heads, head_dim) when the segment is viewed as [..., heads, head_dim], else (width, 1)."""
    for user in node.users:
        if user.target in VIEW_SIZE_OPS:
            shape = tensor_meta(user).shape
            in_shape = tensor_meta(node).shape
            if len(shape) == len(in_shape) + 1 and as_int(shape[-2]) * as_int(shape[-1]) == width:
                return as_int(shape[-2]), as_int(shape[-1])
    return width, 1



def assign_heads(pair: Pair, world: int, rank: int) -> None:
    attn = [s for s in pair.segments if s.unit > 1]
    mlp = [s for s in pair.segments if s.unit == 1]
    if attn and mlp:
        raise NotShardable("attention and MLP outputs mixed in one column linear")
    if mlp:
        for s in mlp:
            if s.width % world:
                raise TensorParallelError(
                    f"llmopt tensor parallelism: {layer_name(pair.row)} has {s.width} input features, not divisible by "
                    f"the world size {world}; valid world sizes: {_divisors(s.width)}"
                )
            per = s.width // world
            s.keep, s.stream = (rank * per, (rank + 1) * per), "mlp"
        return
    pair.kind = "attention"
    hq = max(s.heads for s in attn)
    hkv = min(s.heads for s in attn)
    pair.q_heads, pair.kv_heads = hq, hkv
    kv_ok = hkv % world == 0 or (world % hkv == 0 and world <= hq)
    if hq % world or not kv_ok or any(hq % s.heads for s in attn):
        valid = [w for w in _divisors(hq) if hkv % w == 0 or w % hkv == 0]
        raise TensorParallelError(
            f"llmopt tensor parallelism: the attention of {layer_name(pair.row)} has {hq} query heads and {hkv} key/value "
            f"heads, which cannot be split over the world size {world}; valid world sizes: {valid}"
        )
    per_q = hq // world
    for s in attn:
        if s.heads == hq:
            s.keep, s.stream = (rank * per_q, (rank + 1) * per_q), "q"
        else:  # Hkv >= W: split; fewer KV heads than ranks: the one KV head this rank's Q heads read
            s.keep, s.stream = kv_heads_of_rank(s.heads, world, rank), "kv"



def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]



def as_int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError) as exc:
        raise NotShardable(f"symbolic size {v} in a sharded region") from exc



def node_name(node) -> str:
    from ...report import layer_of

    layer = layer_of(node)
    return f"{node.name} ({layer})" if layer else node.name



def layer_name(node) -> str:
    from ...report import layer_of

    return layer_of(node) or node.name

