"""CompileReport: what llmopt did to one compiled graph, and why it did not do more.

Every graph the backend compiles gets a report: node counts and op histograms before and
after the passes, per-pass rewrite counts and time, each rewrite and each near-miss with
the model layer it hit, fallbacks (a pass that failed, an executor that could not be
used, a dtype/device llmopt does not handle), and each linear's kernel choice. It prints
as a table, serializes to stable JSON (sorted keys, schema version) and draws the graph
as DOT through the networkx view of ``graph.py``.

A kernel choice is structured data (:class:`KernelChoice`: op, kernel, weight shape N x K,
dtype, and per M bucket the kernel, its launch config and why, :class:`BucketKernel`), so
``llmopt autotune`` and the inspection tools read the shapes from the fields, not from the
text; the text table prints the ``reason`` line the pass wrote, as readable as before.

``last_report()`` / ``reports()`` read :data:`REGISTRY`, a :class:`ReportRegistry` of the
most recent reports: with the op registry and the tuning table, one of the few explicit
pieces of global state of llmopt, kept because a user asks for a report after
``torch.compile`` returned (the backend has no other channel back to them). The backend
is its only writer (``register_report``).
"""
from __future__ import annotations

import collections
import json
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class PassRecord:
    name: str
    status: str  # "ok" | "disabled" | "failed" | "not-applicable"
    rewrites: int = 0
    seconds: float = 0.0
    error: str | None = None   # one line: exception type and the first line of its message
    detail: str | None = None  # the whole message and traceback of a failed pass


@dataclass
class Rewrite:
    pass_name: str
    node: str
    layer: str
    detail: str


@dataclass
class NearMiss:
    pass_name: str
    node: str
    layer: str
    reason: str


@dataclass
class Fallback:
    what: str
    reason: str


@dataclass
class BucketKernel:
    """What one M bucket of a linear runs: ``m_bucket`` is ``"1"``, ``"2"``, ... ``"64"``
    or ``"inf"`` (``min(next_pow2(M), 64)``, docs/linear_dispatch.md); ``config`` the
    launch config baked into the graph (a tuning-table entry), None for the kernel's
    heuristic config."""

    m_bucket: str
    kernel: str
    config: dict[str, int] | None
    reason: str


@dataclass
class KernelChoice:
    """The kernel(s) of one linear. ``kernel`` is what runs (``mm``, a quantized op's name,
    or the per-bucket kernels string of ``llmopt.linear``), ``reason`` the one line the
    text report prints. ``N``, ``K`` (the weight is ``[N, K]``) and ``dtype`` are None where
    the pass could not read them; ``buckets`` is empty where no per-bucket choice was made
    (CPU, a weight that is not a frozen constant, mixed dtypes, a quantized linear)."""

    node: str
    layer: str
    op: str
    kernel: str
    reason: str
    N: int | None = None
    K: int | None = None
    dtype: str | None = None
    buckets: list[BucketKernel] = field(default_factory=list)


