"""FX helpers shared by the passes, and a networkx view of a graph for analysis and drawing.

Kept small: reading ``node.meta["val"]`` (the fake tensor dynamo/AOT attached), telling
frozen constants apart, replacing a node while keeping metadata valid, and the
node-count/histogram and DOT export the compile report uses.
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that only reinterpret or move memory; excluded from "device operation" counts.
VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims, aten.slice.Tensor, aten.select.int,
    aten.alias.default, aten.detach.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.as_strided.default, aten.view_as_real.default, aten.view_as_complex.default,
    aten.unflatten.int, aten.flatten.using_ints,
}


def val(node: Any) -> Any:
    """The example value (usually a FakeTensor) recorded for a node, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensor_meta(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


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
