"""Rotary position embedding (RoPE) of queries and keys in one kernel launch.

Eager Hugging Face attention rotates ``q`` and ``k`` separately, each as
``x * cos + rotate_half(x) * sin``: a slice, a negation, a concatenation, two multiplies and
an add per tensor, each a full pass over memory (plus a slice and a concatenation more for
partial rotary). Here one launch reads ``q``, ``k`` and the ``cos``/``sin`` rows once and
writes the rotated ``q`` and ``k`` once; a program handles a block of heads at one
(batch, position), so each ``cos``/``sin`` row is loaded once for all its heads.

Math, for the first ``rd = rotary_dim`` dims of each head (fp32, one rounding to q.dtype):

    out[p1] = x[p1] * cos[p1] - x[p2] * sin[p1]
    out[p2] = x[p2] * cos[p2] + x[p1] * sin[p2]        for i in [0, rd/2)

with ``(p1, p2) = (i, i + rd/2)`` for the ``rotate_half`` spelling (Llama, Mistral, Qwen,
NeoX, Phi) and ``(p1, p2) = (2i, 2i + 1)`` for the interleaved spelling (GPT-J
``rotate_every_two``, the complex-multiplication form of Meta's Llama). ``cos``/``sin`` are
given per dim, in the layout the model computed them (duplicated halves, or
repeat-interleaved pairs), and are used as given. Dims ``>= rd`` are copied unchanged
(partial rotary: GPT-J, NeoX, Phi).

Shapes: ``q: [B, Hq, S, D]``, ``k: [B, Hk, S, D]`` (``Hk != Hq`` for GQA/MQA; any strides,
e.g. HF's ``view(B, S, H, D).transpose(1, 2)``); ``cos, sin: [B or 1, S, rd]`` (any
strides; ``[S, rd]`` and HF's ``[B or 1, 1, S, rd]`` are accepted too). Outputs: ``q_out,
k_out`` contiguous ``[B, H, S, D]`` in q's dtype.

Source: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"
(arXiv:2104.09864); the two layouts as in Hugging Face transformers' Llama and GPT-J.

Public for :mod:`llmopt.codegen.kv_cache` (the fused RoPE + cache append), so the two ops
rotate with the same code: the ``@triton.jit`` building blocks :func:`rotate_heads` and
:func:`rope_position`, the
input contract :func:`check_rope_inputs`, the cos/sin view :func:`cos_sin_3d` and the
reference rotation :func:`rotate_pair_ref`.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .buckets import m_bucket, next_pow2
from .kernel_mode import on_tensor_device, use_triton
from .residual_norm import round_to

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- autotune space
def _rope_configs():
    return [triton.Config({"BLOCK_H": bh}, num_warps=w) for bh in (1, 2, 4, 8, 16) for w in (1, 2, 4)]


def _prune_rope_configs(configs, named_args, **kwargs):
    """Drop head blocks wider than the most heads, and warps with under one element per thread."""
    heads = next_pow2(max(named_args["HQ"], named_args["HK"]))
    block_half = kwargs.get("BLOCK_HALF", named_args.get("BLOCK_HALF"))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_H"] <= heads and c.kwargs["BLOCK_H"] * block_half >= 32 * c.num_warps
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_H"], c.num_warps))]


# --------------------------------------------------------------------------- kernels
@triton.jit
def rotate_heads(
    # pointers: this (batch, position) of x and of the output; cos/sin rows
    x_pos, o_pos, cos_row, sin_row,
    # sizes
    head0, H, HALF, D,
    # strides
    stride_xh, stride_xd, stride_oh, stride_od, stride_cd, stride_sd,
    # constexprs
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        p1 = 2 * i
        p2 = 2 * i + 1
    else:
        p1 = i
        p2 = i + HALF
    i_mask = i < HALF
    cos1 = tl.load(cos_row + p1 * stride_cd, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row + p1 * stride_sd, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + p2 * stride_cd, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + p2 * stride_sd, mask=i_mask, other=0.0).to(tl.float32)[None, :]

    x_heads = x_pos + heads[:, None].to(tl.int64) * stride_xh
    o_heads = o_pos + heads[:, None].to(tl.int64) * stride_oh
    mask = (heads[:, None] < H) & i_mask[None, :]
    a = tl.load(x_heads + p1[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_heads + p2[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    out_dtype = o_pos.dtype.element_ty
    tl.store(o_heads + p1[None, :] * stride_od, round_to(a * cos1 - b * sin1, out_dtype, EMULATE_RTNE), mask=mask)
    tl.store(o_heads + p2[None, :] * stride_od, round_to(b * cos2 + a * sin2, out_dtype, EMULATE_RTNE), mask=mask)
    if HAS_PASS:
        # Partial rotary: dims [2 * HALF, D) are copied bit for bit.
        d = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pass_mask = (heads[:, None] < H) & (d[None, :] < D)
        v = tl.load(x_heads + d[None, :] * stride_xd, mask=pass_mask, other=0.0)
        tl.store(o_heads + d[None, :] * stride_od, v, mask=pass_mask)


@triton.jit
def rope_position(S, cos_ptr, sin_ptr, stride_cb, stride_cs, stride_sb, stride_ss):
    """This program's (batch, position) on a ``(B * S, head blocks)`` grid, as int64, and
    its cos / sin rows."""
    pid_bs = tl.program_id(0)
    b = (pid_bs // S).to(tl.int64)
    s = (pid_bs % S).to(tl.int64)
    return b, s, cos_ptr + b * stride_cb + s * stride_cs, sin_ptr + b * stride_sb + s * stride_ss


@triton.jit
def _rope_kernel(
    # pointers
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    # sizes (M_BUCKET is only the autotune key)
    S, HQ, HK, HALF, D, M_BUCKET,
    # strides
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_qob, stride_qoh, stride_qos, stride_qod,
    stride_kob, stride_koh, stride_kos, stride_kod,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    # constexprs
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    # Grid: (B * S, q head blocks + k head blocks); the first head blocks rotate q, the rest k.
    b, s, cos_row, sin_row = rope_position(S, cos_ptr, sin_ptr, stride_cb, stride_cs, stride_sb, stride_ss)
    pid_h = tl.program_id(1)
    n_q_blocks = tl.cdiv(HQ, BLOCK_H)
    if pid_h < n_q_blocks:
        rotate_heads(
            q_ptr + b * stride_qb + s * stride_qs, qo_ptr + b * stride_qob + s * stride_qos, cos_row, sin_row,
            pid_h * BLOCK_H, HQ, HALF, D,
            stride_qh, stride_qd, stride_qoh, stride_qod, stride_cd, stride_sd,
            INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS, HAS_PASS, EMULATE_RTNE,
        )
    else:
        rotate_heads(
            k_ptr + b * stride_kb + s * stride_ks, ko_ptr + b * stride_kob + s * stride_kos, cos_row, sin_row,
            (pid_h - n_q_blocks) * BLOCK_H, HK, HALF, D,
            stride_kh, stride_kd, stride_koh, stride_kod, stride_cd, stride_sd,
            INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS, HAS_PASS, EMULATE_RTNE,
        )


_rope_tuned = triton.autotune(
    configs=_rope_configs(),
    key=["HQ", "HK", "HALF", "D", "M_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_rope_configs},
)(_rope_kernel)


# --------------------------------------------------------------------------- reference
def cos_sin_3d(cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, rotary_dim: int):
    """cos/sin as ``[B or 1, S, rd]`` views (from ``[S, rd]``, ``[Bc, S, rd]`` or ``[Bc, 1, S, rd]``)."""
    views = []
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() == 2:
            t = t.unsqueeze(0)
        elif t.dim() == 4 and t.shape[1] == 1:
            t = t.squeeze(1)
        batch, seq = q.shape[0], q.shape[2]
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq or t.shape[2] != rotary_dim:
            raise ValueError(
                f"rope: {name} must be [B or 1, S, rotary_dim] = [{batch} or 1, {seq}, {rotary_dim}] "
                f"(q is {tuple(q.shape)}), got {tuple(t.shape)}; index it by position before the call"
            )
        if t.device != q.device or not t.is_floating_point():
            raise ValueError(f"rope: {name} must be a floating-point tensor on {q.device}, got {t.dtype} on {t.device}")
        views.append(t)
    return views


def check_rope_inputs(q, k, rotary_dim: int, interleaved: bool) -> None:
    """The contract of q, k, ``rotary_dim`` and ``interleaved`` (ValueError / TypeError
    saying what is wrong); shared with the fused RoPE + KV-cache append (kv_cache.py)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"rope: q and k must be [B, H, S, D] (heads before positions, as after HF's transpose(1, 2)), "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, S and D (all but H)")
    if q.dtype != k.dtype or q.device != k.device or not q.is_floating_point():
        raise ValueError(
            f"rope: q and k must be floating point with one dtype and device, got {q.dtype} on {q.device} and "
            f"{k.dtype} on {k.device}"
        )
    # The schema types rotary_dim as SymInt: under dynamic shapes the fake kernel may get one.
    is_int = isinstance(rotary_dim, (int, torch.SymInt)) and not isinstance(rotary_dim, bool)
    if not is_int or not 2 <= rotary_dim <= q.shape[3] or rotary_dim % 2:
        raise ValueError(f"rope: rotary_dim must be an even int in [2, head_dim={q.shape[3]}], got {rotary_dim!r}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"rope: interleaved must be a bool, got {interleaved!r}")


def rotate_pair_ref(q, k, cos, sin, rotary_dim: int, interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k on checked inputs (``cos``/``sin`` as :func:`cos_sin_3d` returns
    them): fp32 math (fp64 for fp64), one rounding, contiguous outputs.

    rotate_half as ``roll`` times a sign-folded sin: ``cat(-x2, x1) * sin ==
    roll(x, half) * cat(-sin1, sin2)``, so each tensor costs three ops (mul, roll,
    addcmul) instead of eight; this runs in every layer of a CPU decode step.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)
    half = rotary_dim // 2
    if not interleaved:
        s = torch.cat((-s[..., :half], s[..., half:]), dim=-1)

    def rotate(x):
        xf = x.to(acc)
        rot = xf[..., :rotary_dim]
        if interleaved:  # GPT-J rotate_every_two: (x0, x1) -> (-x1, x0)
            out = rot * c + torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2) * s
        else:
            out = torch.addcmul(rot * c, rot.roll(half, -1), s)
        if rotary_dim < x.shape[-1]:  # partial rotary: the pass-through dims follow
            out = torch.cat((out, xf[..., rotary_dim:]), dim=-1)
        return out.to(x.dtype).contiguous()

    return rotate(q), rotate(k)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager RoPE of q and k in fp32 (fp64 for fp64 inputs), one rounding; contiguous outputs."""
    check_rope_inputs(q, k, rotary_dim, interleaved)
    cos3, sin3 = cos_sin_3d(cos, sin, q, rotary_dim)
    return rotate_pair_ref(q, k, cos3, sin3, rotary_dim, interleaved)


# --------------------------------------------------------------------------- launcher
def _check_out(out: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"rope: {name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}; pass None to allocate it"
        )


@on_tensor_device
def rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
    q_out: Optional[torch.Tensor] = None,
    k_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k in one Triton launch; returns ``(q_out, k_out)`` (allocated contiguous
    when None; a given output may have any strides, e.g. a slot of a KV cache)."""
    check_rope_inputs(q, k, rotary_dim, interleaved)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"rope: the Triton kernel supports {KERNEL_DTYPES}, got {q.dtype}; use rope_ref")
    cos3, sin3 = cos_sin_3d(cos, sin, q, rotary_dim)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    _check_out(q_out, q, "q_out")
    _check_out(k_out, k, "k_out")
    batch, hq, seq, head_dim = q.shape
    hk = k.shape[1]
    if batch * seq == 0 or hq + hk == 0:
        return q_out, k_out
    half = rotary_dim // 2
    # A cos/sin batch of 1 broadcasts over the batch: stride 0.
    stride_cb = cos3.stride(0) if cos3.shape[0] > 1 else 0
    stride_sb = sin3.stride(0) if sin3.shape[0] > 1 else 0
    args = (
        q, k, cos3, sin3, q_out, k_out,
        seq, hq, hk, half, head_dim, m_bucket(batch * seq),
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        stride_cb, cos3.stride(1), cos3.stride(2),
        stride_sb, sin3.stride(1), sin3.stride(2),
    )
    meta = dict(
        INTERLEAVED=interleaved,
        BLOCK_HALF=next_pow2(half),
        BLOCK_PASS=next_pow2(max(head_dim - rotary_dim, 1)),
        HAS_PASS=head_dim > rotary_dim,
    )
    if q.is_cuda:
        grid = lambda m: (batch * seq, triton.cdiv(hq, m["BLOCK_H"]) + triton.cdiv(hk, m["BLOCK_H"]))  # noqa: E731
        _rope_tuned[grid](*args, **meta, EMULATE_RTNE=False)
    else:
        # Interpreter: one fixed config, all heads of a position in one program where possible.
        block_h = min(next_pow2(max(hq, hk)), 16)
        grid = (batch * seq, triton.cdiv(hq, block_h) + triton.cdiv(hk, block_h))
        _rope_kernel[grid](*args, **meta, BLOCK_H=block_h, EMULATE_RTNE=True, num_warps=1)
    return q_out, k_out


# --------------------------------------------------------------------------- registered op
@torch.library.custom_op("llmopt::rope", mutates_args=())
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, Hq, S, D]`` and k ``[B, Hk, S, D]`` by cos/sin ``[B or 1, S, rotary_dim]``;
    fresh contiguous outputs in q's dtype."""
    if q.dtype in KERNEL_DTYPES and use_triton(q, k, cos, sin):
        return rope_triton(q, k, cos, sin, rotary_dim, interleaved)
    return rope_ref(q, k, cos, sin, rotary_dim, interleaved)


@rope.register_fake
def _(q, k, cos, sin, rotary_dim, interleaved):
    check_rope_inputs(q, k, rotary_dim, interleaved)
    return q.new_empty(q.shape), k.new_empty(k.shape)
