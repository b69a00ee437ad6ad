"""In-place KV-cache append: write this step's K and V rows into preallocated caches.

    k_cache[b, h, positions[b, s], :] = k[b, h, s, :]      (same for v)

Shapes: ``k_cache, v_cache: [B, H, S_max, D]`` (any strides, last dim contiguous — the
layout of Hugging Face's StaticCache and of ``llmopt.runtime.StaticKVCache``),
``k, v: [B, H, S_new, D]`` (any strides), ``positions: [S_new]`` (shared by the batch, as
HF's ``cache_position``) or ``[B, S_new]`` (per sequence), integer. Copies only, no math.

Why an op: in a functionalized graph a cache update is ``index_copy`` (a copy of the whole
cache) followed by ``copy_`` back into the input — O(S_max) bytes per layer per decode
step. This op writes the O(S_new) new rows in place, so a decode step's cost no longer
grows with the cache capacity (``passes/kv_cache.py`` emits it).

Positions outside ``[0, S_max)`` are a caller error: the launcher cannot check device
values without a host sync, so the kernel masks them (no out-of-bounds write) and the
reference raises (index_copy's own check). A paged cache would index its blocks through
a block table in the same kernel shape (one program per written row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buckets import next_pow2
from .kernel_mode import on_tensor_device, use_triton
from .rope import KERNEL_DTYPES as ROPE_DTYPES
from .rope import check_rope_inputs, cos_sin_3d, rope_position, rotate_heads, rotate_pair_ref


# --------------------------------------------------------------------------- kernel
@triton.jit
def _kv_append_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr,
    H, S_NEW, S_MAX, D,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_kcb, stride_kch, stride_kcs,
    stride_vcb, stride_vch, stride_vcs,
    stride_pb, stride_ps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # one program per (b, h, s) written row
    s = row % S_NEW
    h = (row // S_NEW) % H
    b = row // (S_NEW * H)
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    pos_vec = tl.zeros([BLOCK_D], dtype=tl.int64) + pos  # broadcast: a block mask, not a scalar one
    mask = (offs < D) & (pos_vec >= 0) & (pos_vec < S_MAX)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + s * stride_ks + offs, mask=mask)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + s * stride_vs + offs, mask=mask)
    tl.store(kc_ptr + b * stride_kcb + h * stride_kch + pos_vec * stride_kcs + offs, k, mask=mask)
    tl.store(vc_ptr + b * stride_vcb + h * stride_vch + pos_vec * stride_vcs + offs, v, mask=mask)


# --------------------------------------------------------------------------- reference
def kv_cache_append_ref(k_cache, v_cache, positions, k, v) -> None:
    if positions.dim() == 1:
        # ``index_put_`` rather than ``index_copy_``: Inductor lowers it to an in-place
        # scatter into the cache, where ``index_copy_`` became a copy of the whole cache.
        k_cache[:, :, positions] = k.to(k_cache.dtype)
        v_cache[:, :, positions] = v.to(v_cache.dtype)
        return
    for b in range(k.shape[0]):  # per-sequence positions (ragged batches)
        k_cache[b].index_copy_(1, positions[b], k[b].to(k_cache.dtype))
        v_cache[b].index_copy_(1, positions[b], v[b].to(v_cache.dtype))


# --------------------------------------------------------------------------- launcher
def _check(k_cache, v_cache, positions, k, v) -> None:
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"kv_cache_append: caches and k/v must be 4-D [B, H, S, D], got {tuple(k_cache.shape)}, "
            f"{tuple(v_cache.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != k_cache.shape[:2] or k.shape[3] != k_cache.shape[3] or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"kv_cache_append: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache {tuple(k_cache.shape)} "
            "(batch, heads and head dim must match)"
        )
    if v.shape[3] != v_cache.shape[3] or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"kv_cache_append: v cache {tuple(v_cache.shape)} does not match k cache {tuple(k_cache.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kv_cache_append: positions must be int32 or int64, got {positions.dtype}")
    expected = (k.shape[2],) if positions.dim() == 1 else (k.shape[0], k.shape[2])
    if tuple(positions.shape) != expected:
        raise ValueError(f"kv_cache_append: positions shape {tuple(positions.shape)}, expected {expected} or {(k.shape[2],)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("kv_cache_append: the caches' last dimension must be contiguous")
    if k.shape[2] > k_cache.shape[2]:
        raise ValueError(
            f"KV cache full: {k_cache.shape[2]} positions reserved, {k.shape[2]} new tokens in one step; "
            "use a larger max_seq_len"
        )


@on_tensor_device
def kv_cache_append_triton(k_cache, v_cache, positions, k, v) -> None:
    _check(k_cache, v_cache, positions, k, v)
    B, H, S_new, D = k.shape
    if k.numel() == 0:
        return
    k = k.to(k_cache.dtype)
    v = v.to(v_cache.dtype)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
    stride_pb = pos.stride(0) if positions.dim() == 2 else 0
    _kv_append_kernel[(B * H * S_new,)](
        k, v, k_cache, v_cache, pos,
        H, S_new, k_cache.shape[2], D,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_pb, pos.stride(1),
        BLOCK_D=next_pow2(D),
    )


# --------------------------------------------------------------------------- op
@torch.library.custom_op("llmopt::kv_cache_append", mutates_args=("k_cache", "v_cache"))
def kv_cache_append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write ``k``/``v`` rows at ``positions`` into the caches, in place."""
    if use_triton(k_cache, k):
        kv_cache_append_triton(k_cache, v_cache, positions, k, v)
    else:
        _check(k_cache, v_cache, positions, k, v)
        kv_cache_append_ref(k_cache, v_cache, positions, k, v)


