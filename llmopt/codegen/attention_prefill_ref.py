"""Prefill attention's contract and eager reference (the CPU implementation and the oracle).

The semantics are those of :mod:`.attention_prefill` (its docstring): ``Sq`` queries at
``q_offsets[b] + i`` against the first ``kv_lens[b]`` of ``Skv`` keys, causal and/or sliding
window, bool or additive mask, logit soft-cap, GQA/MQA; a row with no allowed key is 0.

- :func:`check_prefill_inputs` — shapes, dtypes, devices, scalars; metadata only, so the
  op's fake implementation runs it too.
- :func:`attention_prefill_ref` — the reference, also the paged prefill reference's
  (:mod:`.attention_paged` runs it on each sequence's gathered KV).
- :func:`attention_prefill_cpu_traced` — what a compiled CPU graph runs (the op's CPU twin,
  ``codegen.cpu_decompositions``): SDPA in the inputs' dtype over the valid keys, with
  SDPA's own causal path when the mask is plain causality; the reference otherwise.

Kept apart from the kernel module so each reads on its own (and stays under 600 lines).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .kernel_mode import kernel_mode

LENGTH_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------- contract checks
def _check_lengths(op: str, name: str, t: Optional[torch.Tensor], batch: int, device) -> None:
    if t is None:
        return
    if t.shape != (batch,) or t.dtype not in LENGTH_DTYPES or t.device != device:
        raise ValueError(
            f"{op}: {name} must be an int32/int64 tensor of shape [{batch}] (one entry per sequence) on "
            f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def check_prefill_inputs(op, q, k, v, mask, kv_lens, q_offsets, window, softcap) -> None:
    """Check the shape/dtype/device contract; uses metadata only (also runs on fake tensors)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D [batch, heads, seq, head_dim] (Hugging Face layout), got shape "
                f"{tuple(t.shape)}; transpose a [batch, seq, heads, head_dim] tensor with .transpose(1, 2)"
            )
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"{op}: k and v must be [batch={b}, kv_heads, kv_seq, head_dim={d}] and equal, got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of KV heads ({hkv}) for GQA/MQA; "
            f"check the head counts of q and k"
        )
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{op}: mask must be bool (True = attend) or floating (additive), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"{op}: mask is on {mask.device}, q on {q.device}; move it to {q.device}")
        target = (b, hq, q.shape[2], k.shape[2])
        if mask.dim() > 4 or any(m != 1 and m != t for m, t in zip(mask.shape[::-1], target[::-1])):
            raise ValueError(
                f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to [batch, q_heads, q_seq, kv_seq] = "
                f"{list(target)}"
            )
    _check_lengths(op, "kv_lens", kv_lens, b, q.device)
    _check_lengths(op, "q_offsets", q_offsets, b, q.device)
    if window < 0:
        raise ValueError(f"{op}: window must be >= 0 (0 = no sliding window), got {window}")
    if softcap < 0:
        raise ValueError(f"{op}: softcap must be >= 0 (0 = no soft-capping), got {softcap}")


# --------------------------------------------------------------------------- reference
def _allowed_keys(q, k, mask, kv_lens, q_offsets, causal, window):
    """The combined "may attend" mask, ``[B|1, H|1, Sq, Skv]`` bool, and the additive bias
    (or None). Broadcast dims stay size 1, so a padding mask costs ``B*Sq*Skv`` booleans."""
    sq, skv = q.shape[2], k.shape[2]
    dev = q.device
    rows = torch.arange(sq, device=dev)
    cols = torch.arange(skv, device=dev)
    pos_q = rows[None, :] if q_offsets is None else q_offsets.to(torch.int64)[:, None] + rows[None, :]
    allowed = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=dev)
    if causal:
        allowed = allowed & (cols <= pos_q[:, :, None])[:, None]
    if window > 0:
        allowed = allowed & ((pos_q[:, :, None] - cols) < window)[:, None]
    if kv_lens is not None:
        allowed = allowed & (cols[None, :] < kv_lens.to(torch.int64)[:, None])[:, None, None, :]
    bias = None
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            bias = m
            allowed = allowed & (m != float("-inf"))
    return allowed, bias


