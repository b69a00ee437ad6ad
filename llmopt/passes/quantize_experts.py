"""quantize_experts: ``options={"quantize": "int8" | Int4WeightOnly(...)}`` quantizes fused MoE experts.

The MoE part of ``quantize_linears`` (which calls :func:`run`): each
``llmopt.fused_experts(x, w_gate_up, w_down, weights, ids, act)`` that ``fuse_moe`` emitted,
with both stacks frozen constants (or their transposes), becomes

    llmopt.fused_experts_int8(x, q_gate_up, s_gate_up, q_down, s_down, weights, ids, act)
    llmopt.fused_experts_int4(x, q_gate_up, s_gate_up, z_gate_up, q_down, s_down, z_down,
                              weights, ids, act, group_size)

reading the buffers of a :class:`llmopt.quant.experts.QuantizedExperts` submodule (the
module ``llmopt.quantize_`` swaps into eager models: one quantizer for both paths).

Memory: the float stacks' ``get_attr`` nodes (and a transpose of them) are erased, so the
compiled graph reads only the quantized stacks. As for quantized linears
(docs/frozen_weights.md), the quantized module is derived from both stacks
(``weight_release.derived``): the float stacks' memory is released after compiling (under
tensor parallelism: this rank's float shards, themselves derived from the full stacks), a
recompile reuses the module, and with ``release_weights=False`` they stay derived (an
in-place write raises at the next call).

Near-misses: a scheme without expert kernels (W8A8), an int4 group size that does not
divide the hidden or intermediate size, stacks that are not frozen constants.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import fake_like, free_attr_name, is_constant, real_tensors, tensor_meta
from ..weight_release import derived, release_unread

aten = torch.ops.aten


def run(gm: fx.GraphModule, ctx, config) -> int:
    from ..quant.experts import QuantizedExperts, expert_scheme_problem

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.llmopt.fused_experts.default:
            continue
        x, gu, dn, weights, ids, activation = node.args
        stacks = [_frozen_stack(gm, s) for s in (gu, dn)]
        if any(s is None for s in stacks):
            ctx.near_miss(node, "expert stacks are not frozen constants: experts kept in float")
            continue
        e, two_i, hidden = tensor_meta(gu).shape
        problem = expert_scheme_problem(config, hidden, two_i // 2)
        if problem is not None:
            ctx.near_miss(node, problem)
            continue
        flags = [transposed for _, transposed in stacks]

        def make(*values, flags=flags):
            values = [w.transpose(1, 2) if t else w for w, t in zip(values, flags)]
            module = QuantizedExperts.from_stacks(values[0], values[1], activation, config)
            return module.to(values[0].device)

        # One product of two stacks (weight_release.derived): the float stacks are released
        # after compiling (under tensor parallelism: this rank's float shards), and a
        # recompile reuses the quantized module.
        with real_tensors():
            module = derived(gm, [attr for attr, _ in stacks], ("QuantizedExperts", repr(config), activation, *flags),
                             make, f"the experts were quantized with {type(config).__name__}")
        name = free_attr_name(gm, f"llmopt_qexperts_{node.name}")
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = _emit(gm, name, module, node, x, weights, ids)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for s in (gu, dn):  # the float stacks leave the graph
            _erase_if_unused(gm, s)
        for attr, _ in stacks:  # freed now, not after the graph: never floats and int8 all at once
            release_unread(gm, attr, ctx)
        count += 1
        group = f" g{module.group_size}" if module.scheme == "int4" else ""
        ctx.rewrite(new, f"{module.scheme}{group} experts: {e} experts, H={hidden}, I={two_i // 2}")
    return count


def is_router(linear: fx.Node) -> bool:
    """Whether ``linear``'s output (or its dtype cast) is the logits of ``llmopt.moe_route``."""
    route = torch.ops.llmopt.moe_route.default
    for user in linear.users:
        if user.target == route:
            return True
        if user.target == aten._to_copy.default and any(u.target == route for u in user.users):
            return True
    return False


def _frozen_stack(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, bool] | None:
    """(get_attr node, transposed) when ``node`` is a frozen stack or its (1, 2) transpose."""
    if node.op == "call_function" and node.target == aten.transpose.int and tuple(node.args[1:]) == (1, 2):
        inner = _frozen_stack(gm, node.args[0])
        return None if inner is None or inner[1] else (inner[0], True)
    if node.op == "get_attr" and is_constant(gm, node):
        return node, False
    return None


def _emit(gm: fx.GraphModule, name: str, module, anchor: fx.Node, x, weights, ids) -> fx.Node:
    graph = gm.graph

    def buffer(attr: str) -> fx.Node:
        n = graph.get_attr(f"{name}.{attr}")
        n.meta["val"] = fake_like(anchor, getattr(module, attr))
        return n

    op, args = module.call(x, weights, ids, tensor=buffer)
    new = graph.call_function(op, args)
    fake = fx.node.map_arg(args, lambda a: a.meta.get("val"))
    new.meta = {**anchor.meta, "val": op(*fake)}
    return new


def _erase_if_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a float stack's get_attr (and its transpose) once nothing reads it."""
    if node.users or node.op not in ("get_attr", "call_function"):
        return
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    for i in inputs:
        if i.op == "get_attr" or i.target == aten.transpose.int:
            _erase_if_unused(gm, i)
