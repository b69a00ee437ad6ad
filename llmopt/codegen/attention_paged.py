"""Paged attention: K/V live in fixed-size blocks of a shared pool, read through a block table.

PagedAttention (Kwon et al. 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention", vLLM): instead of one contiguous ``[S_max, D]`` cache per
sequence, every layer owns a pool of blocks of ``block_size`` tokens and each sequence a
list of block ids; a sequence grows one block at a time and frees its blocks when it ends,
so KV memory follows the real lengths (no reservation for ``max_seq_len``), and a common
prefix can be shared between sequences by pointing two tables at the same blocks.

Layout (one layer)::

    k_pool, v_pool: [num_blocks, Hkv, block_size, D]    any strides
    block_tables:   [B, max_blocks_per_seq] int32/int64  block j of sequence b holds its
                                                         tokens [j * block_size, (j+1) * block_size)
    seq_lens:       [B] int32/int64                      valid tokens of sequence b (new ones included)
    token p of sequence b is at  pool[block_tables[b, p // block_size], :, p % block_size, :]

Why ``[num_blocks, Hkv, block_size, D]``: a program works on one (sequence, KV head) and
reads its keys block by block; in this layout a (block, head) is one contiguous
``block_size * D`` tile (4 KiB for 16 fp16 tokens of head dim 128), read with fully
coalesced loads, and it is the per-head ``[H, S, D]`` layout of Hugging Face and of the
dense kernels cut into blocks, so the same tile code reads both. (vLLM's flash layout
``[num_blocks, block_size, Hkv, D]`` makes a token's append one contiguous write across
heads instead, but a per-head read strided by ``Hkv * D``; appends are one token per
sequence per step, reads are the whole context, so reads decide.)

Ops (the math of the dense kernels, :mod:`.attention_decode` and :mod:`.attention_prefill`,
only the address of key ``j`` changes):

``paged_kv_append(k_pool, v_pool, slot_mapping [T], k [T, Hkv, D], v)`` writes row ``t`` at
slot ``slot_mapping[t] = block * block_size + offset``, in place; a negative slot is skipped
(padding rows of a CUDA-graph bucket). One program per token copies its ``[Hkv, D]`` tile.

``paged_attention_decode(q [B, Hq, 1, D], k_pool, v_pool, block_tables, seq_lens, scale,
window=0, softcap=0.0) -> [B, Hq, 1, D]``: one new token per sequence against keys
``[max(0, L - window), L)`` (``L = seq_lens[b]``; the new token's K/V already appended).
Split-KV as the dense decode kernel (FlashDecoding): grid ``(B, Hkv, num_splits)``, the key
range of each sequence cut into ``num_splits`` chunks on the device, all G query heads of a
KV group in one ``[G, D]`` tile (padded to 16 rows for ``tl.dot``) so each K/V tile is read
once per group, fp32 online softmax, fp32 partials ``(o_i, lse_i)`` combined by log-sum-exp
with the dense module's combine kernel (the chunk bounds come from the same
``_split_bounds``, with ``S_max = max_blocks_per_seq * block_size``). The split count depends
on shapes only, so a decode step has a constant grid (CUDA graphs replay it). Plan once, run
per layer (flashinfer's plan/run): :func:`plan_paged_decode` makes a step's
:class:`PagedDecodePlan` (split count, config, one fp32 workspace ``[B, Hq, num_splits, P]``
for the partials, ``P = decode_workspace_pitch(D)``) that every layer's launch runs on
without allocating; the registered op takes the plan's workspace as an optional mutable
argument.

``paged_attention_prefill(q [T, Hq, D], k_pool, v_pool, block_tables, seq_lens,
query_start_loc [N+1], scale, window=0, softcap=0.0) -> [T, Hq, D]``: ``N`` sequences' new
tokens packed along ``T`` (varlen, no padding): rows ``query_start_loc[n] ..
query_start_loc[n+1] - 1`` are the ``q_len_n`` new tokens of sequence ``n``, at positions
``seq_lens[n] - q_len_n ..  seq_lens[n] - 1``; query ``i`` attends causally to the cached
prefix and to the new tokens up to itself: keys ``j <= p_i`` (and ``p_i - j < window``).
This is a chunked prefill, a prompt that reuses a cached prefix, and also a decode token
(``q_len = 1``), so a step that mixes prefills and decodes is one launch.
FlashAttention-2 tiling as the dense prefill kernel (``BLOCK_M`` queries of one head per
program, ``BLOCK_N`` keys streamed with an online softmax in exp2, causal tiles skipped);
the varlen grid is ``(cdiv(T, BLOCK_M) + N, Hq)``: sequence ``n``'s query tiles are programs
``query_start_loc[n] // BLOCK_M + n + m`` (distinct for all n, inside the grid; the vLLM
Triton backend's numbering), which a program finds by counting the sequences that start at
or before it. ``query_start_loc[N]`` must equal ``T``.

Keys are gathered one by one through the table (``block_tables[b, j // block_size]``), so
the key tile ``BLOCK_N`` is independent of ``block_size`` (8, 16, 32, ... all work; a tile
equal to the block size reads one contiguous block). Accumulation is fp32; ``p`` is rounded
to the cache dtype before ``p.v`` for fp16/bf16 as in FlashAttention-2; fp32 uses IEEE
dots. A row with no key (``seq_lens[b] == 0``) gives 0, never NaN.

Limits: block ids and lengths come from device tensors; the CPU paths (reference and
interpreter launcher) check them and raise, the CUDA kernels cannot without a host sync
and clamp lengths to the table's capacity instead. Under the interpreter bf16 dot operands
are upcast to fp32 first (its ``tl.dot`` multiplies the raw bits of bf16).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_decode import (
    _SPLIT_ALIGN_CUDA,
    _SPLIT_ALIGN_INTERPRETER,
    _decode_combine_kernel,
    _split_bounds,
    attention_decode_ref,
    decode_heuristic_config,
    decode_num_splits,
    next_pow2,
)
from .attention_prefill import (
    INTERPRETER_CONFIG,
    MAX_HEAD_DIM,
    _prefill_configs,
    _prune_prefill_configs,
    attention_prefill_ref,
    q_bucket,
)
from .device_math import tanh
from .kernel_mode import interpreting, on_tensor_device, use_triton

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
DEFAULT_BLOCK_SIZE = 16

# ---------------------------------------------------------------------------------------
# Config space and pruning
# ---------------------------------------------------------------------------------------
# Decode: the dense split kernel's heuristic (decode_heuristic_config: 64-key tiles, 4 warps
# on CUDA; 16-key tiles in the interpreter). Prefill: the dense prefill config space and its
# pruning (_prefill_configs, _prune_prefill_configs), keyed by the bucketed mean query length
# per sequence, never the raw token count.


def prefill_q_bucket(num_tokens: int, num_seqs: int) -> int:
    """Autotune key of the varlen prefill: the mean new tokens per sequence, bucketed."""
    return q_bucket(triton.cdiv(max(num_tokens, 1), max(num_seqs, 1)))


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _paged_kv_append_kernel(
    # pointers
    k_ptr, v_ptr, kp_ptr, vp_ptr, slot_ptr,
    # sizes
    num_slots, H, D,
    # strides
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    # constexprs
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program t: token t's [Hkv, D] K and V tiles into their slot (skipped if the slot is
    negative or past the pool)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # broadcast the scalar slot to the tile so the mask is a block mask
    slot_t = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot
    ok = (offs_h < H)[:, None] & (offs_d < D)[None, :] & (slot_t >= 0) & (slot_t < num_slots)
    safe = tl.where(slot_t >= 0, slot_t, 0)
    blk = safe // BLOCK_SIZE
    off = safe % BLOCK_SIZE
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=ok)
    tl.store(kp_ptr + blk * stride_kpb + offs_h[:, None] * stride_kph + off * stride_kpn + offs_d[None, :] * stride_kpd,
             k, mask=ok)
    tl.store(vp_ptr + blk * stride_vpb + offs_h[:, None] * stride_vph + off * stride_vpn + offs_d[None, :] * stride_vpd,
             v, mask=ok)


@triton.jit
def _paged_decode_keys(
    q, k_head, v_head, bt_row, start, end, scale, softcap,
    g_valid, offs_d, d_valid,
    stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Keys [start, end) of one (sequence, KV head) for the G query rows ``q``: the exact
    online softmax of the dense decode kernel, keys addressed through the block table.
    Returns (acc [G, D], l [G], m [G]) in fp32 with acc / l = o and lse = log(l) + m."""
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        # physical address of each key: its block (from the table) and its slot in the block
        blk = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_tn, mask=n_valid, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        k_off = blk * stride_kb + slot * stride_kn
        v_off = blk * stride_vb + slot * stride_vn
        kt = tl.load(k_head + k_off[None, :] + offs_d[:, None] * stride_kd,
                     mask=d_valid[:, None] & n_valid[None, :], other=0.0)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_PRECISION) * scale
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
        if HAS_SOFTCAP:
            s = softcap * tanh(s / softcap)
        s = tl.where(g_valid[:, None] & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # a row with no key yet keeps m = -inf; shift by 0 so -inf - -inf never makes NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        acc = acc * alpha[:, None]
        l = l * alpha + tl.sum(p, 1)
        m = m_new
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l, m


@triton.jit
def _paged_decode_split_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, part_o_ptr, part_lse_ptr, out_ptr,
    # sizes and scalars
    S_max, num_splits, window, scale, softcap,
    # strides
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_tn,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    # constexprs
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_ALIGN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (sequence b, kv head, split): the G query heads of the group against one chunk."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    kv_len, lo, chunk = _split_bounds(lens_ptr, pid_b, S_max, window, num_splits, SPLIT_ALIGN, HAS_WINDOW)
    start = lo + pid_s * chunk
    end = tl.minimum(start + chunk, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    heads = pid_h * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    rows = g_valid[:, None] & d_valid[None, :]
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    k_head = k_ptr + h64 * stride_kh
    v_head = v_ptr + h64 * stride_vh
    bt_row = bt_ptr + b64 * stride_tb

    if DIRECT:
        # one split: normalize and write the output here (0 when the sequence is empty)
        q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=rows, other=0.0)
        acc, l, m = _paged_decode_keys(
            q, k_head, v_head, bt_row, start, end, scale, softcap, g_valid, offs_d, d_valid,
            stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn,
            BLOCK_G, BLOCK_N, BLOCK_D, BLOCK_SIZE, HAS_SOFTCAP, DOT_PRECISION, DOT_FP32,
        )
        l_safe = tl.where(l > 0.0, l, 1.0)
        o = tl.where(l[:, None] > 0.0, acc / l_safe[:, None], 0.0)
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=rows)
    else:
        if start < end:  # splits past the sequence's end exit; the combine kernel skips them
            q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                        mask=rows, other=0.0)
            acc, l, m = _paged_decode_keys(
                q, k_head, v_head, bt_row, start, end, scale, softcap, g_valid, offs_d, d_valid,
                stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn,
                BLOCK_G, BLOCK_N, BLOCK_D, BLOCK_SIZE, HAS_SOFTCAP, DOT_PRECISION, DOT_FP32,
            )
            l_safe = tl.where(l > 0.0, l, 1.0)
            o = tl.where(l[:, None] > 0.0, acc / l_safe[:, None], 0.0)
            shift = tl.where(m == float("-inf"), 0.0, m)
            lse = tl.where(l > 0.0, tl.log(l_safe) + shift, float("-inf"))
            tl.store(part_o_ptr + b64 * stride_pb + heads[:, None] * stride_ph + pid_s * stride_ps
                     + offs_d[None, :] * stride_pd, o, mask=rows)
            tl.store(part_lse_ptr + b64 * stride_lb + heads * stride_lh + pid_s * stride_ls, lse, mask=g_valid)


