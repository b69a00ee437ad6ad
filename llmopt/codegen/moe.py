"""Mixture of experts: top-k routing and the gated expert MLPs, two ops.

A sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) sends each token through ``top_k`` of
``E`` expert MLPs and sums their outputs weighted by the router. Eager transformers runs it
as a Python loop over experts or as a sort + two grouped matmuls + a gather of the
weights; either way many small launches and intermediates. Here it is two ops.

``moe_route(logits, top_k, scoring, renormalize) -> (weights, ids)``::

    logits:  [T, E]  router logits (any float dtype), E <= 1024
    p = softmax(logits, -1) | sigmoid(logits)       in fp32 ("softmax" | "sigmoid")
    weights, ids = topk(p, top_k)                   sorted, descending
    weights /= weights.sum(-1) if renormalize        (Mixtral; Qwen's norm_topk_prob)
    weights: [T, top_k] fp32    ids: [T, top_k] int64

Ties between equal probabilities may pick any of the tied experts (the kernel picks the
lowest index): the weights are the same either way.

``fused_experts(x, w_gate_up, w_down, weights, ids, activation) -> out``::

    x:         [T, H]          tokens
    w_gate_up: [E, 2 I, H]     per expert, the gate rows then the up rows (transformers' layout)
    w_down:    [E, H, I]
    weights:   [T, k] float    routing weights (fp32 or x.dtype)    ids: [T, k] int, in [0, E)
    h_s   = act(x_t @ Wg[e]^T) * (x_t @ Wu[e]^T)    per pair s = (t, j), e = ids[t, j];
                                                     fp32 accumulation, rounded to x.dtype
    y_s   = h_s @ w_down[e]^T                        fp32 accumulation, rounded to x.dtype
    out_t = sum_j weights[t, j] * y_(t, j)           in fp32, rounded once to x.dtype
    out:       [T, H]          x.dtype

The roundings are those of transformers' grouped implementation, so a fused model matches
eager to the rounding of the last sum.

Kernels (Triton, CUDA; the interpreter on CPU in the tests):

* Prefill: the T k pairs are sorted by expert and each expert's run is padded to a multiple
  of ``BLOCK_M`` (vLLM's ``moe_align_block_size``), so every ``BLOCK_M`` tile of the sorted
  order belongs to one expert. One launch computes all the gate/up tiles with the gated
  activation in the epilogue (the [S, 2 I] product is never written); a second launch runs
  the down GEMM and writes each pair's weighted fp32 row back at its token's position.
  The padding and the per-tile expert are computed with tensor ops from an upper bound on
  the padded length (``S + E (BLOCK_M - 1)``): no host sync, CUDA-graph safe. Tiles past
  the end mask all their loads.
* Decode (``T k <= E``): one GEMV program row per pair and output tile, reading only the
  active experts' weights: the bytes of a decode step are ``k`` experts', not ``E``.

The final sum over the k slots is one ``sum`` over a [T, k, H] fp32 buffer.

The CPU implementation sorts the pairs by expert and runs one matmul pair per non-empty
expert (no per-token loop), in x.dtype like eager.

Source: vLLM ``fused_moe`` (sorted, block-aligned grouped GEMM); MegaBlocks (Gale et al.,
2022, arXiv:2211.15841) for grouped GEMMs over variable-size expert batches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flat_gemm import shared_memory_bytes
from .gated_activation import ACTIVATIONS, apply_activation
from .kernel_mode import on_tensor_device, use_triton
from .residual_norm import round_to

SCORINGS = ("softmax", "sigmoid")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROUTE_EXPERTS = 1024  # one register row of router logits per token


# --------------------------------------------------------------------------- configs
def grouped_configs():
    """Tile sizes the CUDA autotuner tries for the grouped GEMMs (BLOCK_M is set by the routing)."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for bk in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


# Shared memory a config may use: under sm_80's 164 KiB opt-in limit (sm_90 has 227 KiB),
# as the flat GEMM's pruning does; the AOT build check (llmopt/tools/gpu_build.py) holds us to it.
MAX_SHARED_BYTES = 160 * 1024


