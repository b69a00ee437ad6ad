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

One kernel, two KV layouts (constexpr ``PAGED``): the dense cache above, or the paged pool
of :mod:`.attention_paged` (``llmopt::paged_attention_prefill``), whose keys are read
through a block table (:func:`.attention_blocks.kv_tile_offsets`) and whose queries are the
varlen packing ``[T, Hq, D]`` of several sequences' new tokens (grid ``(cdiv(T, BLOCK_M) + N,
Hq)``, always causal, ``q_offsets[b] = kv_lens[b] - q_len_b``). :func:`launch_prefill` is the
one launcher both ops' entry points call; the shared tile math (key address, dots, softcap,
online-softmax step) lives in :mod:`.attention_blocks`, the contract and the reference in
:mod:`.attention_prefill_ref`.

Sources: Dao, "FlashAttention-2" (arXiv:2307.08691), the online softmax of Milakov &
Gimelshein (arXiv:1805.02867), the Triton fused-attention tutorial; sliding window from
Mistral 7B (arXiv:2310.06825); soft-capping from Gemma 2 (arXiv:2408.00118).
"""
import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_blocks import (
    LOG2E, block_dim, capped_scores, dot_flags, dot_pv, dot_qk, kv_bases, kv_tile_offsets, normalize,
    online_softmax_step,
)
from .attention_prefill_ref import attention_prefill_ref, check_prefill_inputs
from .kernel_mode import interpreting, on_tensor_device, use_triton
from .op_signature import signature_of

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256

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
    elem = 4 if arg("DOT_PRECISION") == "ieee" else 2
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


def prefill_q_bucket(num_tokens: int, num_seqs: int) -> int:
    """Autotune key of the varlen (paged) prefill: the mean new tokens per sequence, bucketed,
    never the raw token count."""
    return q_bucket(triton.cdiv(max(num_tokens, 1), max(num_seqs, 1)))


# --------------------------------------------------------------------------- kernels
@triton.jit
def _attend_block(
    acc, l_i, m_i, q,
    k_base, v_base, bt_row, mask_base,
    offs_m, q_len, pos_q, offs_d, start_n, kv_len, window,
    stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn, stride_mm, stride_mn,
    scale, softcap,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One K/V block of the online softmax (scores in log2 units, ``exp2``). ``MASK_POSITIONS``
    is False only for interior blocks, where every key is below ``kv_len`` and inside the
    causal/window range of every query of the block, so neither the loads nor the scores need
    a position mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    kv_ok = offs_n < kv_len
    k_off, v_off = kv_tile_offsets(offs_n, kv_ok, bt_row, stride_tn, stride_kb, stride_kn, stride_vb, stride_vn,
                                   PAGED, BLOCK_SIZE)
    if MASK_POSITIONS:
        k = tl.load(k_base + k_off[None, :] + offs_d[:, None] * stride_kd,
                    mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + k_off[None, :] + offs_d[:, None] * stride_kd, mask=d_ok[:, None], other=0.0)
    s = capped_scores(dot_qk(q, k, DOT_PRECISION, DOT_FP32), scale, softcap, LOG2E, HAS_SOFTCAP)

    if HAS_MASK:
        m_ok = (offs_m < q_len)[:, None] & kv_ok[None, :]
        mv = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=m_ok, other=0)
        if MASK_IS_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            mv = mv.to(tl.float32)
            bias = tl.maximum(mv, MASK_FLOOR) * LOG2E
            s = tl.where(mv == float("-inf"), float("-inf"), s + bias)
    if MASK_POSITIONS:
        allowed = kv_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= pos_q[:, None])
        if HAS_WINDOW:
            allowed = allowed & ((pos_q[:, None] - offs_n[None, :]) < window)
        s = tl.where(allowed, s, float("-inf"))

    p, alpha, m_new, l_i = online_softmax_step(m_i, l_i, s, True)
    if MASK_POSITIONS:
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * stride_vd,
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * stride_vd, mask=d_ok[None, :], other=0.0)
    acc = dot_pv(p, v, acc * alpha[:, None], DOT_PRECISION, DOT_FP32)
    return acc, l_i, m_new


@triton.jit
def _varlen_tile(qsl_ptr, pid, num_seqs, BLOCK_M: tl.constexpr, SEQ_SCAN: tl.constexpr):
    """(sequence n, its first query row, its query count, this tile's first row within it)
    of program ``pid`` of the varlen grid: tiles of sequence n are programs
    ``qsl[n] // BLOCK_M + n + i``, an increasing start in n, so n = (number of sequences whose
    first tile is at or before pid) - 1; a program past its sequence's tiles gets a row >= q_len."""
    count = pid * 0
    for s0 in range(0, num_seqs, SEQ_SCAN):
        offs_s = s0 + tl.arange(0, SEQ_SCAN)
        starts = tl.load(qsl_ptr + offs_s, mask=offs_s < num_seqs, other=0).to(tl.int32)
        first_tile = starts // BLOCK_M + offs_s
        count += tl.sum(((first_tile <= pid) & (offs_s < num_seqs)).to(tl.int32), 0)
    n = tl.maximum(count - 1, 0)
    q_start = tl.load(qsl_ptr + n).to(tl.int32)
    q_len = tl.load(qsl_ptr + n + 1).to(tl.int32) - q_start
    return n, q_start, q_len, (pid - (q_start // BLOCK_M + n)) * BLOCK_M


# Sizes are not specialized (a prompt length that happens to be 1 or a multiple of 16 would
# otherwise compile its own variant); strides still are, which is what vectorizes the loads.
@triton.jit(do_not_specialize=["Sq", "Skv", "Q_BUCKET", "num_seqs", "window"])
def _attention_prefill_kernel(
    # pointers (bt_ptr, qsl_ptr: block table and query start offsets, read only when PAGED)
    q_ptr, k_ptr, v_ptr, mask_ptr, kv_lens_ptr, q_offsets_ptr, bt_ptr, qsl_ptr, out_ptr,
    # sizes (Q_BUCKET is only the autotune key; num_seqs only when PAGED)
    Sq, Skv, GROUP, Q_BUCKET, num_seqs,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_tn,
    stride_ob, stride_oh, stride_om, stride_od,
    # scalars
    scale, softcap, window,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, SEQ_SCAN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_Q_OFFSETS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    h_kv = h // GROUP
    if PAGED:
        # varlen: rows [q_start, q_start + q_len) of the packed q are sequence b's new tokens,
        # the last q_len of its kv_lens[b] positions
        n, q_start, q_len, m_first = _varlen_tile(qsl_ptr, tl.program_id(0), num_seqs, BLOCK_M, SEQ_SCAN)
        b = n.to(tl.int64)
        q_off = tl.load(kv_lens_ptr + b).to(tl.int32) - q_len
    else:
        # Last query blocks first: under a causal mask they have the most keys, and starting
        # them early shortens the tail of the launch.
        m_first = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        b = tl.program_id(2).to(tl.int64)
        q_start = 0
        q_len = Sq
        q_off = 0
        if HAS_Q_OFFSETS:
            q_off = tl.load(q_offsets_ptr + b).to(tl.int32)
    kv_len = Skv
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(kv_lens_ptr + b).to(tl.int32), 0), Skv)

    if m_first < q_len:  # always, but for the spare programs of the varlen grid
        m_last = tl.minimum(m_first + BLOCK_M, q_len) - 1  # last real query row of the block
        offs_m = m_first + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        pos_q = q_off + offs_m
        rows = q_start + offs_m
        if PAGED:
            rows = rows.to(tl.int64)

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

        k_base, v_base, bt_row = kv_bases(k_ptr, v_ptr, bt_ptr, b, h_kv, stride_kb, stride_kh, stride_vb, stride_vh,
                                          stride_tb, PAGED)
        mask_base = mask_ptr + b * stride_mb + h * stride_mh
        row_ok = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok, other=0.0)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        # Three stages over [lo, mid_lo), [mid_lo, mid_hi), [mid_hi, hi): only the interior
        # (stage 1) skips the per-key masks. The stage is a compile-time constant
        # (tl.static_range, as in Triton's fused-attention tutorial), so each stage is its
        # own loop with its own constexpr, as if written out three times.
        for stage in tl.static_range(3):
            if stage == 0:
                stage_lo, stage_hi = lo, mid_lo
            elif stage == 1:
                stage_lo, stage_hi = mid_lo, mid_hi
            else:
                stage_lo, stage_hi = mid_hi, hi
            for start_n in range(stage_lo, stage_hi, BLOCK_N):
                acc, l_i, m_i = _attend_block(
                    acc, l_i, m_i, q, k_base, v_base, bt_row, mask_base, offs_m, q_len, pos_q, offs_d, start_n,
                    kv_len, window, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn,
                    stride_mm, stride_mn, scale, softcap, BLOCK_N, HEAD_DIM, PAGED, BLOCK_SIZE,
                    stage != 1, CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, DOT_PRECISION, DOT_FP32,
                )

        # A row that saw no allowed key has l = 0 and acc = 0: its output is defined as 0.
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                 normalize(acc, l_i).to(out_ptr.dtype.element_ty), mask=row_ok)


