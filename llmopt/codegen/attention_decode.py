"""Decode attention: one new query token per sequence against its KV cache, split-KV.

Math and shapes::

    q:        [B, Hq, 1, D]        the new token's queries (any strides)
    k_cache:  [B, Hkv, S_max, D]   HF StaticCache layout (any strides); v_cache likewise
    kv_lens:  [B] int32/int64      valid cached positions of sequence b (the new token's
                                   K/V already written): keys 0 .. kv_lens[b]-1 attend
    mask:     optional, broadcastable to [B, Hq, 1, S_max]: bool (True = attend) or
              additive float (HF left padding passes [B, 1, 1, S_max])
    query head h reads KV head h // G, G = Hq // Hkv (GQA; MQA when Hkv == 1)
    s[j]   = scale * <q_h, k_j>;  softcap > 0: s[j] = softcap * tanh(s[j] / softcap)
    s[j]  += mask (additive) or s[j] = -inf where the bool mask is False,
             where j >= kv_lens[b], or (window > 0) where j <= kv_lens[b] - 1 - window
    out_h  = sum_j softmax(s)[j] v_j       [B, Hq, 1, D] in q.dtype
    a row with no attended key (kv_lens[b] == 0, fully masked) gives out_h = 0, never NaN.

Split-KV (FlashDecoding, Dao et al. 2023, "Flash-Decoding for long-context inference").
A decode step has B * Hkv independent (sequence, KV head) problems, far fewer than an
H100 has SMs, each a long reduction over the cache. The key range of each sequence is cut
into ``num_splits`` contiguous chunks, one program per (b, kv head, split) — grid
``(B, Hkv, num_splits)`` — and each program runs the online softmax of FlashAttention-2
over its chunk and writes an fp32 partial ``(o_i = sum p v / sum p, lse_i = log sum e^s)``.
A second, small kernel (grid ``(B, Hq)``) combines the partials by log-sum-exp::

    out = sum_i e^{lse_i - M} o_i / sum_i e^{lse_i - M},   M = max_i lse_i

With one split the first kernel normalizes and writes ``out`` itself (no workspace, one
launch). All query heads of a KV group are one [G, D] block of a program, so each K/V
tile is read once per group; the tiny G is padded to 16 rows so ``tl.dot`` maps to tensor
cores (the padded rows are masked, never stored). Accumulation is fp32 throughout; the
P.V product casts p (<= 1) to the cache dtype for fp16/bf16, and fp32 runs ``tl.dot`` with
``input_precision="ieee"``.

How the split count and the split size are chosen (:func:`decode_num_splits`):
the host decides only from shapes — ``num_splits = pow2_floor(min(2 * SMs // (B * Hkv),
S_max // 128, 128))`` on CUDA (at least 1), ``min(4, cdiv(S_max, 32))`` under the
interpreter — so it is fixed for a given cache capacity and batch: no host sync on the
device tensor ``kv_lens``, no recompilation and a constant grid across decode steps
(CUDA graphs replay it). Each program derives its chunk on the device from its own
sequence: ``chunk = round_up(cdiv(n_b, num_splits), SPLIT_ALIGN)`` (64 keys on CUDA, 32 in
the interpreter) with ``n_b`` the
attended key count (``kv_lens[b]``, less the keys before a sliding window); split ``i``
covers ``[lo_b + i * chunk, lo_b + (i + 1) * chunk)``. Work is proportional to the real
length, never to S_max: a program whose chunk starts past the end exits at once, and the
combine kernel recomputes the same bounds to read only the splits that ran. At short
lengths the chunks shrink, so all splits still share the work.

FlashDecoding++ (Hong et al. 2023, "asynchronized softmax with unified max value"), when
``unified_max`` (phi, in the units of the final score s) is given: each split computes
``p = exp(s - phi)`` with no running max and no rescaling of the accumulator (the
synchronization FlashDecoding++ removes), and P.V in fp32 (tf32 tensor cores for half
inputs) since p may exceed the fp16 range. Each split also keeps ``max(s)`` (a reduction
off the critical path) and, when a real row of its block has ``max(s) - phi`` outside
``UNIFIED_RANGE = [-40, 40]`` — where e^x or its sum over a chunk could
overflow fp32, or every term would underflow — the split recomputes its chunk with the
exact online-softmax path (an in-kernel fallback: no flag buffer, no host sync, no extra
launch; the re-read costs one more pass over that chunk only). Since each split writes
``(o_i, lse_i)`` the combine kernel does not care which path a split took. Results match
the exact kernel to rounding; ``phi`` only decides speed.

One kernel, two KV layouts (constexpr ``PAGED``): the dense ``[B, Hkv, S_max, D]`` cache
above, or the paged pool of :mod:`.attention_paged` (``llmopt::paged_attention_decode``,
keys read through a block table, ``S_max`` the table's capacity, no mask and no unified
max). :func:`launch_decode` is the one launcher both ops call (it allocates nothing: the
dense op allocates its partials per call, the paged op takes them from the step's plan).
The shared tile math (key address, dots, softcap, online-softmax step, split bounds, LSE
combine) lives in :mod:`.attention_blocks`; the contract, the reference and the CPU
implementation in :mod:`.attention_decode_ref`.

Limits: kv_lens outside [0, S_max] raise on CPU (reference and interpreter launcher) but
are clamped by the CUDA kernel, which cannot raise without a host sync. Under the
interpreter bf16 dot operands are upcast to fp32 first (``DOT_FP32``): Triton's interpreter
multiplies the raw bits of bf16 in ``tl.dot``; p is still rounded to bf16 as on the GPU.
"""
import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_blocks import (
    block_dim, capped_scores, combine_lse, dot_flags, dot_pv, dot_qk, kv_bases, kv_tile_offsets, normalize,
    online_softmax_step, partial_lse, split_bounds,
)
from .attention_decode_ref import KERNEL_DTYPES, attention_decode_cpu, attention_decode_ref, check_decode_args
from .kernel_mode import kernel_mode, on_tensor_device, use_triton

