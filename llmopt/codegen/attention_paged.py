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

Ops (the math of the dense ops; the kernels are the dense ones, :mod:`.attention_decode`
and :mod:`.attention_prefill`, launched with the constexpr ``PAGED``, which changes only the
address of key ``j``: ``block_tables[b, j // block_size] * stride_block + (j % block_size) *
stride_slot`` instead of ``j * stride_seq`` — see :func:`.attention_blocks.kv_tile_offsets`):

``paged_kv_append(k_pool, v_pool, slot_mapping [T], k [T, Hkv, D], v)`` writes row ``t`` at
slot ``slot_mapping[t] = block * block_size + offset``, in place; a negative slot is skipped
(padding rows of a CUDA-graph bucket). One program per token copies its ``[Hkv, D]`` tile
(the one kernel of this module: a write, not attention).

``paged_attention_decode(q [B, Hq, 1, D], k_pool, v_pool, block_tables, seq_lens, scale,
window=0, softcap=0.0) -> [B, Hq, 1, D]``: one new token per sequence against keys
``[max(0, L - window), L)`` (``L = seq_lens[b]``; the new token's K/V already appended).
The dense split-KV decode kernel (FlashDecoding) and its log-sum-exp combine, with
``S_max = max_blocks_per_seq * block_size``. The split count depends on shapes only, so a
decode step has a constant grid (CUDA graphs replay it). Plan once, run per layer
(flashinfer's plan/run): :func:`plan_paged_decode` makes a step's :class:`PagedDecodePlan`
(split count, config, one fp32 workspace ``[B, Hq, num_splits, P]`` for the partials,
``P = decode_workspace_pitch(D)``) that every layer's launch runs on without allocating;
the registered op takes the plan's workspace as an optional mutable argument.

``paged_attention_prefill(q [T, Hq, D], k_pool, v_pool, block_tables, seq_lens,
query_start_loc [N+1], scale, window=0, softcap=0.0) -> [T, Hq, D]``: ``N`` sequences' new
tokens packed along ``T`` (varlen, no padding): rows ``query_start_loc[n] ..
query_start_loc[n+1] - 1`` are the ``q_len_n`` new tokens of sequence ``n``, at positions
``seq_lens[n] - q_len_n ..  seq_lens[n] - 1``; query ``i`` attends causally to the cached
prefix and to the new tokens up to itself: keys ``j <= p_i`` (and ``p_i - j < window``).
This is a chunked prefill, a prompt that reuses a cached prefix, and also a decode token
(``q_len = 1``), so a step that mixes prefills and decodes is one launch. The dense
FlashAttention-2 prefill kernel; ``PAGED`` also selects its varlen grid
``(cdiv(T, BLOCK_M) + N, Hq)``: sequence ``n``'s query tiles are programs
``query_start_loc[n] // BLOCK_M + n + m`` (the vLLM Triton backend's numbering), which a
program finds by counting the sequences that start at or before it. ``query_start_loc[N]``
must equal ``T``.

Keys are gathered one by one through the table, so the key tile ``BLOCK_N`` is independent
of ``block_size`` (8, 16, 32, ... all work). Accumulation is fp32; a row with no key
(``seq_lens[b] == 0``) gives 0, never NaN. Contract checks and references:
:mod:`.attention_paged_ref`.

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
    decode_heuristic_config,
    decode_num_splits,
    decode_split_align,
    launch_decode,
)
from .attention_paged_ref import (
    KERNEL_DTYPES,
    check_append_args,
    check_decode_args,
    check_paged_values,
    check_prefill_args,
    gather_kv,
    paged_attention_decode_ref,
    paged_attention_prefill_ref,
    paged_kv_append_ref,
)
from .attention_prefill import MAX_HEAD_DIM, launch_prefill, prefill_q_bucket
from .kernel_mode import on_tensor_device, use_triton
from .op_signature import signature_of

DEFAULT_BLOCK_SIZE = 16


# ---------------------------------------------------------------------------------------
# Triton kernel: the KV append (attention itself runs the dense kernels with PAGED)
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


# ---------------------------------------------------------------------------------------
# Launchers and the decode plan
# ---------------------------------------------------------------------------------------


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
    with torch.cuda.device(k_pool.device) if k_pool.is_cuda else contextlib.nullcontext():
        _paged_kv_append_kernel[(k.shape[0],)](
            k, v, k_pool, v_pool, slot_mapping,
            nb * bs, hkv, d,
            *k.stride(), *v.stride(), *k_pool.stride(), *v_pool.stride(),
            BLOCK_SIZE=bs, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
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
                           decode_split_align(on_cuda), workspace)


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
                           decode_split_align(on_cuda), workspace)


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
        check_paged_values(op, block_tables, seq_lens, k_pool.shape[0], bs)
    if plan is None:
        if workspace is not None:
            plan = plan_from_workspace(q, k_pool, block_tables, workspace)
        else:  # an unplanned call: plan it here (allocates this call's workspace)
            plan = plan_paged_decode(b, hq, hkv, d, block_tables.shape[1], bs, q.dtype, q.device,
                                     num_splits=num_splits, config=config, one_split_workspace=False)
    # every slot read by the combine is written by a split that ran (in this layer), so the
    # workspace needs no clearing between layers
    multi = plan.num_splits > 1
    return launch_decode(
        q, k_pool, v_pool, seq_lens, None, out, plan.part_o if multi else None, plan.part_lse if multi else None,
        scale=scale, window=window, softcap=softcap, unified_max=None, num_splits=plan.num_splits,
        config=plan.config, split_align=plan.split_align, max_seq_len=plan.max_seq_len, block_tables=block_tables,
    )


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
        check_paged_values(op, block_tables, seq_lens, k_pool.shape[0], bs, qsl[1:] - qsl[:-1])
    return launch_prefill(q, k_pool, v_pool, out, scale=scale, causal=True, window=window, softcap=softcap,
                          kv_lens=seq_lens, block_tables=block_tables, query_start_loc=query_start_loc)


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
@signature_of(paged_attention_decode_ref, extra=("workspace",))
def paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, window=0, softcap=0.0,
                           workspace: Optional[torch.Tensor] = None):
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
@signature_of(paged_attention_prefill_ref)
def paged_attention_prefill(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale, window=0, softcap=0.0):
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
    "check_paged_values",
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