_attention_prefill_tuned = triton.autotune(
    configs=_prefill_configs(),
    key=["Q_BUCKET", "HEAD_DIM", "PAGED", "BLOCK_SIZE", "CAUSAL", "HAS_MASK", "HAS_SOFTCAP", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_prefill_configs},
)(_attention_prefill_kernel)

# Sequences scanned per step of the varlen grid's owner search (one vector load + sum).
_SEQ_SCAN = 128


# --------------------------------------------------------------------------- launchers
def launch_prefill(q, k, v, out, *, scale, causal, window, softcap, mask=None, kv_lens=None, q_offsets=None,
                   block_tables=None, query_start_loc=None):
    """Launch the prefill kernel; checks nothing and allocates nothing (both launchers, dense
    and paged, check the call and own ``out``).

    Dense: ``q, out: [B, Hq, Sq, D]``, ``k, v: [B, Hkv, Skv, D]``, grid
    ``(cdiv(Sq, BLOCK_M), Hq, B)``. Paged (``block_tables`` given, ``PAGED``): ``q, out:
    [T, Hq, D]`` packed by ``query_start_loc [N + 1]``, ``k, v`` the pools ``[num_blocks,
    Hkv, block_size, D]``, ``kv_lens`` the sequences' lengths (new tokens included), always
    causal; varlen grid ``(cdiv(T, BLOCK_M) + N, Hq)``.
    """
    paged = block_tables is not None
    hq, d, hkv = q.shape[1], q.shape[-1], k.shape[1]
    if paged:
        sq, skv, n = q.shape[0], block_tables.shape[1] * k.shape[2], block_tables.shape[0]
        q_strides = (0, q.stride(1), q.stride(0), q.stride(2))
        o_strides = (0, out.stride(1), out.stride(0), out.stride(2))
        bucket = prefill_q_bucket(sq, n)
    else:
        sq, skv, n = q.shape[2], k.shape[2], q.shape[0]
        q_strides, o_strides, bucket = q.stride(), out.stride(), q_bucket(q.shape[2])
    if mask is not None:
        # Broadcast dims become stride 0: the kernel reads HF's [B, 1, Sq, Skv] mask as is.
        m = mask.expand(n, hq, sq, skv)
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)  # same bytes; a uint8 pointer loads on every Triton version
        mask_strides = m.stride()
    else:
        m, mask_strides = q, (0, 0, 0, 0)  # never read (HAS_MASK is False)
    dummy = q  # the pointer of an absent optional tensor (its flag keeps it unread)
    args = (
        q, k, v, m,
        kv_lens if kv_lens is not None else dummy, q_offsets if q_offsets is not None else dummy,
        block_tables if paged else dummy, query_start_loc if paged else dummy, out,
        sq, skv, hq // hkv, bucket, n,
        *q_strides, *k.stride(), *v.stride(), *mask_strides,
        *(block_tables.stride() if paged else (0, 0)), *o_strides,
        float(scale), float(softcap), int(window),
    )
    dot_precision, dot_fp32 = dot_flags(q.dtype)
    meta = dict(
        HEAD_DIM=d, BLOCK_D=block_dim(d), PAGED=paged, BLOCK_SIZE=k.shape[2] if paged else 1, SEQ_SCAN=_SEQ_SCAN,
        CAUSAL=bool(causal) or paged, HAS_WINDOW=window > 0,
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        HAS_SOFTCAP=softcap > 0, HAS_KV_LENS=kv_lens is not None, HAS_Q_OFFSETS=q_offsets is not None and not paged,
        DOT_PRECISION=dot_precision, DOT_FP32=dot_fp32,
    )

    def grid(cfg):
        if paged:
            return (triton.cdiv(sq, cfg["BLOCK_M"]) + n, hq)
        return (triton.cdiv(sq, cfg["BLOCK_M"]), hq, n)

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if q.is_cuda and not interpreting():
            _attention_prefill_tuned[grid](*args, **meta)
        else:
            # Interpreter: one fixed small config (autotuning there would only time numpy).
            _attention_prefill_kernel[grid(INTERPRETER_CONFIG)](*args, **meta, **INTERPRETER_CONFIG)
    return out