# FlashDecoding++ safe range for max(s) - phi: e^40 * (keys per chunk) * |v| stays far below
# fp32 max (3.4e38) for any cache that fits in memory; e^-40 keeps the largest term of a
# chunk a normal fp32 number with ~47 e-folds of headroom below it.
UNIFIED_RANGE = (-40.0, 40.0)
_UNIFIED_LOW = tl.constexpr(UNIFIED_RANGE[0])
_UNIFIED_HIGH = tl.constexpr(UNIFIED_RANGE[1])

# ---------------------------------------------------------------------------------------
# Config space, pruning, split count
# ---------------------------------------------------------------------------------------

DECODE_CONFIG_KEYS = ("BLOCK_N", "num_warps", "num_stages")

# Granularity of a split's chunk (in keys). Both kernels compute chunk bounds from it, so
# it is fixed per device kind (not tuned): a tuned BLOCK_N only changes the tile loop.
_SPLIT_ALIGN_CUDA = 64
_SPLIT_ALIGN_INTERPRETER = 32
_MIN_KEYS_PER_SPLIT = 128  # a split shorter than two 64-key tiles costs more in combine than it saves
_MAX_SPLITS = 128
_INTERPRETER_SPLITS = 4  # the interpreter runs programs one after another: few, but > 1


def decode_split_align(on_cuda: bool) -> int:
    """Keys per unit of a split's chunk: 64 on CUDA, 32 in the interpreter (both launchers,
    dense and paged, pass it to the split and the combine kernel)."""
    return _SPLIT_ALIGN_CUDA if on_cuda else _SPLIT_ALIGN_INTERPRETER


def _pow2_floor(n: int) -> int:
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)


