"""Apply a decomposition table to the nodes of an ATen graph that need it, not to all.

Inductor expects its decompositions applied to the graph it compiles (AOTAutograd does it
when Inductor is the backend). llmopt's post-pass graph is captured without them, so the
Inductor executor applies them afterwards, together with llmopt's CPU decompositions
(``codegen.cpu_decompositions``). Retracing the whole graph with ``make_fx`` does that, but
re-runs every node under fake tensors and rebuilds the graph: on ``llama-100m`` about as
long as the passes, and most nodes (views, matmuls, ops with a lowering) come out as they
went in. :func:`decompose` retraces only the nodes whose op is in the table, is a
``CompositeImplicitAutograd`` op (which the whole retrace also splits into its parts), and
copies every other node as it is, with its metadata.

It falls back to the whole-graph retrace whenever the shortcut cannot be shown to give the
same graph: symbolic shapes, a call that is not an ATen/llmopt op (Python functions,
higher-order ops, ``operator`` arithmetic on sizes), an input without fake metadata, or a
decomposition whose outputs differ in shape or dtype from the node's recorded value (its
users' metadata would then be stale). An output in another layout than the recorded one
is copied into it (:func:`_recorded_outputs`): the graph's views were traced on it. Only
the executor's graph changes; the report and the golden files read the graph before this
step.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import compat
from .graph import attr_value

log = logging.getLogger("llmopt")


class _Unsupported(Exception):
    """The shortcut does not apply to this graph: retrace it whole."""


def decompose(gm: fx.GraphModule, example_inputs: Sequence[Any], table: dict) -> fx.GraphModule:
    """``gm`` with ``table`` applied, as the whole-graph ``make_fx`` retrace would give it;
    ``gm`` itself is not modified."""
    try:
        return _decompose_selected(gm, table)
    except _Unsupported as exc:
        log.debug("llmopt: decompositions applied by a whole-graph retrace: %s", exc)
        return whole_graph(gm, example_inputs, table)


def whole_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], table: dict) -> fx.GraphModule:
    """The reference behaviour: every node retraced with ``table``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(gm, decomposition_table=table)(*example_inputs)


def _needs_retrace(node: fx.Node, table: dict) -> bool:
    target = node.target
    if target is operator.getitem:
        return False
    if not compat.is_op_overload(target):
        raise _Unsupported(f"call of {target!r}")
    return target in table or compat.has_composite_implicit_kernel(target)


def _static_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and all(isinstance(s, int) for s in (*value.shape, *value.stride()))


