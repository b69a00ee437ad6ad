"""The ``lower_attention`` pass: every spelling of attention becomes one ``llmopt.attention_prefill`` op.

The function it replaces, for each batch ``b``, query head ``h`` and query row ``i``::

    def attention(q, k, v, mask, scale, softcap):      # q [B,Hq,Sq,D], k/v [B,Hkv,Skv,D]
        k, v = repeat_kv(k, Hq // Hkv), repeat_kv(v, Hq // Hkv)
        s = (q @ k.transpose(-1, -2)) * scale
        if softcap: s = softcap * tanh(s / softcap)
        s = s + mask                                     # or where(cond, s, fill) / masked_fill
        return softmax(s, -1) @ v

The parts, one module each (after ``normalize`` has made the spellings uniform):

- :mod:`.sdpa`: SDPA as ATen lowers it (CPU and CUDA variants, read by schema);
- :mod:`.eager`: explicit ``matmul → scale → softcap → mask → softmax → matmul``;
- :mod:`.operands`: q/k/v through ``repeat_kv``/``repeat_interleave``/head broadcasts,
  reshapes and transposes; the op's contract on them;
- :mod:`.masks`: the mask proofs (causal, sliding window, ``q_offset``; the pass never
  assumes causality, it proves what it drops);
- :mod:`.emit`: the rewrite, and the layout fix-up after it.

The pass keeps its name ``lower_attention`` in the pipeline and the report (this
package is ``passes/attention`` because it has parts).

Sources: the attention of Vaswani et al. 2017; the graph forms are those of PyTorch's
SDPA decompositions and Hugging Face transformers' ``sdpa_attention_forward``,
``eager_attention_forward``, ``repeat_kv`` and ``masking_utils``.
"""
from __future__ import annotations

import torch.fx as fx

from ..near_miss import NearMiss, rewrite_each
from .eager import SOFTMAX_OPS, match_eager
from .emit import Lowering, emit
from .masks import MaskAnalysis, MaskPlan
from .sdpa import SDPA_OPS, match_sdpa

__all__ = ["run", "match_sdpa", "match_eager", "emit", "Lowering", "MaskAnalysis", "MaskPlan", "SDPA_OPS", "SOFTMAX_OPS"]


def run(gm: fx.GraphModule, ctx) -> int:
    """Lower every attention of ``gm``; returns how many were lowered."""
    analysis = MaskAnalysis(gm)  # shared: every layer usually reads one mask

    def lower(match):
        def rewrite(gm: fx.GraphModule, node: fx.Node):
            lowering = match(gm, node, analysis)
            if lowering is None:
                return None
            if isinstance(lowering, str):
                raise NearMiss(node, lowering)
            emit(gm, lowering)
            return lowering.replace, lowering.describe()

        return rewrite

    rewrites = {**dict.fromkeys(SDPA_OPS, lower(match_sdpa)), **dict.fromkeys(SOFTMAX_OPS, lower(match_eager))}
    # rewrite_each drops the replaced chains (and repeat_kv copies nobody else reads).
    return rewrite_each(gm, ctx, rewrites)
