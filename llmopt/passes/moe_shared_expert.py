"""A shared expert joins the routed experts' ``llmopt.fused_experts`` as ``c`` chunk-experts.

What this replaces, as eager code (Qwen2-MoE; DeepSeek-style blocks have no gate, ``g = 1``):

    routed = llmopt.fused_experts(x, W_gu [E, 2I, H], W_d [E, H, I], weights [T, k], ids [T, k], act)
    shared = down(act(gate(x)) * up(x))                 # intermediate size I_s, e.g. 5632 vs I = 1408
    out    = routed + sigmoid(shared_gate(x)) * shared  # [T, 1] gate
      →  out = llmopt.fused_experts(x, [W_gu; S_gu] [E+c, 2I, H], [W_d; S_d] [E+c, H, I],
                                    [weights, g·1_c] [T, k+c], [ids, E..E+c-1] [T, k+c], act)

Why it is exact: a gated MLP is a sum over its intermediate units,
``down(act(G x) * (U x)) = sum_i D[:, i] · act(G_i x) · (U_i x)``, so splitting the I_s units
into ``c = ceil(I_s / I)`` chunks of ``I`` gives ``c`` MLPs of the routed experts' shape whose
outputs sum to the shared expert's. The last chunk is zero-padded (rows of G and U, columns
of D): a padded unit contributes ``act(0) · 0 · 0 = 0`` when ``act(0) = 0`` (SiLU, GELU, tanh
GELU; the pass checks it and leaves the block otherwise). Every token is routed to all ``c``
chunk-experts with the gate value as their weight, so one grouped GEMM for gate/up, one for
down and one combine cover routed and shared experts; the sigmoid, multiply and add are gone,
and the sum is taken in fp32 and rounded once (the separate spelling rounds the shared output,
its gated product and the sum apiece).

Memory: the new stacks are *the* storage of the routed stacks (``frozen_weights.share_storage``:
the model's expert parameters become views into them). The shared expert's weights are views
of the new stacks too when ``I_s == I`` (one chunk, no padding); otherwise their chunks are a
copy (a chunk of a row-major ``[I_s, H]`` matrix cannot be a strided view of an ``[E+c, 2I, H]``
stack): the stacks are then a product *derived* from the three shared weights
(``weight_release.derived`` with several sources), so the shared weights' memory is released
after compiling (with ``release_weights=False`` they stay, derived: an in-place write raises
at the next call) and the model holds every expert once, in the stacks. A recompile takes
the stacks from the release cache (they extend the routed stacks it finds), or, when nothing
was released, finds the routed stacks already at the head of the earlier graph's stacks and
reuses that storage when its chunk tail is unchanged.

Near-misses (the shared expert then stays a dense MLP that ``merge_parallel_linears`` and
``fuse_gated_activation`` fuse): an activation other than the routed experts' or with
``act(0) != 0``; stacks read transposed; a shared MLP with biases, non-constant weights or
intermediates used elsewhere.

Source: the identity above (a column split of the MLP, as in Megatron's tensor parallelism);
DeepSeek-V2/V3 and Qwen2-MoE shared experts (transformers ``modeling_qwen2_moe``).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..codegen.moe_experts import chunk_experts, zero_preserving
from ..frozen_weights import share_storage
from ..weight_release import OPT_OUT, ReleasedWeightError, check_readable, derived, released
from .fuse_gated_activation import activation_of
from ..graph import add_constant, call_with_meta, constant_value, other_operand, real_tensors, tensor_meta
from .near_miss import NearMiss

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


# --------------------------------------------------------------------------- the pattern
def _strip_views(n):
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in _VIEWS:
        n = n.args[0]
    return n


def _linear_of(n, x_sources) -> fx.Node | None:
    """The weight node when ``n = linear(x', W)`` without bias, ``x'`` the tokens, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.linear.default):
        return None
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    if bias is not None or _strip_views(n.args[0]) not in x_sources:
        return None
    return n.args[1]