def attention_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    kv_lens: Optional[torch.Tensor],
    q_offsets: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Eager attention with the kernel's semantics (module docstring); the CPU implementation.

    Math in fp32 (fp64 stays fp64, for the tests' ground truth). Without softcap it calls
    ``scaled_dot_product_attention`` with one explicit float mask (``-inf`` where not
    allowed), so CPU prefill does not hold the score matrix; with softcap it computes the
    scores explicitly, GQA by grouping query heads over the shared KV head (no repeat).
    Keys beyond ``kv_lens`` are zeroed before use: a preallocated cache may hold garbage there.
    """
    check_prefill_inputs("attention_prefill_ref", q, k, v, mask, kv_lens, q_offsets, window, softcap)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.numel() == 0:
        return q.new_zeros(q.shape)

    if kv_lens is not None:
        # Never look past the longest valid sequence; zero the rest of shorter ones.
        lens = kv_lens.to(torch.int64).clamp(0, skv)
        kmax = int(lens.max())
        k, v = k[:, :, :kmax], v[:, :, :kmax]
        if mask is not None and mask.shape[-1] != 1:
            mask = mask[..., :kmax]
        if bool((lens < kmax).any()):
            valid = (torch.arange(kmax, device=q.device)[None, :] < lens[:, None])[:, None, :, None]
            k = torch.where(valid, k, 0)
            v = torch.where(valid, v, 0)
        kv_lens = lens
        skv = kmax
    if skv == 0:
        return q.new_zeros(q.shape)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)

    # Nothing but (top-left) causality: SDPA's own is_causal path, no mask tensor at all.
    # No row can be fully masked then (top-left causal always allows key 0).
    plain = mask is None and kv_lens is None and window == 0 and (not causal or q_offsets is None)
    if softcap == 0.0 and plain:
        out = torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, is_causal=causal, scale=scale, enable_gqa=hq != hkv
        )
        return out.to(q.dtype).contiguous()

    allowed, bias = _allowed_keys(q, k, mask, kv_lens, q_offsets, causal, window)
    any_allowed = allowed.any(dim=-1, keepdim=True)
    float_mask = torch.zeros((), dtype=acc, device=q.device) if bias is None else bias.to(acc)
    float_mask = torch.where(allowed, float_mask, float("-inf"))
    # Fully masked rows get a harmless mask (no NaN) and are zeroed afterwards.
    float_mask = torch.where(any_allowed, float_mask, 0.0)

    if softcap == 0.0:
        out = torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=float_mask, scale=scale, enable_gqa=hq != hkv
        )
    else:
        g = hq // hkv
        scores = qf.reshape(b, hkv, g, sq, d) @ kf.unsqueeze(2).transpose(-1, -2) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.reshape(b, hq, sq, skv) + float_mask
        probs = torch.softmax(scores, dim=-1)
        out = (probs.reshape(b, hkv, g, sq, skv) @ vf.unsqueeze(2)).reshape(b, hq, sq, d)
    out = torch.where(any_allowed, out, 0.0)
    return out.to(q.dtype).contiguous()


# --------------------------------------------------------------------------- compiled CPU path
def attention_prefill_cpu_traced(q, k, v, mask, kv_lens, q_offsets, scale, causal, window=0, softcap=0.0):
    """:func:`attention_prefill_ref` for a call from a compiled CPU graph (the op's CPU twin).

    The contract was checked by the op's fake implementation when the graph was traced, and
    the graph's guards keep it: per call this looks only at values. The prefill's usual
    case (every sequence the same valid length, no soft-cap, every query row with a key)
    runs one SDPA in the inputs' own dtype over the valid keys; the mask is dropped for
    SDPA's ``is_causal`` when it is exactly top-left causality (a prompt from position 0,
    what Hugging Face's static-cache mask is then), or else passed as one boolean (or, for
    an additive mask, one float in q's dtype) tensor. Anything else runs the reference.

    Why: the reference computes in fp32. In bf16 that is four copies per call (q, k, v and
    the output) and an fp32 SDPA with a float mask, where ATen's CPU flash attention
    already accumulates bf16/fp16 in fp32 (its scores, softmax and output accumulator), as
    eager Hugging Face and Inductor's graph run it. The causal path skips the blocks above
    the diagonal and builds no mask. Measured on the CI machine (one thread, llama-100m
    shapes, prompt 64): 490-640 us per call through the reference, ~360 us here (docs/executors.md).
    An additive mask of another dtype than q's (its -inf/finfo.min would not survive the
    cast) takes the reference.
    """
    if softcap > 0 or q.dtype == torch.float64 or q.numel() == 0 or kernel_mode() == "reference":
        return attention_prefill_ref(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)
    sq, length = q.shape[2], k.shape[2]
    if kv_lens is not None:
        lens = kv_lens.tolist()
        length = lens[0]
        if not 0 < length <= k.shape[2] or any(n != length for n in lens):  # ragged: the reference zeroes
            return attention_prefill_ref(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)
        k, v = k[:, :, :length], v[:, :, :length]
        if mask is not None and mask.shape[-1] != 1:
            mask = mask[..., :length]
    gqa = q.shape[1] != k.shape[1]
    from_start = q_offsets is None or not any(q_offsets.tolist())
    if window == 0 and sq == length and from_start and ((causal and mask is None) or _lower_triangle(mask, sq)):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.contiguous()
    allowed, bias = _allowed_keys(q, k, mask, None, q_offsets, causal, window)
    if (bias is not None and bias.dtype != q.dtype) or not bool(allowed.any(dim=-1).all()):
        # (a row with no key is 0: the reference's rule)
        return attention_prefill_ref(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)
    attn_mask = allowed if bias is None else torch.where(allowed, bias, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return out.contiguous()


def _lower_triangle(mask: Optional[torch.Tensor], s: int) -> bool:
    # True when ``mask`` is a full bool [..., s, s] mask whose every pattern is exactly
    # causality (key j allowed for query i iff j <= i); a mask broadcast over queries or
    # keys is not. Two small ops: this runs once per layer.
    if mask is None or mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (s, s):
        return False
    tril = torch.ones((s, s), dtype=torch.bool, device=mask.device).tril_()
    return torch.equal(mask, tril.expand(mask.shape))


__all__ = ["LENGTH_DTYPES", "attention_prefill_cpu_traced", "attention_prefill_ref", "check_prefill_inputs"]