def prune_grouped_configs(configs, named_args, **kwargs):
    """Drop tiles whose pipelined K loop overflows shared memory, tiles much wider than N or
    deeper than K, and 8 warps on tiles too small to feed them."""
    n_cap = max(triton.next_power_of_2(named_args["N"]), 32)
    k_cap = max(triton.next_power_of_2(named_args["K"]), 32)
    # BLOCK_M comes from the routing, passed by keyword: the autotuner hands it in kwargs.
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
    gated = "x_ptr" in named_args  # the gate/up kernel streams two weight tiles per step
    activations = named_args.get("x_ptr", named_args.get("h_ptr"))
    element = activations.element_size() if hasattr(activations, "element_size") else 2

    def shared_bytes(c):
        return shared_memory_bytes(
            {"BLOCK_M": block_m, "BLOCK_N": c.kwargs["BLOCK_N"], "BLOCK_K": c.kwargs["BLOCK_K"],
             "num_stages": c.num_stages}, element, gated)

    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap
        and shared_bytes(c) <= MAX_SHARED_BYTES
        and not (c.num_warps == 8 and c.kwargs["BLOCK_N"] * block_m < 64 * 64)
    ]
    if not kept:  # the smallest tile always fits
        kept = [min(configs, key=shared_bytes)]
    return kept


