"""Prefill attention: one FlashAttention-2-style tiled kernel for every mask a decoder uses.

Prefill attends ``Sq`` new queries to ``Skv`` keys. Eager attention materializes the
``[B, H, Sq, Skv]`` score matrix (and, for GQA, a repeated copy of K and V); here a program
owns ``BLOCK_M`` queries of one head, keeps them in registers and streams K/V in
``BLOCK_N``-key blocks through an online softmax, so scores never touch memory and K/V are
read once per query block, straight from the shared KV head.

Math, per batch ``b``, query head ``h`` (KV head ``h // (Hq // Hkv)``), query row ``i``:

    p_q     = q_offsets[b] + i                      absolute position of the query
    s_ij    = scale * q_i . k_j                     then, if softcap > 0,
    s_ij    = softcap * tanh(s_ij / softcap)        (Gemma 2 logit soft-capping)
    s_ij   += mask[b, h, i, j]                      additive float mask, if given
    allowed = j < kv_lens[b]
              and (not causal or j <= p_q)
              and (window == 0 or p_q - j < window) (Mistral sliding window)
              and mask[b, h, i, j]                  bool mask; an additive -inf also masks
    out_i   = sum_j softmax_j(s_ij over allowed j) v_j,  and 0 when no key is allowed.

``q_offsets`` (default 0: top-left aligned like SDPA's ``is_causal``) places the queries at
an offset into the cache, which is chunked prefill and prefix reuse; ``kv_lens`` (default
``Skv``) gives each sequence of the batch its own valid length. Keys at or beyond
``kv_lens[b]`` are never read, so the work is proportional to the valid length, not to the
cache capacity.

Shapes (Hugging Face layout, any strides): ``q: [B, Hq, Sq, D]``, ``k, v: [B, Hkv, Skv, D]``
with ``Hq % Hkv == 0`` (GQA/MQA read the shared KV head, no repeat); ``mask`` broadcastable to
``[B, Hq, Sq, Skv]`` (read through expanded strides, never materialized); ``kv_lens,
q_offsets: [B]`` int32/int64. ``out: [B, Hq, Sq, D]`` contiguous, dtype of ``q``. Head dims up
to 256; dims that are not powers of two (80, 96) are padded to the next one with masked loads.

Precision: ``q.k`` and ``p.v`` accumulate in fp32 (fp32 inputs use IEEE fp32 dots, not tf32);
the softmax runs in fp32 with ``exp2`` and ``log2(e)`` folded into the scale; ``p`` is rounded
to the input dtype before ``p.v`` as in FlashAttention-2. One rounding of the output.

Loop structure per query block: the key range is cut to ``[lo, hi)`` (causal blocks above the
diagonal and keys outside the window or beyond ``kv_lens`` are never visited), then split
into boundary blocks, which apply the position mask, and interior blocks, which need none.

Sources: Dao, "FlashAttention-2" (arXiv:2307.08691), the online softmax of Milakov &
Gimelshein (arXiv:1805.02867), the Triton fused-attention tutorial; sliding window from
Mistral 7B (arXiv:2310.06825); soft-capping from Gemma 2 (arXiv:2408.00118).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .device_math import tanh
from .kernel_mode import interpreting, on_tensor_device, use_triton

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
LENGTH_DTYPES = (torch.int32, torch.int64)

# Additive mask values are clamped here before the log2(e) fold, so that HF's
# ``finfo(dtype).min`` stays finite (a row masked only by it gets eager's uniform softmax,
# not an all -inf row) while -inf itself still means "not allowed".
MASK_FLOOR = tl.constexpr(-1.0e37)

# One small config under the interpreter: it runs numpy per block, so tile size is only speed.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------- autotune space
def _prefill_configs():
    tiles = [(128, 128), (128, 64), (128, 32), (64, 128), (64, 64), (64, 32), (32, 64), (16, 64), (16, 32)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in tiles
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _prune_prefill_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot pay off for this head dim and query count.

    - ``BLOCK_M`` no larger than the (bucketed) query count: a 128-row tile for 16 queries
      only wastes registers.
    - The fp32 accumulator ``BLOCK_M x BLOCK_D`` must fit in registers: at most 128 fp32 per
      thread, or the kernel spills.
    - Shared memory for Q plus ``num_stages`` K and V blocks within 160 KiB (below the
      227 KiB of H100 and the 164 KiB of A100, leaving room for the compiler's scratch).
    - 8 warps only for tiles big enough to give each warp 16 rows or more of work.
    """
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    block_d = arg("BLOCK_D")
    bucket = arg("Q_BUCKET")
    elem = 4 if arg("IEEE_FP32") else 2
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > max(16, bucket):
            continue
        if bm * block_d > 128 * 32 * c.num_warps:
            continue
        if (bm * block_d + 2 * c.num_stages * bn * block_d) * elem > 160 * 1024:
            continue
        if c.num_warps == 8 and bm < 128:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


