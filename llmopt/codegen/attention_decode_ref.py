"""Decode attention's contract, eager reference and CPU implementation.

The math and shapes are those of :mod:`.attention_decode` (its docstring): one new query
token per sequence against a dense ``[B, Hkv, S_max, D]`` KV cache with ``kv_lens`` valid
positions, optional bool/additive mask, sliding window and logit soft-cap.

- :func:`check_decode_args` — the op contract, metadata only (the fake implementation runs it).
- :func:`attention_decode_ref` — eager math in fp32 (fp64 stays fp64): the tests' oracle and,
  through :func:`.attention_paged.paged_attention_decode_ref`, the paged reference's.
- :func:`attention_decode_cpu` — the op's CPU implementation: PyTorch's fused SDPA over the
  valid prefix where it expresses the case exactly, the reference otherwise.
- :func:`attention_decode_cpu_traced` — the same for a call from a compiled graph, whose
  contract the fake implementation checked when the graph was traced: only what depends on
  values (lengths, mask) is looked at per call (the CPU twin, ``cpu_decompositions``).

Kept apart from the kernel module so each reads on its own (and stays under 600 lines).
"""
import torch
import torch.nn.functional as F

from .kernel_mode import kernel_mode

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The checks the dense and the paged decode contracts share (attention_paged_ref uses them).
def check_one_new_token(op: str, q, several: str) -> None:
    """q is ``[B, Hq, 1, D]``; ``several`` names the op to use for several new tokens."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(
            f"{op}: q must be [B, Hq, 1, D] (one new token per sequence), got {tuple(q.shape)}; "
            f"use {several} for several new tokens"
        )


def check_gqa(op: str, hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: {hq} query heads are not a multiple of {hkv} KV heads; GQA needs Hq % Hkv == 0")


def check_window_softcap(op: str, window, softcap) -> None:
    if window < 0:
        raise ValueError(f"{op}: window={window} must be >= 0 (0 = no sliding window)")
    if not softcap >= 0.0:
        raise ValueError(f"{op}: softcap={softcap} must be >= 0 (0 = no logit softcap)")


def check_decode_args(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max,
                      dtypes=KERNEL_DTYPES) -> tuple:
    """Check the op contract (shapes, dtypes, devices, scalars); return (B, Hq, Hkv, S_max, D)."""
    name = "attention_decode"
    check_one_new_token(name, q, "the prefill attention op")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{name}: k_cache and v_cache must both be [B, Hkv, S_max, D] (HF StaticCache layout), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, Hq, _, D = q.shape
    _, Hkv, S_max, Dk = k_cache.shape
    if k_cache.shape[0] != B or Dk != D:
        raise ValueError(
            f"{name}: k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}: batch and head dim "
            "must be equal"
        )
    check_gqa(name, Hq, Hkv)
    if q.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {q.dtype} is not supported; use one of {', '.join(map(str, dtypes))}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"{name}: q is {q.dtype} but the caches are {k_cache.dtype}/{v_cache.dtype}; cast them to one dtype"
        )
    if kv_lens.dim() != 1 or kv_lens.shape[0] != B or kv_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: kv_lens must be a [B] = [{B}] int32/int64 tensor of valid cache lengths, got "
            f"{tuple(kv_lens.shape)} {kv_lens.dtype}"
        )
    for t, what in ((k_cache, "k_cache"), (v_cache, "v_cache"), (kv_lens, "kv_lens")):
        if t.device != q.device:
            raise ValueError(f"{name}: {what} is on {t.device} but q on {q.device}; move them to one device")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"{name}: mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"{name}: mask is on {mask.device} but q on {q.device}; move it to one device")
        try:
            if torch.broadcast_shapes(mask.shape, (B, Hq, 1, S_max)) != (B, Hq, 1, S_max):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"{name}: mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, 1, S_max] = "
                f"{[B, Hq, 1, S_max]}; HF static caches pass [B, 1, 1, S_max]"
            ) from None
    check_window_softcap(name, window, softcap)
    if unified_max is not None and not abs(unified_max) < float("inf"):
        raise ValueError(f"{name}: unified_max={unified_max} must be a finite float (or None for the exact path)")
    return B, Hq, Hkv, S_max, D


def decode_key_mask(lens, length: int, mask, window: int, Hq: int, Hkv: int, S_max: int):
    """Which of the cache's first ``length`` slots each query head may attend to, and the
    user's additive mask over them, for a decode step (``lens``: [B] int64 valid lengths;
    ``mask`` broadcastable to [B, Hq, 1, S_max], ``S_max`` the cache's capacity).

    Returns ``(valid, bias)``: ``valid`` is bool, [B, 1, 1, length] (a slot is below its
    sequence's length and, with a ``window``, among its last ``window`` slots), narrowed by a
    bool user ``mask`` to [B, Hkv, G, length]; ``bias`` is an additive user ``mask`` as
    [B, Hkv, G, length] in its own dtype, else None. Shared by the reference (over the
    longest valid prefix) and the full-capacity form (``length`` = the capacity)."""
    B = lens.shape[0]
    pos = torch.arange(length, device=lens.device)
    valid = pos[None, :] < lens[:, None]  # [B, length]
    if window > 0:
        valid = valid & (pos[None, :] >= lens[:, None] - window)
    valid = valid[:, None, None, :]
    if mask is None:
        return valid, None
    user = mask.expand(B, Hq, 1, S_max)[..., :length].reshape(B, Hkv, Hq // Hkv, length)
    if user.dtype == torch.bool:
        return valid & user, None
    return valid, user


def attention_decode_ref(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0, unified_max=None):
    """Eager reference, the CPU implementation and the tests' oracle (fp64 in, fp64 out).

    Slices the caches to the longest valid length of the batch, groups the query heads of
    each KV head (``q.reshape(B, Hkv, G, D)``, the same pairing as ``repeat_interleave``
    of K/V by G, without copying K/V), builds the explicit mask and runs the softmax in fp32
    (fp64 for fp64 inputs). ``unified_max`` only changes how the kernel computes the same
    result, so the reference ignores it.
    """
    B, Hq, Hkv, S_max, D = check_decode_args(
        q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max,
        dtypes=KERNEL_DTYPES + (torch.float64,),
    )
    G = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = kv_lens.to(torch.int64)
    if B == 0 or D == 0:
        return torch.zeros((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    L, shortest = int(lens.max()), int(lens.min())
    if shortest < 0 or L > S_max:
        raise ValueError(
            f"attention_decode: kv_lens must lie in [0, S_max={S_max}], got values in [{shortest}, {L}]; "
            f"the cache holds at most {S_max} positions"
        )
    if L == 0:
        return torch.zeros((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    k = k_cache[:, :, :L].to(compute)
    v = v_cache[:, :, :L].to(compute)
    qg = q.reshape(B, Hkv, G, D).to(compute)
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    valid, bias = decode_key_mask(lens, L, mask, window, Hq, Hkv, S_max)
    if bias is not None:
        s = s + bias.to(compute)
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if shortest < L:
        # positions past a shorter sequence's end may hold anything (NaN): 0 * NaN is NaN
        in_cache = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
        v = v.masked_fill(~in_cache[:, None, :, None], 0.0)
    o = torch.matmul(p, v) / torch.where(l > 0, l, torch.ones_like(l))
    return o.reshape(B, Hq, 1, D).to(q.dtype)


def attention_decode_cpu(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0, unified_max=None):
    """The CPU implementation: PyTorch's fused SDPA over the valid prefix of the cache.

    Same contract and result as :func:`attention_decode_ref` (tested against it); it exists
    because the reference spells the softmax out in half a dozen eager ops, and on CPU each
    costs a dispatch and a pass over ``[B, Hq, L]``, while SDPA's CPU kernel does it in one
    (about 8x faster on a 4-layer 256-wide Llama decode step). Cases SDPA cannot express
    exactly go to the reference: soft-capping, float64, rows of different valid lengths
    (positions past a shorter row's end may hold NaN, which a masked SDPA still multiplies
    by zero) and rows with nothing to attend to.
    """
    if (softcap > 0 or q.dtype == torch.float64 or q.device.type != "cpu" or q.shape[0] == 0
            or q.shape[-1] == 0 or q.shape[1] % k_cache.shape[1] != 0):
        return attention_decode_ref(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    B, Hq, Hkv, S_max, D = check_decode_args(
        q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max, dtypes=KERNEL_DTYPES,
    )
    L, shortest = int(kv_lens.max()), int(kv_lens.min())
    if shortest != L or L <= 0 or L > S_max:
        return attention_decode_ref(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    keep = None
    if window > 0 and window < L:
        keep = torch.arange(L, device=q.device) >= L - window  # [L]
        keep = keep.view(1, 1, 1, L)
    bias = None
    if mask is not None:
        user = mask[..., :L]
        # The usual decode mask (no padding) keeps every valid key: SDPA without a mask
        # is then the same math, and about 3x faster than with one.
        if bool(user.all()) if user.dtype == torch.bool else bool((user == 0).all()):
            mask = None
    if mask is not None:
        user = mask.expand(B, Hq, 1, S_max)[..., :L]
        if user.dtype == torch.bool:
            keep = user if keep is None else keep & user
            if not bool(keep.any(-1).all()):  # a row with every key masked: defined as 0
                return attention_decode_ref(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap,
                                            unified_max)
        else:
            bias = user.to(q.dtype)
    if keep is not None:
        if bias is None:
            bias = keep  # SDPA's bool mask: True attends
        else:
            bias = bias.masked_fill(~keep, float("-inf"))
    if bias is not None and mask is not None and mask.dtype != torch.bool:
        if not bool((bias > float("-inf")).any(-1).all()):  # every key at -inf: defined as 0
            return attention_decode_ref(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    k, v = k_cache[:, :, :L], v_cache[:, :, :L]
    G = Hq // Hkv
    if G > 1:  # one query group per KV head: [B, Hkv, G, D] against [B, Hkv, L, D], no K/V copy
        qg = q.reshape(B, Hkv, G, D)
        if bias is not None:
            bias = bias.expand(B, Hq, 1, L).reshape(B, Hkv, G, L)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias, scale=scale)
        return out.reshape(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention_decode_cpu_traced(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0,
                                unified_max=None):
    """:func:`attention_decode_cpu` for a call from a compiled graph (the op's CPU twin).

    The shapes, dtypes, devices and scalars were checked by the op's fake implementation
    when the graph was traced, and the compiled graph's guards keep them: per call this
    looks only at what depends on values. The decode step's usual case (every row the same
    valid length, a mask that keeps every valid key, no window inside the prefix) reads the
    lengths in one ``tolist`` and runs SDPA; anything else goes to the checked
    implementation. Why: the checked path's Python (contract checks, ``max``/``min`` and
    their ``item`` syncs) cost about as much as SDPA itself at decode sizes (measured on the
    CI machine, one thread, llama-100m shapes: 117 us per call against 42 us of SDPA),
    twelve times per step.
    """
    lens = kv_lens.tolist()
    L = lens[0] if lens else 0
    if (softcap > 0 or q.dtype == torch.float64 or 0 < window < L or not 0 < L <= k_cache.shape[2]
            or any(n != L for n in lens) or kernel_mode() == "reference"):
        return attention_decode_fallback(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    if mask is not None:
        user = mask[..., :L]
        # A mask that keeps every valid key (the usual decode mask, no padding) is no mask.
        if not bool(user.all() if user.dtype == torch.bool else (user == 0).all()):
            return attention_decode_fallback(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap,
                                             unified_max)
    B, Hq, _, D = q.shape
    Hkv = k_cache.shape[1]
    k, v = k_cache[:, :, :L], v_cache[:, :, :L]
    if Hq != Hkv:  # one query group per KV head, as in attention_decode_cpu
        out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v, scale=scale)
        return out.reshape(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_decode_fallback(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max):
    """What the op runs on CPU for a case the traced fast path does not take (the reference
    under ``LLMOPT_KERNELS=reference``, as the op itself does)."""
    run = attention_decode_ref if kernel_mode() == "reference" else attention_decode_cpu
    return run(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)


__all__ = ["KERNEL_DTYPES", "attention_decode_cpu", "attention_decode_cpu_traced", "attention_decode_ref", "decode_key_mask",
           "check_decode_args"]
