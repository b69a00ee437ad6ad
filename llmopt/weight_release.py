"""Releasing the float weights a compiled graph no longer reads (quantized, sharded).

Why: ``options={"quantize": "int8"}`` or ``{"tensor_parallel": ...}`` makes the graph read a
*derived* constant (the quantized weight, this rank's shard). Without a release the model
holds both: the user's float parameters and the derived copy (issue #16 item 5, #18 item 4).

What (the contract, README "Frozen weights", docs/frozen_weights.md): after the graph that
consumed a weight is built, the storage behind the weight is resized to 0 bytes, as FSDP
does for its unsharded parameters (``p.untyped_storage().resize_(0)``). The parameter
object, its shape, stride, dtype and device stay, so Dynamo's guards and llmopt's own
per-call check (frozen_weights) still hold. Afterwards:

- the compiled model works, and a **recompile** (new batch size, dynamic shape) reuses the
  derived constants from a per-storage cache (:func:`derived`), never re-reading the freed
  floats; a compile that would need the freed values (other options, a pass that reads
  them) raises :class:`ReleasedWeightError` instead of computing on garbage;
- an **eager** call of a module holding a released parameter, or its ``load_state_dict``,
  raises :class:`ReleasedWeightError` (a forward / load pre-hook installed at release);
- an in-place write through the tensor itself (``p.copy_``, ``p.data.copy_``) has no memory
  to write to: it is not allowed (it crashes the process; torch cannot check it);
- ``options={"release_weights": False}`` keeps the originals (and the older contract:
  in-place writes to a quantized weight raise at the next call).

A storage is released only when no live compiled graph reads it in place (a registry of
readers per storage, :func:`register_readers`) and every weight on it was consumed.

A product may come from several sources (quantized expert stacks, a shared expert chunked
into the expert stacks: issue #19): it is cached on each source's storage under one key
that names every source by a storage serial (:func:`storage_serial`; never reused, unlike
``id()``, and a released storage has no ``data_ptr``). A product may be a source in turn
(a rank's shard, then quantized: issue #18): once the graph reads only the last product,
the intermediate one is released like a weight, and the cache chain still serves a
recompile. The registries are weak-keyed on storage objects, which torch keeps unique per
storage (torch >= 2.1); a released storage cannot be keyed by its address.

Metadata of a released tensor can still be re-arranged (a merge that finds the members
adjacent, a transposed view): :func:`layout` regrows the storage for the duration of a
view-building function (uncommitted memory on CPU, one group on CUDA) and frees it again.
"""
from __future__ import annotations

import gc
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

OPT_OUT = "compile with options={'release_weights': False} to keep the original weights"


class ReleasedWeightError(RuntimeError):
    """A released weight (its memory freed after compilation) was needed."""


@dataclass
class Released:
    """One released storage: what it held and the constants derived from it."""

    names: list[str]
    reason: str
    nbytes: int
    # (kind, offset, shape, stride, dtype) of the source view -> the derived constant
    products: dict[tuple, Any] = field(default_factory=dict)


class ReaderToken:
    """Identity of one compiled graph in the reader registry (held by its frozen call)."""


# storage -> Released; storage -> the compiled graphs reading it in place. Weak keys: an
# entry dies with the model's storage; weak readers: a reader dies with its compiled graph.
_RELEASED: "weakref.WeakKeyDictionary[torch.UntypedStorage, Released]" = weakref.WeakKeyDictionary()
_READERS: "weakref.WeakKeyDictionary[torch.UntypedStorage, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_HOOKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
# storage -> a number never reused (weak keys: dies with the storage), for cache keys that
# name several storages: an id() or data_ptr() can come back for a new storage, and a
# released storage has no data_ptr at all.
_SERIALS: "weakref.WeakKeyDictionary[torch.UntypedStorage, int]" = weakref.WeakKeyDictionary()
_NEXT_SERIAL = itertools.count()


def storage_serial(t: torch.Tensor) -> int:
    """A number naming ``t``'s storage for as long as it lives (never reused)."""
    storage = t.untyped_storage()
    serial = _SERIALS.get(storage)
    if serial is None:
        serial = _SERIALS[storage] = next(_NEXT_SERIAL)
    return serial