@kv_cache_append.register_fake
def _(k_cache, v_cache, positions, k, v) -> None:
    _check(k_cache, v_cache, positions, k, v)
    return None


# =========================================================================================
# RoPE fused with the append: rotate K as it is written (the kv_cache pass emits it when
# the new K is the output of an llmopt.rope).
#
#     q_out = rope(q);  k_cache[b, :, pos[s]] = rope(k)[b, :, s];  v_cache[b, :, pos[s]] = v[b, :, s]
#
# One launch instead of two (rope, then append): a program per (batch, position) rotates
# a block of query heads into ``q_out``, or a block of key heads straight into their cache
# slot, or copies a block of value heads — the rotated K never goes through memory twice.
# The rotation is rope.py's ``rotate_heads`` (same math, same rounding); ``positions``
# is shared by the batch (HF's cache_position), ``[S]``.
# =========================================================================================
@triton.jit
def _rope_append_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr,
    S, HQ, HK, HALF, D, S_MAX,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_qob, stride_qoh, stride_qos, stride_qod,
    stride_kcb, stride_kch, stride_kcs, stride_kcd,
    stride_vcb, stride_vch, stride_vcs, stride_vcd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    b, s, cos_row, sin_row = rope_position(S, cos_ptr, sin_ptr, stride_cb, stride_cs, stride_sb, stride_ss)
    pid_h = tl.program_id(1)
    pos = tl.load(pos_ptr + s).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), S_MAX - 1)  # the reference raises; never write out of bounds
    n_q = tl.cdiv(HQ, BLOCK_H)
    n_k = tl.cdiv(HK, BLOCK_H)
    if pid_h < n_q:
        rotate_heads(
            q_ptr + b * stride_qb + s * stride_qs, qo_ptr + b * stride_qob + s * stride_qos, cos_row, sin_row,
            pid_h * BLOCK_H, HQ, HALF, D,
            stride_qh, stride_qd, stride_qoh, stride_qod, stride_cd, stride_sd,
            INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS, HAS_PASS, EMULATE_RTNE,
        )
    elif pid_h < n_q + n_k:
        rotate_heads(
            k_ptr + b * stride_kb + s * stride_ks, kc_ptr + b * stride_kcb + pos * stride_kcs, cos_row, sin_row,
            (pid_h - n_q) * BLOCK_H, HK, HALF, D,
            stride_kh, stride_kd, stride_kch, stride_kcd, stride_cd, stride_sd,
            INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS, HAS_PASS, EMULATE_RTNE,
        )
    else:
        heads = (pid_h - n_q - n_k) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < HK) & (d[None, :] < D)
        src = v_ptr + b * stride_vb + s * stride_vs + heads[:, None].to(tl.int64) * stride_vh + d[None, :] * stride_vd
        dst = vc_ptr + b * stride_vcb + pos * stride_vcs + heads[:, None].to(tl.int64) * stride_vch + d[None, :] * stride_vcd
        tl.store(dst, tl.load(src, mask=mask, other=0.0), mask=mask)


