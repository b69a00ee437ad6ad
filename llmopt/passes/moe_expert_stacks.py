"""Per-expert weights (transformers 4.4x's loop of expert modules) stacked for ``fuse_moe``.

A per-expert loop reads ``3·E`` 2-D constants, one ``gate [I, H]``, ``up [I, H]`` and
``down [H, I]`` per expert, where transformers 5 reads two stacks. When Dynamo traces the
loop into one graph (the user compiled with Dynamo's flag
``compat.DYNAMIC_OUTPUT_SHAPES_FLAG`` set to True, which lets it trace the data-dependent
``torch.where`` of each expert), ``fuse_moe`` finds the block but not its
stacks; this module builds them:

    gate_up [E, 2I, H] = stack_e(cat(gate_e, up_e)),  down [E, H, I] = stack_e(down_e)

Which constant is which is read from the order of first use (the loop runs the experts in
order, and each expert's forward reads gate and up before down); which of the first two is
the gate is left to ``fuse_moe``'s proof (:func:`swap_gate_up` flips it in place). Once the
proof holds, :func:`share` makes the stacks *the* storage of the per-expert weights
(``frozen_weights.share_storage``: ``gate_e = gate_up[e, :I]``, ``up_e = gate_up[e, I:]``,
``down_e = down[e]``, the parameters' own shapes and strides): each weight held once.

Source: transformers 4.48 ``MixtralSparseMoeBlock`` (the loop); Dynamo's dynamic output
shapes (unbacked sizes for ``nonzero`` / ``torch.where``).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..compat import DYNAMIC_OUTPUT_SHAPES_FLAG
from ..frozen_weights import ledger, share_storage
from ..graph import add_constant, constant_value, real_tensors, tensor_meta
from ..weight_release import check_readable, layout

FLAG_HINT = (
    f"compile with {DYNAMIC_OUTPUT_SHAPES_FLAG} = True (Dynamo then traces the per-expert loop into one "
    "graph and fuse_moe stacks the experts), or call llmopt.prepare_moe(model) before torch.compile"
)


def expert_triples(gm: fx.GraphModule, constants: list[fx.Node], num_experts: int) -> list[list[fx.Node]] | None:
    """``[[gate_or_up, up_or_gate, down], ...]`` per expert in loop order, or None when the
    constants are not 3 2-D weights per expert of the shapes ``[I, H], [I, H], [H, I]``."""
    if num_experts < 1 or len(constants) != 3 * num_experts:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def first_use(n: fx.Node) -> int:
        return min((order[u] for u in n.users), default=order[n])

    ranked = sorted(constants, key=first_use)
    triples = [ranked[3 * e:3 * e + 3] for e in range(num_experts)]
    shapes = {tuple(tuple(tensor_meta(n).shape) if tensor_meta(n) is not None else () for n in t) for t in triples}
    if len(shapes) != 1:
        return None
    (a, b, d), = shapes
    if len(a) != 2 or a != b or d != (a[1], a[0]):
        return None
    return triples


def build(gm: fx.GraphModule, triples: list[list[fx.Node]], before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Two new constants: the stacks, gate rows first (reading the first of each pair as the
    gate). A recompile finds the weights already views of the stacks an earlier compile
    built (:func:`share`): those stacks again, no copy (their memory may be released)."""
    with real_tensors():
        parts = [[constant_value(gm, n, layout_only=True).detach() for n in t] for t in triples]
        stacks = _earlier_stacks(parts)
        if stacks is None:
            for part in (p for t in parts for p in t):
                # Released by an earlier compile (weight_release) but not laid out as its
                # stacks: a copy would need the values.
                check_readable(part, "stacking a per-expert MoE loop again (use llmopt.prepare_moe(model))")
            stacks = (_stack_pairs(parts), torch.stack([d for _, _, d in parts]))
    return add_constant(gm, "moe_gate_up_stack", stacks[0], before), add_constant(gm, "moe_down_stack", stacks[1], before)


def _stack_pairs(parts) -> torch.Tensor:
    """The [E, 2I, H] stack of each expert's gate rows then up rows, written in place: a
    ``torch.stack`` of per-expert ``torch.cat``s would hold every pair a third time while
    stacking (docs/memory.md)."""
    g0 = parts[0][0]
    if any(t.dtype != g0.dtype or t.device != g0.device or t.shape != g0.shape for g, u, _ in parts for t in (g, u)):
        return torch.stack([torch.cat([g, u], dim=0) for g, u, _ in parts])  # promotes / checks as torch does
    inter = g0.shape[0]
    stack = g0.new_empty((len(parts), 2 * inter, *g0.shape[1:]))
    for e, (g, u, _) in enumerate(parts):
        stack[e, :inter].copy_(g)
        stack[e, inter:].copy_(u)
    return stack


def _earlier_stacks(parts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The [E, 2I, H] / [E, H, I] stacks the parts are views of (gate rows first), or None."""
    first_g, first_d = parts[0][0], parts[0][2]
    inter = first_g.shape[0]
    gu_shape = (len(parts), 2 * inter, *first_g.shape[1:])
    d_shape = (len(parts), *first_d.shape)
    row, d_size = math.prod(first_g.shape), math.prod(first_d.shape)
    for e, (g, u, d) in enumerate(parts):
        expected = ((g, first_g, 2 * e * row), (u, first_g, (2 * e + 1) * row), (d, first_d, e * d_size))
        if any(t.untyped_storage() is not ref.untyped_storage() or t.storage_offset() != offset
               or not t.is_contiguous() for t, ref, offset in expected):
            return None
    if first_g.untyped_storage() is first_d.untyped_storage():
        return None
    return tuple(layout(lambda t, shape=shape: t.new_empty(0).set_(t.untyped_storage(), 0, shape), ref)
                 for ref, shape in ((first_g, gu_shape), (first_d, d_shape)))


def reused(gm: fx.GraphModule, gate_up: fx.Node) -> bool:
    """Whether ``gate_up`` is stacks an earlier compile built (see :func:`build`): model
    weights already live in its storage (a fresh stack holds none until :func:`share`)."""
    led = ledger(gm)
    with real_tensors():
        storage = constant_value(gm, gate_up, layout_only=True).untyped_storage()
        return led is not None and any(w.tensor.untyped_storage() is storage for w in led.weights)


def swap_gate_up(gm: fx.GraphModule, gate_up: fx.Node, triples: list[list[fx.Node]]) -> None:
    """Read the second of each pair as the gate: swap the stack's halves in place, and the pairs."""
    with real_tensors():
        stack = constant_value(gm, gate_up, layout_only=True)
        inter = stack.shape[1] // 2
        stack.copy_(torch.cat([stack[:, inter:], stack[:, :inter]], dim=1))
    for t in triples:
        t[0], t[1] = t[1], t[0]


def share(gm: fx.GraphModule, gate_up: fx.Node, down: fx.Node, triples: list[list[fx.Node]]) -> None:
    """The stacks become the per-expert weights' storage (each weight a view, held once)."""
    inter = tensor_meta(gate_up).shape[1] // 2
    gu_parts, d_parts = [], []
    for e, (g, u, d) in enumerate(triples):
        gu_parts += [(g.target, lambda s, e=e: s[e, :inter]), (u.target, lambda s, e=e: s[e, inter:])]
        d_parts.append((d.target, lambda s, e=e: s[e]))
    share_storage(gm, gate_up.target, gu_parts)
    share_storage(gm, down.target, d_parts)


def drop(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Remove constants that were built for a proof that failed."""
    for n in nodes:
        if not n.users:
            gm.graph.erase_node(n)
            if n.target in gm._buffers:
                delattr(gm, n.target)