def shared_mlp(n, x_sources):
    """(activation, gate W, up W, down W, nodes) when ``n = down(act(gate(x')) * up(x'))``."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.linear.default):
        return None
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    prod = n.args[0]
    if bias is not None or not (isinstance(prod, fx.Node) and prod.target == aten.mul.Tensor):
        return None
    w_down = n.args[1]
    for a, b in (prod.args, prod.args[::-1]):
        act = activation_of(a)
        if act is None:
            continue
        w_gate, w_up = _linear_of(act[1], x_sources), _linear_of(b, x_sources)
        if w_gate is not None and w_up is not None:
            return act[0], w_gate, w_up, w_down, [n, prod, a, act[1], b]
    return None


def find_shared(fused: fx.Node, x: fx.Node):
    """(add node, gate logit node or None, the shared MLP match) for ``fused + [sigmoid(g(x)) *] mlp(x)``."""
    head = fused
    if len(head.users) == 1 and next(iter(head.users)).target in _VIEWS:
        head = next(iter(head.users))
    if len(head.users) != 1:
        return None
    (add,) = head.users
    if add.op != "call_function" or add.target != aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return None
    other = other_operand(add, head)
    if tensor_meta(other) is None or tuple(tensor_meta(other).shape) != tuple(tensor_meta(head).shape):
        return None  # a broadcasting add is not "routed + shared" row by row
    x_sources = {x, _strip_views(x)}
    mlp = shared_mlp(other, x_sources)
    if mlp is not None:
        return add, None, mlp, [other]
    if isinstance(other, fx.Node) and other.target == aten.mul.Tensor and len(other.args) == 2:
        for s, m in (other.args, other.args[::-1]):
            if isinstance(s, fx.Node) and s.target == aten.sigmoid.default and _linear_of(s.args[0], x_sources) is not None:
                mlp = shared_mlp(m, x_sources)
                if mlp is not None:
                    return add, s.args[0], mlp, [other, s, s.args[0]]
    return None


# --------------------------------------------------------------------------- the rewrite
def fuse_shared_expert(gm: fx.GraphModule, fused: fx.Node) -> tuple[fx.Node, str] | None:
    """Fold the shared expert beside ``fused`` (an ``llmopt.fused_experts`` node) into it:
    (the new node, a detail for the report), None when there is none; NearMiss when one is
    there but cannot join."""
    x, gu_node, d_node, weights, ids, activation = fused.args
    found = find_shared(fused, x)
    if found is None:
        return None
    add, gate_logit, (act, wg, wu, wd, mlp_nodes), glue = found
    gate_weight = gate_logit.args[1] if gate_logit is not None else None
    consts = [n for n in (wg, wu, wd, gate_weight, gu_node, d_node) if n is not None]
    if gu_node.target == aten.transpose.int:
        raise NearMiss(add, "shared expert not fused: the routed stacks are read transposed")
    if any(not isinstance(c, fx.Node) or c.op != "get_attr" for c in consts):
        raise NearMiss(add, "shared expert not fused: its weights or the expert stacks are not frozen constants")
    with real_tensors():
        zero_ok = zero_preserving(act)
    if act != activation or not zero_ok:
        raise NearMiss(add, f"shared expert not fused: its activation {act} is not the routed experts' {activation} "
                       "with act(0) = 0 (needed to zero-pad its last chunk)")
    inner = mlp_nodes[1:] + glue[1:]
    if any(len(n.users) != 1 for n in inner) or len(mlp_nodes[0].users) != 1 or len(glue[0].users) != 1:
        raise NearMiss(add, "shared expert not fused: one of its intermediates is used outside the block")
    gv, gate_v = tensor_meta(wg), tensor_meta(gate_weight) if gate_weight is not None else None
    e, two_i, h = tensor_meta(gu_node).shape
    inter = two_i // 2
    if gate_v is not None and tuple(gate_v.shape) != (1, h):
        raise NearMiss(add, f"shared expert not fused: its gate weight is {tuple(gate_v.shape)}, expected [1, {h}]")
    if gv.dtype != tensor_meta(gu_node).dtype or gv.shape[1] != h:
        raise NearMiss(add, "shared expert not fused: its weights' dtype or hidden size differ from the experts'")
    i_s = int(gv.shape[0])
    c = math.ceil(i_s / inter)
    gu_new, d_new = _stacks(gm, fused, gu_node, d_node, (wg, wu, wd), inter, c, exact=(i_s == inter))
    graph = gm.graph
    xv = tensor_meta(x)
    t = xv.shape[0]
    w_dtype = tensor_meta(weights).dtype
    with real_tensors():
        ids_value = torch.arange(e, e + c, dtype=tensor_meta(ids).dtype, device=xv.device).view(1, c)
        one = torch.ones(1, 1, dtype=w_dtype, device=xv.device)
    shared_ids = add_constant(gm, "moe_shared_ids", ids_value, add)
    with graph.inserting_before(add):
        rows = t if isinstance(t, int) else call_with_meta(graph, aten.sym_size.int, (x, 0))
        ids_sh = call_with_meta(graph, aten.expand.default, (shared_ids, [rows, c]))
        if gate_logit is not None:
            g = call_with_meta(graph, aten.sigmoid.default, (gate_logit,))
            g = call_with_meta(graph, aten.view.default, (g, [-1, 1]))
            g = call_with_meta(graph, aten._to_copy.default, (g,), {"dtype": w_dtype})
        else:
            g = add_constant(gm, "moe_shared_weight", one, add)
        w_sh = call_with_meta(graph, aten.expand.default, (g, [rows, c]))
        all_w = call_with_meta(graph, aten.cat.default, ([weights, w_sh], 1))
        all_ids = call_with_meta(graph, aten.cat.default, ([ids, ids_sh], 1))
        new = call_with_meta(graph, torch.ops.llmopt.fused_experts.default, (x, gu_new, d_new, all_w, all_ids, activation))
        out = new
        if tuple(tensor_meta(add).shape) != tuple(tensor_meta(new).shape):
            out = call_with_meta(graph, aten.view.default, (new, list(tensor_meta(add).shape)))
    new.meta.update({k: v for k, v in fused.meta.items() if k != "val"})
    add.replace_all_uses_with(out)
    # In use order, each once (an ungated expert's output is both glue and the MLP's down).
    for n in dict.fromkeys([add, *glue, *mlp_nodes, *(v for v in fused.users if v is not add), fused]):
        if not n.users:
            graph.erase_node(n)
    gated = "sigmoid-gated " if gate_logit is not None else ""
    return new, f"{gated}shared expert (I={i_s}) fused as {c} chunk-experts"


def _stacks(gm, anchor, gu_node, d_node, shared, inter: int, c: int, exact: bool):
    """The new [E+c, 2I, H] / [E+c, H, I] stack constants, made the storage of the routed
    stacks (and of the shared weights when ``exact``: one unpadded chunk; otherwise the
    stacks are a product derived from the shared weights, which are then released)."""
    wg, wu, wd = shared
    with real_tensors():
        routed_gu = constant_value(gm, gu_node, layout_only=True)
        routed_d = constant_value(gm, d_node, layout_only=True)
        if exact:
            new_gu, new_d = _append(routed_gu, routed_d, *(constant_value(gm, n, layout_only=True) for n in shared),
                                    inter)
        else:
            new_gu, new_d = _derived_stacks(gm, routed_gu, routed_d, shared, inter)
    e = routed_gu.shape[0]
    gu = add_constant(gm, "moe_gate_up_with_shared", new_gu, anchor)
    dn = add_constant(gm, "moe_down_with_shared", new_d, anchor)
    gu_parts = [(gu_node.target, lambda s: s.narrow(0, 0, e))]
    d_parts = [(d_node.target, lambda s: s.narrow(0, 0, e))]
    if exact:
        gu_parts += [(wg.target, lambda s: s[e, :inter]), (wu.target, lambda s: s[e, inter:])]
        d_parts += [(wd.target, lambda s: s[e])]
    share_storage(gm, gu.target, gu_parts)
    share_storage(gm, dn.target, d_parts)
    return gu, dn


def _derived_stacks(gm, routed_gu, routed_d, shared, inter: int):
    """[routed; chunks of the shared expert], derived from the shared weights
    (``weight_release.derived``, three sources): the chunks are a copy, so the shared
    weights' own memory is released after compiling and the expert is held once, in the
    stacks. The stacks' storage is the routed experts' (their parameters become views of
    it), so the cached product holds no memory of its own; a recompile takes it from the
    cache when it still extends the routed stacks it finds (same storage, offset 0)."""
    e = routed_gu.shape[0]
    kind = ("moe_shared_stacks", e, inter, tuple(routed_gu.shape), tuple(routed_d.shape))
    cached = any(released(constant_value(gm, n, layout_only=True)) is not None for n in shared)
    new_gu, new_d = derived(gm, shared, kind, lambda sg, su, sd: _append(routed_gu, routed_d, sg, su, sd, inter),
                            "the compiled graph holds a chunked copy of it in the MoE expert stacks")
    if cached and not (_extends(routed_gu, new_gu) and _extends(routed_d, new_d)):
        # The cached stacks extend other routed weights (replaced since): no chunks to rebuild them from.
        raise ReleasedWeightError(
            f"llmopt: the shared expert's weights were released after an earlier compile and the routed experts "
            f"were replaced since, so the expert stacks cannot be rebuilt; reload the model, or {OPT_OUT}")
    return new_gu, new_d


def _append(routed_gu, routed_d, sg, su, sd, inter: int):
    """The stacks [routed; chunks]: the routed stacks' own storage when an earlier compile
    already made it so with the same chunks, else a copy (the chunks are temporaries)."""
    chunk_gu, chunk_d = chunk_experts(sg.detach(), su.detach(), sd.detach(), inter)
    new_gu = _reusable(routed_gu, chunk_gu)
    new_d = _reusable(routed_d, chunk_d)
    if new_gu is None or new_d is None:  # a copy reads the routed values: never freed memory
        check_readable(routed_gu, "joining the shared expert to the expert stacks")
        check_readable(routed_d, "joining the shared expert to the expert stacks")
    if new_gu is None:
        new_gu = torch.cat([routed_gu.detach(), chunk_gu])
    if new_d is None:
        new_d = torch.cat([routed_d.detach(), chunk_d])
    return new_gu, new_d


def _extends(routed: torch.Tensor, stack: torch.Tensor) -> bool:
    """Whether ``routed`` is the head of ``stack``: its storage, offset 0, same layout."""
    return (routed.untyped_storage() is stack.untyped_storage() and routed.storage_offset() == 0
            and routed.stride() == stack.stride() and routed.shape[1:] == stack.shape[1:])


def _reusable(routed: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor | None:
    """The stack [routed; chunks] as a view, when ``routed`` already is the head of such a
    stack (an earlier compile made it) whose tail holds ``chunks``; else None."""
    if routed.device.type == "meta" or not routed.is_contiguous() or routed.storage_offset() != 0:
        return None
    storage = routed.untyped_storage()
    shape = (routed.shape[0] + chunks.shape[0], *routed.shape[1:])
    if storage.nbytes() != math.prod(shape) * routed.element_size():
        return None
    whole = routed.new_empty(0).set_(storage, 0, shape)
    return whole if torch.equal(whole[routed.shape[0]:], chunks) else None