def decode_configs() -> list[dict]:
    """The config space an offline tuner sweeps for the split kernel (before pruning)."""
    return [
        {"BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
        for bn in (32, 64, 128)
        for nw in (2, 4, 8)
        for ns in (2, 3, 4)
    ]


def prune_decode_configs(configs: list[dict], head_dim: int, group: int, dtype: torch.dtype) -> list[dict]:
    """Drop configs that cannot win: more than 128 32-bit registers per thread for a K and a
    V tile (cache dtype), the fp32 score tile and the fp32 accumulator (they would spill),
    or 8 warps on a tile too small to give each warp its own rows."""
    block_d = block_dim(head_dim)
    block_g = block_dim(group)
    kept = []
    for c in configs:
        regs = 2 * c["BLOCK_N"] * block_d * dtype.itemsize / 4 + block_g * (c["BLOCK_N"] + block_d)
        if regs / (32 * c["num_warps"]) > 128:
            continue
        if c["num_warps"] == 8 and c["BLOCK_N"] * block_d < 64 * 128:
            continue
        kept.append(c)
    return kept


# Preference order of the heuristic: the first config that survives pruning is used.
_HEURISTIC_ORDER = (
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
)


def decode_heuristic_config(head_dim: int, group: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The split kernel's config when no tuned one is given.

    On CUDA: the largest key tile that fits in registers (64 keys x 4 warps for fp16/bf16
    up to head dim 128; 32 keys for fp32 or head dim 256) with 2 stages, so the next K/V
    tile is in flight while this one is reduced (decode is bound by bytes in flight).
    Under the interpreter: 16-key tiles, so the tests' 32-key chunks run the multi-tile loop.
    """
    if device.type != "cuda":
        return {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    kept = prune_decode_configs([dict(c) for c in _HEURISTIC_ORDER], head_dim, group, dtype)
    return kept[0] if kept else dict(_HEURISTIC_ORDER[-1])


def decode_num_splits(batch: int, kv_heads: int, max_seq_len: int, sm_count: Optional[int]) -> int:
    """Split count from shapes only (see the module docstring); ``sm_count=None`` means the
    interpreter. Fixed for a given (batch, kv heads, cache capacity, GPU): decode steps
    that only grow ``kv_lens`` keep the same grid and compiled kernels."""
    if sm_count is None:
        return max(1, min(_INTERPRETER_SPLITS, triton.cdiv(max_seq_len, _SPLIT_ALIGN_INTERPRETER)))
    programs = max(1, batch * kv_heads)
    # two programs per SM hide the latency of the next tile's loads behind the reduction
    want = max(1, (2 * sm_count) // programs)
    by_length = max(1, max_seq_len // _MIN_KEYS_PER_SPLIT)
    return _pow2_floor(min(want, by_length, _MAX_SPLITS))


def validate_config(config: dict) -> dict:
    unknown = set(config) - set(DECODE_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"attention_decode config has unknown keys {sorted(unknown)}; valid keys: {', '.join(DECODE_CONFIG_KEYS)}"
        )
    bn = config.get("BLOCK_N", 16)
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"attention_decode config BLOCK_N={bn} must be a power of two >= 16")
    return config

# ---------------------------------------------------------------------------------------
# Triton kernels (the building blocks are in .attention_blocks)
# ---------------------------------------------------------------------------------------


@triton.jit
def _attend_keys(
    q, k_base, v_base, bt_row, m_base, start, end, scale, softcap, phi,
    offs_g, g_valid, offs_d, d_valid,
    stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn, stride_mh, stride_mn,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UNIFIED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Keys [start, end) of one (sequence, kv head) for the G query rows ``q`` [BLOCK_G, BLOCK_D].

    Returns (acc [G, D], l [G], m [G]) in fp32: exact mode keeps the online-softmax running
    max m and acc = sum e^{s - m} v, l = sum e^{s - m}; unified mode uses the fixed shift phi
    (acc = sum e^{s - phi} v) and m is only the running max of s, for the range check.
    """
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k_off, v_off = kv_tile_offsets(offs_n, n_valid, bt_row, stride_tn, stride_kb, stride_kn, stride_vb,
                                       stride_vn, PAGED, BLOCK_SIZE)
        # K^T tile [D, N] straight from memory; keys past `end` are never read (other=0)
        kt = tl.load(k_base + k_off[None, :] + offs_d[:, None] * stride_kd,
                     mask=d_valid[:, None] & n_valid[None, :], other=0.0)
        s = capped_scores(dot_qk(q, kt, DOT_PRECISION, DOT_FP32), scale, softcap, 1.0, HAS_SOFTCAP)
        valid = g_valid[:, None] & n_valid[None, :]
        if MASK_KIND == 1:
            keep = tl.load(m_base + offs_g[:, None] * stride_mh + offs_n[None, :] * stride_mn, mask=valid, other=0)
            valid = valid & (keep != 0)
        if MASK_KIND == 2:
            bias = tl.load(m_base + offs_g[:, None] * stride_mh + offs_n[None, :] * stride_mn, mask=valid, other=0.0)
            s = s + bias.to(tl.float32)
        s = tl.where(valid, s, float("-inf"))
        if UNIFIED:
            p = tl.exp(s - phi)
            m = tl.maximum(m, tl.max(s, 1))
            l += tl.sum(p, 1)
        else:
            p, alpha, m, l = online_softmax_step(m, l, s, False)
            acc = acc * alpha[:, None]
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        if UNIFIED:
            # p may exceed the fp16 range here: keep it fp32 (tf32 MMA for half caches)
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = dot_pv(p, v, acc, DOT_PRECISION, DOT_FP32)
    return acc, l, m


@triton.jit
def _decode_split_kernel(
    # pointers (bt_ptr: the block table, read only when PAGED)
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, mask_ptr, part_o_ptr, part_lse_ptr, out_ptr,
    # sizes and scalars
    S_max, num_splits, window, scale, softcap, phi,
    # strides
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_tn,
    stride_mb, stride_mh, stride_mn,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    # constexprs
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_ALIGN: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UNIFIED: tl.constexpr, EXACT_FALLBACK: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (sequence b, kv head, split): the G query heads of the group against one chunk."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    kv_len, lo, chunk = split_bounds(lens_ptr, pid_b, S_max, window, num_splits, SPLIT_ALIGN, HAS_WINDOW)
    start = lo + pid_s * chunk
    end = tl.minimum(start + chunk, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_valid = offs_g < GROUP
    heads = pid_h * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    k_base, v_base, bt_row = kv_bases(k_ptr, v_ptr, bt_ptr, b64, h64, stride_kb, stride_kh, stride_vb, stride_vh,
                                      stride_tb, PAGED)
    m_base = mask_ptr + b64 * stride_mb + (h64 * GROUP) * stride_mh
    rows = g_valid[:, None] & d_valid[None, :]

    # splits past the sequence's end skip the work; one split (DIRECT) still writes its 0 rows
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    shift = tl.zeros([BLOCK_G], dtype=tl.float32)
    if start < end:
        q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=rows, other=0.0)
        acc, l, m = _attend_keys(
            q, k_base, v_base, bt_row, m_base, start, end, scale, softcap, phi,
            offs_g, g_valid, offs_d, d_valid,
            stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn, stride_mh, stride_mn,
            BLOCK_G, BLOCK_N, BLOCK_D, PAGED, BLOCK_SIZE, MASK_KIND, HAS_SOFTCAP, UNIFIED, DOT_PRECISION, DOT_FP32,
        )
        # (acc, l, shift) with acc / l = o and log(l) + shift = lse
        if UNIFIED:
            shift = tl.zeros([BLOCK_G], dtype=tl.float32) + phi
            if EXACT_FALLBACK:
                excess = m - phi
                out_of_range = g_valid & (m > float("-inf")) & ((excess > _UNIFIED_HIGH) | (excess < _UNIFIED_LOW))
                if tl.max(out_of_range.to(tl.int32), 0) > 0:
                    # phi was a bad guess for this chunk: redo it exactly (FlashDecoding++ recompute)
                    acc, l, m = _attend_keys(
                        q, k_base, v_base, bt_row, m_base, start, end, scale, softcap, phi,
                        offs_g, g_valid, offs_d, d_valid,
                        stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, stride_tn, stride_mh,
                        stride_mn, BLOCK_G, BLOCK_N, BLOCK_D, PAGED, BLOCK_SIZE, MASK_KIND, HAS_SOFTCAP, False,
                        DOT_PRECISION, DOT_FP32,
                    )
                    shift = tl.where(m == float("-inf"), 0.0, m)
        else:
            shift = tl.where(m == float("-inf"), 0.0, m)
    o = normalize(acc, l)
    if DIRECT:
        # one split: the normalized rows are the output (no workspace, no combine)
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=rows)
    else:
        if start < end:  # the combine kernel reads only the splits that ran
            tl.store(part_o_ptr + b64 * stride_pb + heads[:, None] * stride_ph + pid_s * stride_ps
                     + offs_d[None, :] * stride_pd, o, mask=rows)
            tl.store(part_lse_ptr + b64 * stride_lb + heads * stride_lh + pid_s * stride_ls, partial_lse(l, shift),
                     mask=g_valid)


@triton.jit
def _decode_combine_kernel(
    # pointers
    part_o_ptr, part_lse_ptr, lens_ptr, out_ptr,
    # sizes
    S_max, num_splits, window,
    # strides
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    """Program (b, query head): log-sum-exp combine of the splits that ran."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    kv_len, lo, chunk = split_bounds(lens_ptr, pid_b, S_max, window, num_splits, SPLIT_ALIGN, HAS_WINDOW)
    n_active = tl.cdiv(kv_len - lo, chunk)
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < n_active
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    b64 = pid_b.to(tl.int64)
    lse = tl.load(part_lse_ptr + b64 * stride_lb + pid_h * stride_lh + offs_s * stride_ls,
                  mask=s_valid, other=float("-inf"))
    o = tl.load(part_o_ptr + b64 * stride_pb + pid_h * stride_ph + offs_s[:, None] * stride_ps
                + offs_d[None, :] * stride_pd, mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    tl.store(out_ptr + b64 * stride_ob + pid_h * stride_oh + offs_d * stride_od,
             combine_lse(lse, o).to(out_ptr.dtype.element_ty), mask=d_valid)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def launch_decode(q, k, v, kv_lens, mask, out, part_o, part_lse, *, scale, window, softcap, unified_max,
                  num_splits, config, split_align, max_seq_len, block_tables=None, exact_fallback=True):
    """Launch the split kernel, then the combine kernel when ``num_splits > 1``; allocates
    nothing (both launchers, dense and paged, check the call and own the buffers).

    Dense: ``k, v: [B, Hkv, S_max, D]``, ``block_tables=None``. Paged: ``k, v`` are the pools
    ``[num_blocks, Hkv, block_size, D]`` and ``block_tables [B, max_blocks]`` gives the key
    address (``PAGED``); ``max_seq_len`` is then the table's capacity. ``part_o [B, Hq, S, D]``
    and ``part_lse [B, Hq, S]`` (fp32, any strides) hold the partials; unused (may be None)
    with one split. ``config``: ``{"BLOCK_N", "num_warps", "num_stages"}``.
    """
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    paged = block_tables is not None
    if mask is None:
        mask_kind, mask_arg, m_strides = 0, q, (0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        full = mask.expand(B, Hq, 1, max_seq_len)
        mask_arg = full.view(torch.uint8) if mask_kind == 1 else full
        m_strides = (full.stride(0), full.stride(1), full.stride(3))
    direct = num_splits == 1
    if direct:
        part_o, part_lse = out, out  # unused: the split kernel writes out itself
        p_strides, l_strides = (0, 0, 0, 0), (0, 0, 0)
    else:
        p_strides, l_strides = part_o.stride(), part_lse.stride()
    dot_precision, dot_fp32 = dot_flags(q.dtype)
    unified = unified_max is not None
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _decode_split_kernel[(B, Hkv, num_splits)](
            q, k, v, block_tables if paged else kv_lens, kv_lens, mask_arg, part_o, part_lse, out,
            max_seq_len, num_splits, int(window), float(scale), float(softcap),
            float(unified_max) if unified else 0.0,
            q.stride(0), q.stride(1), q.stride(3),
            *k.stride(), *v.stride(),
            *(block_tables.stride() if paged else (0, 0)),
            *m_strides, *p_strides, *l_strides,
            out.stride(0), out.stride(1), out.stride(3),
            GROUP=Hq // Hkv, HEAD_DIM=D,
            BLOCK_G=block_dim(Hq // Hkv), BLOCK_N=config["BLOCK_N"], BLOCK_D=block_dim(D),
            SPLIT_ALIGN=split_align, PAGED=paged, BLOCK_SIZE=k.shape[2] if paged else 1,
            MASK_KIND=mask_kind, HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
            UNIFIED=unified, EXACT_FALLBACK=bool(exact_fallback), DIRECT=direct,
            DOT_PRECISION=dot_precision, DOT_FP32=dot_fp32,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
        if not direct:
            _decode_combine_kernel[(B, Hq)](
                part_o, part_lse, kv_lens, out,
                max_seq_len, num_splits, int(window),
                *p_strides, *l_strides,
                out.stride(0), out.stride(1), out.stride(3),
                HEAD_DIM=D, BLOCK_D=block_dim(D), BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                SPLIT_ALIGN=split_align, HAS_WINDOW=window > 0,
                num_warps=2 if q.is_cuda else 1,
            )
    return out


@on_tensor_device
def attention_decode_triton(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0, unified_max=None,
                            *, out=None, num_splits=None, config=None, exact_fallback=True):
    """Launch the split kernel (and the combine kernel when num_splits > 1) on a dense cache.

    ``out``: optional [B, Hq, 1, D] buffer of q's dtype (any strides) to write.
    ``num_splits``: override :func:`decode_num_splits` (tests, benchmarks).
    ``config``: a dict of :data:`DECODE_CONFIG_KEYS`, else :func:`decode_heuristic_config`.
    ``exact_fallback=False`` disables the FlashDecoding++ recompute, for tests that show
    it is what rescues out-of-range inputs; never turn it off otherwise.
    """
    B, Hq, Hkv, S_max, D = check_decode_args(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    if D > 256:
        raise ValueError(f"attention_decode: head dim {D} > 256 is not supported by the Triton kernel")
    if out is None:
        out = torch.empty((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    elif out.shape != (B, Hq, 1, D) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"attention_decode: out must be a {(B, Hq, 1, D)} {q.dtype} tensor on {q.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if B == 0 or Hq == 0 or D == 0:
        return out
    on_cuda = q.is_cuda
    if not on_cuda and B and kv_lens.numel():
        # cheap on CPU (the interpreter); on CUDA it would be a host sync per step, so the kernel clamps
        lo, hi = int(kv_lens.min()), int(kv_lens.max())
        if lo < 0 or hi > S_max:
            raise ValueError(
                f"attention_decode: kv_lens must lie in [0, S_max={S_max}], got values in [{lo}, {hi}]"
            )
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if on_cuda else None
    if num_splits is None:
        num_splits = decode_num_splits(B, Hkv, S_max, sm_count)
    if num_splits < 1:
        raise ValueError(f"attention_decode: num_splits={num_splits} must be >= 1")
    cfg = dict(decode_heuristic_config(D, Hq // Hkv, q.dtype, q.device))
    if config:
        cfg.update(validate_config(dict(config)))
    part_o = part_lse = None
    if num_splits > 1:
        # every slot read by the combine is written by a split that ran, so `empty` is enough
        part_o = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    return launch_decode(
        q, k_cache, v_cache, kv_lens, mask, out, part_o, part_lse, scale=scale, window=window, softcap=softcap,
        unified_max=unified_max, num_splits=num_splits, config=cfg, split_align=decode_split_align(on_cuda),
        max_seq_len=S_max, exact_fallback=exact_fallback,
    )


# ---------------------------------------------------------------------------------------
# Registered op
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("llmopt::attention_decode", mutates_args=())
def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    unified_max: Optional[float] = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its valid KV-cache prefix."""
    tensors = (q, k_cache, v_cache, kv_lens) + ((mask,) if mask is not None else ())
    if use_triton(*tensors):
        return attention_decode_triton(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    if kernel_mode() == "reference":
        return attention_decode_ref(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    return attention_decode_cpu(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)


@attention_decode.register_fake
def _attention_decode_fake(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0, unified_max=None):
    check_decode_args(q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max,
                      dtypes=KERNEL_DTYPES + (torch.float64,))
    return q.new_empty(q.shape)


__all__ = [
    "DECODE_CONFIG_KEYS",
    "KERNEL_DTYPES",
    "UNIFIED_RANGE",
    "attention_decode",
    "attention_decode_cpu",
    "attention_decode_ref",
    "attention_decode_triton",
    "check_decode_args",
    "decode_configs",
    "decode_heuristic_config",
    "decode_num_splits",
    "decode_split_align",
    "launch_decode",
    "prune_decode_configs",
    "validate_config",
]