@triton.jit
def _paged_prefill_block(
    acc, l_i, m_i, q, k_head, v_head, bt_row, offs_n, pos_q, offs_d, d_ok,
    seq_len, window, scale, qk_scale, softcap,
    stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn,
    BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    IEEE_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One key tile of the online softmax (exp2, log2(e) folded into the scale)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    kv_ok = offs_n < seq_len
    blk = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_tn, mask=kv_ok, other=0).to(tl.int64)
    slot = offs_n % BLOCK_SIZE
    k = tl.load(k_head + (blk * stride_kb + slot * stride_kn)[None, :] + offs_d[:, None] * stride_kd,
                mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
    if IEEE_FP32:
        qk = tl.dot(q, k, input_precision="ieee")
    elif UPCAST_DOT:
        qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")  # q was upcast by the caller
    else:
        qk = tl.dot(q, k)
    if HAS_SOFTCAP:
        s = softcap * tanh(qk * (scale / softcap)) * LOG2E
    else:
        s = qk * qk_scale
    allowed = kv_ok[None, :] & (offs_n[None, :] <= pos_q[:, None])
    if HAS_WINDOW:
        allowed = allowed & ((pos_q[:, None] - offs_n[None, :]) < window)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + (blk * stride_vb + slot * stride_vn)[:, None] + offs_d[None, :] * stride_vd,
                mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None]
    if IEEE_FP32:
        acc += tl.dot(p, v, input_precision="ieee")
    elif UPCAST_DOT:
        acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