@on_tensor_device
@signature_of(attention_prefill_ref, extra=("out",))
def attention_prefill_triton(q, k, v, mask, kv_lens, q_offsets, scale, causal, window=0, softcap=0.0,
                             out: Optional[torch.Tensor] = None):
    """Prefill attention with the Triton kernel; returns ``out`` (allocated when None)."""
    op = "attention_prefill"
    check_prefill_inputs(op, q, k, v, mask, kv_lens, q_offsets, window, softcap)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernel supports {KERNEL_DTYPES}, got {q.dtype}; use {op}_ref")
    d = q.shape[3]
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
    return launch_prefill(q, k, v, out, scale=scale, causal=causal, window=window, softcap=softcap, mask=mask,
                          kv_lens=kv_lens, q_offsets=q_offsets)


# --------------------------------------------------------------------------- registered op
def _kernel_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # fp64 and head dims above 256 always take the reference.
    return q.dtype in KERNEL_DTYPES and 0 < q.shape[-1] <= MAX_HEAD_DIM and use_triton(q, k, v)


@torch.library.custom_op("llmopt::attention_prefill", mutates_args=())
@signature_of(attention_prefill_ref)
def attention_prefill(q, k, v, mask, kv_lens, q_offsets, scale, causal, window=0, softcap=0.0):
    """Prefill attention (module docstring): a fresh contiguous ``[B, Hq, Sq, D]`` tensor."""
    if _kernel_path(q, k, v):
        return attention_prefill_triton(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)
    return attention_prefill_ref(q, k, v, mask, kv_lens, q_offsets, scale, causal, window, softcap)


@attention_prefill.register_fake
def _(q, k, v, mask, kv_lens, q_offsets, scale, causal, window=0, softcap=0.0):
    check_prefill_inputs("attention_prefill", q, k, v, mask, kv_lens, q_offsets, window, softcap)
    return q.new_empty(q.shape)