def rope_kv_cache_append_ref(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions):
    """Eager: ``rope`` then ``kv_cache_append``; returns the rotated q. Inputs as checked by
    ``_check_rope_append`` (the op checks them; this runs in every CPU decode step)."""
    cos3, sin3 = cos_sin_3d(cos, sin, q, rotary_dim)
    q_rot, k_rot = rotate_pair_ref(q, k, cos3, sin3, rotary_dim, interleaved)
    kv_cache_append_ref(k_cache, v_cache, positions, k_rot, v)
    return q_rot


def _check_rope_append(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions):
    """Raises on a bad call; returns cos/sin as ``[B or 1, S, rotary_dim]`` views."""
    check_rope_inputs(q, k, rotary_dim, interleaved)
    cos3, sin3 = cos_sin_3d(cos, sin, q, rotary_dim)
    if positions.dim() != 1:
        raise ValueError(f"rope_kv_cache_append: positions must be [S] (shared by the batch), got {tuple(positions.shape)}")
    _check(k_cache, v_cache, positions, k, v)
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"rope_kv_cache_append: k/v dtype {k.dtype}/{v.dtype} must equal the caches' {k_cache.dtype}")
    return cos3, sin3


@on_tensor_device
def rope_kv_cache_append_triton(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions, q_out=None):
    cos3, sin3 = _check_rope_append(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if B * S == 0:
        return q_out
    half = rotary_dim // 2
    block_h = min(next_pow2(max(HQ, HK)), 16)
    grid = (B * S, triton.cdiv(HQ, block_h) + 2 * triton.cdiv(HK, block_h))
    _rope_append_kernel[grid](
        q, k, v, cos3, sin3, q_out, k_cache, v_cache, positions,
        S, HQ, HK, half, D, k_cache.shape[2],
        *q.stride(), *k.stride(), *v.stride(), *q_out.stride(), *k_cache.stride(), *v_cache.stride(),
        cos3.stride(0) if cos3.shape[0] > 1 else 0, cos3.stride(1), cos3.stride(2),
        sin3.stride(0) if sin3.shape[0] > 1 else 0, sin3.stride(1), sin3.stride(2),
        INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_HALF=next_pow2(half),
        BLOCK_PASS=next_pow2(max(D - rotary_dim, 1)), HAS_PASS=D > rotary_dim,
        BLOCK_D=next_pow2(D), EMULATE_RTNE=not q.is_cuda,
        num_warps=1 if not q.is_cuda else 4,
    )
    return q_out


@torch.library.custom_op("llmopt::rope_kv_cache_append", mutates_args=("k_cache", "v_cache"))
def rope_kv_cache_append(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
) -> torch.Tensor:
    """Rotate q (returned) and k (written into ``k_cache`` at ``positions``), append v."""
    if q.dtype in ROPE_DTYPES and use_triton(q, k, k_cache):
        return rope_kv_cache_append_triton(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions)
    _check_rope_append(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions)
    return rope_kv_cache_append_ref(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions)


@rope_kv_cache_append.register_fake
def _(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions):
    _check_rope_append(q, k, v, cos, sin, rotary_dim, interleaved, k_cache, v_cache, positions)
    return q.new_empty(q.shape)
