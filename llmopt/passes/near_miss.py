"""``NearMiss``: what a pass raises from deep inside a matcher when a candidate cannot be
rewritten. The pass's loop catches it and records ``reason`` against ``node`` in the report
(``ctx.near_miss``), leaving the graph as it was: one exception type for every pass, so the
matchers can stop at the first failed precondition without threading a result back up."""
from __future__ import annotations

import torch.fx as fx


class NearMiss(Exception):
    """A candidate that cannot be rewritten; the message is the reason."""

    def __init__(self, node: fx.Node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason
