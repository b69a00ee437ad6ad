"""reinplace_kv: functionalized in-place llmopt ops on graph inputs become in-place calls again.

AOTAutograd functionalizes a custom op that mutates its arguments (``mutates_args``): a
step of the paged engine, which writes the new K/V into the layer's pools with
``llmopt::paged_kv_append``, is captured as ::

    out = auto_functionalized_v2(paged_kv_append, slot_mapping=s, k=k, v=v,
                                 _k_pool_base_index=0, _v_pool_base_index=1,
                                 _all_bases=[k_pool, v_pool])     # clones both pools
    attn = paged_attention_decode(q, out[1], out[2], ...)          # reads the clones
    ...
    copy_(k_pool, out[1]); copy_(v_pool, out[2])                   # writes them back

(``auto_functionalized`` with the pools as keyword arguments on older torch). Inductor
re-inplaces this; the ``aten`` executor (llmopt's CPU default) runs it as written: every
layer of every step clones its two pools and copies them back, O(pool) bytes for an
O(new tokens) write. This pass restores the program the user wrote::

    paged_kv_append(k_pool, v_pool, s, k, v)                       # in place, O(new tokens)
    attn = paged_attention_decode(q, k_pool, v_pool, ...)

It rewrites a node only when doing so cannot change a value the graph computes:

- the op is an llmopt op (``OpOverload`` in the ``llmopt`` namespace) whose mutable
  arguments are tensors or optional tensors (no tensor lists);
- every mutated argument is a graph input itself (``placeholder``), not a view of one,
  and each is written back by exactly one ``copy_(input, result)`` of the matching output
  (or of the last link of a chain, see below);
- every user of the functional node is a ``getitem`` of it (so each output is accounted
  for);
- no node between the functional op and the last of its write-backs reads the input or a
  view of it (shape queries excepted). Moving the write from the ``copy_`` to the op is
  visible only to such a reader: readers before the op run before either write, readers
  after the ``copy_`` see the written value either way, and the functional result equals
  the input once written. Any other case is left functional with a near-miss saying why.

Two more shapes are handled. A chain: several ops mutate the same input in turn (every
layer's ``paged_attention_decode`` writes the step's one split workspace), captured as
``af_1(_all_bases=[ws])``, ``af_2(_all_bases=[af_1's new ws])``, ..., ``copy_(ws, af_L's)``.
When each link's new value is read only by the next link, as the tensor it mutates, no node
sees an intermediate value, so the first link runs in place on the input (the second then
mutates the input itself: the single-op case, and so on). An optional mutable argument left
None (``Tensor(a!)?``): nothing is mutated, the wrapper becomes the plain call.

The same rewrite is Inductor's ``reinplace`` for ``auto_functionalized`` (it clones only
the bases that are read later); here no base may be read later, so none is cloned.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# Queries of a tensor's metadata, not of its data: they may sit anywhere.
_METADATA_OPS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}


def _functionalized_targets() -> dict:
    """The higher-order ops that wrap a functionalized mutable op on this torch, by kind
    ("v1": mutated tensors as keyword arguments; "v2": as ``_all_bases`` + indices)."""
    out = {}
    for name, kind in (("auto_functionalized", "v1"), ("auto_functionalized_v2", "v2")):
        try:
            out[getattr(torch.ops.higher_order, name)] = kind
        except AttributeError:  # this torch has no such op
            continue
    return out


def run(gm: fx.GraphModule, ctx) -> int:
    targets = _functionalized_targets()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(gm.graph.nodes):
        kind = targets.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        op = node.args[0] if node.args else None
        if getattr(op, "namespace", None) != "llmopt" or not hasattr(op, "_schema"):
            continue  # another library's op: not ours to reason about
        plan, reason = _plan(node, op, kind, order, targets)
        if reason:
            ctx.near_miss(node, f"{op.name()}: {reason}; left functional (its mutated inputs are copied at each call)")
            continue
        new = _rewrite(gm, node, op, plan)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        inputs = ", ".join(p.name for p in plan["inputs"].values())
        if inputs:
            ctx.rewrite(new, f"{op.name()} in place on graph input(s) {inputs}: no clone, no copy_ back")
        else:
            ctx.rewrite(new, f"{op.name()}: its optional mutable arguments are None: the plain call")
        count += 1
    if count:
        ctx.report.notes.append(f"reinplace_kv: {count} functionalized llmopt op(s) run in place on their inputs")
    return count


def _is_tensor_or_optional(t) -> bool:
    return isinstance(t, torch.TensorType) or (
        isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.TensorType))


def _mutable_arguments(op) -> list:
    return [a for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def _plan(node: fx.Node, op, kind: str, order: dict, targets: dict) -> tuple[dict | None, str | None]:
    """What the rewrite needs (mutated argument -> input placeholder, its result index, its
    write-back), or the reason it is not safe."""
    schema = op._schema
    mutable = _mutable_arguments(op)
    if not mutable:
        return None, "no mutable argument in the schema"
    if any(not _is_tensor_or_optional(a.type) for a in mutable):
        return None, "a mutable argument is not a single tensor (tensor lists are not handled)"
    if any(not isinstance(a.type, torch.TensorType) for a in schema.returns):
        return None, "the op returns something other than tensors"
    n_outputs = max(1, len(schema.returns))  # a None-returning op still fills slot 0

    inputs: dict[str, fx.Node] = {}  # mutable argument name -> the placeholder it writes
    result_index: dict[fx.Node, int] = {}  # placeholder -> index of its new value in the output tuple
    if kind == "v1":
        given = 0
        for i, arg in enumerate(mutable):
            base = node.kwargs.get(arg.name)
            if base is None and isinstance(arg.type, torch.OptionalType):
                continue  # an optional mutable argument left out: nothing is written
            if not isinstance(base, fx.Node):
                return None, f"mutable argument {arg.name} is not a graph value"
            given += 1
            inputs[arg.name] = base
            result_index[base] = n_outputs + i
        if len(result_index) != given:
            return None, "the same tensor is passed as two mutable arguments"
    else:
        bases = node.kwargs.get("_all_bases")
        if not isinstance(bases, (list, tuple)) or not all(isinstance(b, fx.Node) for b in bases):
            return None, "unexpected _all_bases"
        view_keys = ("_alias", "_size", "_stride", "_storage_offset", "_slice_dim")
        for arg in mutable:
            index = node.kwargs.get(f"_{arg.name}_base_index")
            if index is None and isinstance(arg.type, torch.OptionalType):
                continue  # an optional mutable argument left out: nothing is written
            if not isinstance(index, int) or not 0 <= index < len(bases):
                return None, f"mutable argument {arg.name} has no base"
            if any(f"_{arg.name}{key}" in node.kwargs for key in view_keys):
                return None, f"mutable argument {arg.name} is a view of a graph input, not the input itself"
            inputs[arg.name] = bases[index]
        for i, base in enumerate(bases):
            result_index.setdefault(base, n_outputs + i)
        if len(set(bases)) != len(bases):
            return None, "the same tensor appears twice among the bases"

    for name, base in inputs.items():
        if base.op != "placeholder":
            return None, f"mutable argument {name} ({base.name}) is not a graph input"

    # every output is read through getitem; map each result index to its getitem nodes
    getitems: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
            return None, f"its result is used by {user.name} other than by indexing"
        getitems.setdefault(user.args[1], []).append(user)
    if not schema.returns and any(u.users for u in getitems.get(0, [])):
        return None, "the None result of the op is used"

    write_backs: dict[fx.Node, fx.Node] = {}  # input -> its copy_ from this op's result
    last_writes: dict[fx.Node, fx.Node] = {}  # input -> the copy_ that ends its chain of writes
    for base, index in result_index.items():
        results = getitems.get(index, [])
        copies = [u for r in results for u in r.users if _is_copy_into(u, base, r)]
        all_copies = [u for u in base.users if u.op == "call_function" and u.target == aten.copy_.default
                      and u.args[0] is base]
        if len(all_copies) != 1:
            return None, (f"input {base.name} is not written back exactly once from this op's result "
                          f"({len(all_copies)} copy_ into it)")
        if len(copies) == 1:
            write_backs[base] = last_writes[base] = copies[0]
            continue
        end = _chain_write_back(results, base, targets)
        if end is None:
            return None, (f"the new value of input {base.name} is neither copied back into it nor passed, "
                          "unread by any other node, to the next llmopt op mutating it")
        last_writes[base] = end

    if last_writes:
        last = max(order[c] for c in last_writes.values())
        for base in result_index:
            reader = _read_between(base, node, order, order[node], last, set(last_writes.values()))
            if reader is not None:
                return None, (f"{reader.name} reads input {base.name} between the op and its write-back "
                              "(it would see the new value early)")
    return {"inputs": inputs, "result_index": result_index, "getitems": getitems,
            "write_backs": write_backs, "n_outputs": n_outputs}, None


def _chain_write_back(results: list, base: fx.Node, targets: dict) -> fx.Node | None:
    """The ``copy_`` into ``base`` that ends a chain of functionalized llmopt ops each
    mutating the previous one's new value of ``base`` (several layers writing one shared
    workspace), or None when the chain has another reader or shape.

    Each link's new value must be read by the next link only, as the tensor it mutates, so
    no node ever sees an intermediate value: running the first link in place on ``base``
    changes what no other node reads (the next link then mutates ``base`` itself)."""
    if len(results) != 1:
        return None
    value = results[0]
    for _ in range(len(base.graph.nodes)):
        users = list(value.users)
        if len(users) != 1:
            return None
        user = users[0]
        if _is_copy_into(user, base, value):
            return user
        kind = targets.get(user.target) if user.op == "call_function" else None
        op = user.args[0] if kind and user.args else None
        if getattr(op, "namespace", None) != "llmopt" or not hasattr(op, "_schema"):
            return None
        n_outputs = max(1, len(op._schema.returns))
        mutable = _mutable_arguments(op)
        if kind == "v1":
            slots = [n_outputs + i for i, a in enumerate(mutable) if user.kwargs.get(a.name) is value]
            others = [v for k, v in user.kwargs.items() if v is value and k not in {a.name for a in mutable}]
        else:
            bases = user.kwargs.get("_all_bases") or []
            slots = [n_outputs + i for i, b in enumerate(bases) if b is value]
            others = [v for k, v in user.kwargs.items() if v is value]
        if len(slots) != 1 or others or value in user.args:
            return None  # read as a plain argument too, or mutated twice: not a link
        nexts = [u for u in user.users if u.op == "call_function" and u.target is operator.getitem
                 and u.args[1] == slots[0]]
        if len(nexts) != 1:
            return None
        value = nexts[0]
    return None


def _is_copy_into(node: fx.Node, base: fx.Node, result: fx.Node) -> bool:
    return (node.op == "call_function" and node.target == aten.copy_.default
            and node.args[0] is base and node.args[1] is result)


def _is_view(node: fx.Node) -> bool:
    """A node whose result aliases its input: a view op (its schema says so), an element of
    a list of views (``getitem`` of ``split``), or ``_unsafe_view`` (a view whose schema
    does not say so)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem or node.target == aten._unsafe_view.default:
        return True
    schema = getattr(node.target, "_schema", None)
    return (schema is not None and bool(schema.returns)
            and schema.returns[0].alias_info is not None and not schema.returns[0].alias_info.is_write)


