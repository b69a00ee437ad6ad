"""The weights a compiled graph froze: one storage per weight, and the weight-change contract.

Freezing turns the model's parameters (and unmutated buffers) into constants of the graph,
so that passes can concatenate (Q/K/V, gate/up), re-lay out (GPT-2's ``Conv1D``),
quantize or shard them. Two things must then hold (DESIGN.md, "Memory"):

- **Each weight is held once.** A pass whose new constant is only a re-arrangement of the
  originals (a concatenation, a transpose, a shard) makes it *the* storage: the user's
  parameters are rebound (``p.data = view``) as views into it, and the originals' memory
  is freed. Peak memory stays at eager's plus one group of weights during compilation.
- **A change to a weight never leaves the graph silently on old values.** In-place writes
  to a weight whose storage the graph reads (``p.copy_``, ``p.data.copy_``,
  ``load_state_dict``) reach the graph: nothing to do. A weight whose *value* the compiler
  consumed (quantized, or read to prove a mask causal) is *derived*: an in-place write
  through the parameter bumps its version counter and the next call raises. Replacing a
  weight (``p.data = new``, ``module.weight = nn.Parameter(new)``, ``model.to(...)``) is
  detected at the next call by comparing its data pointer with the one recorded at
  compile time, and raises.

  Not detectable without reading the weights at every call: an in-place write through
  ``p.data`` (which bypasses the version counter) to a *derived* weight. README "Frozen
  weights" documents it; quantizing before compiling (``llmopt.quantize_``) avoids it.
- **A weight replaced by a derived constant is released** (``weight_release``, on by
  default): once only its quantized copy or its shard is read, its storage is resized to
  0 bytes and recompiles take the derived constant from a cache.

The API a pass uses (the ledger lives in ``gm.meta``, so passes need no new argument):

- :func:`note_read` — called by ``graph.constant_value``: the pass consumes the value of a
  constant, so the weights behind it become derived (in-place writes raise);
- :func:`share_storage` — "this new constant replaces these constants; each of them is
  this view of it": the weights behind them are rebound as views and stay writable. A
  pass reads the values it re-arranges with ``constant_value(..., layout_only=True)``.
- :func:`reusable_storage` — when the members already are adjacent views of one storage
  (a recompile of a model whose weights an earlier compile merged), the merged constant is
  that storage again: no copy, and every compiled graph reads the same memory.

The backend builds the ledger when freezing (:meth:`FrozenWeights.add`), seals it after
the passes (:meth:`FrozenWeights.seal`) and checks it at each call
(:meth:`FrozenWeights.checker`): a ``data_ptr`` comparison per weight plus a version
comparison per derived weight: about 0.2 us per weight (README "Frozen weights").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .compat import real_tensor_mode
from .weight_release import OPT_OUT, ReaderToken, ReleasedWeightError, layout, released, storage_nbytes

LEDGER_KEY = "llmopt_frozen_weights"

RECOMPILE_HINT = (
    "Recompile after changing weights: call torch.compiler.reset() and call the compiled "
    "model again, or compile with options={'freeze': False} to read the weights at every call."
)

ViewFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FrozenWeight:
    """One user tensor (parameter or buffer) that the graph holds as a constant."""

    index: int  # position among the compiled graph's call inputs
    name: str  # where it lives in the model (``model.layers.0.self_attn.q_proj.weight``)
    tensor: torch.Tensor  # the user's tensor object, passed again at every call
    derived: str | None = None  # why in-place writes cannot reach the graph, or None
    data_ptr: int = 0
    version: int = 0
    alias: torch.Tensor | None = None  # keeps the recorded storage (and its address) alive


@dataclass
class FrozenWeights:
    """The ledger of one compiled graph: its frozen weights and which constant holds each."""

    weights: list[FrozenWeight] = field(default_factory=list)
    # constant attribute name -> [(weight number, view of the constant that *is* the weight)]
    views: dict[str, list[tuple[int, ViewFn]]] = field(default_factory=dict)
    # this graph in the registry of in-place readers (weight_release): kept alive by its call
    reader: ReaderToken = field(default_factory=ReaderToken)

    def add(self, index: int, name: str, tensor: torch.Tensor, constant: str) -> None:
        self.views[constant] = [(len(self.weights), _identity)]
        self.weights.append(FrozenWeight(index, name, tensor))

    def seal(self) -> dict[str, int]:
        """Record what the checks compare against; returns counts for the report."""
        with real_tensor_mode():
            for w in self.weights:
                w.data_ptr = w.tensor.data_ptr()
                w.version = w.tensor._version
                w.alias = w.tensor.detach()
        derived = sum(w.derived is not None for w in self.weights)
        return {"frozen": len(self.weights), "shared": len(self.weights) - derived, "derived": derived}

    def checker(self) -> Callable[[Sequence], None]:
        """The per-call check: raises when a weight was replaced, or a derived one modified."""
        # The data pointer alone decides "replaced": a new tensor object over the same
        # storage (``nn.Parameter(p.data)``) is the memory the graph reads, so it is fine.
        every = tuple((w.index, w.data_ptr) for w in self.weights)
        # A derived weight's version counter belongs to the tensor object: a new object
        # would restart it, so there the object must be the same too.
        derived = tuple((w.index, w.tensor, w.version) for w in self.weights if w.derived is not None)
        by_index = {w.index: w for w in self.weights}

        def check(args: Sequence) -> None:
            for i, ptr in every:
                if args[i].data_ptr() != ptr:
                    raise _replaced(by_index[i], args[i])
            for i, tensor, version in derived:
                if args[i] is not tensor:
                    raise _replaced(by_index[i], args[i])
                if args[i]._version != version:
                    raise _modified(by_index[i])

        return check


def ledger(gm: torch.fx.GraphModule) -> FrozenWeights | None:
    return getattr(gm, "meta", {}).get(LEDGER_KEY)


def attach(gm: torch.fx.GraphModule, weights: FrozenWeights) -> None:
    gm.meta[LEDGER_KEY] = weights


def note_read(gm: torch.fx.GraphModule, constant: str, why: str = "") -> None:
    """The compiler consumes the value of ``constant``: the weights it holds are derived."""
    led = ledger(gm)
    if led is None:
        return
    for number, _ in led.views.get(constant, ()):
        weight = led.weights[number]
        if weight.derived is None:
            weight.derived = why or "the compiled graph uses a value computed from it at compile time"


def share_storage(gm: torch.fx.GraphModule, new: str, parts: Sequence[tuple[str, ViewFn]],
                  fill: Callable[[int], None] | None = None) -> int:
    """The constant ``new`` replaces the constants ``parts[i][0]``, each equal to
    ``parts[i][1](new)``: rebind the user's tensors behind them as views into ``new`` and
    point the old constants there too, so their memory is freed. Returns how many user
    tensors were rebound.

    ``fill(i)``, when given, writes part ``i``'s values into ``new``; it is called just
    before part ``i`` is rebound, after part ``i - 1``'s old storage lost its last
    reference here. A caller that builds ``new`` this way and keeps no reference of its own
    to the parts holds at most one part twice, never the whole of ``new`` (docs/memory.md)."""
    led = ledger(gm)
    if led is None:
        for i in range(len(parts) if fill is not None else 0):
            fill(i)
        return 0
    with real_tensor_mode():
        return _share_storage(gm, led, new, parts, fill)


def _share_storage(gm, led: FrozenWeights, new: str, parts, fill: Callable[[int], None] | None = None) -> int:
    storage = _attr(gm, new)
    rebound = 0
    seen: set[int] = set()
    for i, (old, part) in enumerate(parts):
        old_value = None  # the previous part's old constant: its last reference in this frame
        if fill is not None:
            fill(i)
        if old == new:
            continue
        old_value = _attr(gm, old)
        if old_value is None:
            continue
        piece = layout(part, storage)
        if piece.shape != old_value.shape or piece.dtype != old_value.dtype:
            raise ValueError(f"share_storage: {old} is {tuple(old_value.shape)}, its view of {new} is {tuple(piece.shape)}")
        for number, view in led.views.get(old, ()):
            tensor = led.weights[number].tensor
            # Compose: the weight is view(old constant) and old constant = part(new).
            fn = _compose(view, part)
            value = layout(fn, storage)
            if released(tensor) is not None and tensor.untyped_storage() is not storage.untyped_storage():
                # The values are gone: a copy of them would be garbage (weight_release).
                raise ReleasedWeightError(
                    f"llmopt: {led.weights[number].name} was released after an earlier compile and cannot be "
                    f"re-arranged into {new}; call torch.compiler.reset() and reload the model, or {OPT_OUT}")
            if value.shape != tensor.shape or value.dtype != tensor.dtype or value.device != tensor.device:
                raise ValueError(f"share_storage: {led.weights[number].name} would change shape or dtype")
            if number in seen:
                # The same weight twice in ``new`` (a group reading one tensor twice): it can
                # be a view of one place only, so the other copy would go stale.
                led.weights[number].derived = f"the compiled graph holds it twice ({new})"
                continue
            seen.add(number)
            if value.stride() != tensor.stride():
                # Dynamo guards parameter strides: a view with other strides would fail the
                # guards of the frame being compiled. Keep the original; the new constant is
                # then a copy of it.
                if led.weights[number].derived is None:
                    led.weights[number].derived = f"the compiled graph reads a re-laid-out copy of it ({new})"
                continue
            tensor.data = value
            led.views.setdefault(new, []).append((number, fn))
            rebound += 1
        _set_attr(gm, old, piece)
    return rebound


def alias_constant(gm: torch.fx.GraphModule, new: str, old: str, inverse: ViewFn) -> None:
    """The constant ``new`` is a view of the constant ``old`` (no copy), and
    ``inverse(new)`` gives ``old`` back: the weights behind ``old`` are held by ``new`` too."""
    led = ledger(gm)
    if led is None:
        return
    for number, view in led.views.get(old, ()):
        led.views.setdefault(new, []).append((number, _compose(view, inverse)))


def reusable_storage(members: Sequence[torch.Tensor | None], widths: Sequence[int]) -> torch.Tensor | None:
    """The concatenation along dim 0 of ``members`` as a view, when they already are
    contiguous, adjacent pieces of one storage (an earlier compile merged them); ``None``
    members are gaps of ``widths[i]`` rows that must hold zeros. None when a copy is needed."""
    present = [(m, sum(widths[:i])) for i, m in enumerate(members) if m is not None]
    if not present:
        return None
    first, start = present[0]
    if first.device.type == "meta" or not first.is_contiguous():
        return None
    row = math.prod(first.shape[1:])  # not first[0]: no view of a released weight (weight_release)
    base = first.storage_offset() - start * row
    storage = first.untyped_storage()
    total = sum(widths)
    shape = (total, *first.shape[1:])
    if base < 0 or (base + total * row) * first.element_size() > storage_nbytes(first):
        return None
    for m, offset in present:
        if (
            not m.is_contiguous()
            or m.dtype != first.dtype
            or m.shape[1:] != first.shape[1:]
            or m.untyped_storage().data_ptr() != storage.data_ptr()
            or m.storage_offset() != base + offset * row
        ):
            return None
    # A storage released after an earlier compile (weight_release) has no values: the view
    # is built in a layout window, and gaps cannot be proven zero.
    merged = layout(lambda t: t.new_empty(0).set_(storage, base, shape, _contiguous_strides(shape)), first)
    if released(first) is not None:
        return None if len(present) < len(members) else merged
    for i, m in enumerate(members):
        if m is None and bool(merged.narrow(0, sum(widths[:i]), widths[i]).any()):
            return None
    return merged


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _compose(view: ViewFn, part: ViewFn) -> ViewFn:
    return lambda t: view(part(t))


def _attr(gm: torch.fx.GraphModule, name: str):
    obj = gm
    for p in name.split("."):
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def _set_attr(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> None:
    *path, last = name.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p)
    if last in owner._buffers:
        owner._buffers[last] = value
    else:
        setattr(owner, last, value)


def _replaced(w: FrozenWeight, arg) -> RuntimeError:
    how = "replaced by another tensor object" if arg is not w.tensor else "given new storage (p.data = ... or .to(...))"
    return RuntimeError(
        f"llmopt: a model weight changed after compilation: {w.name} was {how}; the compiled graph still "
        f"reads the weights it was compiled with. {RECOMPILE_HINT}"
    )


def _modified(w: FrozenWeight) -> RuntimeError:
    return RuntimeError(
        f"llmopt: a model weight changed after compilation: {w.name} was modified in place, but the "
        f"compiled graph does not read its storage ({w.derived}). {RECOMPILE_HINT}"
    )