def q_bucket(sq: int) -> int:
    """Autotune key for the query count: ``min(next_pow2(Sq), 128)`` (128 is the largest tile)."""
    return min(triton.next_power_of_2(max(sq, 1)), 128)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _attend_block(
    acc, l_i, m_i, q,
    k_base, v_base, mask_base,
    offs_m, pos_q, offs_d, start_n,
    Sq, kv_len, window,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    scale, qk_scale, softcap,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One K/V block of the online softmax. ``MASK_POSITIONS`` is False only for interior
    blocks, where every key is below ``kv_len`` and inside the causal/window range of every
    query of the block, so neither the loads nor the scores need a position mask."""
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    if MASK_POSITIONS:
        kv_ok = offs_n < kv_len
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=d_ok[:, None], other=0.0)
    if IEEE_FP32:
        qk = tl.dot(q, k, input_precision="ieee")
    elif UPCAST_DOT:
        qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")  # q was upcast by the caller
    else:
        qk = tl.dot(q, k)

    if HAS_SOFTCAP:
        s = softcap * tanh(qk * (scale / softcap))
        s = s * LOG2E
    else:
        s = qk * qk_scale  # scale * log2(e): the softmax below uses exp2

    if HAS_MASK:
        m_ok = (offs_m < Sq)[:, None] & (offs_n < kv_len)[None, :]
        mv = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=m_ok, other=0)
        if MASK_IS_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            mv = mv.to(tl.float32)
            bias = tl.maximum(mv, MASK_FLOOR) * LOG2E
            s = tl.where(mv == float("-inf"), float("-inf"), s + bias)
    if MASK_POSITIONS:
        allowed = (offs_n < kv_len)[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= pos_q[:, None])
        if HAS_WINDOW:
            allowed = allowed & ((pos_q[:, None] - offs_n[None, :]) < window)
        s = tl.where(allowed, s, float("-inf"))

    # Online softmax. A row with no allowed key so far has m = -inf; subtracting 0 instead
    # keeps exp2 at exactly 0 for it rather than NaN (-inf - -inf).
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    if MASK_POSITIONS:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None]
    if IEEE_FP32:
        acc += tl.dot(p, v, input_precision="ieee")
    elif UPCAST_DOT:
        acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


# Sizes are not specialized (a prompt length that happens to be 1 or a multiple of 16 would
# otherwise compile its own variant); strides still are, which is what vectorizes the loads.
@triton.jit(do_not_specialize=["Sq", "Skv", "Q_BUCKET", "window"])
def _attention_prefill_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, kv_lens_ptr, q_offsets_ptr, out_ptr,
    # sizes (Q_BUCKET is only the autotune key)
    Sq, Skv, GROUP, Q_BUCKET,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    # scalars
    scale, softcap, window,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_Q_OFFSETS: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    # Last query blocks first: under a causal mask they have the most keys, and starting
    # them early shortens the tail of the launch.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    h_kv = h // GROUP

    kv_len = Skv
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(kv_lens_ptr + b).to(tl.int32), 0), Skv)
    q_off = 0
    if HAS_Q_OFFSETS:
        q_off = tl.load(q_offsets_ptr + b).to(tl.int32)

    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, Sq) - 1  # last real query row of the block
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos_q = q_off + offs_m

    # Key range any query of the block may see: [lo, hi).
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, q_off + m_last + 1)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(q_off + m_first - window + 1, 0) // BLOCK_N) * BLOCK_N
    # Interior blocks [full_lo, full_hi): allowed for every query row of the block.
    full_lo = lo
    if HAS_WINDOW:
        full_lo = tl.cdiv(tl.maximum(q_off + m_last - window + 1, 0), BLOCK_N) * BLOCK_N
    full_hi = kv_len
    if CAUSAL:
        full_hi = tl.minimum(full_hi, q_off + m_first + 1)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    # Clamp so that [lo, mid_lo) + [mid_lo, mid_hi) + [mid_hi, hi) cover [lo, hi) exactly.
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), hi)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    for start_n in range(lo, mid_lo, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, pos_q, offs_d, start_n,
            Sq, kv_len, window, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            scale, qk_scale, softcap,
            BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, IEEE_FP32,
            UPCAST_DOT,
        )
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, pos_q, offs_d, start_n,
            Sq, kv_len, window, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            scale, qk_scale, softcap,
            BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, IEEE_FP32,
            UPCAST_DOT,
        )
    for start_n in range(mid_hi, hi, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, pos_q, offs_d, start_n,
            Sq, kv_len, window, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            scale, qk_scale, softcap,
            BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, IEEE_FP32,
            UPCAST_DOT,
        )

    # A row that saw no allowed key has l = 0 and acc = 0: its output is defined as 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_base = out_ptr + b * stride_ob + h * stride_oh
    tl.store(out_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty),
             mask=(offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :])


_attention_prefill_tuned = triton.autotune(
    configs=_prefill_configs(),
    key=["Q_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_SOFTCAP", "IEEE_FP32"],
    prune_configs_by={"early_config_prune": _prune_prefill_configs},
)(_attention_prefill_kernel)


# --------------------------------------------------------------------------- contract checks
def _check_lengths(op: str, name: str, t: Optional[torch.Tensor], batch: int, device) -> None:
    if t is None:
        return
    if t.shape != (batch,) or t.dtype not in LENGTH_DTYPES or t.device != device:
        raise ValueError(
            f"{op}: {name} must be an int32/int64 tensor of shape [{batch}] (one entry per sequence) on "
            f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _check_inputs(op, q, k, v, mask, kv_lens, q_offsets, window, softcap) -> None:
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
    _check_inputs("attention_prefill_ref", q, k, v, mask, kv_lens, q_offsets, window, softcap)
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


# --------------------------------------------------------------------------- launcher
@on_tensor_device
def attention_prefill_triton(
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
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Prefill attention with the Triton kernel; returns ``out`` (allocated when None)."""
    op = "attention_prefill"
    _check_inputs(op, q, k, v, mask, kv_lens, q_offsets, window, softcap)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernel supports {KERNEL_DTYPES}, got {q.dtype}; use {op}_ref")
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if d > MAX_HEAD_DIM or d == 0:
        raise ValueError(f"{op}: the Triton kernel supports head_dim 1..{MAX_HEAD_DIM}, got {d}; use {op}_ref")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"{op}: out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}; pass out=None to allocate it"
        )
    if out.numel() == 0:
        return out

    if mask is not None:
        # Broadcast dims become stride 0: the kernel reads HF's [B, 1, Sq, Skv] mask as is.
        m = mask.expand(b, hq, sq, skv)
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)  # same bytes; a uint8 pointer loads on every Triton version
        mask_strides = m.stride()
    else:
        m, mask_strides = q, (0, 0, 0, 0)  # never read (HAS_MASK is False)

    args = (
        q, k, v, m,
        kv_lens if kv_lens is not None else q, q_offsets if q_offsets is not None else q, out,
        sq, skv, hq // hkv, q_bucket(sq),
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        float(scale), float(softcap), int(window),
    )
    meta = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        CAUSAL=bool(causal), HAS_WINDOW=window > 0,
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        HAS_SOFTCAP=softcap > 0, HAS_KV_LENS=kv_lens is not None, HAS_Q_OFFSETS=q_offsets is not None,
        IEEE_FP32=q.dtype == torch.float32,
        # Triton's interpreter (3.x) multiplies the raw uint16 bits of bf16 operands in
        # tl.dot; there, bf16 operands are upcast exactly to fp32 first (same products, same
        # fp32 accumulation as the tensor-core dot).
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreting(),
    )
    if q.is_cuda and not interpreting():
        def grid(cfg):
            return (triton.cdiv(sq, cfg["BLOCK_M"]), hq, b)

        _attention_prefill_tuned[grid](*args, **meta)
    else:
        # Interpreter: one fixed small config (autotuning there would only time numpy).
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(sq, cfg["BLOCK_M"]), hq, b)
        _attention_prefill_kernel[grid](*args, **meta, **cfg)
    return out


# --------------------------------------------------------------------------- registered op
def _kernel_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # fp64 and head dims above 256 always take the reference.
    return q.dtype in KERNEL_DTYPES and 0 < q.shape[-1] <= MAX_HEAD_DIM and use_triton(q, k, v)


@torch.library.custom_op("llmopt::attention_prefill", mutates_args=())
def attention_prefill(
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
    """Prefill attention (module docstring): a fresh contiguous ``[B, Hq, Sq, D]`` tensor."""
    if _kernel_path(q, k, v):
        return attention_prefill_triton(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)
    return attention_prefill_ref(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)


@attention_prefill.register_fake
def _(q, k, v, mask, kv_lens, q_offsets, scale, causal, window=0, softcap=0.0):
    _check_inputs("attention_prefill", q, k, v, mask, kv_lens, q_offsets, window, softcap)
    return q.new_empty(q.shape)