@dataclass
class CompileReport:
    graph_index: int = 0
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    executor: str = ""
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    frozen_constants: int = 0
    mutated_inputs: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    kernel_choices: list[KernelChoice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    # Where compile_seconds went, phase -> seconds, in order: "capture" (AOTAutograd's ATen
    # graph; the first compile of a graph only), "freeze", "passes", "executor" (the inner
    # executor's compile: Inductor's retrace, codegen and C++ build), "report" (histograms
    # and graph views). Empty for a graph that fell back before compiling.
    compile_phases: dict[str, float] = field(default_factory=dict)
    # The capture cache (llmopt/capture_cache.py) for this graph: "hit" (no AOTAutograd
    # trace), "stored" (captured, and kept for the next compile), "off", or "not cached: why".
    capture_cache: str = ""
    # Graph structure (node -> op, edges) before and after, for drawing; not in to_json().
    graph_before: Any = field(default=None, repr=False)
    graph_after: Any = field(default=None, repr=False)

    # -- recording -------------------------------------------------------------------
    def rewrite(self, pass_name: str, node: Any, detail: str) -> None:
        self.rewrites.append(Rewrite(pass_name, _node_name(node), layer_of(node), detail))

    def near_miss(self, pass_name: str, node: Any, reason: str) -> None:
        self.near_misses.append(NearMiss(pass_name, _node_name(node), layer_of(node), reason))

    def fallback(self, what: str, reason: str) -> None:
        self.fallbacks.append(Fallback(what, reason))

    def kernel_choice(self, node: Any, op: str, kernel: str, reason: str, *, N: int | None = None,
                      K: int | None = None, dtype: str | None = None,
                      buckets: list[BucketKernel] | tuple[BucketKernel, ...] = ()) -> None:
        self.kernel_choices.append(KernelChoice(_node_name(node), layer_of(node), op, kernel, reason,
                                                N, K, dtype, list(buckets)))

    def phases_text(self) -> str:
        """``capture 1.20s, freeze 0.05s, ...``: :attr:`compile_phases` on one line."""
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.compile_phases.items())

    def rewrites_by_pass(self) -> dict[str, int]:
        return {p.name: p.rewrites for p in self.passes}

    # -- output ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("graph_before")
        d.pop("graph_after")
        d["schema_version"] = SCHEMA_VERSION
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, default=str)

    def to_dot(self, which: str = "after") -> str:
        """The graph before or after the passes, in Graphviz DOT."""
        from .graph import to_dot

        graph = {"before": self.graph_before, "after": self.graph_after}.get(which)
        if which not in ("before", "after"):
            raise ValueError(f"which must be 'before' or 'after', got {which!r}")
        if graph is None:
            raise ValueError("this report holds no graph (it was built without one)")
        return to_dot(graph, title=f"llmopt graph {self.graph_index} ({which})")

    def __str__(self) -> str:
        lines = [
            f"llmopt compile report — graph {self.graph_index} on {self.device} "
            f"({', '.join(self.dtypes) or 'no tensors'}), executor {self.executor or '?'}",
            f"nodes: {self.nodes_before} → {self.nodes_after}   frozen constants: {self.frozen_constants}"
            f"   mutated inputs: {len(self.mutated_inputs)}   compile time: {self.compile_seconds:.2f}s"
            + (f" ({self.phases_text()})" if self.compile_phases else "")
            + (f"   capture cache: {self.capture_cache}" if self.capture_cache else ""),
            "",
            f"{'pass':<26}{'status':<16}{'rewrites':>9}{'ms':>9}",
        ]
        for p in self.passes:
            lines.append(f"{p.name:<26}{p.status:<16}{p.rewrites:>9}{p.seconds * 1e3:>9.1f}")
            if p.error:
                lines.append(f"    error: {p.error}")
        sections = (  # (title, records, one line per record); a section without records is left out
            ("rewrites:", self.rewrites, lambda r: f"  {r.pass_name:<24} {r.layer or '-':<28} {r.detail}"),
            ("near-misses (not rewritten):", self.near_misses,
             lambda m: f"  {m.pass_name:<24} {m.layer or '-':<28} {m.node}: {m.reason}"),
            ("kernels:", self.kernel_choices, lambda k: f"  {k.layer or '-':<28} {k.op:<16} {k.kernel:<24} {k.reason}"),
            ("fallbacks:", self.fallbacks, lambda f: f"  {f.what}: {f.reason}"),
        )
        for title, records, line in sections:
            if records:
                lines += ["", title, *(line(r) for r in records)]
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def one_line_error(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _node_name(node: Any) -> str:
    return getattr(node, "name", str(node))


def layer_of(node: Any) -> str:
    """The module path a graph node came from (``model.layers.3.self_attn``), or ''.

    The innermost entry of ``nn_module_stack`` that hangs off the same root as the
    outermost one: transformers >= 5.2x wraps some functions (``apply_rotary_pos_emb``) in
    modules reached through a global (``G['__import_…'].apply_rotary_pos_emb``), which
    would otherwise name the node after the function instead of its layer."""
    meta = getattr(node, "meta", None) or {}
    stack = meta.get("nn_module_stack")
    if not stack:
        return ""
    # Outermost first; each value is (qualified path, module type).
    paths = [str(v[0] if isinstance(v, tuple) else v) for v in stack.values()]
    root = _source_of(paths[0])
    chosen = next((p for p in reversed(paths) if _source_of(p) == root), paths[-1])
    return clean_module_path(chosen)


def _source_of(path: str) -> str:
    m = _SOURCE_PREFIX.match(path.strip())
    return m.group(0) if m else ""


# A Dynamo source names the object a module path starts from: ``L['self']``,
# ``L['args'][0]`` (transformers >= 5.2x wraps ``forward`` in a decorator),
# ``L['fn'].__self__`` (a compiled bound method), ``G['model']``, ``L['kwargs']['m']``,
# or its flattened identifier (``L__self___``, ``L_args_0_``). Everything after it is the
# module path proper. One regex strips any of them, so a new spelling in a Dynamo or
# transformers release changes this line only.
_SOURCE_PREFIX = re.compile(
    r"""^(?:
        [LG]\[(?:'[^']*'|"[^"]*"|\d+)\]          # L['self'], G['model']
        (?:\[(?:'[^']*'|"[^"]*"|\d+)\])*          # ['args'][0], ['kwargs']['m']
        (?:\.__self__)?                           # a bound method's receiver
      | [LG]_{1,2}(?:self|args_\d+|fn___self__|[A-Za-z0-9]+)_{1,3}  # flattened spellings
    )""",
    re.VERBOSE,
)


def clean_module_path(path: str) -> str:
    """A Dynamo module path reduced to the model's own: ``L['args'][0].model.layers[0].mlp``
    → ``model.layers.0.mlp``, whatever source prefix Dynamo put in front of it."""
    path = path.strip()
    m = _SOURCE_PREFIX.match(path)
    if m:
        path = path[m.end():]
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    path = path.replace("._modules.", ".").replace(".__self__", "")
    return path.strip(".")


# -- the registry of recent reports ------------------------------------------------------
class ReportRegistry:
    """The reports of the most recently compiled graphs, oldest first, at most
    ``max_reports`` of them (a long-running server compiles without bound); thread-safe
    (Dynamo may compile from several threads). Each report registered gets the next
    ``graph_index``; clearing starts the count again at 0."""

    def __init__(self, max_reports: int = 64):
        self._reports: collections.deque[CompileReport] = collections.deque(maxlen=max_reports)
        self._lock = threading.Lock()

    def register(self, report: CompileReport) -> None:
        with self._lock:
            report.graph_index = (self._reports[-1].graph_index + 1) if self._reports else 0
            self._reports.append(report)

    def last(self) -> CompileReport | None:
        with self._lock:
            return self._reports[-1] if self._reports else None

    def all(self) -> list[CompileReport]:
        with self._lock:
            return list(self._reports)

    def clear(self) -> None:
        with self._lock:
            self._reports.clear()


# The registry the backend writes and llmopt.last_report() / reports() read.
REGISTRY = ReportRegistry()


def register_report(report: CompileReport) -> None:
    """Number ``report`` and keep it in :data:`REGISTRY` (the backend calls this once per graph)."""
    REGISTRY.register(report)


def last_report() -> CompileReport | None:
    """The report of the most recently compiled graph (None before any compile)."""
    return REGISTRY.last()


def reports() -> list[CompileReport]:
    """Reports of recently compiled graphs, oldest first (one per graph; graph breaks and
    recompiles add more)."""
    return REGISTRY.all()


def clear_reports() -> None:
    """Forget every report (the next graph compiled is graph 0 again)."""
    REGISTRY.clear()
