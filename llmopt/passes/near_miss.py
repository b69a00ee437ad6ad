"""How a pass tries its candidates: ``NearMiss`` and the loop that records them.

A matcher raises ``NearMiss`` from deep inside when a candidate cannot be rewritten; the
loop catches it and records ``reason`` against ``node`` in the report (``ctx.near_miss``),
leaving the graph as it was: one exception type for every pass, so the matchers can stop
at the first failed precondition without threading a result back up. A rewrite that
succeeds returns ``(new node, detail)`` and the loop records the hit (``ctx.rewrite``).
Every pass that rewrites node by node runs through :func:`rewrite_each`, so hits and
near-misses are recorded the same way everywhere.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.fx as fx

# rewrite(gm, anchor) -> (new node, detail) when it rewrote, None when the anchor is not
# a candidate at all; raises NearMiss when it is one that cannot be rewritten.
Rewrite = Callable[[fx.GraphModule, fx.Node], "tuple[fx.Node, str] | None"]


class NearMiss(Exception):
    """A candidate that cannot be rewritten; the message is the reason."""

    def __init__(self, node: fx.Node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def try_rewrite(ctx: Any, rewrite: Rewrite, gm: fx.GraphModule, node: fx.Node) -> int:
    """Run ``rewrite`` at ``node``; record the hit or the near-miss; 1 if it rewrote."""
    try:
        done = rewrite(gm, node)
    except NearMiss as miss:
        ctx.near_miss(miss.node, miss.reason)
        return 0
    if done is None:
        return 0
    new, detail = done
    ctx.rewrite(new, detail)
    return 1


def rewrite_each(gm: fx.GraphModule, ctx: Any, rewrites: Mapping[Any, Rewrite]) -> int:
    """Try ``rewrites[node.target]`` at every ``call_function`` node whose target is a key,
    in graph order (nodes a rewrite inserts are not visited), then drop what the rewrites
    left dead. Returns the number of rewrites."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        rewrite = rewrites.get(node.target)
        if rewrite is not None:
            count += try_rewrite(ctx, rewrite, gm, node)
    gm.graph.eliminate_dead_code()
    return count
