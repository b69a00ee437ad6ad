"""Per-expert weights (transformers 4.4x's loop of expert modules) stacked for ``fuse_moe``.

A per-expert loop reads ``3·E`` 2-D constants, one ``gate [I, H]``, ``up [I, H]`` and
``down [H, I]`` per expert, where transformers 5 reads two stacks. When Dynamo traces the
loop into one graph (the user compiled with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True``, which lets it trace the
data-dependent ``torch.where`` of each expert), ``fuse_moe`` finds the block but not its
stacks; this module builds them:

    gate_up [E, 2I, H] = stack_e(cat(gate_e, up_e)),  down [E, H, I] = stack_e(down_e)

Which constant is which is read from the order of first use (the loop runs the experts in
order, and each expert's forward reads gate and up before down); which of the first two is
the gate is left to ``fuse_moe``'s proof (:func:`swap_gate_up` flips it in place). Once the
proof holds, :func:`share` makes the stacks *the* storage of the per-expert weights
(``frozen_weights.share_storage``: ``gate_e = gate_up[e, :I]``, ``up_e = gate_up[e, I:]``,
``down_e = down[e]``, the parameters' own shapes and strides): each weight held once.

Source: transformers 4.48 ``MixtralSparseMoeBlock`` (the loop); Dynamo's
``capture_dynamic_output_shape_ops`` (unbacked sizes for ``nonzero`` / ``torch.where``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..frozen_weights import share_storage
from ..graph import add_constant, constant_value, real_tensors, tensor_meta
from ..weight_release import check_readable

FLAG_HINT = (
    "compile with torch._dynamo.config.capture_dynamic_output_shape_ops = True (Dynamo then traces the "
    "per-expert loop into one graph and fuse_moe stacks the experts), or call llmopt.prepare_moe(model) "
    "before torch.compile"
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
    """Two new constants: the stacks, gate rows first (reading the first of each pair as the gate)."""
    with real_tensors():
        parts = [[constant_value(gm, n, layout_only=True).detach() for n in t] for t in triples]
        for part in (p for t in parts for p in t):
            # Quantized or sharded stacks were released by an earlier compile (weight_release):
            # this loop spelling is re-stacked by copying, which needs the values.
            check_readable(part, "stacking a per-expert MoE loop again (use llmopt.prepare_moe(model))")
        gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u, _ in parts])
        down = torch.stack([d for _, _, d in parts])
    return add_constant(gm, "moe_gate_up_stack", gate_up, before), add_constant(gm, "moe_down_stack", down, before)


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