def grouped_block_m(pairs: int, num_experts: int) -> int:
    """BLOCK_M for the grouped GEMM: the expected rows per expert, 16 (tl.dot's minimum) .. 64."""
    return min(64, max(16, triton.next_power_of_2(max(1, pairs // max(num_experts, 1)))))


def use_decode_path(tokens: int, top_k: int, num_experts: int) -> bool:
    """GEMV per pair while the pairs are no more than the experts (few weights read twice)."""
    return tokens * top_k <= num_experts


# --------------------------------------------------------------------------- kernels
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


@triton.jit
def _decode_gate_up_kernel(
    # pointers
    x_ptr, w_ptr, ids_ptr, h_ptr,
    # sizes
    N, K, TOP_K,
    # strides
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_it, stride_hs,
    # constexprs
    ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """h[s, n] = act(x_t . Wg[e, n]) * (x_t . Wu[e, n]) for pair s = (t, j): one expert's rows."""
    s = tl.program_id(0).to(tl.int64)  # int64: s * stride passes 2**31 for large batches
    t = s // TOP_K
    e = tl.load(ids_ptr + t * stride_it + (s % TOP_K)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    gate_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + N * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_ptr + t * stride_xt + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        m = mask_n[:, None] & mask_k[None, :]
        wg = tl.load(gate_rows + offs_k[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        wu = tl.load(up_rows + offs_k[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        acc_g += wg * xk[None, :]
        acc_u += wu * xk[None, :]
    # Round each product to x.dtype first, as the unfused GEMM would write it.
    g = round_to(tl.sum(acc_g, axis=1), h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    u = round_to(tl.sum(acc_u, axis=1), h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    h = apply_activation(g, ACTIVATION) * u
    tl.store(h_ptr + s * stride_hs + offs_n, round_to(h, h_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask_n)


@triton.jit
def _decode_down_kernel(
    # pointers
    h_ptr, w_ptr, ids_ptr, rw_ptr, y_ptr,
    # sizes
    N, K, TOP_K,
    # strides
    stride_hs, stride_we, stride_wn, stride_wk, stride_it, stride_rt, stride_ys,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """y[s, n] = weights[t, j] * round(h_s . Wd[e, n]) in fp32, for pair s = (t, j)."""
    s = tl.program_id(0).to(tl.int64)  # int64: s * stride passes 2**31 for large batches
    t = s // TOP_K
    j = s % TOP_K
    e = tl.load(ids_ptr + t * stride_it + j).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        hk = tl.load(h_ptr + s * stride_hs + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(rows + offs_k[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w.to(tl.float32) * hk[None, :]
    y = round_to(tl.sum(acc, axis=1), h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    rw = tl.load(rw_ptr + t * stride_rt + j).to(tl.float32)
    tl.store(y_ptr + s * stride_ys + offs_n, y * rw, mask=mask_n)


@triton.jit
def _grouped_gate_up_kernel(
    # pointers
    x_ptr, w_ptr, sorted_ptr, block_expert_ptr, h_ptr,
    # sizes (M_BUCKET is only the autotune key)
    N, K, S, TOP_K, M_BUCKET,
    # strides
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_hm,
    # constexprs
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """h[r, n] for the padded sorted rows r of one BLOCK_M tile, all of one expert."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    # Tiles past the padded end (e == -1): every load and store masked off.
    s_limit = tl.where(e >= 0, S, 0)
    n_limit = tl.where(e >= 0, N, 0)
    e = tl.maximum(e, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    mask_m = pair < s_limit
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_limit
    x_rows = x_ptr + tok[:, None] * stride_xt
    gate_cols = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    up_cols = gate_cols + N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mw = mask_k[:, None] & mask_n[None, :]
        gt = tl.load(gate_cols + offs_k[:, None] * stride_wk, mask=mw, other=0.0)  # [BLOCK_K, BLOCK_N] = Wg^T
        ut = tl.load(up_cols + offs_k[:, None] * stride_wk, mask=mw, other=0.0)
        if DOT_IN_FP32:
            xt = xt.to(tl.float32)
            gt = gt.to(tl.float32)
            ut = ut.to(tl.float32)
        acc_g = tl.dot(xt, gt, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xt, ut, acc_u, input_precision=DOT_PRECISION)
    g = round_to(acc_g, h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    u = round_to(acc_u, h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    h = apply_activation(g, ACTIVATION) * u
    out = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(out, round_to(h, h_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_down_kernel(
    # pointers
    h_ptr, w_ptr, sorted_ptr, block_expert_ptr, rw_ptr, y_ptr,
    # sizes (M_BUCKET is only the autotune key)
    N, K, S, M_BUCKET,
    # strides
    stride_hm, stride_we, stride_wn, stride_wk, stride_ys,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, EMULATE_RTNE: tl.constexpr,
):
    """y[pair, n] = rw[pair] * round(h[r] . Wd[e, n]) in fp32, written at the pair's own row."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    # Tiles past the padded end (e == -1): every load and store masked off.
    s_limit = tl.where(e >= 0, S, 0)
    n_limit = tl.where(e >= 0, N, 0)
    e = tl.maximum(e, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    mask_m = pair < s_limit
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_limit
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
    w_cols = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ht = tl.load(h_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            ht = ht.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(ht, wt, acc, input_precision=DOT_PRECISION)
    y = round_to(acc, h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    rw = tl.load(rw_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
    out = y_ptr + pair.to(tl.int64)[:, None] * stride_ys + offs_n[None, :]
    tl.store(out, y * rw[:, None], mask=mask_m[:, None] & mask_n[None, :])


_grouped_gate_up_tuned = triton.autotune(
    configs=grouped_configs(), key=["N", "K", "M_BUCKET", "BLOCK_M"], prune_configs_by={"early_config_prune": prune_grouped_configs}
)(_grouped_gate_up_kernel)
_grouped_down_tuned = triton.autotune(
    configs=grouped_configs(), key=["N", "K", "M_BUCKET", "BLOCK_M"], prune_configs_by={"early_config_prune": prune_grouped_configs}
)(_grouped_down_kernel)


# --------------------------------------------------------------------------- references
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


def _check_experts(x, w_gate_up, w_down, weights, ids, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_experts: unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3 or weights.dim() != 2 or ids.dim() != 2:
        raise ValueError(
            "fused_experts: expected x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], weights [T, k], ids [T, k]; got "
            f"{tuple(x.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}, {tuple(weights.shape)}, {tuple(ids.shape)}"
        )
    t, h = x.shape
    e, two_i, h2 = w_gate_up.shape
    if h2 != h or two_i % 2 or tuple(w_down.shape) != (e, h, two_i // 2):
        raise ValueError(
            f"fused_experts: weight shapes do not fit x [T, {h}]: w_gate_up {tuple(w_gate_up.shape)} must be [E, 2I, {h}] "
            f"and w_down {tuple(w_down.shape)} must be [E, {h}, I]"
        )
    if weights.shape != ids.shape or ids.shape[0] != t:
        raise ValueError(f"fused_experts: weights {tuple(weights.shape)} and ids {tuple(ids.shape)} must both be [{t}, k]")
    if ids.dtype not in (torch.int64, torch.int32) or not weights.is_floating_point():
        raise TypeError(f"fused_experts: ids must be int64/int32 and weights float, got {ids.dtype} and {weights.dtype}")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError(
            f"fused_experts: x, w_gate_up and w_down must share a dtype, got {x.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )


def _check_ids_in_range(ids: torch.Tensor, num_experts: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(
            f"fused_experts: expert ids must be in [0, {num_experts}), got ids in [{int(ids.min())}, {int(ids.max())}]"
        )


def fused_experts_ref(x, w_gate_up, w_down, weights, ids, activation: str) -> torch.Tensor:
    """Sort the pairs by expert, one gate/up and one down matmul per non-empty expert, in
    x.dtype; weighted sum over the k slots in fp32 (fp64 for fp64 x), rounded once."""
    from .gated_activation import gated_activation_ref

    _check_experts(x, w_gate_up, w_down, weights, ids, activation)
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    _check_ids_in_range(ids, num_experts)
    t, k = ids.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    rw = weights.reshape(-1).to(acc)
    y = torch.zeros(t * k, x.shape[1], dtype=acc, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        gu = x[pairs // k] @ w_gate_up[e].t()
        h = gated_activation_ref(gu[:, :inter], gu[:, inter:], activation)
        y[pairs] = (h @ w_down[e].t()).to(acc) * rw[pairs, None]
    return y.view(t, k, -1).sum(dim=1).to(x.dtype)


# --------------------------------------------------------------------------- launchers
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


def align_block_size(ids: torch.Tensor, num_experts: int, block_m: int, exact: bool = False):
    """Pairs sorted by expert, each expert's run padded to a multiple of ``block_m``.

    Returns (sorted_pairs [P], block_expert [P / block_m]) with ``P = S + E (block_m - 1)``
    rounded up to ``block_m``, the upper bound of the padded length (no host sync), or with
    ``exact`` the padded length itself (one sync; the interpreter then runs no dead tiles).
    ``sorted_pairs`` holds pair indices ``t k + j``; padding slots hold ``S`` (masked).
    ``block_expert[b]`` is the expert of tile b, -1 past the padded end.
    """
    flat = ids.reshape(-1).to(torch.int64)
    s = flat.numel()
    device = flat.device
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts
    dest = padded_start[expert_sorted] + torch.arange(s, device=device) - first[expert_sorted]
    if exact:
        length = int(padded_end[-1]) if num_experts else 0
    else:
        length = triton.cdiv(s + num_experts * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((length,), s, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def _interpreter_block(n: int) -> int:
    """A tile edge for the interpreter: the whole dim up to 64 (16 at least, for tl.dot)."""
    return min(64, max(16, triton.next_power_of_2(n)))


def _check_kernel_inputs(x, w_gate_up, w_down, weights, ids, activation):
    _check_experts(x, w_gate_up, w_down, weights, ids, activation)
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"fused_experts: the Triton kernels support {KERNEL_DTYPES}, got {x.dtype}")
    if not x.is_cuda:  # on CUDA an out-of-range id would cost a sync to detect
        _check_ids_in_range(ids, w_gate_up.shape[0])


@on_tensor_device
def fused_experts_triton(x, w_gate_up, w_down, weights, ids, activation: str, decode: bool | None = None):
    """The fused experts with the Triton kernels; ``decode`` forces a path (None: by size)."""
    _check_kernel_inputs(x, w_gate_up, w_down, weights, ids, activation)
    # The kernels index the [T, k] routing tensors with a unit slot stride.
    weights, ids = weights.contiguous(), ids.contiguous()
    t, hidden = x.shape
    k = ids.shape[1]
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    s = t * k
    y = torch.empty(s, hidden, dtype=torch.float32, device=x.device)
    if s == 0 or hidden == 0:
        return torch.zeros_like(x)
    if inter == 0:
        return torch.zeros_like(x)
    emulate = not x.is_cuda
    if decode is None:
        decode = use_decode_path(t, k, num_experts)
    if decode:
        h = torch.empty(s, inter, dtype=x.dtype, device=x.device)
        gu_n, gu_k = (64, 64) if x.is_cuda else (_interpreter_block(inter), _interpreter_block(hidden))
        d_n, d_k = (64, 64) if x.is_cuda else (_interpreter_block(hidden), _interpreter_block(inter))
        _decode_gate_up_kernel[(s, triton.cdiv(inter, gu_n))](
            x, w_gate_up, ids, h, inter, hidden, k,
            x.stride(0), x.stride(1), *w_gate_up.stride(), ids.stride(0), h.stride(0),
            ACTIVATION=activation, BLOCK_N=gu_n, BLOCK_K=gu_k, EMULATE_RTNE=emulate, num_warps=4,
        )
        _decode_down_kernel[(s, triton.cdiv(hidden, d_n))](
            h, w_down, ids, weights, y, hidden, inter, k,
            h.stride(0), *w_down.stride(), ids.stride(0), weights.stride(0), y.stride(0),
            BLOCK_N=d_n, BLOCK_K=d_k, EMULATE_RTNE=emulate, num_warps=4,
        )
        return y.view(t, k, hidden).sum(dim=1).to(x.dtype)

    block_m = grouped_block_m(s, num_experts)
    sorted_pairs, block_expert = align_block_size(ids, num_experts, block_m, exact=not x.is_cuda)
    h = torch.empty(sorted_pairs.numel(), inter, dtype=x.dtype, device=x.device)
    rw = weights.view(-1)
    # Autotune key: pairs bucketed to powers of two (at most 13 tunings, never per step).
    m_bucket = min(triton.next_power_of_2(max(1, s)), 4096)
    # Triton's interpreter multiplies bf16 tiles as raw bits (triton 3.9): upcast there
    # (bf16 x bf16 products are exact in fp32).
    dot_in_fp32 = x.dtype == torch.bfloat16 and not x.is_cuda
    precision = "ieee" if x.dtype == torch.float32 or dot_in_fp32 else "tf32"
    n_blocks = block_expert.numel()
    gate_args = (
        x, w_gate_up, sorted_pairs, block_expert, h, inter, hidden, s, k, m_bucket,
        x.stride(0), x.stride(1), *w_gate_up.stride(), h.stride(0),
    )
    down_args = (
        h, w_down, sorted_pairs, block_expert, rw, y, hidden, inter, s, m_bucket,
        h.stride(0), *w_down.stride(), y.stride(0),
    )
    common = dict(BLOCK_M=block_m, DOT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32, EMULATE_RTNE=emulate)
    if x.is_cuda:
        grid = lambda meta: (n_blocks, triton.cdiv(meta["N"], meta["BLOCK_N"]))  # noqa: E731
        _grouped_gate_up_tuned[grid](*gate_args, ACTIVATION=activation, **common)
        _grouped_down_tuned[grid](*down_args, **common)
    else:
        # Interpreter: one fixed tile (autotuning there would only time numpy), as few
        # programs as the sizes allow (each costs the interpreter milliseconds).
        for kernel, n, kk, extra in (
            (_grouped_gate_up_kernel, inter, hidden, dict(ACTIVATION=activation)),
            (_grouped_down_kernel, hidden, inter, {}),
        ):
            block_n, block_k = _interpreter_block(n), _interpreter_block(kk)
            args = gate_args if kernel is _grouped_gate_up_kernel else down_args
            kernel[(n_blocks, triton.cdiv(n, block_n))](
                *args, **extra, **common, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4
            )
    return y.view(t, k, hidden).sum(dim=1).to(x.dtype)


def active_expert_bytes(w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor) -> int:
    """Weight bytes the decode path reads for ``ids``: each distinct active expert's rows once
    per pair that uses it (an upper bound: a GPU's L2 may serve the repeats)."""
    per_expert = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    return per_expert * ids.numel()


# --------------------------------------------------------------------------- registered ops
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


@torch.library.custom_op("llmopt::fused_experts", mutates_args=())
def fused_experts(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x_t), experts gated MLPs; fresh [T, H] output."""
    if x.dtype in KERNEL_DTYPES and use_triton(x, w_gate_up, w_down, weights, ids):
        return fused_experts_triton(x, w_gate_up, w_down, weights, ids, activation)
    return fused_experts_ref(x, w_gate_up, w_down, weights, ids, activation).contiguous()


@fused_experts.register_fake
def _(x, w_gate_up, w_down, weights, ids, activation):
    _check_experts(x, w_gate_up, w_down, weights, ids, activation)
    return x.new_empty(x.shape)
