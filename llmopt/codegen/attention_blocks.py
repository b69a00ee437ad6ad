"""The ``@triton.jit`` building blocks that the prefill and decode attention kernels share.

Why one module: :mod:`.attention_prefill` and :mod:`.attention_decode` each hold one kernel
serving both KV layouts — a dense ``[B, Hkv, S, D]`` cache (HF layout, any strides) and a
paged pool ``[num_blocks, Hkv, block_size, D]`` read through a block table
(:mod:`.attention_paged`). What both kernels do alike lives here, once:

- :func:`kv_bases` / :func:`kv_tile_offsets` — the address of key ``j``, chosen by the
  constexpr ``PAGED``:
  ``j * stride_n`` in a dense cache (the caller's base already points at sequence ``b``),
  ``block_tables[b, j // BLOCK_SIZE] * stride_b + (j % BLOCK_SIZE) * stride_n`` in a pool
  (the base points at the KV head only). The key tile ``BLOCK_N`` does not depend on
  ``BLOCK_SIZE``: keys are gathered one by one, so any block size works.
- :func:`dot_qk` / :func:`dot_pv` — the two products, fp32 accumulation, with the
  interpreter's bf16 work-around (``DOT_FP32``, see :func:`dot_flags`); ``p`` is rounded to
  the cache dtype before ``p.v`` as in FlashAttention-2.
- :func:`capped_scores` — the scale and the Gemma 2 logit soft-cap ``c * tanh(s / c)``
  (tanh from :mod:`.device_math`), in natural or log2 units.
- :func:`online_softmax_step` — one tile of the online softmax (Milakov & Gimelshein,
  arXiv:1805.02867; FlashAttention-2, arXiv:2307.08691), NaN-free for rows with no key yet.
- :func:`split_bounds` — the chunk of split-KV decode (FlashDecoding) each program owns,
  which the split kernel and the combine kernel must compute alike.
- :func:`normalize` / :func:`partial_lse` — the end of a split: ``o = acc / l`` (0 for a row
  with no key) and its log-sum-exp, which :func:`combine_lse` merges across splits.

Host side: :func:`dot_flags` (the two dot constexprs for a dtype) and :func:`block_dim`.
"""
import torch
import triton
import triton.language as tl

from .device_math import tanh
from .kernel_mode import interpreting

LOG2E = tl.constexpr(1.4426950408889634)


def dot_flags(dtype: torch.dtype) -> tuple[str, bool]:
    """``(DOT_PRECISION, DOT_FP32)`` for inputs of ``dtype``: IEEE fp32 dots for fp32 (no
    tf32), and, under the interpreter, bf16 operands upcast to fp32 before each dot (Triton
    3.x's interpreter multiplies the raw uint16 bits of bf16 in ``tl.dot``; the upcast is
    exact, so the products and the fp32 accumulation are those of the tensor-core dot)."""
    return ("ieee" if dtype == torch.float32 else "tf32"), (dtype == torch.bfloat16 and interpreting())


def block_dim(n: int) -> int:
    """A ``tl.dot`` operand dimension for ``n`` rows or columns: the next power of two, >= 16."""
    return max(16, triton.next_power_of_2(max(n, 1)))


@triton.jit
def kv_tile_offsets(offs_n, n_valid, bt_row, stride_tn, stride_kb, stride_kn, stride_vb, stride_vn,
                    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Element offsets of keys ``offs_n`` in K and in V (module docstring). Dense: from the
    sequence's base. Paged: from the KV head's base of the pool, through the table row
    ``bt_row`` (entries of keys that are not valid are not read)."""
    if PAGED:
        blk = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_tn, mask=n_valid, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        k_off = blk * stride_kb + slot * stride_kn
        v_off = blk * stride_vb + slot * stride_vn
    else:
        k_off = offs_n * stride_kn
        v_off = offs_n * stride_vn
    return k_off, v_off


@triton.jit
def kv_bases(k_ptr, v_ptr, bt_ptr, b, h_kv, stride_kb, stride_kh, stride_vb, stride_vh, stride_tb,
             PAGED: tl.constexpr):
    """``(k_base, v_base, bt_row)``: the bases :func:`kv_tile_offsets` addresses keys from.
    A dense cache is per sequence (KV head ``h_kv`` of sequence ``b``); a paged pool is
    shared by every sequence (KV head ``h_kv`` only), and ``bt_row`` is ``b``'s block-table
    row."""
    k_base = k_ptr + h_kv * stride_kh
    v_base = v_ptr + h_kv * stride_vh
    if not PAGED:
        k_base += b * stride_kb
        v_base += b * stride_vb
    return k_base, v_base, bt_ptr + b * stride_tb


@triton.jit
def dot_qk(q, kt, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``q @ kt`` in fp32 (``q: [M, D]``, ``kt: [D, N]``)."""
    if DOT_FP32:
        return tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_PRECISION)
    return tl.dot(q, kt, input_precision=DOT_PRECISION)


