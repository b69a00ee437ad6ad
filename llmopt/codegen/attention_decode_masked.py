"""Decode attention over a small static cache's whole capacity, as plain ATen with a mask.

The math and the contract are those of :mod:`.attention_decode` (one new query token per
sequence, a dense ``[B, Hkv, S_max, D]`` cache with ``kv_lens`` valid slots, optional
bool/additive mask, sliding window, soft-cap); the oracle is
:func:`.attention_decode_ref.attention_decode_ref`. Accumulation in fp32 (fp64 for fp64).

Why it exists: on CPU under the Inductor executor, decode attention was an opaque call
per layer (the CPU twin: Python, one ``tolist`` of the lengths, a mask check, SDPA over
the valid prefix), a fixed 60-120 us per layer measured on the CI machine, i.e. about a
tenth of a llama-100m decode step. Written over the full capacity, with the valid lengths
as a mask instead of a slice, the shapes no longer depend on values: Inductor fuses the
scores, the masked softmax and the weighted sum of V into the graph's C++ loops, with no
Python per layer. The price is reading the cache's empty slots too, so the executor takes
this form only for caches of at most :data:`FULL_CAPACITY_MAX_SLOTS` slots, where the
slots past the valid length cost less than the twin's fixed overhead (the bound and its
measurement: docs/executors.md); longer caches keep the twin, which reads only the
valid prefix.

Slots past a sequence's length may hold anything, NaN included (a cache is not zeroed
between requests): the scores are masked with ``where`` (not by adding ``-inf``, which
leaves NaN NaN), and so is each ``p * v`` term (a zero weight times a NaN value is NaN).
A row with nothing to attend to is 0, as in the reference.
"""
import torch

from .attention_decode_ref import decode_key_mask

# Caches with at most this many slots run decode attention over their whole capacity
# (above); larger ones keep the valid-prefix twin. See docs/executors.md for the figures.
FULL_CAPACITY_MAX_SLOTS = 128


def full_capacity_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a traced ``attention_decode`` call takes :func:`attention_decode_full_capacity`:
    a static cache capacity within the bound (a symbolic one would add a guard on its value)."""
    capacity = k_cache.shape[2]
    return isinstance(capacity, int) and 0 < capacity <= FULL_CAPACITY_MAX_SLOTS and q.shape[-1] > 0


def attention_decode_full_capacity(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0,
                                   unified_max=None):
    """``attention_decode`` over all ``S_max`` slots, masked by ``kv_lens`` (module docstring).

    Written as broadcast products and reductions, not ``matmul``, so that Inductor generates
    them as loops fused with the mask and the softmax instead of calling a GEMM library for
    [G, D] x [D, S] products. ``unified_max`` only changes how a GPU kernel computes the
    same result, so it is ignored here, as in the reference.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(B, Hkv, G, 1, D).to(compute)
    s = (qg * k_cache[:, :, None].to(compute)).sum(-1) * scale  # [B, Hkv, G, S]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    valid, bias = decode_key_mask(kv_lens.to(torch.int64), S, mask, window, Hq, Hkv, S)
    if bias is not None:
        s = s + bias.to(compute)
    s = torch.where(valid, s, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row with every slot masked: p = 0, output 0
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    pv = torch.where(valid[..., None], p[..., None] * v_cache[:, :, None].to(compute), 0.0)
    o = pv.sum(-2) / torch.where(l > 0, l, 1.0)  # [B, Hkv, G, D]
    return o.reshape(B, Hq, 1, D).to(q.dtype)


__all__ = ["FULL_CAPACITY_MAX_SLOTS", "attention_decode_full_capacity", "full_capacity_applies"]
