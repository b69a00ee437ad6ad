"""The pass pipeline: an ordered list of named graph rewrites and the manager that runs them.

Each pass is a module (or a package, see ``PASS_MODULES``) in this package with one
public entry, ``run(gm, ctx) -> int``: it rewrites ``gm`` in place and returns how many
rewrites it made, recording each hit and each near-miss (with its reason) through ``ctx``
(:mod:`.near_miss` holds the loop most passes run). The manager

- runs the enabled passes in ``PIPELINE`` order and times each;
- snapshots the graph before each pass: a pass that raises is logged in the report and
  its partial rewrite is rolled back, so the model still runs, correctly
  (``strict=True`` re-raises instead — the tests run strict);
- lints the graph after each pass, so a pass that leaves it malformed fails loudly there;
- merges duplicate pure computations that passes emitted per layer, once at the end.
"""
from __future__ import annotations

import importlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import compat
from ..report import CompileReport, PassRecord, one_line_error

log = logging.getLogger("llmopt")

# Pipeline order matters: normalize makes the spellings uniform; fusions run before
# attention lowering (RoPE feeds attention); linear kernel selection sees the final
# (merged, possibly quantized) linears. fuse_moe runs before the linears are merged (the
# router and a shared expert read the same tokens).
PIPELINE: tuple[str, ...] = (
    "normalize",
    "fuse_moe",
    "merge_parallel_linears",
    "shard_tensor_parallel",
    "fuse_residual_norm",
    "fuse_gated_activation",
    "fuse_rope",
    "lower_attention",
    "kv_cache",
    "reinplace_kv",
    "quantize_linears",
    "select_linear_kernel",
)
PASS_NAMES = PIPELINE


@dataclass
class PassContext:
    """What a pass sees besides the graph: options, report, device, example inputs, and the
    inner executor that will run the result (``"aten"`` or ``"inductor"``)."""

    options: Any
    report: CompileReport
    device: torch.device
    example_inputs: list[Any] = field(default_factory=list)
    executor: str = "aten"
    current_pass: str = ""
    # The tuning table of this compile, resolved once by the backend
    # (select_linear_kernel.resolve_tuning_table); None: off CUDA, autotune="off", or a
    # context built outside the backend, for which the pass resolves it itself.
    tuning_table: Any = None

    def rewrite(self, node: Any, detail: str) -> None:
        self.report.rewrite(self.current_pass, node, detail)

    def near_miss(self, node: Any, reason: str) -> None:
        self.report.near_miss(self.current_pass, node, reason)


class PassFailed(RuntimeError):
    """A pass raised while ``strict=True``."""


# A pass whose rewrite has parts is a package named for its subject; its pass name (in
# options, reports and golden graphs) stays the name of what it does.
PASS_MODULES: dict[str, str] = {"lower_attention": "attention"}


def available_passes() -> dict[str, Any]:
    """Pass name -> module, for every pass of PIPELINE."""
    return {name: importlib.import_module(f"{__name__}.{PASS_MODULES.get(name, name)}") for name in PIPELINE}


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Run every enabled pass on ``gm``; returns the total number of rewrites."""
    total = 0
    modules = available_passes()
    for name in PIPELINE:
        if not ctx.options.enabled(name):
            ctx.report.passes.append(PassRecord(name, "disabled"))
            continue
        total += _run_one(name, modules[name], gm, ctx)
    # Passes may emit the same helper computation per layer (a combined mask, lengths):
    # merge the twins once at the end.
    from .normalize import merge_duplicates

    merge_duplicates(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return total


def _run_one(name: str, module: Any, gm: fx.GraphModule, ctx: PassContext) -> int:
    ctx.current_pass = name
    saved_graph = GraphSnapshot(gm.graph)
    saved_attrs = set(gm._buffers) | set(gm._parameters) | set(vars(gm))
    n_rewrites, n_near = len(ctx.report.rewrites), len(ctx.report.near_misses)
    start = time.perf_counter()
    try:
        count = int(module.run(gm, ctx))
        gm.graph.lint()
    except Exception as exc:  # a pass must never take the user's model down...
        if compat.is_dynamo_control_flow(exc):
            raise  # Dynamo steers its tracing with these: never swallow them
        if getattr(exc, "llmopt_user_error", False):
            raise  # ...unless the user asked for something impossible (it says what to change)
        seconds = time.perf_counter() - start
        gm.graph = saved_graph.restore()
        for attr in set(gm._buffers) - saved_attrs:
            delattr(gm, attr)
        gm.recompile()
        del ctx.report.rewrites[n_rewrites:]
        del ctx.report.near_misses[n_near:]
        message = one_line_error(exc)
        detail = traceback.format_exc()
        ctx.report.passes.append(PassRecord(name, "failed", 0, seconds, message, detail))
        # One line in the log (an FX error message can hold the whole graph); the message
        # and traceback are in the report (PassRecord.detail).
        log.warning("llmopt: pass %s failed and was skipped (detail in llmopt.last_report()): %s", name, message)
        if ctx.options.strict:
            raise PassFailed(f"llmopt pass {name!r} failed: {message}") from exc
        return 0
    finally:
        ctx.current_pass = ""
    seconds = time.perf_counter() - start
    gm.recompile()
    ctx.report.passes.append(PassRecord(name, "ok", count, seconds))
    return count


class GraphSnapshot:
    """What rolling a graph back needs, taken in O(nodes) tuples instead of a copy.

    A pass that raises is rare; copying the whole graph before each pass (a new node per
    node, about 30% of the pipeline's time on a 12-layer Llama) paid for that case on every
    compile. The snapshot holds each node's fields and a shallow copy of its ``meta`` (what
    ``Graph.graph_copy`` keeps); the args and kwargs are FX's immutable containers, which a
    pass replaces and never edits, so holding them is enough. :meth:`restore` builds the
    graph as it was, only when a pass failed."""

    def __init__(self, graph: fx.Graph):
        self.owning_module = graph.owning_module
        self.nodes = [(n, n.op, n.target, n.args, n.kwargs, n.name, n.type, dict(n.meta)) for n in graph.nodes]

    def restore(self) -> fx.Graph:
        new = fx.Graph(owning_module=self.owning_module)
        env: dict[fx.Node, fx.Node] = {}
        for node, op, target, args, kwargs, name, type_expr, meta in self.nodes:
            copy = new.create_node(op, target, fx.map_arg(args, env.__getitem__), fx.map_arg(kwargs, env.__getitem__),
                                   name, type_expr)
            copy.meta = meta
            env[node] = copy
        return new