def released(t: Any) -> Released | None:
    """The release record of ``t``'s storage, while it is released (0 bytes)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    record = _RELEASED.get(storage)
    return record if record is not None and storage.nbytes() == 0 else None


def check_readable(t: torch.Tensor, what: str) -> None:
    """Raise when a pass is about to read the values of a released tensor."""
    record = released(t)
    if record is not None:
        raise ReleasedWeightError(
            f"llmopt: {what} needs the values of {', '.join(record.names)}, whose memory was released after an "
            f"earlier compile ({record.reason}); call torch.compiler.reset() and reload the model, or {OPT_OUT}"
        )


def check_unoptimized_run(tensors: Iterable[Any], why: str, remedy: str) -> None:
    """Raise when a graph about to run unoptimized (the backend's fallback: ``why``) reads a
    released tensor among ``tensors``; running it would fail inside torch with a storage-size
    error, or, were the memory reused, compute on garbage. ``remedy`` says what to do."""
    records = {id(r): r for r in (released(t) for t in tensors) if r is not None}
    if records:
        names = [name for r in records.values() for name in r.names]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ReleasedWeightError(
            f"llmopt: this graph would run unoptimized ({why}), but it reads {shown}, whose memory was released "
            f"after an earlier compile ({next(iter(records.values())).reason}): {remedy}, or {OPT_OUT}"
        )


def layout(fn: Callable[..., Any], *tensors: torch.Tensor) -> Any:
    """``fn(*tensors)``, where ``fn`` only builds views: a released storage is regrown for
    the call (torch checks a view's bounds against the storage size) and freed again. The
    memory is never written or read, so on CPU it is not even committed."""
    grown = []
    for t in tensors:
        record = released(t)
        if record is not None and all(s is not t.untyped_storage() for s in grown):
            grown.append(t.untyped_storage())
            grown[-1].resize_(record.nbytes)
    try:
        return fn(*tensors)
    finally:
        for s in grown:
            s.resize_(0)


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage, as it was before a release."""
    record = released(t)
    return record.nbytes if record is not None else t.untyped_storage().nbytes()


@dataclass
class Pending:
    """Derived constants computed by one compile, waiting for :func:`release`."""

    items: list[tuple[torch.Tensor, tuple, Any, str]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # names of the weights released so far
    readers: dict[int, tuple] | None = None  # release_unread's index of get_attr nodes by storage


PENDING_KEY = "llmopt_derived_constants"


def derived(gm: torch.fx.GraphModule, nodes: "torch.fx.Node | Sequence[torch.fx.Node]", kind: tuple,
            make: Callable[..., Any], why: str) -> Any:
    """``make(*values)``: a constant derived from the values of the frozen constants
    ``nodes`` (one node: a quantized weight, a shard; several: quantized expert stacks, a
    shared expert chunked into the expert stacks); the weights behind them become derived
    (frozen_weights). The product is cached on every source storage, so a recompile reuses
    it when an earlier compile released any of them; raises when one was released without
    this product (other options, another kind)."""
    from .frozen_weights import note_read
    from .graph import constant_value

    nodes = [nodes] if isinstance(nodes, torch.fx.Node) else list(nodes)
    sources = [constant_value(gm, n, layout_only=True) for n in nodes]
    for n in nodes:
        note_read(gm, n.target, why)
    # Storage serials, not ids: the key must not match a later storage at a reused address.
    key = (kind, tuple((storage_serial(s), s.storage_offset(), tuple(s.shape), tuple(s.stride()), s.dtype)
                       for s in sources))
    records = [r for r in (released(s) for s in sources) if r is not None]
    for record in records:
        if key in record.products:
            return record.products[key]
    for s in sources:
        check_readable(s, why)
    product = make(*sources)
    pending = gm.meta.setdefault(PENDING_KEY, Pending())
    pending.items.extend((s, key, product, why) for s in sources)
    return product


def register_readers(tensors: Iterable[torch.Tensor], token: ReaderToken) -> None:
    """``token``'s graph reads these tensors' storages in place: they must not be released."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            _READERS.setdefault(t.untyped_storage(), weakref.WeakSet()).add(token)


def _read_elsewhere(storage: torch.UntypedStorage, token: ReaderToken) -> bool:
    return any(r is not token for r in _READERS.get(storage, ()))


def release(gm: torch.fx.GraphModule, weights: list, graph_tensors: list[torch.Tensor], token: ReaderToken,
            enabled: bool) -> list[str]:
    """Free the storages of frozen weights that only derived constants of this graph read.

    ``weights``: the ledger's frozen weights (``name``, ``tensor``, ``derived``);
    ``graph_tensors``: every tensor the final graph reads. Returns the released weights'
    names (with those :func:`release_unread` released during the passes); the cache
    entries move to the registry so that a recompile reuses them."""
    pending = gm.meta.pop(PENDING_KEY, None)
    register_readers(graph_tensors, token)
    for t in graph_tensors:
        check_readable(t, "the compiled graph")
    if pending is None:
        return []
    if enabled:
        read = {id(t.untyped_storage()) for t in graph_tensors}
        # Latest first: a product derived further (a shard, then quantized) is released while
        # the item naming its parent is still pending.
        for source, _, _, _ in reversed(list(pending.items)):
            _release_storage(source.untyped_storage(), weights, read, token, pending)
    return pending.released


def release_unread(gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: Any) -> None:
    """A pass stopped reading the constant ``node`` (its last user was replaced by a
    derived constant): release its storage now rather than when the graph is done, so that
    the float weights and their quantized copies are never all held at once."""
    from .frozen_weights import ledger

    pending, led = gm.meta.get(PENDING_KEY), ledger(gm)
    if node.users or pending is None or led is None or not ctx.options.release_weights:
        return
    tensor = getattr(gm, node.target, None) if "." not in node.target else None
    if not isinstance(tensor, torch.Tensor):
        return
    if pending.readers is None:
        pending.readers = _readers_by_storage(gm)
    storage = tensor.untyped_storage()
    _, nodes = pending.readers.get(id(storage), (None, ()))
    read = {id(storage)} if any(n is not node and n.users for n in nodes) else set()
    _release_storage(storage, led.weights, read, led.reader, pending)


def _readers_by_storage(gm: torch.fx.GraphModule) -> dict[int, tuple[torch.UntypedStorage, list[torch.fx.Node]]]:
    """id(storage) -> (the storage, kept alive so that its id is not reused; the get_attr
    nodes reading it): built once per compile, so that
    releasing after each of n linears is O(n), not a scan of the graph per linear. A node
    that loses its users reads nothing (checked at use). Nodes added later read new
    constants (quantized buffers); were one to read an indexed storage, the final
    :func:`release` check would raise rather than let the graph read freed memory."""
    index: dict[int, tuple[torch.UntypedStorage, list[torch.fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        obj = gm.get_submodule(n.target.rsplit(".", 1)[0]) if "." in n.target else gm
        value = getattr(obj, n.target.rsplit(".", 1)[-1], None)
        values = list(value.parameters()) + list(value.buffers()) if isinstance(value, torch.nn.Module) else [value]
        for v in values:
            if isinstance(v, torch.Tensor):
                index.setdefault(id(v.untyped_storage()), (v.untyped_storage(), []))[1].append(n)
    return index


def _release_storage(storage: torch.UntypedStorage, weights: list, read: set[int], token: ReaderToken,
                     pending: Pending) -> None:
    """Release ``storage`` when only derived constants need it; move its cache entries."""
    items = [it for it in pending.items if it[0].untyped_storage() is storage]
    if not items:
        return
    record = _RELEASED.get(storage)
    if record is None:
        if id(storage) in read or not storage.resizable() or _read_elsewhere(storage, token):
            return
        on_storage = [w for w in weights if w.tensor.untyped_storage() is storage]
        if on_storage:
            if any(w.derived is None for w in on_storage):
                return
            names = [w.name for w in on_storage]
        else:
            # No weight of the model: a derived constant that a further derivation replaced
            # (a shard, then quantized): its record lives in its parent's cache.
            names = _product_names(storage, weights, pending)
            if names is None:
                return
        record = Released(names, items[0][3], storage.nbytes())
        _RELEASED[storage] = record
        storage.resize_(0)
        if on_storage:  # a derived constant is no weight of the model: not counted
            pending.released.extend(record.names)
            _guard_modules({id(w.tensor): w.name for w in on_storage})
    for it in items:
        record.products.setdefault(it[1], it[2])
    moved = {id(it) for it in items}  # by identity: == on the tuples would compare tensors
    pending.items[:] = [it for it in pending.items if id(it) not in moved]


def _product_names(storage: torch.UntypedStorage, weights: list, pending: Pending) -> list[str] | None:
    """Names for a derived constant on ``storage`` ("<weight> (derived: why)"), or None when
    ``storage`` holds no product of this compile's derivations (then it is not ours to free)."""
    for source, _, product, why in pending.items:
        if isinstance(product, torch.Tensor) and product.untyped_storage() is storage:
            parent = source.untyped_storage()
            record = _RELEASED.get(parent)
            names = record.names if record is not None else [w.name for w in weights
                                                             if w.tensor.untyped_storage() is parent]
            return [f"a derived copy of {', '.join(names) or 'a constant'} ({why})"]
    return None


def _guard_modules(params: dict[int, str]) -> None:
    """Install the pre-hooks that explain eager use of released parameters. The backend
    sees parameter tensors, not modules, so their owners are found by one scan."""
    for obj in gc.get_objects():
        # type(), not isinstance: some objects answer isinstance through a lazy __getattr__
        if not issubclass(type(obj), torch.nn.Module) or obj in _HOOKED:
            continue
        if any(id(p) in params for p in obj._parameters.values() if p is not None):
            obj.register_forward_pre_hook(_refuse_forward)
            if hasattr(obj, "register_load_state_dict_pre_hook"):  # torch >= 2.5
                obj.register_load_state_dict_pre_hook(_refuse_load)
            _HOOKED.add(obj)


def _released_parameters(module: torch.nn.Module) -> list[Released]:
    return [r for r in (released(p) for p in module._parameters.values()) if r is not None]


def _refuse_forward(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # traced by a recompile: the graph reads the derived constants
        return
    records = _released_parameters(module)
    if records:
        raise ReleasedWeightError(
            f"llmopt: {type(module).__name__} was called eagerly, but its weights ({', '.join(records[0].names)}) "
            f"were released after torch.compile ({records[0].reason}): call the compiled model instead, or {OPT_OUT}"
        )


def _refuse_load(module: torch.nn.Module, *args: Any) -> None:
    records = _released_parameters(module)
    if records:
        raise ReleasedWeightError(
            f"llmopt: load_state_dict into {', '.join(records[0].names)}, whose memory was released after "
            f"torch.compile ({records[0].reason}); reload the model and compile it again, or {OPT_OUT}"
        )


def cached_for(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the release cache holds for these tensors' released storages: their
    derived constants (a quantized module's buffers, a shard), and those derived from them
    in turn. With the parameters and the graphs' constants, that is all a compiled model
    holds; memory tests count it (a float shard left beside its quantized copy would show)."""
    out: list[torch.Tensor] = []
    stack = [t.untyped_storage() for t in tensors if isinstance(t, torch.Tensor)]
    seen: set[int] = set()
    while stack:
        storage = stack.pop()
        record = _RELEASED.get(storage)
        if id(storage) in seen or record is None:
            continue
        seen.add(id(storage))
        for product in record.products.values():
            for t in _tensors_of(product):
                out.append(t)
                stack.append(t.untyped_storage())
    return out


def _tensors_of(product: Any) -> list[torch.Tensor]:
    if isinstance(product, torch.Tensor):
        return [product]
    if isinstance(product, torch.nn.Module):
        return [*product.parameters(), *(b for b in product.buffers() if b is not None)]
    if isinstance(product, (tuple, list)):
        return [t for p in product for t in _tensors_of(p)]
    return []


def graph_tensors(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Every tensor the graph reads through ``get_attr`` (a submodule's parameters and
    buffers included); drops the constants of ``gm`` that no node reads any more (a
    consumed float weight), so that they hold no memory and no executor sees them."""
    named = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in gm._buffers if b not in named]:
        delattr(gm, name)
    out = []
    for target in {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}:
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, torch.nn.Module):
            out.extend(obj.parameters())
            out.extend(b for b in obj.buffers() if b is not None)
    return out
