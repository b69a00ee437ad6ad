"""kv_cache: static KV-cache updates become in-place appends; attention reads the valid length.

What the functionalized graph of a static cache looks like (Hugging Face ``StaticCache``
with ``index_copy_``, gpt-fast's ``k_cache[:, :, input_pos] = k``)::

    k_all = index_copy(k_cache, 2, pos, k_new)       # a copy of the WHOLE cache
    out   = attention(q, k_all, v_all, mask)         # over all S_max positions
    copy_(k_cache, k_all)                            # written back at the end

Per layer and decode step that moves O(S_max) bytes three times, however short the
sequence. This pass rewrites it to::

    kv_cache_append(k_cache, v_cache, pos, k_new, v_new)      # O(new tokens), in place
        (rope_kv_cache_append when k_new is the rotated K of an llmopt.rope: K is rotated
         as it is written, and q comes out of the same launch)
    out = attention_decode(q, k_cache, v_cache, kv_lens, mask)  # Sq == 1: split-KV
    out = attention_prefill(q, k_cache, v_cache, mask, kv_lens, q_offsets)   # Sq > 1

with ``kv_lens = pos[-1] + 1`` and ``q_offsets = pos[0]`` (one small computation per
distinct ``pos``, shared by every layer that uses it). The attention kernels stop at
``kv_lens``, so the step's cost follows the real length, not ``max_cache_len``.

The one assumption, which is the static-cache contract: positions are written from 0
upwards, so slots past ``pos[-1]`` hold no token; a correct model masks them (HF's
static-cache mask does, by causality). The pass therefore only rewrites attention that
carries a mask (or a causal flag whose alignment it can honour) and leaves any other
use of a cache with a near-miss.

``DynamicCache`` (HF's default) grows by ``cat`` each step: correct but a copy per step
and a recompile per shape bucket; the pass leaves it alone and says so in the report.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..codegen import zero_pages
from ..codegen import attention_decode as _decode  # noqa: F401  (registers the op)
from ..codegen import attention_prefill as _prefill  # noqa: F401
from ..codegen import kv_cache as _kv  # noqa: F401
from ..graph import move_users_after, tensor_meta

aten = torch.ops.aten
llmopt = torch.ops.llmopt

# FlashDecoding++'s unified max: any finite estimate is correct (rows that overflow it are
# recomputed exactly); 0 suits the O(1)-magnitude logits of trained models.
UNIFIED_MAX_ESTIMATE = 0.0


def run(gm: fx.GraphModule, ctx) -> int:
    write_backs = _write_backs(gm)
    plans: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    count = 0
    dynamic_layers = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != llmopt.attention_prefill.default:
            continue
        args = _bind(node)
        k_upd, v_upd = _cache_update(args["k"], write_backs), _cache_update(args["v"], write_backs)
        if k_upd is None or v_upd is None:
            if _is_dynamic_cache(args["k"]):
                dynamic_layers += 1
                ctx.near_miss(node, "DynamicCache (K/V grow by cat each step): left as is; use "
                              "cache_implementation='static' or llmopt.StaticKVCache for in-place updates")
            continue
        reason = _check(node, args, k_upd, v_upd, write_backs)
        if reason:
            ctx.near_miss(node, reason)
            continue
        _rewrite(gm, node, args, k_upd, v_upd, write_backs, plans, ctx)
        count += 1
    count += _first_writes_of_fresh_caches(gm, ctx)
    if count:
        ctx.report.notes.append(f"kv_cache: static cache (index_copy/index_put) updates in {count} attention(s) → in-place append")
    if dynamic_layers:
        ctx.report.notes.append(f"kv_cache: DynamicCache seen in {dynamic_layers} attention(s); left as is")
    return count


FRESH_ALLOCATIONS = (aten.zeros.default, aten.full.default, aten.empty.memory_format)


def _first_writes_of_fresh_caches(gm: fx.GraphModule, ctx) -> int:
    """``index_copy(zeros(...), dim, pos, new)``: the first write into a cache the graph
    allocates, written into its allocation instead of a copy of it.

    Hugging Face's ``StaticCache`` allocates its tensors lazily, inside the first forward:
    the prefill graph then allocates each cache and writes the prompt's K/V into it with a
    functional ``index_copy``, which copies the whole freshly zeroed cache once more. The
    allocation has no other reader, so writing into it in place is the same result. Each
    update gets its own allocation (CSE may have merged the identical ``zeros`` of K and V).

    - A CPU allocation of at least ``zero_pages.MIN_BYTES`` (either executor) becomes
      ``llmopt::zeros_index_copy``: the zeros are fresh pages the kernel supplies on first
      write, so a 4096-slot cache costs a system call instead of a zero fill of its whole
      capacity (page faults included: 50-60 ms of a ~180 ms bf16 prefill at batch 4 on the
      CI machine, ``codegen/zero_pages.py``), and its resident memory grows with the tokens
      written. Inductor calls it through its CPU twin.
    - Otherwise, with the aten executor (which runs ATen as written): ``zeros`` +
      ``index_copy_``. With Inductor: left as is (Inductor fuses the fill and the write
      into one loop; a device allocator does not hand out zeroed pages).
    """
    g = gm.graph
    count = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target != aten.index_copy.default:
            continue
        cache, dim, pos, new = node.args[:4]
        if not _is_zero_allocation(cache):
            continue
        if any(u.target != aten.index_copy.default or u.args[0] is not cache for u in cache.users):
            continue  # the allocation is read as is somewhere: keep the functional form
        cv, nv, pv = tensor_meta(cache), tensor_meta(new), tensor_meta(pos)
        if cv is None or nv is None or pv is None or cv.dtype != nv.dtype or cv.device != nv.device \
                or pv.dim() > 1 or pv.dtype != torch.int64:
            continue  # index_copy itself would refuse it: leave its error to it
        # Concrete sizes first: lazily_zeroed reads them as ints (a symbolic size would be guarded on).
        lazy = all(isinstance(s, int) for s in cv.shape) and zero_pages.lazily_zeroed(cv.shape, cv.dtype, cv.device)
        if not lazy and ctx.executor != "aten":
            continue
        with g.inserting_before(node):
            if lazy:
                written = g.call_function(llmopt.zeros_index_copy.default, (new, dim, pos, list(cache.args[0])))
                how = "zero pages mapped lazily, update written in place"
            else:
                buf = g.call_function(cache.target, cache.args, dict(cache.kwargs))
                buf.meta = dict(cache.meta)
                written = g.call_function(aten.index_copy_.default, (buf, *node.args[1:]), dict(node.kwargs))
                how = "update written in place"
            written.meta = dict(node.meta)
        node.replace_all_uses_with(written)
        g.erase_node(node)
        if not cache.users:
            g.erase_node(cache)
        ctx.rewrite(written, f"cache allocated in the graph (lazy StaticCache): {how}")
        count += 1
    return count


def _is_zero_allocation(node) -> bool:
    """A contiguous, strided, unpinned allocation whose contents are zeros or unspecified."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in FRESH_ALLOCATIONS):
        return False
    if node.target == aten.full.default:
        value = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        if not isinstance(value, (int, float, bool)) or value != 0 or math.copysign(1.0, value) < 0:
            return False  # not zeros (or -0.0, whose sign a zero page would lose)
    layout, pinned = node.kwargs.get("layout"), node.kwargs.get("pin_memory")
    fmt = node.kwargs.get("memory_format")
    val = tensor_meta(node)
    return (layout in (None, torch.strided) and not pinned and fmt in (None, torch.contiguous_format)
            and val is not None and val.is_contiguous())


