"""Mask proofs: what a mask means, proven at compile time, never assumed.

``MaskAnalysis`` turns the mask of one attention (given to SDPA, or applied to the scores
of eager attention) into a :class:`MaskPlan`: the kernel's ``causal``/``window``/
``q_offset`` arguments plus whatever mask is left to pass to it.

- The mask condition is split into its AND factors (``bitwise_and``/``logical_and``,
  broadcast ``expand`` looked through). Factors that depend only on constants (``arange``
  comparisons of Hugging Face ``masking_utils``, a frozen ``tril`` buffer sliced as in
  GPT-2's ``bias[:, :, k-q:k, :k]``) are *evaluated* with real tensors at compile time and
  the result is compared element by element with the kernel's own position rule
  ``j <= i + off`` (``off`` becomes ``q_offsets`` when not 0) and ``i + off - j < window``
  (:func:`fit_positions`); an all-true factor disappears. Factors that depend on graph
  inputs (a padding ``attention_mask``, a static cache's mask) stay a mask passed to the
  kernel.
- "Hard" masks (bool, ``where(cond, 0, -inf)``, ``masked_fill(-inf)``) keep exact
  semantics with any split, so proven factors become ``causal``/``window`` and the rest
  a bool mask. "Soft" masks (a finite fill such as ``finfo.min``, as HF eager uses) give
  a row whose keys are all masked a uniform softmax; one is dropped only when no factor
  depends on inputs and every row provably keeps a key, else the additive mask is passed
  as is (correct; the kernel treats finite values as a bias).
- Any other additive float mask is passed through unchanged.

Source: Hugging Face transformers' ``masking_utils`` (causal, sliding-window and padding
masks) and GPT-2's ``bias`` buffer.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ...graph import constant_value, real_tensors, statically_equal, tensor_meta
from .operands import scalar_value

aten = torch.ops.aten

AND_OPS = (aten.bitwise_and.Tensor, aten.logical_and.default)
NOT_OPS = (aten.bitwise_not.default, aten.logical_not.default)
# A constant mask is evaluated at compile time only up to this many elements.
MAX_CONSTANT_NUMEL = 1 << 22


@dataclass
class MaskPlan:
    """How the kernel's mask arguments are built from the graph's mask.

    ``expr`` is a small tree over existing nodes, materialized only when the rewrite is
    emitted: ``("node", n)``, ``("not", n)``, ``("and", [expr, ...])``,
    ``("where_float", cond_expr, fill)`` (an additive mask: 0 where ``cond``, ``fill``
    elsewhere) or ``("where_bias", cond_expr, bias_node, fill)``.
    """

    expr: Any = None
    causal: bool = False
    window: int = 0
    q_offset: int = 0
    what: str = "no mask"


class MaskAnalysis:
    """Proves what a mask means; evaluations of constant mask subgraphs are cached (every
    layer of a model usually shares one mask)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._values: dict[fx.Node, torch.Tensor | None] = {}

    # -- entry points -------------------------------------------------------------------
    def additive_or_bool(self, mask: fx.Node, target: tuple) -> MaskPlan | str:
        """A mask given to SDPA or added to the scores: bool (True = attend) or float."""
        mv = tensor_meta(mask)
        if mv is None:
            return "mask has no tensor metadata"
        if not _broadcastable(mv, target):
            return f"mask {tuple(mv.shape)} does not broadcast to the scores {list(target)}"
        if mv.dtype == torch.bool:
            return self.condition(("node", mask), target, hard=True, original=("node", mask))
        if not mv.is_floating_point():
            return f"mask of dtype {mv.dtype}"
        value = self.constant(mask)
        if value is not None:
            with real_tensors():
                return self._constant_additive(mask, value, target)
        source = _strip_broadcast(mask)
        if source.target == aten.where.self:
            cond, a, b = source.args[:3]
            zero, fill = scalar_value(a), scalar_value(b)
            if zero == 0.0 and fill is not None and fill < 0:
                return self.condition(("node", cond), target, hard=fill == -math.inf, original=("node", mask), fill=fill)
        return MaskPlan(expr=("node", mask), what="mask: additive, passed through")

    def combine_eager(self, terms: list[tuple], target: tuple) -> MaskPlan | str:
        if not terms:
            return MaskPlan()
        if len(terms) == 1 and terms[0][0] == "add":
            return self.additive_or_bool(terms[0][1], target)
        if len(terms) == 1:
            _, cond, fill = terms[0]
            if fill >= 0 or math.isnan(fill):
                return f"masked scores are filled with {fill}, not a large negative value"
            original = ("where_float", cond, fill)
            return self.condition(cond, target, hard=fill == -math.inf, original=original, fill=fill)
        if len(terms) == 2 and terms[0][0] == "where" and terms[1][0] == "add":
            # GPT-2 (pre-masking_utils): where(causal_buffer, s, min) + attention_mask.
            _, cond, fill = terms[0]
            bias = terms[1][1]
            bv = tensor_meta(bias)
            if bv is None or not bv.is_floating_point() or not _broadcastable(bv, target):
                return "additive mask after where() is not a broadcastable float tensor"
            if fill >= 0 or math.isnan(fill):
                return f"masked scores are filled with {fill}, not a large negative value"
            plan = self.condition(cond, target, hard=True, original=("where_bias", cond, bias, fill), fill=fill)
            if isinstance(plan, str):
                return plan
            if plan.expr is None:
                plan.expr, plan.what = ("node", bias), plan.what + ", additive mask kept"
                return plan
            # Not fully proven: one float mask, the bias where attended, the fill elsewhere.
            return MaskPlan(expr=("where_bias", cond, bias, fill), what="mask: condition and additive mask combined")
        return "unsupported combination of masking operations"

    def condition(self, cond: tuple, target: tuple, hard: bool, original: tuple, fill: float = -math.inf) -> MaskPlan | str:
        """Plan for "attend where ``cond``" (the rest masked with ``fill``).

        hard: masked keys are excluded exactly (bool / -inf), so the condition may be split
        into proven position rules and a remaining bool mask. Otherwise (a finite fill) the
        mask is dropped only when it is entirely a position rule that leaves every row a key.
        """
        factors = self._factors(cond)
        constant: torch.Tensor | None = None
        opaque: list[tuple] = []
        pattern = None
        with real_tensors():
            for f in factors:
                value = self._value(f)
                if value is None:
                    opaque.append(f)
                else:
                    constant = value if constant is None else constant & value
            if constant is not None:
                pattern = fit_positions(constant, target)
        if constant is not None:
            if pattern is None:  # a constant that is no position rule stays in the mask
                if not hard:
                    return self._passthrough(original)
                return MaskPlan(expr=_conjunction(factors), what="mask: bool (constant, not a position rule)")
        plan, notes = MaskPlan(), []
        if pattern is not None and pattern[0] == "causal":
            _, off, window, nonempty = pattern
            if (not hard and (opaque or not nonempty)) or (off and not isinstance(target[0], int)):
                return self._passthrough(original)
            plan.causal, plan.q_offset, plan.window = True, off, window
            notes.append(_position_rule_text(off, window, target))
        elif pattern is not None:
            notes.append("constant all-true part dropped")
        if opaque:
            if not hard:
                return self._passthrough(original)
            plan.expr = _conjunction(opaque)
            notes.append("bool mask" + (" for the input-dependent part" if pattern is not None else ""))
        plan.what = "mask: " + ", ".join(notes)
        return plan

    def _constant_additive(self, mask: fx.Node, value: torch.Tensor, target: tuple) -> MaskPlan:
        """A float mask that is a compile-time constant: 0 where attended, one negative fill
        elsewhere, is a position rule when it fits one."""
        masked = value[value != 0]
        fills = masked.unique() if masked.numel() else masked
        if fills.numel() > 1 or (fills.numel() == 1 and not float(fills[0]) < 0):
            return self._passthrough(("node", mask))
        hard = fills.numel() == 0 or float(fills[0]) == -math.inf
        pattern = fit_positions(value == 0, target)
        if pattern is None:
            return self._passthrough(("node", mask))
        if pattern[0] == "all":
            return MaskPlan(what="mask: constant all-zero, dropped")
        _, off, window, nonempty = pattern
        if (not hard and not nonempty) or (off and not isinstance(target[0], int)):
            return self._passthrough(("node", mask))
        what = "mask: constant, " + _position_rule_text(off, window, target)
        return MaskPlan(causal=True, q_offset=off, window=window, what=what)

    def _passthrough(self, original: tuple) -> MaskPlan:
        if original[0] == "node":
            return MaskPlan(expr=original, what="mask: passed through (not proven)")
        return MaskPlan(expr=original, what="mask: condition passed as an additive mask (not proven)")

    # -- factors and constants -------------------------------------------------------------
    def _factors(self, cond: tuple) -> list[tuple]:
        kind, node = cond
        if kind == "node":
            node = _strip_broadcast(node)
            if node.target in AND_OPS:
                return [f for a in node.args[:2] for f in self._factors(("node", a))]
            if node.target in NOT_OPS:
                return [("not", node.args[0])]
            return [("node", node)]
        inner = _strip_broadcast(node)
        if inner.target in NOT_OPS:
            return self._factors(("node", inner.args[0]))
        return [("not", inner)]

    def _value(self, factor: tuple) -> torch.Tensor | None:
        kind, node = factor
        value = self.constant(node)
        if value is None or value.dtype != torch.bool:
            return None
        return ~value if kind == "not" else value

    def constant(self, node: Any) -> torch.Tensor | None:
        """The real value of ``node`` when it depends only on constants (frozen buffers,
        arange, scalars) and has static shapes; None otherwise. Evaluated once."""
        if not isinstance(node, fx.Node):
            return None
        if node in self._values:
            return self._values[node]
        self._values[node] = None  # cycles cannot happen; this also caps re-entry
        value = self._evaluate(node)
        self._values[node] = value
        return value

    def _evaluate(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            value = constant_value(self.gm, node)
            return value if isinstance(value, torch.Tensor) else None
        if node.op != "call_function":
            return None
        v = tensor_meta(node)
        if v is None or any(not isinstance(s, int) for s in v.shape) or v.numel() > MAX_CONSTANT_NUMEL:
            return None
        target = node.target
        if target is not operator.getitem:
            schema = getattr(target, "_schema", None)
            if schema is None or schema.is_mutable:
                return None
            if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
                return None
        ok = True

        def load(a):
            nonlocal ok
            if isinstance(a, fx.Node):
                value = self.constant(a)
                if value is None:
                    ok = False
                return value
            if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                ok = False
            return a

        args = fx.node.map_aggregate(node.args, load)
        kwargs = fx.node.map_aggregate(node.kwargs, load)
        if not ok:
            return None
        with real_tensors():
            out = target(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else None


def fit_positions(value: torch.Tensor, target: tuple):
    """Classify a constant "may attend" tensor against the kernel's position rule.

    ("all",) when every entry is True; ("causal", off, window, rows_nonempty) when, for every
    batch and head, ``allowed[i, j] == (j <= i + off) and (window == 0 or i + off - j < window)``;
    None otherwise.
    """
    if value.dim() > 4:
        return None
    if bool(value.all()):
        return ("all",)
    sq, skv = target[2], target[3]
    if not (isinstance(sq, int) and isinstance(skv, int)):
        return None
    m = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    if m.shape[2] not in (1, sq) or m.shape[3] not in (1, skv):
        return None
    m = m.expand(m.shape[0], m.shape[1], sq, skv).cpu()
    first = m[0, 0]
    if not bool((m == first).all()):
        return None
    rows = torch.arange(sq)[:, None]
    cols = torch.arange(skv)[None, :]
    # off: from a row whose last allowed key is before the end (else the rule never binds).
    off = skv - 1
    for i in range(sq):
        allowed = first[i].nonzero()
        if allowed.numel() and int(allowed[-1]) < skv - 1:
            off = int(allowed[-1]) - i
            break
    window = 0
    for i in range(sq):
        allowed = first[i].nonzero()
        if allowed.numel() and int(allowed[0]) > 0:
            window = i + off - int(allowed[0]) + 1
            break
    expected = cols <= rows + off
    if window > 0:
        expected = expected & ((rows + off - cols) < window)
    if not bool((expected == first).all()):
        return None
    return ("causal", off, window, bool(first.any(dim=-1).all()))


def _position_rule_text(off: int, window: int, target: tuple) -> str:
    """What a proven position rule is, for the report. ``j <= i + off`` never binds when
    ``off >= Skv - 1`` (e.g. an anti-causal ``triu`` mask is exactly the window rule with
    the causal bound out of reach): then it is not called causal."""
    skv = target[3]
    if window and isinstance(skv, int) and off >= skv - 1:
        return f"proven window {window} (no upper bound on the keys)"
    return "proven causal" + (f" + window {window}" if window else "")


def _conjunction(factors: list[tuple]) -> tuple:
    return factors[0] if len(factors) == 1 else ("and", factors)


def _strip_broadcast(node: fx.Node) -> fx.Node:
    """Look through ``expand`` (a broadcast never changes a mask's meaning)."""
    while isinstance(node, fx.Node) and node.target == aten.expand.default:
        node = node.args[0]
    return node


def _broadcastable(v, target: tuple) -> bool:
    if v.dim() > 4:
        return False
    for m, t in zip(reversed(v.shape), reversed(target)):
        if not (statically_equal(m, 1) or statically_equal(m, t)):
            return False
    return True