@triton.jit
def dot_pv(p, v, acc, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + p @ v`` with ``p`` (fp32, <= 1) rounded to the cache dtype first."""
    if DOT_FP32:
        # same rounding of p as the MMA path, products in fp32
        return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)


@triton.jit
def capped_scores(qk, scale, softcap, units, HAS_SOFTCAP: tl.constexpr):
    """``units * scale * qk``, soft-capped as ``units * softcap * tanh(scale * qk / softcap)``;
    ``units`` is 1 (natural log units) or ``LOG2E`` (for an ``exp2`` softmax)."""
    if HAS_SOFTCAP:
        return softcap * tanh(qk * (scale / softcap)) * units
    return qk * (scale * units)


@triton.jit
def online_softmax_step(m_i, l_i, s, EXP2: tl.constexpr):
    """One tile ``s [M, N]`` of the online softmax: returns ``(p, alpha, m_new, l_new)`` with
    ``p = e^(s - m_new)``, ``alpha = e^(m_i - m_new)`` (the caller rescales its accumulator
    by it) and ``l_new = alpha * l_i + sum p``; base 2 when ``EXP2``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with no key yet keeps m = -inf; shift by 0 so -inf - -inf never makes NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    if EXP2:
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
    else:
        alpha = tl.exp(m_i - m_sub)
        p = tl.exp(s - m_sub[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def normalize(acc, l):
    """``acc / l`` per row, 0 for a row that saw no key (``l == 0``), never NaN."""
    l_safe = tl.where(l > 0.0, l, 1.0)
    return tl.where(l[:, None] > 0.0, acc / l_safe[:, None], 0.0)


@triton.jit
def partial_lse(l, shift):
    """Log-sum-exp of a split from its sum ``l = sum e^(s - shift)``; -inf when empty."""
    l_safe = tl.where(l > 0.0, l, 1.0)
    return tl.where(l > 0.0, tl.log(l_safe) + shift, float("-inf"))


@triton.jit
def split_bounds(lens_ptr, pid_b, S_max, window, num_splits,
                 SPLIT_ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(kv_len, lo, chunk) of sequence ``pid_b``: attended keys are [lo, kv_len), split i
    covers [lo + i * chunk, lo + (i + 1) * chunk). The split and combine kernels both call
    this, so they agree on which splits ran."""
    kv_len = tl.load(lens_ptr + pid_b).to(tl.int32)
    # kv_lens outside [0, S_max] cannot be reported from the device: clamp so no read is out of bounds
    kv_len = tl.minimum(tl.maximum(kv_len, 0), S_max)
    lo = kv_len * 0
    if HAS_WINDOW:
        lo = tl.maximum(kv_len - window, 0)
    per_split = tl.cdiv(kv_len - lo, num_splits)
    chunk = tl.maximum(tl.cdiv(per_split, SPLIT_ALIGN) * SPLIT_ALIGN, SPLIT_ALIGN)
    return kv_len, lo, chunk


@triton.jit
def combine_lse(lse, o):
    """Merge splits: ``lse [S]`` and normalized partials ``o [S, D]`` (empty splits have
    ``lse = -inf``) into ``sum_i e^(lse_i - M) o_i / sum_i e^(lse_i - M)``, 0 if all empty."""
    m = tl.max(lse, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_ref)
    denom = tl.sum(w, 0)
    acc = tl.sum(w[:, None] * o, 0)
    denom_safe = tl.where(denom > 0.0, denom, 1.0)
    return tl.where(denom > 0.0, acc / denom_safe, 0.0)


__all__ = [
    "LOG2E",
    "block_dim",
    "capped_scores",
    "combine_lse",
    "dot_flags",
    "dot_pv",
    "dot_qk",
    "kv_bases",
    "kv_tile_offsets",
    "normalize",
    "online_softmax_step",
    "partial_lse",
    "split_bounds",
]
