"""normalize: make equal math look equal, so the later passes match one spelling.

- Remove no-ops: views/reshapes/expands to the same shape, full slices, ``alias`` and
  ``detach`` in an inference graph, identity ``_to_copy`` (same dtype, device, layout),
  ``clone`` of an already contiguous tensor, dropout in eval (``train=False``).
- Canonicalize linears: ``addmm(b, x, t(w))``, ``mm(x, t(w))``, ``matmul``-produced
  ``view → mm → view`` chains and GPT-2's ``Conv1D`` (``addmm(b, x, w)`` with a frozen
  ``[K, N]`` weight, transposed once) all become ``aten.linear(x, w[N, K], b)`` — the
  single form ``merge_parallel_linears``, the fusions and ``select_linear_kernel`` match
  (they check themselves whether ``w`` is a frozen constant).

- Merge duplicates (common-subexpression elimination): the same pure op on the same
  inputs computed twice — per-layer copies of ``unsqueeze(cos, 1)``, of the cache
  positions ``arange(n) + counter``, of mask slices — becomes one node, so later passes
  see one value (and plan its metadata once, e.g. the KV lengths every layer shares).

A no-op is only removed when it is provably one (shapes and strides from
``node.meta["val"]``, without adding guards on symbolic sizes) and when removing it cannot
create an alias between a graph output and an input that the graph writes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import compat
from ..frozen_weights import alias_constant
from ..graph import VIEW_OPS, add_constant, constant_value, is_constant, real_tensors, tensor_meta
from ..weight_release import layout

aten = torch.ops.aten

_SAME_SHAPE_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}
_ALIASES = {aten.alias.default, aten.detach.default}
_TRANSPOSE = {aten.t.default}


def run(gm: fx.GraphModule, ctx) -> int:
    count = 0
    outputs = _output_nodes(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        src = _noop_source(node)
        if src is not None and node not in outputs:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            count += 1
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (aten.addmm.default, aten.mm.default):
            if _canonicalize_matmul(gm, node, ctx):
                count += 1
    count += merge_duplicates(gm, outputs)
    gm.graph.eliminate_dead_code()
    return count


# Ops that allocate without defining their values, or draw random numbers: two calls are
# two different tensors even with equal arguments.
_NOT_MERGEABLE_PREFIXES = ("empty", "new_empty", "rand", "normal", "bernoulli", "multinomial", "uniform", "exponential")


def _mergeable(target) -> bool:
    import operator

    if target is operator.getitem:
        return True
    schema = getattr(target, "_schema", None)
    if schema is None or schema.is_mutable:
        return False
    name = schema.name.split("::")[-1]
    if name.startswith(_NOT_MERGEABLE_PREFIXES) or "dropout" in name:
        return False
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    hash(value)  # raises TypeError for unhashable values (the caller skips the node)
    return (type(value), value)


def merge_duplicates(gm: fx.GraphModule, outputs: set[fx.Node] | None = None) -> int:
    """Merge identical pure nodes; returns how many were removed.

    Safe with in-place ops in the graph (the KV-cache appends of ``passes/kv_cache.py``,
    the ``copy_`` that advances a cache's slot counter): a node that reads a graph input
    some op writes is merged only with a twin that saw the same writes *of that input*
    (its key carries, per written input it depends on, the count of writes to it so far).
    So the mask a static cache's layers all compute from the positions is computed once,
    even though the KV appends of every layer run in between.
    """
    outputs = _output_nodes(gm) if outputs is None else outputs
    mutated = {node: _mutated_roots(node) for node in gm.graph.nodes
               if node.op == "call_function" and _is_mutable(node.target)}
    written = set().union(*mutated.values()) if mutated else set()
    writes = dict.fromkeys(written, 0)
    deps: dict[fx.Node, frozenset] = {}
    seen: dict = {}
    merged = 0
    for node in list(gm.graph.nodes):
        mine = frozenset(a for a in node.all_input_nodes if a in written)
        deps[node] = mine.union(*(deps.get(a, frozenset()) for a in node.all_input_nodes))
        if node in written:
            deps[node] = deps[node] | {node}
        if node.op != "call_function":
            continue
        if node in mutated:
            for root in mutated[node]:
                writes[root] += 1
            continue
        if not _mergeable(node.target):
            continue
        try:
            state = tuple(sorted((r.name, writes[r]) for r in deps[node]))
            key = (node.target, _hashable(node.args), _hashable(node.kwargs), state)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
        elif node not in outputs:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def _is_mutable(target) -> bool:
    return bool(getattr(getattr(target, "_schema", None), "is_mutable", False))


def _mutated_roots(node: fx.Node) -> set[fx.Node]:
    """The tensors ``node`` writes: its arguments the schema marks written, followed
    through views to their base (a graph input, or an intermediate). Where the schema
    marks none, everything the node reads counts as written: conservative."""
    schema = node.target._schema
    args = [*node.args, *(node.kwargs.get(a.name) for a in schema.arguments[len(node.args):])]
    roots: set[fx.Node] = set()
    for arg, spec in zip(args, schema.arguments):
        if not (spec.alias_info is not None and spec.alias_info.is_write):
            continue
        for value in (arg if isinstance(arg, (list, tuple)) else [arg]):
            base = value
            while isinstance(base, fx.Node) and base.op == "call_function" and base.target in VIEW_OPS and base.args:
                base = base.args[0]
            if isinstance(base, fx.Node):
                roots.add(base)
    return roots or set(node.all_input_nodes)


def _output_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return set(out.all_input_nodes)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dim() != b.dim():
        return False
    return all(compat.statically_true(x == y) for x, y in zip(a.shape, b.shape))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _same_shape(a, b) and all(
        compat.statically_true(x == y) for x, y, n in zip(a.stride(), b.stride(), a.shape) if not compat.statically_true(n == 1)
    )


def _noop_source(node: fx.Node) -> fx.Node | None:
    """The input this node merely passes through, or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    a, b = tensor_meta(src), tensor_meta(node)
    if a is None or b is None:
        return None
    t = node.target
    if t in _ALIASES:
        return src
    if t in _SAME_SHAPE_VIEWS:
        return src if _same_layout(a, b) else None
    if t == aten.slice.Tensor:
        return src if _same_layout(a, b) else None
    if t == aten._to_copy.default:
        kw = node.kwargs
        if set(kw) - {"dtype", "device", "layout", "memory_format"}:
            return None
        if a.dtype == b.dtype and a.device == b.device and _same_layout(a, b) and src.op != "placeholder":
            return src
        return None
    if t == aten.clone.default:
        return src if _same_layout(a, b) and a.is_contiguous() and src.op != "placeholder" else None
    if t in (aten.dropout.default,):
        return src if len(node.args) >= 3 and node.args[2] is False else None
    return None


def _canonicalize_matmul(gm: fx.GraphModule, node: fx.Node, ctx) -> bool:
    """Rewrite addmm/mm with a frozen weight into aten.linear(x, w[N,K], b)."""
    if node.target == aten.addmm.default:
        bias, x, wt = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            ctx.near_miss(node, "addmm with beta/alpha != 1 is not a linear")
            return False
        if tensor_meta(bias) is None or tensor_meta(bias).dim() != 1:
            return False
    else:
        x, wt = node.args[:2]
        bias = None
    weight = _weight_nk(gm, wt)
    if weight is None:
        return False
    # Fold a surrounding view(x3d -> 2d) ... view(2d -> 3d): linear takes any leading dims.
    x_in = x
    out_node = node
    if (
        isinstance(x, fx.Node)
        and x.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
        and len(node.users) == 1
    ):
        user = next(iter(node.users))
        src = x.args[0]
        sv, uv = tensor_meta(src), tensor_meta(user)
        if (
            user.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
            and sv is not None
            and uv is not None
            and sv.dim() == uv.dim()
            and all(compat.statically_true(p == q) for p, q in zip(sv.shape[:-1], uv.shape[:-1]))
        ):
            x_in, out_node = src, user
    with gm.graph.inserting_before(out_node):
        lin = gm.graph.call_function(aten.linear.default, (x_in, weight, bias))
    lin.meta = dict(out_node.meta)
    ctx.rewrite(lin, f"{node.target.__name__} → linear")
    out_node.replace_all_uses_with(lin)
    if out_node is not node:
        gm.graph.erase_node(out_node)
    gm.graph.erase_node(node)
    return True


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _weight_nk(gm: fx.GraphModule, wt: fx.Node) -> fx.Node | None:
    """The [N, K] weight behind the right operand of ``x @ wt``, or None.

    ``t(w)`` gives ``w`` whatever it is (later passes check it is a frozen constant and
    report when it is not); an untransposed ``[K, N]`` operand only when it is a frozen
    constant, whose transpose is then stored once.
    """
    if not isinstance(wt, fx.Node):
        return None
    if wt.target in _TRANSPOSE or (wt.target == aten.permute.default and list(wt.args[1]) == [1, 0]):
        return wt.args[0]
    if is_constant(gm, wt):
        # [K, N] constant used directly (GPT-2 Conv1D): its transposed *view* — no copy, so
        # the weight is held once and in-place writes to it reach the graph (the kernels
        # take strides).
        value = constant_value(gm, wt, layout_only=True)
        if value.dim() != 2:
            return None
        with real_tensors():
            transposed = layout(torch.t, value)  # a view: also of a released weight (weight_release)
        node = add_constant(gm, wt.target + "_t", transposed, wt)
        alias_constant(gm, node.target, wt.target, _transpose)
        return node
    return None