# Sizes are not specialized (a token count that happens to be 1 or a multiple of 16 would
# otherwise compile its own variant); strides still are.
@triton.jit(do_not_specialize=["T", "num_seqs", "Q_BUCKET", "window"])
def _paged_prefill_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, qsl_ptr, out_ptr,
    # sizes (Q_BUCKET is only the autotune key)
    T, num_seqs, GROUP, Q_BUCKET,
    # strides
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_tn,
    stride_ot, stride_oh, stride_od,
    # scalars
    scale, softcap, window,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SEQ_SCAN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Program (query tile, query head) of the varlen grid (module docstring)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    h_kv = h // GROUP

    # Which sequence owns this tile: tiles of sequence n start at qsl[n] // BLOCK_M + n, an
    # increasing function of n, so n = (number of sequences starting at or before pid) - 1.
    count = pid * 0
    for s0 in range(0, num_seqs, SEQ_SCAN):
        offs_s = s0 + tl.arange(0, SEQ_SCAN)
        starts = tl.load(qsl_ptr + offs_s, mask=offs_s < num_seqs, other=0).to(tl.int32)
        first_tile = starts // BLOCK_M + offs_s
        count += tl.sum(((first_tile <= pid) & (offs_s < num_seqs)).to(tl.int32), 0)
    n = tl.maximum(count - 1, 0)
    q_start = tl.load(qsl_ptr + n).to(tl.int32)
    q_len = tl.load(qsl_ptr + n + 1).to(tl.int32) - q_start
    m0 = (pid - (q_start // BLOCK_M + n)) * BLOCK_M

    if m0 < q_len:
        n64 = n.to(tl.int64)
        seq_len = tl.load(lens_ptr + n64).to(tl.int32)
        ctx = seq_len - q_len  # tokens before this chunk: its first query sits at position ctx
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        pos_q = ctx + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)

        # keys any row of the tile may see: [lo, hi)
        m_last = tl.minimum(m0 + BLOCK_M, q_len) - 1
        hi = tl.minimum(seq_len, ctx + m_last + 1)
        lo = 0
        if HAS_WINDOW:
            lo = (tl.maximum(ctx + m0 - window + 1, 0) // BLOCK_N) * BLOCK_N

        k_head = k_ptr + h_kv * stride_kh
        v_head = v_ptr + h_kv * stride_vh
        bt_row = bt_ptr + n64 * stride_tb
        qk_scale = scale * LOG2E
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            acc, l_i, m_i = _paged_prefill_block(
                acc, l_i, m_i, q, k_head, v_head, bt_row, offs_n, pos_q, offs_d, d_ok,
                seq_len, window, scale, qk_scale, softcap,
                stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn,
                BLOCK_SIZE, HAS_WINDOW, HAS_SOFTCAP, IEEE_FP32, UPCAST_DOT,
            )
        # a row that saw no key (inconsistent lengths) has l = 0 and acc = 0: output 0
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_paged_prefill_tuned = triton.autotune(
    configs=_prefill_configs(),
    key=["Q_BUCKET", "HEAD_DIM", "BLOCK_SIZE", "HAS_SOFTCAP", "IEEE_FP32"],
    prune_configs_by={"early_config_prune": _prune_prefill_configs},
)(_paged_prefill_kernel)

# Sequences scanned per step of the owner search (one vector load + sum).
_SEQ_SCAN = 128


# ---------------------------------------------------------------------------------------
# Contract checks (metadata only: they also run on fake tensors)
# ---------------------------------------------------------------------------------------


def _check_pools(op: str, k_pool, v_pool, dtypes) -> tuple[int, int, int, int]:
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"{op}: k_pool and v_pool must both be [num_blocks, num_kv_heads, block_size, head_dim], got "
            f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if k_pool.dtype not in dtypes or v_pool.dtype != k_pool.dtype:
        raise TypeError(
            f"{op}: the pools must share one dtype of {', '.join(map(str, dtypes))}, got {k_pool.dtype} and "
            f"{v_pool.dtype}"
        )
    if v_pool.device != k_pool.device:
        raise ValueError(f"{op}: k_pool is on {k_pool.device} but v_pool on {v_pool.device}; use one device")
    return tuple(k_pool.shape)


def _check_index(op: str, name: str, t, shape: tuple, device) -> None:
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{op}: {name} must have shape [{want}], got {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the pools on {device}; move it to {device}")


def _check_scalars(op: str, window, softcap) -> None:
    if window < 0:
        raise ValueError(f"{op}: window={window} must be >= 0 (0 = no sliding window)")
    if not softcap >= 0.0:
        raise ValueError(f"{op}: softcap={softcap} must be >= 0 (0 = no logit softcap)")


def check_append_args(k_pool, v_pool, slot_mapping, k, v, dtypes=KERNEL_DTYPES + (torch.float64,)) -> None:
    op = "paged_kv_append"
    _, hkv, _, d = _check_pools(op, k_pool, v_pool, dtypes)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != (hkv, d):
            raise ValueError(
                f"{op}: {name} must be [num_tokens, num_kv_heads={hkv}, head_dim={d}] (one row per new token), "
                f"got {tuple(t.shape)}; from Hugging Face [1, H, T, D] states pass states[0].transpose(0, 1)"
            )
        if t.dtype != k_pool.dtype or t.device != k_pool.device:
            raise TypeError(
                f"{op}: {name} is {t.dtype} on {t.device} but the pools are {k_pool.dtype} on {k_pool.device}; "
                "build the cache with the model's dtype and device"
            )
    if v.shape != k.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    _check_index(op, "slot_mapping", slot_mapping, (k.shape[0],), k_pool.device)


def check_decode_args(q, k_pool, v_pool, block_tables, seq_lens, window, softcap,
                      dtypes=KERNEL_DTYPES + (torch.float64,)) -> tuple:
    """Return (B, Hq, Hkv, block_size, D)."""
    op = "paged_attention_decode"
    _, hkv, bs, d = _check_pools(op, k_pool, v_pool, dtypes)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(
            f"{op}: q must be [B, Hq, 1, D] (one new token per sequence), got {tuple(q.shape)}; use "
            "paged_attention_prefill for several new tokens"
        )
    b, hq, _, dq = q.shape
    if dq != d:
        raise ValueError(f"{op}: q head dim {dq} differs from the pools' {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: {hq} query heads are not a multiple of {hkv} KV heads; GQA needs Hq % Hkv == 0")
    if q.dtype != k_pool.dtype or q.device != k_pool.device:
        raise TypeError(f"{op}: q is {q.dtype} on {q.device} but the pools are {k_pool.dtype} on {k_pool.device}")
    _check_index(op, "block_tables", block_tables, (b, None), q.device)
    _check_index(op, "seq_lens", seq_lens, (b,), q.device)
    _check_scalars(op, window, softcap)
    return b, hq, hkv, bs, d


def check_prefill_args(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, window, softcap,
                       dtypes=KERNEL_DTYPES + (torch.float64,)) -> tuple:
    """Return (T, N, Hq, Hkv, block_size, D)."""
    op = "paged_attention_prefill"
    _, hkv, bs, d = _check_pools(op, k_pool, v_pool, dtypes)
    if q.dim() != 3:
        raise ValueError(
            f"{op}: q must be [num_tokens, Hq, D] (the new tokens of all sequences, packed), got "
            f"{tuple(q.shape)}; from Hugging Face [1, Hq, T, D] pass q[0].transpose(0, 1)"
        )
    t, hq, dq = q.shape
    if dq != d:
        raise ValueError(f"{op}: q head dim {dq} differs from the pools' {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: {hq} query heads are not a multiple of {hkv} KV heads; GQA needs Hq % Hkv == 0")
    if q.dtype != k_pool.dtype or q.device != k_pool.device:
        raise TypeError(f"{op}: q is {q.dtype} on {q.device} but the pools are {k_pool.dtype} on {k_pool.device}")
    _check_index(op, "seq_lens", seq_lens, (None,), q.device)
    n = seq_lens.shape[0]
    _check_index(op, "block_tables", block_tables, (n, None), q.device)
    _check_index(op, "query_start_loc", query_start_loc, (n + 1,), q.device)
    _check_scalars(op, window, softcap)
    return t, n, hq, hkv, bs, d


def _check_values(op, block_tables, seq_lens, num_blocks, block_size, q_lens=None) -> None:
    """Value checks, on the host: only where that costs no device sync (CPU tensors)."""
    if seq_lens.numel() == 0:
        return
    lens = seq_lens.to(torch.int64)
    capacity = block_tables.shape[1] * block_size
    if int(lens.min()) < 0 or int(lens.max()) > capacity:
        raise ValueError(
            f"{op}: seq_lens must lie in [0, {capacity}] (block table width {block_tables.shape[1]} x block size "
            f"{block_size}), got values in [{int(lens.min())}, {int(lens.max())}]"
        )
    used = (torch.arange(block_tables.shape[1])[None, :] * block_size) < lens[:, None]
    ids = block_tables.to(torch.int64)[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(
            f"{op}: a block table points outside the pool of {num_blocks} blocks (ids in "
            f"[{int(ids.min())}, {int(ids.max())}] for blocks holding tokens)"
        )
    if q_lens is not None:
        if int(q_lens.min()) < 0:
            raise ValueError(f"{op}: query_start_loc must be non-decreasing")
        if bool((q_lens > lens).any()):
            raise ValueError(
                f"{op}: a sequence has more new tokens than seq_lens (q_len {q_lens.tolist()} vs seq_lens "
                f"{lens.tolist()}); seq_lens counts the cached prefix plus the new tokens"
            )


# ---------------------------------------------------------------------------------------
# References (CPU implementation and oracle)
# ---------------------------------------------------------------------------------------


def gather_kv(pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The contiguous ``[B, Hkv, S, D]`` cache of each sequence (``S`` = the longest length
    rounded up to blocks), read through the block table. Slots past a sequence's length
    hold whatever their block holds; table entries past its last block are not read."""
    bs = pool.shape[2]
    lens = seq_lens.to(torch.int64)
    nb = -(-int(lens.max()) // bs) if lens.numel() else 0
    table = block_tables[:, :nb].to(torch.int64)
    used = (torch.arange(nb, device=table.device)[None, :] * bs) < lens[:, None]
    table = torch.where(used, table, 0)
    b, h, d = table.shape[0], pool.shape[1], pool.shape[3]
    # whole blocks in table order (a copy of contiguous [H, bs, D] tiles), then per head
    blocks = pool.index_select(0, table.reshape(-1)).view(b, nb, h, bs, d)
    return blocks.transpose(1, 2).reshape(b, h, nb * bs, d)


def paged_kv_append_ref(k_pool, v_pool, slot_mapping, k, v) -> None:
    """``pool[slot // bs, :, slot % bs] = row`` for every row with a slot >= 0, in place."""
    check_append_args(k_pool, v_pool, slot_mapping, k, v)
    nb, _, bs, _ = k_pool.shape
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if slots.numel() == 0:
        return
    if int(slots.max()) >= nb * bs:
        raise ValueError(
            f"paged_kv_append: slot {int(slots.max())} is outside the pool of {nb} blocks x {bs} slots"
        )
    k_pool[slots // bs, :, slots % bs] = k
    v_pool[slots // bs, :, slots % bs] = v


def _decode_gathered(q, k, v, lens, scale, window, softcap):
    """Decode attention of q ``[B, Hq, 1, D]`` over gathered ``[B, Hkv, S, D]`` K/V.

    Without softcap: one batched ``scaled_dot_product_attention`` (GQA through
    ``enable_gqa``) under a key mask ``lens - window <= j < lens``. Slots outside it may hold
    stale data or NaN (a block's unwritten tail): their K/V are zeroed first, because a
    masked-out key still enters ``p @ v`` as ``0 * v``. Empty sequences give 0. With softcap:
    the dense decode reference. (One call for the batch, not one per sequence: on CPU this
    is the engine's decode attention, and a per-sequence loop would cost O(B) launches per layer.)
    """
    if softcap > 0:
        return attention_decode_ref(q, k, v, lens, None, scale, window, softcap)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    gqa = q.shape[1] != k.shape[1]
    pos = torch.arange(k.shape[2], device=k.device)
    n = lens.to(device=k.device, dtype=torch.int64).clamp(max=k.shape[2])[:, None]
    valid = pos[None, :] < n  # [B, S]
    if window > 0:
        valid &= pos[None, :] >= n - window
    keep = valid[:, None, :, None]
    k = torch.where(keep, k.to(compute), 0.0)
    v = torch.where(keep, v.to(compute), 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(compute), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=gqa)
    # a row with no key: SDPA's softmax over nothing is NaN; the op's contract says 0.
    # Contiguous, as the fake implementation promises (SDPA may return another layout).
    return torch.where((n > 0)[:, :, None, None], out, 0.0).to(q.dtype).contiguous()


def paged_attention_decode_ref(q, k_pool, v_pool, block_tables, seq_lens, scale, window=0, softcap=0.0):
    """Dense decode attention on each sequence's gathered, contiguous KV (fp32 math; fp64 stays
    fp64 for the tests' ground truth)."""
    b, hq, hkv, bs, d = check_decode_args(q, k_pool, v_pool, block_tables, seq_lens, window, softcap)
    if b == 0 or d == 0 or int(seq_lens.max()) == 0:
        return q.new_zeros(q.shape)
    _check_values("paged_attention_decode", block_tables.cpu(), seq_lens.cpu(), k_pool.shape[0], bs)
    k = gather_kv(k_pool, block_tables, seq_lens)
    v = gather_kv(v_pool, block_tables, seq_lens)
    return _decode_gathered(q, k, v, seq_lens, scale, window, softcap)


def paged_attention_prefill_ref(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale,
                                window=0, softcap=0.0):
    """Dense causal attention of each sequence's new rows over its gathered, contiguous KV.

    Sequences with one new row (decodes riding along in a mixed step) go through the decode
    path together; each longer chunk runs the dense prefill reference on its own (SDPA's
    causal path for a prompt with no cached prefix, an explicit offset mask otherwise).
    """
    t, n, hq, hkv, bs, d = check_prefill_args(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc,
                                              window, softcap)
    qsl = query_start_loc.to(torch.int64).cpu()
    q_lens = qsl[1:] - qsl[:-1]
    if n and int(qsl[-1]) != t:
        raise ValueError(
            f"paged_attention_prefill: query_start_loc[-1]={int(qsl[-1])} must equal the number of query "
            f"rows {t}; every row belongs to one sequence"
        )
    if t == 0 or d == 0:
        return q.new_zeros(q.shape)
    lens_cpu = seq_lens.to(torch.int64).cpu()
    _check_values("paged_attention_prefill", block_tables.cpu(), lens_cpu, k_pool.shape[0], bs, q_lens)
    out = q.new_empty(q.shape)
    single = (q_lens == 1).nonzero().flatten()
    if single.numel():
        seqs = single.to(q.device)
        rows = qsl[:-1][single].to(q.device)
        sub_tables, sub_lens = block_tables.index_select(0, seqs), seq_lens.index_select(0, seqs)
        k = gather_kv(k_pool, sub_tables, sub_lens)
        v = gather_kv(v_pool, sub_tables, sub_lens)
        dec = _decode_gathered(q.index_select(0, rows)[:, :, None], k, v, sub_lens, scale, window, softcap)
        out.index_copy_(0, rows, dec[:, :, 0])
    for s in (q_lens > 1).nonzero().flatten().tolist():
        start, length, total = int(qsl[s]), int(q_lens[s]), int(lens_cpu[s])
        k = gather_kv(k_pool, block_tables[s:s + 1], seq_lens[s:s + 1])[:, :, :total]
        v = gather_kv(v_pool, block_tables[s:s + 1], seq_lens[s:s + 1])[:, :, :total]
        ctx = total - length
        offsets = None if ctx == 0 else torch.tensor([ctx], device=q.device)
        qs = q[start:start + length].transpose(0, 1)[None]
        o = attention_prefill_ref(qs, k, v, None, None, offsets, scale, True, window, softcap)
        out[start:start + length] = o[0].transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_out(op, out, shape, like):
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{op}: out must be a {tuple(shape)} {like.dtype} tensor on {like.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}; pass out=None to allocate it"
        )
    return out


@on_tensor_device
def paged_kv_append_triton(k_pool, v_pool, slot_mapping, k, v) -> None:
    """Launch the append kernel (one program per token)."""
    check_append_args(k_pool, v_pool, slot_mapping, k, v, dtypes=KERNEL_DTYPES)
    nb, hkv, bs, d = k_pool.shape
    if k.shape[0] == 0 or d == 0 or hkv == 0:
        return
    if not k_pool.is_cuda and int(slot_mapping.max()) >= nb * bs:
        raise ValueError(f"paged_kv_append: slot {int(slot_mapping.max())} is outside the pool of {nb} x {bs} slots")
    with _device_ctx(k_pool):
        _paged_kv_append_kernel[(k.shape[0],)](
            k, v, k_pool, v_pool, slot_mapping,
            nb * bs, hkv, d,
            *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
            BLOCK_SIZE=bs, BLOCK_H=next_pow2(hkv), BLOCK_D=next_pow2(d),
        )


@functools.lru_cache(maxsize=None)
def _heuristic_config(head_dim: int, group: int, dtype: torch.dtype, device_type: str) -> tuple:
    # memoized: the op, given only a workspace, re-derives the config at every layer
    return tuple(decode_heuristic_config(head_dim, group, dtype, torch.device(device_type)).items())


@dataclasses.dataclass(frozen=True, eq=False)
class PagedDecodePlan:
    """One decode step's launch decisions, made once and reused by every layer (plan/run, as
    flashinfer's ``BatchDecodeWithPagedKVCacheWrapper.plan`` / ``run``).

    ``workspace`` ``[num_seqs, num_q_heads, num_splits, P]`` fp32 holds the split partials:
    ``[..., :head_dim]`` the normalized partial outputs ``o_i``, ``[..., head_dim]`` their
    log-sum-exp; ``P = decode_workspace_pitch(head_dim)`` pads each row to a multiple of 16
    floats so every stride and the LSE column's address stay 16-divisible (Triton then
    specializes them as aligned, as for a contiguous ``[.., head_dim]`` buffer). Every layer
    of the step overwrites it (the combine reads only slots its own split kernel wrote), so
    one buffer serves all layers. A step's plan has one even for one split (then unused; a
    few bytes), so that the tensor alone carries the split count: the registered op receives
    only the tensor (see :func:`plan_from_workspace`).
    """

    num_seqs: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int  # the block table's capacity, max_blocks_per_seq * block_size
    num_splits: int
    config: dict  # {"BLOCK_N", "num_warps", "num_stages"} of the split kernel
    split_align: int
    workspace: Optional[torch.Tensor]  # None only in a launcher's own one-split plan

    @property
    def part_o(self) -> torch.Tensor:
        return self.workspace.narrow(3, 0, self.head_dim)

    @property
    def part_lse(self) -> torch.Tensor:
        return self.workspace.select(3, self.head_dim)

    def check_fits(self, q: torch.Tensor, k_pool: torch.Tensor, block_tables: torch.Tensor) -> None:
        """Raise ``ValueError`` unless this plan was made for a call of these shapes."""
        want = (q.shape[0], q.shape[1], k_pool.shape[1], q.shape[3], block_tables.shape[1] * k_pool.shape[2])
        have = (self.num_seqs, self.num_q_heads, self.num_kv_heads, self.head_dim, self.max_seq_len)
        where = "" if self.workspace is None else f" on {self.workspace.device}"
        if want != have or (self.workspace is not None and self.workspace.device != q.device):
            raise ValueError(
                "paged_attention_decode: the plan was made for (seqs, q heads, kv heads, head dim, max seq len) = "
                f"{have}{where}, but the call has {want} on {q.device}; plan each step with "
                "plan_paged_decode(...) from that step's metadata, or pass plan=None"
            )


def decode_workspace_pitch(head_dim: int) -> int:
    """Floats per row of the split workspace: ``head_dim`` partial outputs and one LSE,
    rounded up to a multiple of 16."""
    return -(-(head_dim + 1) // 16) * 16


def check_decode_workspace(q: torch.Tensor, workspace: torch.Tensor) -> int:
    """Check a split workspace against decode query ``q`` ``[N, Hq, 1, D]``; return its split
    count. Works on fake tensors (the op's fake implementation calls it)."""
    n, hq, _, d = q.shape
    ok = (workspace.dim() == 4 and workspace.shape[0] == n and workspace.shape[1] == hq
          and workspace.shape[2] >= 1 and workspace.shape[3] == decode_workspace_pitch(d))
    if not ok or workspace.dtype != torch.float32 or workspace.device != q.device:
        pitch = decode_workspace_pitch(d)
        raise ValueError(
            f"paged_attention_decode: workspace must be a [{n}, {hq}, num_splits >= 1, {pitch}] float32 tensor "
            f"on {q.device} (from plan_paged_decode for this step), got {tuple(workspace.shape)} {workspace.dtype} on "
            f"{workspace.device}; pass workspace=None to let the op allocate one"
        )
    return workspace.shape[2]


def plan_paged_decode(num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                      max_blocks_per_seq: int, block_size: int, dtype: torch.dtype, device,
                      *, num_splits: Optional[int] = None, config: Optional[dict] = None,
                      sm_count: Optional[int] = None, one_split_workspace: bool = True) -> PagedDecodePlan:
    """Plan a decode step from its metadata: the split count (:func:`decode_num_splits`, from
    shapes only), the split kernel's config (:func:`decode_heuristic_config`, then
    ``config``) and the fp32 split workspace. ``sm_count``: the GPU's SM count (read from the
    device when None on CUDA; ignored elsewhere). ``num_splits`` overrides the heuristic.
    ``one_split_workspace=False``: no workspace (None) when one split, which does not use it
    (the launcher's plan of an unplanned call, never handed to the op)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda and sm_count is None:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    s_max = max_blocks_per_seq * block_size
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, s_max, sm_count if on_cuda else None)
    if num_splits < 1:
        raise ValueError(f"paged_attention_decode: num_splits={num_splits} must be >= 1")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"paged_attention_decode: {num_q_heads} query heads are not a multiple of {num_kv_heads} "
                         "KV heads; GQA needs Hq % Hkv == 0")
    cfg = dict(_heuristic_config(head_dim, num_q_heads // num_kv_heads, dtype, device.type))
    cfg.update(config or {})
    workspace = None
    if num_splits > 1 or one_split_workspace:
        workspace = torch.empty((num_seqs, num_q_heads, num_splits, decode_workspace_pitch(head_dim)),
                                dtype=torch.float32, device=device)
    return PagedDecodePlan(num_seqs, num_q_heads, num_kv_heads, head_dim, s_max, num_splits, cfg,
                           _SPLIT_ALIGN_CUDA if on_cuda else _SPLIT_ALIGN_INTERPRETER, workspace)


def plan_from_workspace(q: torch.Tensor, k_pool: torch.Tensor, block_tables: torch.Tensor,
                        workspace: torch.Tensor) -> PagedDecodePlan:
    """The plan that a workspace made by :func:`plan_paged_decode` stands for (its split count
    is its third dimension); allocates nothing. How the registered op, which takes tensors
    only, runs the step's plan."""
    num_splits = check_decode_workspace(q, workspace)
    n, hq, _, d = q.shape
    hkv = k_pool.shape[1]
    on_cuda = q.device.type == "cuda"
    return PagedDecodePlan(n, hq, hkv, d, block_tables.shape[1] * k_pool.shape[2], num_splits,
                           dict(_heuristic_config(d, hq // hkv, q.dtype, q.device.type)),
                           _SPLIT_ALIGN_CUDA if on_cuda else _SPLIT_ALIGN_INTERPRETER, workspace)


@on_tensor_device
def paged_attention_decode_triton(q, k_pool, v_pool, block_tables, seq_lens, scale, window=0, softcap=0.0,
                                  *, out=None, num_splits=None, config=None, plan=None, workspace=None):
    """Launch the paged split kernel (and the dense combine kernel when num_splits > 1).

    ``plan``: the step's :class:`PagedDecodePlan` (split count, config, workspace): nothing
    is allocated but ``out`` (when None) and no heuristic runs; it must fit the call.
    ``workspace``: a plan's workspace tensor alone (what the registered op receives).
    Without either the launcher plans this call itself (allocating the workspace).
    ``out``: optional [B, Hq, 1, D] buffer (any strides). ``num_splits``: override the
    shape-based split count (tests). ``config``: ``{"BLOCK_N", "num_warps", "num_stages"}``.
    """
    op = "paged_attention_decode"
    b, hq, hkv, bs, d = check_decode_args(q, k_pool, v_pool, block_tables, seq_lens, window, softcap,
                                          dtypes=KERNEL_DTYPES)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {d} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    if (plan is not None or workspace is not None) and (num_splits is not None or config is not None):
        raise ValueError(f"{op}: num_splits / config come from the plan; pass them to plan_paged_decode instead")
    if plan is not None and workspace is not None:
        raise ValueError(f"{op}: pass plan or workspace, not both")
    if plan is not None:
        plan.check_fits(q, k_pool, block_tables)
    out = _check_out(op, out, (b, hq, 1, d), q)
    if b == 0 or hq == 0 or d == 0:
        return out
    on_cuda = q.is_cuda
    if not on_cuda:
        # cheap on CPU (the interpreter); on CUDA a host sync per step, so the kernel clamps
        _check_values(op, block_tables, seq_lens, k_pool.shape[0], bs)
    if plan is None:
        if workspace is not None:
            plan = plan_from_workspace(q, k_pool, block_tables, workspace)
        else:  # an unplanned call: plan it here (allocates this call's workspace)
            plan = plan_paged_decode(b, hq, hkv, d, block_tables.shape[1], bs, q.dtype, q.device,
                                     num_splits=num_splits, config=config, one_split_workspace=False)
    num_splits, cfg, split_align, s_max = plan.num_splits, plan.config, plan.split_align, plan.max_seq_len
    direct = num_splits == 1
    if direct:
        part_o, part_lse = out, out  # unused: the split kernel writes out itself
        p_strides, l_strides = (0, 0, 0, 0), (0, 0, 0)
    else:
        # every slot read by the combine is written by a split that ran (in this layer), so
        # the workspace needs no clearing between layers
        part_o, part_lse = plan.part_o, plan.part_lse
        p_strides, l_strides = part_o.stride(), part_lse.stride()
    with _device_ctx(q):
        _paged_decode_split_kernel[(b, hkv, num_splits)](
            q, k_pool, v_pool, block_tables, seq_lens, part_o, part_lse, out,
            s_max, num_splits, int(window), float(scale), float(softcap),
            q.stride(0), q.stride(1), q.stride(3),
            *k_pool.stride(), *v_pool.stride(), *block_tables.stride(),
            *p_strides, *l_strides,
            out.stride(0), out.stride(1), out.stride(3),
            GROUP=hq // hkv, HEAD_DIM=d, BLOCK_SIZE=bs,
            BLOCK_G=max(16, next_pow2(hq // hkv)), BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, next_pow2(d)),
            SPLIT_ALIGN=split_align, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0, DIRECT=direct,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            DOT_FP32=not on_cuda and q.dtype == torch.bfloat16,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if not direct:
            _decode_combine_kernel[(b, hq)](
                part_o, part_lse, seq_lens, out,
                s_max, num_splits, int(window),
                *p_strides, *l_strides,
                out.stride(0), out.stride(1), out.stride(3),
                HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_S=max(2, next_pow2(num_splits)),
                SPLIT_ALIGN=split_align, HAS_WINDOW=window > 0,
                num_warps=2 if on_cuda else 1,
            )
    return out


@on_tensor_device
def paged_attention_prefill_triton(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale,
                                   window=0, softcap=0.0, *, out=None):
    """Launch the varlen paged prefill kernel; ``out``: optional [T, Hq, D] buffer."""
    op = "paged_attention_prefill"
    t, n, hq, hkv, bs, d = check_prefill_args(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc,
                                              window, softcap, dtypes=KERNEL_DTYPES)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {d} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    out = _check_out(op, out, (t, hq, d), q)
    if t == 0 or hq == 0 or d == 0:
        return out
    if n == 0:
        raise ValueError(f"{op}: {t} query rows but no sequence (seq_lens is empty)")
    if not q.is_cuda:
        qsl = query_start_loc.to(torch.int64)
        if int(qsl[0]) != 0 or int(qsl[-1]) != t:
            raise ValueError(
                f"{op}: query_start_loc must run from 0 to the number of query rows {t}, got "
                f"[{int(qsl[0])}, ..., {int(qsl[-1])}]"
            )
        _check_values(op, block_tables, seq_lens, k_pool.shape[0], bs, qsl[1:] - qsl[:-1])
    args = (
        q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, out,
        t, n, hq // hkv, prefill_q_bucket(t, n),
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *block_tables.stride(), *out.stride(),
        float(scale), float(softcap), int(window),
    )
    meta = dict(
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_SIZE=bs, SEQ_SCAN=_SEQ_SCAN,
        HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0, IEEE_FP32=q.dtype == torch.float32,
        UPCAST_DOT=q.dtype == torch.bfloat16 and interpreting(),
    )
    with _device_ctx(q):
        if q.is_cuda and not interpreting():
            def grid(cfg):
                return (triton.cdiv(t, cfg["BLOCK_M"]) + n, hq)

            _paged_prefill_tuned[grid](*args, **meta)
        else:
            cfg = INTERPRETER_CONFIG
            _paged_prefill_kernel[(triton.cdiv(t, cfg["BLOCK_M"]) + n, hq)](*args, **meta, **cfg)
    return out


# ---------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------


def _kernel_path(x: torch.Tensor, *others: torch.Tensor) -> bool:
    # fp64 (the tests' ground truth) and head dims above 256 always take the reference
    return x.dtype in KERNEL_DTYPES and x.shape[-1] <= MAX_HEAD_DIM and use_triton(x, *others)


@torch.library.custom_op("llmopt::paged_kv_append", mutates_args=("k_pool", "v_pool"))
def paged_kv_append(
    k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write the new tokens' K/V rows into their slots of the pools, in place."""
    if _kernel_path(k_pool, v_pool, slot_mapping, k, v):
        paged_kv_append_triton(k_pool, v_pool, slot_mapping, k, v)
    else:
        paged_kv_append_ref(k_pool, v_pool, slot_mapping, k, v)


@paged_kv_append.register_fake
def _paged_kv_append_fake(k_pool, v_pool, slot_mapping, k, v) -> None:
    check_append_args(k_pool, v_pool, slot_mapping, k, v)
    return None


@torch.library.custom_op("llmopt::paged_attention_decode", mutates_args=("workspace",))
def paged_attention_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its paged KV.

    ``workspace``: the step's split workspace (:attr:`PagedDecodePlan.workspace`), shared by
    every layer and overwritten by each (hence mutable); None allocates one per call."""
    if workspace is not None:
        check_decode_workspace(q, workspace)
    if _kernel_path(q, k_pool, v_pool, block_tables, seq_lens):
        return paged_attention_decode_triton(q, k_pool, v_pool, block_tables, seq_lens, scale, window, softcap,
                                             workspace=workspace)
    return paged_attention_decode_ref(q, k_pool, v_pool, block_tables, seq_lens, scale, window, softcap)


@paged_attention_decode.register_fake
def _paged_attention_decode_fake(q, k_pool, v_pool, block_tables, seq_lens, scale, window=0, softcap=0.0,
                                 workspace=None):
    check_decode_args(q, k_pool, v_pool, block_tables, seq_lens, window, softcap)
    if workspace is not None:
        check_decode_workspace(q, workspace)
    return q.new_empty(q.shape)


@torch.library.custom_op("llmopt::paged_attention_prefill", mutates_args=())
def paged_attention_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their paged prefix and themselves."""
    if _kernel_path(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc):
        return paged_attention_prefill_triton(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale,
                                              window, softcap)
    return paged_attention_prefill_ref(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale,
                                       window, softcap)


@paged_attention_prefill.register_fake
def _paged_attention_prefill_fake(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale,
                                  window=0, softcap=0.0):
    check_prefill_args(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, window, softcap)
    return q.new_empty(q.shape)


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "KERNEL_DTYPES",
    "PagedDecodePlan",
    "check_append_args",
    "check_decode_args",
    "check_decode_workspace",
    "check_prefill_args",
    "decode_workspace_pitch",
    "gather_kv",
    "paged_attention_decode",
    "paged_attention_decode_ref",
    "paged_attention_decode_triton",
    "paged_attention_prefill",
    "paged_attention_prefill_ref",
    "paged_attention_prefill_triton",
    "paged_kv_append",
    "paged_kv_append_ref",
    "paged_kv_append_triton",
    "plan_from_workspace",
    "plan_paged_decode",
    "prefill_q_bucket",
]