def _read_between(base: fx.Node, fnode: fx.Node, order: dict, start: int, stop: int, allowed: set) -> fx.Node | None:
    """A node strictly between positions ``start`` and ``stop`` that reads ``base`` or a view
    of it (``fnode`` and the write-backs excepted), else None."""
    aliases, stack = {base}, [base]
    while stack:  # views of the input, transitively: reading one reads the input
        for user in stack.pop().users:
            if user not in aliases and _is_view(user):
                aliases.add(user)
                stack.append(user)
    for alias in aliases:
        for user in alias.users:
            if user is fnode or user in allowed or user in aliases:
                continue
            if user.op == "call_function" and user.target in _METADATA_OPS:
                continue
            if start < order[user] < stop:
                return user
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, op, plan: dict) -> fx.Node:
    g = gm.graph
    kwargs = {}
    for arg in op._schema.arguments:
        if arg.name in plan["inputs"]:
            kwargs[arg.name] = plan["inputs"][arg.name]
        elif arg.name in node.kwargs:
            kwargs[arg.name] = node.kwargs[arg.name]
    with g.inserting_before(node):
        new = g.call_function(op, (), kwargs)
    new.meta = {k: v for k, v in node.meta.items() if k != "val"}
    returns = op._schema.returns
    val = node.meta.get("val")
    if len(returns) == 0:
        new.meta["val"] = None
    elif isinstance(val, (tuple, list)):
        new.meta["val"] = val[0] if len(returns) == 1 else tuple(val[: len(returns)])

    for copy in plan["write_backs"].values():
        g.erase_node(copy)
    for index, users in plan["getitems"].items():
        for getitem in users:
            if index >= plan["n_outputs"]:  # the new value of an input: the input itself now
                base = next(b for b, i in plan["result_index"].items() if i == index)
                getitem.replace_all_uses_with(base)
            elif len(returns) == 1:
                getitem.replace_all_uses_with(new)
            elif len(returns) > 1:
                getitem.args = (new, index)
                continue
            g.erase_node(getitem)
    g.erase_node(node)
    return new
