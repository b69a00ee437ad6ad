"""Mixture-of-experts routing: router logits -> top-k experts and their weights, one op.

``moe_route(logits, top_k, scoring, renormalize) -> (weights, ids)``::

    logits:  [T, E]  router logits (any float dtype), E <= 1024
    p = softmax(logits, -1) | sigmoid(logits)       in fp32 ("softmax" | "sigmoid")
    weights, ids = topk(p, top_k)                   sorted, descending
    weights /= weights.sum(-1) if renormalize        (Mixtral; Qwen's norm_topk_prob)
    weights: [T, top_k] fp32    ids: [T, top_k] int64

Ties between equal probabilities may pick any of the tied experts (the kernel picks the
lowest index): the weights are the same either way.

Kernel (Triton): one program per ``BLOCK_T`` tokens holds their whole logit rows in
registers (hence the 1024-expert limit) and extracts the top k by k masked max-reductions.
The experts themselves are ``llmopt.codegen.moe_experts`` (float) and
``llmopt.codegen.moe_quant`` (int8 / int4 weight-only).

Source: vLLM ``fused_moe`` (``topk_softmax``); transformers' Mixtral / Qwen-MoE routers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_mode import on_tensor_device, use_triton

SCORINGS = ("softmax", "sigmoid")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROUTE_EXPERTS = 1024  # one register row of router logits per token


# --------------------------------------------------------------------------- kernel
@triton.jit
def _moe_route_kernel(
    # pointers
    logits_ptr, weights_ptr, ids_ptr,
    # sizes
    T, E,
    # strides
    stride_lt, stride_le, stride_wt, stride_it,
    # constexprs
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask_t = rows < T
    mask = mask_t[:, None] & (cols[None, :] < E)
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        m = tl.max(x, axis=1)
        m = tl.where(mask_t, m, 0.0)  # padding rows: all -inf, keep them NaN-free
        e = tl.exp(x - m[:, None])
        p = e / tl.where(mask_t, tl.sum(e, axis=1), 1.0)[:, None]
    # masked columns must never be picked: below every probability (all >= 0)
    p = tl.where(mask, p, -1.0)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        # lowest index among the maxima
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)
        total += best
        tl.store(weights_ptr + rows * stride_wt + j, best, mask=mask_t)
        tl.store(ids_ptr + rows * stride_it + j, idx.to(tl.int64), mask=mask_t)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORMALIZE:
        for j in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + rows * stride_wt + j, mask=mask_t, other=1.0)
            tl.store(weights_ptr + rows * stride_wt + j, w / total, mask=mask_t)



# --------------------------------------------------------------------------- reference
def _check_route(logits: torch.Tensor, top_k: int, scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"moe_route: unknown scoring {scoring!r}; valid: {', '.join(SCORINGS)}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"moe_route: logits must be a float [tokens, experts] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"moe_route: top_k must be in [1, {logits.shape[1]}] (the number of experts), got {top_k}")


def moe_route_ref(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """Eager routing in fp32 (fp64 for fp64 logits): (weights [T, k], ids [T, k] int64)."""
    _check_route(logits, top_k, scoring)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    p = torch.softmax(z, dim=-1) if scoring == "softmax" else torch.sigmoid(z)
    weights, ids = torch.topk(p, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# --------------------------------------------------------------------------- launcher
@on_tensor_device
def moe_route_triton(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """Routing with the Triton kernel: (weights [T, k] fp32, ids [T, k] int64)."""
    _check_route(logits, top_k, scoring)
    t, e = logits.shape
    if e > MAX_ROUTE_EXPERTS:
        raise ValueError(f"moe_route: the kernel handles up to {MAX_ROUTE_EXPERTS} experts, got {e}")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(64, 4096 // block_e, triton.next_power_of_2(t)))
    _moe_route_kernel[(triton.cdiv(t, block_t),)](
        logits, weights, ids, t, e,
        logits.stride(0), logits.stride(1), weights.stride(0), ids.stride(0),
        TOP_K=top_k, SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
    )
    return weights, ids


# --------------------------------------------------------------------------- registered op
@torch.library.custom_op("llmopt::moe_route", mutates_args=())
def moe_route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities -> top-k (weights fp32, ids int64), optionally renormalized."""
    if logits.dtype in KERNEL_DTYPES and use_triton(logits):
        return moe_route_triton(logits, top_k, scoring, renormalize)
    weights, ids = moe_route_ref(logits, top_k, scoring, renormalize)
    return weights.contiguous(), ids.contiguous()


@moe_route.register_fake
def _(logits, top_k, scoring, renormalize):
    _check_route(logits, top_k, scoring)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=dtype), logits.new_empty((t, top_k), dtype=torch.int64)
