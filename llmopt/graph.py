"""FX helpers shared by the passes, and a networkx view of a graph for analysis and drawing.

Kept small: reading ``node.meta["val"]`` (the fake tensor dynamo/AOT attached), the node
predicates every matcher needs (``is_call``, ``is_cast``, ``single_user``, ``same_shape``
on possibly symbolic sizes), telling frozen constants apart, inserting a node with valid
metadata (``call_with_meta``) and keeping downstream metadata valid after a replacement
changed strides (``propagate_layout``), and the node-count/histogram and DOT export the
compile report uses. One copy of each: the passes import them from here.
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx

from . import compat

aten = torch.ops.aten

# Reshapes that keep the row-major order of the elements (a matcher looks through them).
RESHAPE_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_CAST_KWARGS = {"dtype", "layout", "device", "memory_format"}

# Views that keep every dimension whole: they reorder, insert, drop (size 1) or index
# dimensions, or slice along one, but never merge or split one, so a dimension can be
# followed through them by its index arguments (shard_tensor_parallel follows the head
# dimension this way, checking those arguments per call).
DIMENSION_VIEW_OPS = frozenset({
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.slice.Tensor, aten.select.int, aten.alias.default, aten.detach.default,
    aten.split.Tensor, aten.split_with_sizes.default,
})

# Ops that only reinterpret or move memory; excluded from "device operation" counts.
VIEW_OPS = {
    *RESHAPE_OPS, *DIMENSION_VIEW_OPS, aten.t.default, aten.squeeze.default, aten.squeeze.dims,
    aten.unbind.int, aten.as_strided.default, aten.view_as_real.default, aten.view_as_complex.default,
    aten.unflatten.int, aten.flatten.using_ints,
}


def val(node: Any) -> Any:
    """The example value (usually a FakeTensor) recorded for a node, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_meta(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def statically_equal(a: Any, b: Any) -> bool:
    """``a == b`` for sizes that may be symbolic: True only when known without a guard."""
    return compat.statically_true(a == b)


def same_shape(v: torch.Tensor | None, shape: Iterable) -> bool:
    """``v`` (a tensor or fake, may be None) has exactly ``shape`` (sizes may be symbolic)."""
    shape = tuple(shape)
    if v is None or v.dim() != len(shape):
        return False
    return all(statically_equal(a, b) for a, b in zip(v.shape, shape))


def is_call(node: Any, target: Any) -> bool:
    """``node`` is a ``call_function`` of ``target``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def single_user(node: fx.Node, accept=None) -> fx.Node | None:
    """The one user of ``node`` when it has exactly one, it is a ``call_function`` and
    ``accept(user)`` holds (when given); None otherwise."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_function" or (accept is not None and not accept(user)):
        return None
    return user


def is_cast(node: Any, floating: bool = False) -> bool:
    """``node`` is ``x.to(dtype)``: an ``aten._to_copy`` that may change the dtype only
    (same device, strided, memory format preserved). ``floating``: both sides are
    floating point too."""
    if not is_call(node, aten._to_copy.default) or set(node.kwargs) - _CAST_KWARGS:
        return False
    if node.kwargs.get("layout") not in (None, torch.strided):
        return False
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    if src is None or out is None or src.device != out.device or out.layout != torch.strided:
        return False
    return not floating or (src.is_floating_point() and out.is_floating_point())


def other_operand(binary: fx.Node, operand: Any) -> Any:
    """The argument of the binary op ``binary`` that is not ``operand`` (None when
    ``operand`` is not one of the two, or is both)."""
    a, b = binary.args[0], binary.args[1]
    if a is operand and b is not operand:
        return b
    if b is operand and a is not operand:
        return a
    return None


def call_with_meta(g: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point with its
    ``meta["val"]`` computed on the arguments' fake values."""
    kwargs = kwargs or {}
    node = g.call_function(target, args, kwargs)
    fake_args = fx.node.map_arg(args, lambda n: n.meta["val"])
    fake_kwargs = fx.node.map_arg(kwargs, lambda n: n.meta["val"])
    node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def is_constant(gm: fx.GraphModule, node: Any) -> bool:
    """A frozen tensor: a ``get_attr`` node (parameters become these when frozen)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def real_tensors():
    """Suspend fake tensors to compute on frozen constants inside a pass."""
    from .compat import real_tensor_mode

    return real_tensor_mode()


def constant_value(gm: fx.GraphModule, node: fx.Node, layout_only: bool = False) -> torch.Tensor:
    """The real tensor behind a ``get_attr`` node.

    Reading it tells the frozen-weight ledger that the compiled graph depends on this
    value as of compile time (in-place writes to the weights behind it then raise), unless
    ``layout_only``: the caller only re-arranges it into a new constant that it makes the
    weights' storage with ``frozen_weights.share_storage``."""
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    if not layout_only:
        from .frozen_weights import note_read
        from .weight_release import check_readable

        check_readable(obj, f"compiling (constant {node.target})")  # never compute on freed memory
        note_read(gm, node.target)
    return obj


def add_constant(gm: fx.GraphModule, name_hint: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``tensor`` as a frozen constant on ``gm`` and return a get_attr node for it."""
    base = "_llmopt_" + "".join(c if c.isalnum() else "_" for c in name_hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor, persistent=False)  # a real tensor, computed under real_tensors()
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_like(before, tensor)
    return node


def fake_like(anchor: fx.Node, tensor: torch.Tensor):
    """A fake tensor for ``tensor`` in the anchor node's fake mode (meta of a new constant)."""
    from .compat import detect_fake_mode

    for n in anchor.graph.nodes:
        v = val(n)
        if isinstance(v, torch.Tensor):
            mode = detect_fake_mode([v])
            if mode is not None:
                return mode.from_tensor(tensor, static_shapes=True)
    return tensor


def attr_value(module: Any, target: str) -> Any:
    """What a ``get_attr`` node with this ``target`` (``a.b.c``) reads from ``module``."""
    for name in target.split("."):
        module = getattr(module, name)
    return module


def free_attr_name(gm, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``...: the first name no attribute of ``gm`` has yet
    (for submodules and constants a pass adds)."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def first_user_position(nodes: Iterable[fx.Node]) -> fx.Node:
    """The earliest node (in graph order) among ``nodes``."""
    nodes = list(nodes)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return min(nodes, key=order.__getitem__)


def op_name(node: fx.Node) -> str:
    """``aten.addmm.default`` / ``llmopt.rms_norm.default`` / ``getitem`` / ``placeholder``."""
    if node.op != "call_function":
        return node.op
    t = node.target
    return str(t) if hasattr(t, "_schema") else getattr(t, "__name__", str(t))


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    c = collections.Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(c.items()))


def count_ops(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def count_device_ops(gm: fx.GraphModule) -> int:
    """call_function nodes that launch device work: views and getitem excluded."""
    import operator

    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target not in VIEW_OPS and n.target is not operator.getitem
    )


def networkx_view(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph of the FX graph: one vertex per node with its op, shape and dtype."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        v = tensor_meta(n)
        g.add_node(
            n.name,
            op=op_name(n),
            kind=n.op,
            shape=str(tuple(v.shape)) if v is not None else "",
            dtype=str(v.dtype).replace("torch.", "") if v is not None else "",
        )
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


def to_dot(g: nx.DiGraph, title: str = "llmopt") -> str:
    """Graphviz DOT text for a networkx view (no graphviz install needed)."""

    def q(s: str) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    colors = {"placeholder": "lightblue", "get_attr": "lightgrey", "output": "lightyellow"}
    lines = [f"digraph {q(title)} {{", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
    for name, data in g.nodes(data=True):
        label = f"{name}\\n{data.get('op', '')}"
        if data.get("shape"):
            label += f"\\n{data['shape']} {data.get('dtype', '')}"
        color = colors.get(data.get("kind"), "white")
        if str(data.get("op", "")).startswith("llmopt"):
            color = "palegreen"
        lines.append(f'  {q(name)} [label="{label}", style=filled, fillcolor={color}];')
    for a, b in g.edges():
        lines.append(f"  {q(a)} -> {q(b)};")
    lines.append("}")
    return "\n".join(lines)


def replace_all_uses(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` (metadata of users stays valid: same value)."""
    old.replace_all_uses_with(new)


def is_side_effect_free(node: fx.Node) -> bool:
    """True for nodes that may move in the graph: no in-place writes, no outputs,
    no placeholders (an op whose schema mutates an argument is pinned where it is)."""
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return not schema.is_mutable
    return True  # operator.getitem and other Python callables on values


def move_users_after(node: fx.Node) -> int:
    """Move the (transitive) users of ``node`` that stand before it to just after it.

    A pass that inserts ``new`` late and then points an earlier node's users at it (say a
    ``sym_size`` of the tensor it replaces, read for a symbolic batch size) leaves those
    users before their input. They are moved after ``node`` in their original order;
    only side-effect-free nodes are moved (a mutating one raises: moving it could reorder
    a write and a read). Returns how many nodes moved."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    here = order[node]
    early: set[fx.Node] = set()
    stack = [u for u in node.users if order[u] < here]
    while stack:
        n = stack.pop()
        if n in early:
            continue
        if not is_side_effect_free(n):
            raise RuntimeError(f"{n.name} ({n.target}) stands before its input {node.name} and writes memory: cannot reorder")
        early.add(n)
        stack.extend(u for u in n.users if order[u] < here)
    anchor = node
    for n in sorted(early, key=order.__getitem__):
        anchor.append(n)
        anchor = n
    return len(early)


# --------------------------------------------------------------------------- layout after a rewrite
def propagate_layout(g: fx.Graph, replaced: dict[fx.Node, fx.Node]) -> None:
    """Keep ``meta["val"]`` true after replacing nodes by ones with equal values but other
    strides (the llmopt ops return contiguous tensors), and keep the graph runnable.

    ``replaced`` maps each old node to its replacement, whose users are the old node's.
    Users are re-evaluated on fake tensors in graph order, and so on downstream while the
    strides keep changing (an elementwise op follows its input's layout; SDPA's output
    follows q's; a matmul or copy stops the change). A ``view`` that the new strides make
    impossible gets one copy of its input, laid out as it was before, right in front of it:
    e.g. Hugging Face's ``attn_output.transpose(1, 2).view(B, S, -1)`` after SDPA.
    """
    order = {n: i for i, n in enumerate(g.nodes)}
    old_vals = {new: old.meta.get("val") for old, new in replaced.items()}
    pending = {u for new in replaced.values() for u in new.users}
    while pending:
        node = min(pending, key=lambda n: order.get(n, len(order)))
        pending.discard(node)
        if node.op != "call_function":
            continue
        before = node.meta.get("val")
        try:
            after = _reevaluate(node)
        except Exception:
            if node.target not in (aten.view.default, aten._unsafe_view.default):
                continue  # cannot re-evaluate this op on fakes; its metadata stays as traced
            src = node.args[0]
            with g.inserting_before(node):
                copy = _copy_to_layout(g, src, old_vals.get(src))
            if copy is None:
                raise
            node.replace_input_with(src, copy)
            after = _reevaluate(node)
        node.meta["val"] = after
        if not _same_layout_vals(before, after):
            old_vals[node] = before
            pending.update(node.users)


def _reevaluate(node: fx.Node):
    args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
    return node.target(*args, **kwargs)


def _copy_to_layout(g: fx.Graph, src: fx.Node, old) -> fx.Node | None:
    """A copy of ``src`` with ``old``'s strides (old must be a permuted dense layout)."""
    if not isinstance(old, torch.Tensor):
        return None
    dims = old.dim()
    for perm in _candidate_perms(dims):
        shape = [old.shape[p] for p in perm]
        expected = [1] * dims
        for i in range(dims - 2, -1, -1):
            expected[i] = expected[i + 1] * shape[i + 1]
        if all(statically_equal(old.stride(p), e) or statically_equal(old.shape[p], 1) for p, e in zip(perm, expected)):
            if perm == list(range(dims)):
                return call_with_meta(g, aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
            inverse = [perm.index(i) for i in range(dims)]
            t = call_with_meta(g, aten.permute.default, (src, perm))
            c = call_with_meta(g, aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
            return call_with_meta(g, aten.permute.default, (c, inverse))
    return None


def _candidate_perms(dims: int) -> list[list[int]]:
    perms = [list(range(dims))]
    if dims == 4:
        perms += [[0, 2, 1, 3], [0, 2, 3, 1], [0, 3, 1, 2], [1, 0, 2, 3], [2, 0, 1, 3]]
    return perms


def _same_layout_vals(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout_vals(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dim() == b.dim() and all(
            statically_equal(s, t) or statically_equal(n, 1) for s, t, n in zip(a.stride(), b.stride(), a.shape)
        )
    return True