def _bind(node: fx.Node) -> dict:
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value
    return out


def _write_backs(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """placeholder -> the ``copy_(placeholder, value)`` that writes it back."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.copy_.default and node.args[0].op == "placeholder":
            out[node.args[0]] = node
    return out


def _cache_update(node, write_backs):
    """(cache placeholder, positions, new rows) when ``node`` is a functional cache update
    of a placeholder that the graph writes back, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.index_copy.default:
        cache, dim, pos, new = node.args[:4]
        cv = tensor_meta(cache)
        if cv is None or dim not in (2, 2 - cv.dim()):
            return None
    elif node.target == aten.index_put.default:
        cache, indices, new = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if accumulate or len(indices) != 3 or indices[0] is not None or indices[1] is not None:
            return None
        pos = indices[2]
    else:
        return None
    if not isinstance(cache, fx.Node) or cache.op != "placeholder":
        return None
    wb = write_backs.get(cache)
    if wb is None or wb.args[1] is not node:
        return None
    return cache, pos, new, node


def _is_dynamic_cache(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.target == aten.cat.default
        and any(isinstance(a, fx.Node) and a.op == "placeholder" for a in node.args[0])
    )


def _check(node, args, k_upd, v_upd, write_backs) -> str | None:
    kc, kpos, knew, kfull = k_upd
    vc, vpos, vnew, vfull = v_upd
    if kpos is not vpos:
        return "K and V are written at different position tensors"
    pv = tensor_meta(kpos)
    if pv is None or pv.dim() != 1 or pv.dtype not in (torch.int32, torch.int64):
        return "cache positions are not a 1-D integer tensor"
    for full in (kfull, vfull):
        extra = [u for u in full.users if u is not node and u is not write_backs[full.args[0]]]
        if extra:
            return f"the updated cache {full.name} has other users ({extra[0].name})"
    if args["kv_lens"] is not None or args["q_offsets"] is not None:
        return "attention already has lengths/offsets"
    if args["mask"] is None and not args["causal"]:
        return "attention over a static cache without a mask: slots past the written positions would be attended"
    if args["causal"]:
        return "causal flag over a static cache (top-left aligned): left as is"
    kv, cv = tensor_meta(knew), tensor_meta(kc)
    if kv is None or cv is None or kv.dtype != cv.dtype:
        return "new K/V dtype differs from the cache dtype"
    return None


def _lengths(gm, pos: fx.Node, q: fx.Node, before: fx.Node, plans) -> tuple[fx.Node, fx.Node]:
    """(kv_lens [B], q_offsets [B]) int32 for ``pos``, built once per positions tensor
    (before the first attention that needs them; later layers reuse them)."""
    if pos in plans:
        return plans[pos]
    g = gm.graph
    batch = tensor_meta(q).shape[0]

    def emit(target, *a, **kw):
        n = g.call_function(target, a, kw)
        n.meta["val"] = target(*fx.node.map_arg(a, lambda x: x.meta["val"]), **kw)
        return n

    with g.inserting_before(before):
        if not isinstance(batch, int):  # a symbolic batch size comes from a node
            batch = emit(aten.sym_size.int, q, 0)
        kv_lens = emit(aten._to_copy.default, emit(aten.expand.default, emit(aten.add.Tensor, emit(aten.select.int, pos, 0, -1), 1), [batch]), dtype=torch.int32)
        q_offsets = emit(aten._to_copy.default, emit(aten.expand.default, emit(aten.select.int, pos, 0, 0), [batch]), dtype=torch.int32)
    plans[pos] = (kv_lens, q_offsets)
    return plans[pos]


def _rewrite(gm, node, args, k_upd, v_upd, write_backs, plans, ctx) -> None:
    g = gm.graph
    kc, pos, knew, kfull = k_upd
    vc, _, vnew, vfull = v_upd
    q = args["q"]
    qv = tensor_meta(q)
    sq = qv.shape[2]
    kv_lens, q_offsets = _lengths(gm, pos, q, node, plans)
    rope = _fusable_rope(knew, kfull)
    with g.inserting_before(node):
        if rope is not None:
            # Rotate K as it is written: one launch for rope + append; q comes out rotated.
            r_q, r_k, cos, sin, rotary_dim, interleaved = rope.args
            fused = g.call_function(
                llmopt.rope_kv_cache_append.default, (r_q, r_k, vnew, cos, sin, rotary_dim, interleaved, kc, vc, pos)
            )
            fused.meta = dict(rope.meta)
            fused.meta["val"] = tensor_meta(q)
            q_getitem = next(u for u in rope.users if u.args[1] == 0)
            q_getitem.replace_all_uses_with(fused)
            # Readers of q's size placed earlier (a symbolic batch size for kv_lens, once
            # the batch size has changed between calls) now read ``fused``: keep them after it.
            move_users_after(fused)
            q = fused
        else:
            append = g.call_function(llmopt.kv_cache_append.default, (kc, vc, pos, knew, vnew))
            append.meta = dict(node.meta)
            append.meta["val"] = None
        decode = isinstance(sq, int) and sq == 1
        if decode:
            unified = UNIFIED_MAX_ESTIMATE if ctx.options.unified_max_softmax else None
            new = g.call_function(
                llmopt.attention_decode.default,
                (q, kc, vc, kv_lens, args["mask"], args["scale"], args["window"], args["softcap"], unified),
            )
        else:
            new = g.call_function(
                llmopt.attention_prefill.default,
                (q, kc, vc, args["mask"], kv_lens, q_offsets, args["scale"], False, args["window"], args["softcap"]),
            )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    g.erase_node(node)
    for cache, full in ((kc, kfull), (vc, vfull)):
        wb = write_backs.pop(cache, None)
        if wb is not None:
            g.erase_node(wb)
        if not full.users:
            g.erase_node(full)
    if rope is not None:
        for user in list(rope.users):
            if not user.users:
                g.erase_node(user)
        if not rope.users:
            g.erase_node(rope)
    kind = "decode (split-KV)" if decode else "prefill"
    append_kind = "rope fused into the append" if rope is not None else "in-place append"
    ctx.rewrite(new, f"static cache: {append_kind} + {kind} attention over the valid length")


def _fusable_rope(knew: fx.Node, kfull: fx.Node) -> fx.Node | None:
    """The ``llmopt.rope`` node whose rotated K (``knew``) only feeds this cache update."""
    import operator

    if not (isinstance(knew, fx.Node) and knew.target is operator.getitem and knew.args[1] == 1):
        return None
    rope = knew.args[0]
    if rope.op != "call_function" or rope.target != llmopt.rope.default:
        return None
    if set(knew.users) != {kfull} or any(u.target is not operator.getitem for u in rope.users):
        return None
    kv = tensor_meta(rope.args[1])
    return rope if kv is not None and kv.dtype == tensor_meta(knew).dtype else None
