"""fuse_moe: a sparse mixture-of-experts block becomes ``llmopt.moe_route`` + ``llmopt.fused_experts``.

What this pass replaces, as eager code (Mixtral, Qwen2-MoE, Qwen3-MoE; the expert MLPs
``down(act(gate(x)) * up(x))`` stored as two stacks ``w_gate_up [E, 2I, H]`` and
``w_down [E, H, I]``):

    p = softmax(logits.float(), -1)          # or sigmoid(logits)
    weights, ids = topk(p, k)
    weights /= weights.sum(-1, keepdim=True) # when renormalizing (Mixtral, norm_topk_prob)
    out = sum_j weights[:, j] * expert_{ids[:, j]}(x)        # any spelling
      →  weights, ids = llmopt.moe_route(logits, k, scoring, renormalize)
         out = llmopt.fused_experts(x, w_gate_up, w_down, weights, ids, act)

Why not a node-by-node pattern: transformers spells the expert sum many ways (5.x: a sort +
two grouped matmuls + a gather, or a repeat + two batched matmuls), each changing between
releases. The pass finds the block
by its shape in the graph instead, and proves it by computing:

1. **Anchor.** ``aten.topk(p, k)`` over the last dim of ``p = softmax(z, -1)`` or
   ``sigmoid(z)``.
2. **Region.** The nodes that depend on the top-k result, in graph order, up to the first
   one where they all meet again (no other node of the region is still used later): the
   block's output, a ``[T, H]`` tensor in the tokens' dtype. The region may read only the
   tokens ``x``, ``p`` and two 3-D frozen constants (the expert stacks); one activation
   (silu / gelu / tanh-gelu) must appear in it.
3. **Proof.** The region, copied into a module of its own, is run on random tokens and
   router logits (two draws) with the real expert weights, and compared with the fused ops
   for each reading of the parameters the shapes allow (renormalized or not; the stacks as
   ``[E, 2I, H] / [E, H, I]`` or transposed). Exactly the matching reading is used; none
   matching is a near-miss. With dynamic shapes the region runs at the sizes Dynamo
   traced with (its symbolic sizes bound to their example values). The check's tolerance (relative Frobenius error 1e-4 in fp32,
   2e-2 in fp16/bf16) is far below the effect of any real difference (a skipped
   renormalization changes the output by tens of percent).

A shared expert added to the block's output (Qwen2-MoE's ``sigmoid(gate(x)) * mlp(x)``, or
an ungated ``mlp(x)``) is outside the region; once the block is fused, ``moe_shared_expert``
folds it into the same ``fused_experts`` call as ``ceil(I_s / I)`` chunk-experts (exact: a
gated MLP is a sum over its intermediate units). With
``quantize=`` the fused experts are then quantized by ``quantize_experts`` (called from
quantize_linears). A model already quantized by ``llmopt.quantize_`` traces its
``QuantizedExperts`` op: such a block is a near-miss ("already one llmopt op").

Near-misses, with their reason: a top-k not over router probabilities; routing results
used outside the block; a region reading other tensors (biases, a post-expert norm's
weight) or more than two weight stacks; a block whose output has another dtype; a region
that does not compute the fused ops' result (e.g. interleaved gate/up rows); a graph break
inside the block (its output in another graph).

Not covered: the per-expert loop of transformers 4.4x-4.5x (and 5.x's "eager" experts). Its
data-dependent ``torch.where`` inside a ``for`` loop makes Dynamo run the whole block
eagerly and compile only the expert MLPs, so no llmopt graph ever holds the block.
``llmopt.prepare_moe(model)`` (llmopt/moe_prepare.py) is the opt-in fix: it replaces such
blocks with stacked ones that call the fused ops directly.

Source: vLLM ``fused_moe`` (the fused form); transformers ``integrations/moe.py`` (the
spellings).
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx

from .. import compat
from ..codegen import moe_experts, moe_quant, moe_route  # noqa: F401  registers the llmopt::moe_route, fused_experts* ops
from ..graph import constant_value, real_tensors, tensor_meta
from ..report import reports
from ..weight_release import released
from . import moe_expert_stacks as expert_stacks
from .moe_shared_expert import fuse_shared_expert
from .near_miss import NearMiss

aten = torch.ops.aten

# A MoE block spelled in ATen is tens of nodes (a per-expert loop, unrolled, ~15 per expert).
_MAX_REGION_NODES = 4096
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 2e-2
_CHECK_SEEDS = (0, 1)
_ACTIVATIONS = {aten.silu.default: "silu"}
_FUSED_EXPERT_OPS = (
    torch.ops.llmopt.fused_experts.default,
    torch.ops.llmopt.fused_experts_int8.default,
    torch.ops.llmopt.fused_experts_int4.default,
)



def run(gm: fx.GraphModule, ctx) -> int:
    _note_skipped_loops(ctx)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.topk.default and node.graph is gm.graph:
            try:
                done = fuse_block(gm, node)
            except NearMiss as miss:
                ctx.near_miss(miss.node, miss.reason)
                continue
            if done is not None:
                new, detail = done
                gm.graph.eliminate_dead_code()
                try:
                    shared = fuse_shared_expert(gm, new)
                except NearMiss as miss:
                    ctx.near_miss(miss.node, miss.reason)
                    shared = None
                if shared is not None:
                    new, shared_detail = shared
                    detail = f"{detail} + {shared_detail}"
                    gm.graph.eliminate_dead_code()
                ctx.rewrite(new, detail)
                count += 1
    return count


def _note_skipped_loops(ctx) -> None:
    """A per-expert loop that Dynamo ran eagerly is in no graph: say so, and how to fix it."""
    skipped = compat.skipped_data_dependent_loops()
    heading = f"fuse_moe: {skipped} frame(s) skipped by Dynamo so far: "
    # Dynamo's counter only grows: note each new count once (not on every later graph).
    if not skipped or any(n.startswith(heading) for r in reports() for n in r.notes):
        return
    message = ("a data-dependent torch.where/nonzero broke the graph inside a loop, so Dynamo ran that frame eagerly "
               "(a per-expert MoE loop, e.g. transformers 4.4x): no graph holds such blocks and llmopt cannot fuse "
               f"them; {expert_stacks.FLAG_HINT}")
    ctx.report.notes.append(heading + message)
    warnings.warn(f"llmopt: {message}", stacklevel=2)  # one text: Python shows it once


# --------------------------------------------------------------------------- the anchor
def routing_of(topk: fx.Node) -> tuple[fx.Node, str, int] | None:
    """(logits, scoring, k) when ``topk`` picks the top-k of router probabilities."""
    p, k = topk.args[0], topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    pv = tensor_meta(p)
    if pv is None or pv.dim() != 2 or not largest or dim not in (-1, 1) or not isinstance(k, int):
        return None
    if p.target == aten._softmax.default and p.args[1] in (-1, 1):
        return p.args[0], "softmax", k
    if p.target == aten.sigmoid.default:
        return p.args[0], "sigmoid", k
    return None


# --------------------------------------------------------------------------- the region
def block_region(topk: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The nodes depending on ``topk`` up to where they meet again, and that meeting node."""
    nodes = list(topk.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    start = order[topk]
    last_use = {}
    region, live = [topk], {topk}
    members = {topk}
    last_use[topk] = max(order[u] for u in topk.users)
    for n in nodes[start + 1:start + 1 + _MAX_REGION_NODES]:
        if n.op == "output":
            break
        if not any(i in members for i in n.all_input_nodes):
            continue
        members.add(n)
        region.append(n)
        here = order[n]
        live = {r for r in live if last_use[r] > here}
        if n.users:
            last_use[n] = max(order[u] for u in n.users)
            live.add(n)
        if live == {n} and _is_block_output(n, topk) and not _only_cast(n):
            return region, n
    raise NearMiss(
        topk,
        "the routing results are not gathered back into one [tokens, hidden] output in this graph "
        "(used outside the block, or a graph break inside it)",
    )


def _is_block_output(n: fx.Node, topk: fx.Node) -> bool:
    v, pv = tensor_meta(n), tensor_meta(topk.args[0])
    return (
        v is not None and pv is not None and v.is_floating_point() and v.dim() >= 2
        and compat.statically_true(math.prod(v.shape[:-1]) == pv.shape[0])
        and n.target not in (operator.getitem,)
    )


def _only_cast(n: fx.Node) -> bool:
    """The block's sum is cast once more (fp32 sum -> tokens' dtype): the cast is the output."""
    if len(n.users) != 1:
        return False
    (user,) = n.users
    return _is_dtype_cast(user)


def _is_dtype_cast(n: Any) -> bool:
    """``x.to(dtype)``: an ``aten._to_copy`` that changes nothing but the dtype."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target != aten._to_copy.default:
        return False
    src, out = tensor_meta(n.args[0]), tensor_meta(n)
    kw = n.kwargs
    return (
        src is not None and out is not None and set(kw) <= {"dtype", "layout", "device"}
        and kw.get("layout", torch.strided) == torch.strided and out.device == src.device
    )


def region_inputs(region: list[fx.Node]) -> list[fx.Node]:
    members = set(region)
    seen, out = set(), []
    for n in region:
        for i in n.all_input_nodes:
            if i not in members and i not in seen:
                seen.add(i)
                out.append(i)
    return out


def derived_chain(node: fx.Node, source: fx.Node, limit: int = 64) -> list[fx.Node] | None:
    """``node`` and its ancestors up to ``source`` when it is computed from ``source``,
    frozen constants and literals alone by ATen ops, else None."""
    chain, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is source:
            continue
        if n.op == "placeholder" and _is_size(n):
            chain.append(n)  # a symbolic size (dynamic shapes): bound to its hint by the proof
            continue
        if n.op == "placeholder" or len(seen) > limit:
            return None
        if n.op == "call_function" and not (hasattr(n.target, "_schema") or n.target is operator.getitem or _is_size(n)):
            return None  # a Python callable that is not size arithmetic: not known to be pure
        chain.append(n)
        stack.extend(n.all_input_nodes)
    return chain


def _is_size(n: fx.Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _hints(shape) -> tuple[int, ...] | None:
    sizes = tuple(compat.size_hint(d) for d in shape)
    return None if any(d is None for d in sizes) else sizes


def _order(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def activation_in(region: list[fx.Node]) -> str | None:
    names = set()
    for n in region:
        if n.op != "call_function":
            continue
        if n.target in _ACTIVATIONS:
            names.add(_ACTIVATIONS[n.target])
        elif n.target == aten.gelu.default:
            approximate = n.args[1] if len(n.args) > 1 else n.kwargs.get("approximate", "none")
            names.add({"none": "gelu", "tanh": "gelu_tanh"}.get(approximate, "?"))
        elif n.target == torch.ops.llmopt.gated_activation.default:
            names.add(n.args[2])
    return names.pop() if len(names) == 1 else None


# --------------------------------------------------------------------------- the rewrite
def fuse_block(gm: fx.GraphModule, topk: fx.Node) -> tuple[fx.Node, str] | None:
    routing = routing_of(topk)
    if routing is None:
        return None  # a top-k of something else (sampling, beam search)
    logits, scoring, k = routing
    p = topk.args[0]
    region, exit_node = block_region(topk)
    if any(n.target in _FUSED_EXPERT_OPS for n in region):
        raise NearMiss(topk, "the experts are already one llmopt op (a model quantized by llmopt.quantize_): "
                       "routing left to ATen")
    # moe_route computes in fp32 itself: an upcast of the logits is part of the routing.
    while _is_dtype_cast(logits):
        logits = logits.args[0]
    # The tokens: what the router's linear reads.
    if logits.op != "call_function" or logits.target != aten.linear.default:
        raise NearMiss(topk, f"router logits {logits.name} are not a linear of the tokens")
    x = logits.args[0]
    # Inputs computed from the tokens and constants alone (a transposed weight, the tokens
    # repeated k times, an arange) belong to the block; the constants among them are its weights.
    chains = {i: derived_chain(i, x) for i in region_inputs(region) if i is not p}
    others = [i for i, chain in chains.items() if chain is None]
    if others:
        raise NearMiss(topk, f"the block reads {', '.join(o.name for o in others)}, computed from other inputs "
                       "than the tokens and frozen constants (a bias, a norm weight?)")
    prelude = sorted({n for chain in chains.values() for n in chain} - {x}, key=_order(gm))
    stacks = [n for n in prelude if n.op == "get_attr"]
    sizes = [n for n in prelude if n.op == "placeholder"]
    prelude = [n for n in prelude if n.op != "placeholder"]
    # A per-expert loop traced whole (capture_dynamic_output_shape_ops): 3 weights per expert.
    triples = expert_stacks.expert_triples(gm, stacks, int(tensor_meta(logits).shape[-1]))
    if triples is None and (len(stacks) != 2 or any(tensor_meta(s) is None or tensor_meta(s).dim() != 3 for s in stacks)):
        shapes = [tuple(tensor_meta(s).shape) if tensor_meta(s) is not None else "?" for s in stacks]
        raise NearMiss(topk, f"the block reads {len(stacks)} frozen constants {shapes}, expected the two 3-D expert weight "
                       "stacks or three 2-D weights per expert")
    xv, ov = tensor_meta(x), tensor_meta(exit_node)
    if tuple(ov.shape) != tuple(xv.shape) and not all(isinstance(d, int) for d in ov.shape):
        raise NearMiss(exit_node, f"block output {tuple(ov.shape)} has another, symbolic shape than the tokens {tuple(xv.shape)}")
    if xv.dim() != 2 or xv.dtype != ov.dtype or not xv.is_floating_point():
        raise NearMiss(exit_node, f"tokens {xv.dtype} {tuple(xv.shape)} and block output {ov.dtype} {tuple(ov.shape)}: "
                       "expected [T, H] tokens and an output of their dtype")
    activation = activation_in(region)
    if activation is None:
        raise NearMiss(topk, "no single gated activation (silu, gelu, tanh gelu) in the block")
    if triples is None:
        reading = prove(gm, prelude + region, exit_node, x, p, logits, scoring, k, stacks, activation, sizes)
    else:
        reading = _prove_per_expert(gm, prelude + region, exit_node, x, p, logits, scoring, k, triples, activation, sizes)
    if reading is None:
        raise NearMiss(exit_node, "the block does not compute sum_j w_j expert_j(x) for any reading of its weights "
                       "(renormalized or not, stacks transposed or not): left as is")
    renormalize, gate_up_node, down_node, transposed = reading
    graph = gm.graph
    with graph.inserting_before(exit_node):
        route = graph.call_function(torch.ops.llmopt.moe_route.default, (logits, k, scoring, renormalize))
        weights = graph.call_function(operator.getitem, (route, 0))
        ids = graph.call_function(operator.getitem, (route, 1))
        w_gu, w_d = gate_up_node, down_node
        if transposed:
            w_gu = graph.call_function(aten.transpose.int, (gate_up_node, 1, 2))
            w_d = graph.call_function(aten.transpose.int, (down_node, 1, 2))
        fused = graph.call_function(torch.ops.llmopt.fused_experts.default, (x, w_gu, w_d, weights, ids, activation))
        out = fused
        if tuple(ov.shape) != tuple(xv.shape):
            out = graph.call_function(aten.view.default, (fused, list(ov.shape)))
    route.meta["val"] = torch.ops.llmopt.moe_route.default(tensor_meta(logits), k, scoring, renormalize)
    weights.meta["val"], ids.meta["val"] = route.meta["val"]
    if transposed:
        w_gu.meta["val"] = tensor_meta(gate_up_node).transpose(1, 2)
        w_d.meta["val"] = tensor_meta(down_node).transpose(1, 2)
    fused.meta = {k_: v for k_, v in exit_node.meta.items() if k_ != "val"}
    fused.meta["val"] = torch.ops.llmopt.fused_experts.default(
        xv, tensor_meta(w_gu), tensor_meta(w_d), weights.meta["val"], ids.meta["val"], activation
    )
    if out is not fused:
        out.meta["val"] = fused.meta["val"].view(list(ov.shape))
    exit_node.replace_all_uses_with(out)
    e, two_i, _ = tensor_meta(w_gu).shape
    detail = (
        f"MoE block ({len(region)} ops) → moe_route({scoring}, top_k={k}, renormalize={renormalize}) + "
        f"fused_experts({activation}, {e} experts, I={two_i // 2}{', stacks transposed' if transposed else ''})"
    )
    return fused, detail


# --------------------------------------------------------------------------- the proof
def _prove_per_expert(gm, region, exit_node, x, p, logits, scoring, k, triples, activation, sizes):
    """:func:`prove` over stacks built from per-expert weights, each pair read gate-first and
    then up-first; the stacks become the weights' storage once a reading holds."""
    gate_up, down = expert_stacks.build(gm, triples, region[0])
    for swap in (False, True):
        if swap and expert_stacks.reused(gm, gate_up):
            break  # the stacks of an earlier compile, already in their proven order (no values to swap)
        if swap:
            expert_stacks.swap_gate_up(gm, gate_up, triples)
        reading = prove(gm, region, exit_node, x, p, logits, scoring, k, [gate_up, down], activation, sizes)
        if reading is not None:
            expert_stacks.share(gm, gate_up, down, triples)
            return reading
    expert_stacks.drop(gm, [gate_up, down])
    return None


def prove(gm, region, exit_node, x, p, logits, scoring, k, stacks, activation, sizes=()):
    """The (renormalize, gate_up, down, transposed) reading under which the region equals
    the fused ops on random inputs, or None. With dynamic shapes the region runs at the
    traced example sizes (``sizes``: the symbolic size inputs, bound to their hints)."""
    xv, lv = tensor_meta(x), tensor_meta(logits)
    x_shape, l_shape = _hints(xv.shape), _hints(lv.shape)
    size_values = [compat.size_hint(s.meta["val"]) for s in sizes]
    if x_shape is None or l_shape is None or any(v is None for v in size_values):
        return None
    readings = []
    for gu, dn in (stacks, stacks[::-1]):
        gv, dv = tensor_meta(gu).shape, tensor_meta(dn).shape
        h = xv.shape[1]
        for transposed in (False, True):
            g_shape = (gv[0], gv[2], gv[1]) if transposed else tuple(gv)
            d_shape = (dv[0], dv[2], dv[1]) if transposed else tuple(dv)
            e, two_i, hh = g_shape
            if not (compat.statically_true(hh == h) and two_i % 2 == 0
                    and tuple(d_shape) == (e, h, two_i // 2) and e == l_shape[-1]):
                continue
            for renormalize in (True, False):
                readings.append((renormalize, gu, dn, transposed))
    if not readings:
        return None
    with real_tensors(), torch.no_grad():
        weights_of = _proof_weights(gm, stacks, region)
        module = _region_module(gm, region, exit_node, x, p, sizes, weights_of)
        device = weights_of[stacks[0].target].device
        draws = []
        for seed in _CHECK_SEEDS:
            g = torch.Generator(device="cpu").manual_seed(seed)
            xs = torch.randn(x_shape, generator=g).to(device=device, dtype=xv.dtype)
            z = (2 * torch.randn(l_shape, generator=g)).to(device=device, dtype=lv.dtype)
            probs = tensor_meta(p)
            pz = torch.softmax(z, -1) if scoring == "softmax" else torch.sigmoid(z)
            draws.append((xs, z, pz.to(probs.dtype), module(xs, pz.to(probs.dtype), *size_values)))
        tol = _CHECK_TOLERANCE.get(xv.dtype, _HALF_TOLERANCE)
        for renormalize, gu, dn, transposed in readings:
            w_gu, w_d = weights_of[gu.target], weights_of[dn.target]
            if transposed:
                w_gu, w_d = w_gu.transpose(1, 2), w_d.transpose(1, 2)
            ok = True
            for xs, z, _, expected in draws:
                weights, ids = moe_route.moe_route_ref(z, k, scoring, renormalize)
                got = moe_experts.fused_experts_ref(xs, w_gu, w_d, weights, ids, activation)
                if got.shape != expected.reshape(got.shape).shape or _rel_err(got, expected.reshape(got.shape)) > tol:
                    ok = False
                    break
            if ok:
                return renormalize, gu, dn, transposed
    return None


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(b).all()):
        return math.inf
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den else num


def _proof_weights(gm, stacks, region=()) -> dict[str, torch.Tensor]:
    """The constants the proof runs with, by attribute name: the stacks (their values read:
    the weights become derived) and the region's other constants, except that a constant
    an earlier compile released (weight_release: a recompile after quantizing or sharding
    the stacks) is a view of a seeded random stand-in for its whole storage, so views of one
    storage (per-expert weights and the stacks they live in) stay consistent. Which reading
    of the parameters the block computes is a property of the code, not of the values, so
    random weights prove it as well."""
    out, stand_ins = {}, {}
    region_constants = [n for n in region if n.op == "get_attr" and n not in stacks]
    for node in [*stacks, *region_constants]:
        value = constant_value(gm, node, layout_only=True)
        record = released(value)
        if record is None:
            if node in stacks:  # the values are read: the weights become derived
                out[node.target] = constant_value(gm, node)
            continue
        storage = value.untyped_storage()
        if id(storage) not in stand_ins:
            g = torch.Generator(device="cpu").manual_seed(1000 + len(stand_ins))
            flat = torch.randn(record.nbytes // value.element_size(), generator=g) * value.shape[-1] ** -0.5
            stand_ins[id(storage)] = (storage, flat.to(device=value.device, dtype=value.dtype))
        flat = stand_ins[id(storage)][1]
        out[node.target] = flat.as_strided(tuple(value.shape), tuple(value.stride()), value.storage_offset())
    return out


def _region_module(gm, region, exit_node, x, p, sizes=(), weights_of=None) -> fx.GraphModule:
    """The region as a module of its own: (tokens, probabilities, *sizes) -> block output;
    the stacks in ``weights_of`` replace the model's (stand-ins for released ones)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x: graph.placeholder("x"), p: graph.placeholder("probs")}
    for i, size in enumerate(sizes):
        env[size] = graph.placeholder(f"size_{i}")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a frozen constant
            env[n] = graph.get_attr(n.target)
        return env[n]

    for n in region:
        env[n] = graph.get_attr(n.target) if n.op == "get_attr" else graph.node_copy(n, lookup)
    graph.output(env[exit_node])
    module = fx.GraphModule(gm, graph)
    for target, value in (weights_of or {}).items():
        if "." not in target and target in module._buffers:
            module._buffers[target] = value
        elif "." not in target:
            setattr(module, target, value)
    return module