def _decompose_selected(gm: fx.GraphModule, table: dict) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    constants: dict[str, torch.Tensor] = {}
    traces: dict[Any, fx.GraphModule] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not _static_tensor(node.meta.get("val")):
                raise _Unsupported(f"input {node.name} is not a tensor of static shape")
        elif node.op == "call_function" and _needs_retrace(node, table):
            env[node] = _inline(graph, node, env, table, constants, traces)
            continue
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(env[node.args[0]], tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of a node that was retraced
            continue
        elif node.op not in ("get_attr", "call_function", "output"):
            raise _Unsupported(f"{node.op} node {node.name}")
        env[node] = graph.node_copy(node, lambda n: env[n])
    # The new module holds the same tensors as ``gm`` (by reference) and the decompositions'
    # own constants.
    attrs = {n.target: constants[n.target] if n.target in constants else attr_value(gm, n.target)
             for n in graph.nodes if n.op == "get_attr"}
    return fx.GraphModule(attrs, graph)


def _inline(graph: fx.Graph, node: fx.Node, env: dict, table: dict, constants: dict, traces: dict) -> Any:
    """Trace ``node``'s op with ``table`` on its arguments' fake values and copy the result
    into ``graph``; returns what ``node`` becomes (a node, or a tuple of nodes).

    A trace depends only on the op, the arguments that are not tensors and the tensors'
    metadata (their values are fake), so one trace serves every node that has the same
    (the same op in each decoder layer): ``traces`` holds them by that key. The copies of
    one trace share its fake values (``meta["val"]``); Inductor reads their metadata, and
    the code it generated from such a graph was checked to have the same kernels as from
    the whole retrace (docs/compile_time.md)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs: list[fx.Node] = []

    def collect(n: fx.Node) -> fx.Node:
        if n not in inputs:
            inputs.append(n)
        return n

    fx.node.map_arg((node.args, node.kwargs), collect)
    for n in inputs:
        if not _static_tensor(n.meta.get("val")) or isinstance(env.get(n), tuple):
            raise _Unsupported(f"argument {n.name} of {node.name} is not a tensor of static shape")

    def call(*tensors: torch.Tensor) -> Any:
        by_node = dict(zip(inputs, tensors))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), by_node.__getitem__)
        return node.target(*args, **kwargs)

    key = _trace_key(node, inputs)
    sub = traces.get(key) if key is not None else None
    if sub is None:
        sub = make_fx(call, decomposition_table=table)(*[n.meta["val"] for n in inputs])
        if key is not None:
            traces[key] = sub
    mapping: dict[fx.Node, fx.Node] = {}
    placeholders = iter(inputs)
    result: Any = None
    for sub_node in sub.graph.nodes:
        if sub_node.op == "placeholder":
            mapping[sub_node] = env[next(placeholders)]
        elif sub_node.op == "get_attr":
            # A tensor the decomposition created (a constant): held by the new module.
            name = f"_decomposed_{node.name}_{sub_node.target}"
            constants[name] = getattr(sub, sub_node.target)
            mapping[sub_node] = graph.get_attr(name)
            mapping[sub_node].meta = dict(sub_node.meta)
        elif sub_node.op == "call_function":
            mapping[sub_node] = graph.node_copy(sub_node, lambda n: mapping[n])
        elif sub_node.op == "output":
            result = fx.node.map_arg(sub_node.args[0], lambda n: mapping[n])
        else:
            raise _Unsupported(f"{sub_node.op} node in the decomposition of {node.name}")
    result = _recorded_outputs(graph, node, result)
    if isinstance(result, list):
        result = tuple(result)
    return result


def _trace_key(node: fx.Node, inputs: list[fx.Node]) -> Any:
    """What ``node``'s trace depends on, hashable; None when it may depend on more (a fake
    tensor that carries its constant value)."""
    for n in inputs:
        if getattr(n.meta["val"], "constant", None) is not None:
            return None

    def describe(n: fx.Node) -> tuple:
        v = n.meta["val"]
        return ("tensor", inputs.index(n), tuple(v.shape), v.stride(), v.dtype, v.device, v.storage_offset())

    key = (node.target, _hashable(fx.node.map_arg((node.args, node.kwargs), describe)))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _hashable(v)) for k, v in value.items()))
    return value


def _recorded_outputs(graph: fx.Graph, node: fx.Node, result: Any) -> Any:
    """``result`` as ``node``'s users expect it: the values it recorded, in its layouts.

    The decomposition must give as many tensors as the node recorded, each of the same
    shape, dtype and device, or the shortcut does not apply. An output in another layout
    is copied into the recorded one: the graph was traced on the eager kernel's layouts,
    and a ``view`` after it may only be valid on them (an Inductor decomposition may
    choose another layout: its ``cat`` with an empty operand returns the other operand as
    it is, a transposed tensor for the empty first step of a dynamic KV cache, where eager
    ``cat`` returns a contiguous one; the whole-graph retrace then fails on the ``view``)."""
    recorded = node.meta.get("val")
    if result is None:
        if node.users:
            raise _Unsupported(f"the decomposition of {node.name} returns nothing")
        return result
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    values = list(recorded) if isinstance(recorded, (tuple, list)) else [recorded]
    if len(outputs) != len(values):
        raise _Unsupported(f"the decomposition of {node.name} returns {len(outputs)} values, not {len(values)}")
    kept = []
    for out, value in zip(outputs, values):
        if not isinstance(out, fx.Node):
            raise _Unsupported(f"the decomposition of {node.name} returns a constant")
        new = out.meta.get("val")
        if value is None and new is None:
            kept.append(out)
            continue
        if not (isinstance(new, torch.Tensor) and isinstance(value, torch.Tensor)):
            raise _Unsupported(f"the decomposition of {node.name} returns a non-tensor")
        if (new.shape, new.dtype, new.device) != (value.shape, value.dtype, value.device):
            raise _Unsupported(f"the decomposition of {node.name} changes its output: {tuple(new.shape)} "
                               f"{new.dtype} {new.device}, recorded {tuple(value.shape)} {value.dtype} {value.device}")
        if _same_layout(new, value):
            kept.append(out)
        elif _dense(value):
            kept.append(_copy_into_layout(graph, out, value))
        else:  # an expanded or strided recorded value: no buffer of its own to copy into
            raise _Unsupported(f"the decomposition of {node.name} changes its output's layout: {new.stride()}, "
                               f"recorded {value.stride()} (not dense)")
    return kept if isinstance(result, (tuple, list)) else kept[0]


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly once (a permuted contiguous tensor):
    a buffer of these strides can be allocated and written."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _copy_into_layout(graph: fx.Graph, out: fx.Node, value: torch.Tensor) -> fx.Node:
    """``out``'s values in a new tensor of ``value``'s shape and strides (a functional
    ``copy`` into ``empty_strided``; Inductor keeps a copy between different layouts)."""
    empty = graph.call_function(torch.ops.aten.empty_strided.default, (list(value.shape), list(value.stride())),
                                {"dtype": value.dtype, "device": value.device})
    empty.meta["val"] = value.new_empty_strided(value.shape, value.stride())
    copy = graph.call_function(torch.ops.aten.copy.default, (empty, out))
    copy.meta["val"] = value
    return copy


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The stride of a dimension of size 1 is never used to address an element (a kernel
    # may record any value there), so only the others must agree.
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


__all__ = ["decompose", "whole_graph"]
