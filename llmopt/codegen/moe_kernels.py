"""The Triton kernels of the fused experts, for float, int8 and int4 expert stacks.

One set of four kernels (decode GEMV gate/up and down, grouped prefill GEMM gate/up and
down) serves every weight format; the format is the constexpr ``QUANT``:

* ``QUANT = 0`` — float stacks ``W [E, N, K]`` in the tokens' dtype;
* ``QUANT = 8`` — int8 codes ``q [E, N, K]``, one scale per output channel ``s [E, N]``:
  ``W[e, n, k] = q[e, n, k] * s[e, n]``;
* ``QUANT = 4`` — int4 codes packed two per byte along K (``uint8 [E, N, K / 2]``, low
  nibble = even column: ``llmopt.codegen.quant_packing.pack_int4``), scales and float zero
  points per group of ``GROUP`` inputs ``s, z [E, N, K / GROUP]``:
  ``W[e, n, k] = (q[e, n, k] - z[e, n, k / GROUP]) * s[e, n, k / GROUP]``.

Quantized weights are dequantized in the K loop, in registers: a K tile never straddles a
group (``BLOCK_K`` divides ``GROUP``; int8 has one group, scale stride 0), so each tile
multiplies the tokens by the exact integer tile ``q - z`` (exact in fp16/bf16: |q - z| <= 255)
and adds the product times the tile's scale to the fp32 accumulator, as the quantized
linears do. The bytes a decode step reads are the active experts' codes: a half (int8) or
a quarter (int4) of bf16's.

Everything else (routing layout, roundings, the weighted fp32 combine) is the float
kernels' and is described in ``llmopt.codegen.moe_experts``.

Source: vLLM ``fused_moe`` (sorted, block-aligned grouped GEMM; its int8/int4 weight-only
variants dequantize in the loop the same way); gpt-fast for the weight-only formats.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .flat_gemm import shared_memory_bytes
from .gated_activation import apply_activation
from .residual_norm import round_to

QUANT_FLOAT, QUANT_INT8, QUANT_INT4 = 0, 8, 4


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
    deeper than K (or than an int4 group), and 8 warps on tiles too small to feed them."""
    n_cap = max(triton.next_power_of_2(named_args["N"]), 32)
    k_cap = max(triton.next_power_of_2(named_args["K"]), 32)
    # BLOCK_M, QUANT and GROUP are passed by keyword: the autotuner hands them in kwargs.
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
    if kwargs.get("QUANT", named_args.get("QUANT", QUANT_FLOAT)) == QUANT_INT4:
        k_cap = min(k_cap, kwargs.get("GROUP", named_args.get("GROUP", k_cap)))
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
        kept = [min((c for c in configs if c.kwargs["BLOCK_K"] <= k_cap), key=shared_bytes)]
    return kept


# --------------------------------------------------------------------------- building blocks
@triton.jit
def _weight_tile(w_ptr, z_ptr, e, rows, cols, mask,
                 stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg,
                 QUANT: tl.constexpr, GROUP: tl.constexpr):
    """W[e, rows, cols] as stored (float), as int8 codes, or as int4 ``q - z`` (fp32);
    ``rows`` and ``cols`` broadcast to the tile's shape."""
    row_base = w_ptr + e * stride_we + rows.to(tl.int64) * stride_wn
    if QUANT == 4:
        byte = tl.load(row_base + (cols // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((cols % 2) * 4)) & 0xF
        z = tl.load(z_ptr + e * stride_se + rows.to(tl.int64) * stride_sn + (cols // GROUP) * stride_sg,
                    mask=mask, other=0.0)
        return q.to(tl.float32) - z.to(tl.float32)
    else:
        return tl.load(row_base + cols * stride_wk, mask=mask, other=0)


@triton.jit
def _tile_scale(s_ptr, e, rows, k0, mask, stride_se, stride_sn, stride_sg, GROUP: tl.constexpr):
    """The fp32 scale of rows ``rows`` for the group holding column ``k0`` (int8: stride_sg = 0)."""
    s = tl.load(s_ptr + e * stride_se + rows.to(tl.int64) * stride_sn + (k0 // GROUP) * stride_sg, mask=mask, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _dot_tile(acc, a, w, s_ptr, e, cols_n, k0, mask_n, stride_se, stride_sn, stride_sg,
              DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """acc [M, N] += a [M, K] @ w [K, N] (float), or (a @ codes) * scale[n] (quantized)."""
    if QUANT == 0:
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        return tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    else:
        if DOT_IN_FP32:
            a = a.to(tl.float32)
        codes = w.to(a.dtype)  # small integers: exact in fp16/bf16
        part = tl.dot(a, codes, input_precision=DOT_PRECISION)
        scale = _tile_scale(s_ptr, e, cols_n, k0, mask_n, stride_se, stride_sn, stride_sg, GROUP)
        return acc + part * scale[None, :]


@triton.jit
def _gemv_tile(acc, xk, w, s_ptr, e, rows_n, k0, mask_n, stride_se, stride_sn, stride_sg,
               QUANT: tl.constexpr, GROUP: tl.constexpr):
    """acc [N, K] += w [N, K] * x [K] elementwise in fp32, dequantized first (summed over K later)."""
    w = w.to(tl.float32)
    if QUANT != 0:
        w = w * _tile_scale(s_ptr, e, rows_n, k0, mask_n, stride_se, stride_sn, stride_sg, GROUP)[:, None]
    return acc + w * xk[None, :]


# --------------------------------------------------------------------------- decode (GEMV)
@triton.jit
def decode_gate_up_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, h_ptr,
    # sizes
    N, K, TOP_K,
    # strides
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_it, stride_hs,
    # constexprs
    ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr,
):
    """h[s, n] = act(x_t . Wg[e, n]) * (x_t . Wu[e, n]) for pair s = (t, j): one expert's rows."""
    s = tl.program_id(0).to(tl.int64)  # int64: s * stride passes 2**31 for large batches
    t = s // TOP_K
    e = tl.load(ids_ptr + t * stride_it + (s % TOP_K)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(x_ptr + t * stride_xt + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        m = mask_n[:, None] & mask_k[None, :]
        wg = _weight_tile(w_ptr, z_ptr, e, offs_n[:, None], offs_k[None, :], m, stride_we, stride_wn, stride_wk,
                          stride_se, stride_sn, stride_sg, QUANT, GROUP)
        wu = _weight_tile(w_ptr, z_ptr, e, N + offs_n[:, None], offs_k[None, :], m, stride_we, stride_wn, stride_wk,
                          stride_se, stride_sn, stride_sg, QUANT, GROUP)
        acc_g = _gemv_tile(acc_g, xk, wg, s_ptr, e, offs_n, k0, mask_n, stride_se, stride_sn, stride_sg, QUANT, GROUP)
        acc_u = _gemv_tile(acc_u, xk, wu, s_ptr, e, N + offs_n, k0, mask_n, stride_se, stride_sn, stride_sg, QUANT, GROUP)
    # Round each product to x.dtype first, as the unfused GEMM would write it.
    g = round_to(tl.sum(acc_g, axis=1), h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    u = round_to(tl.sum(acc_u, axis=1), h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    h = apply_activation(g, ACTIVATION) * u
    tl.store(h_ptr + s * stride_hs + offs_n, round_to(h, h_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask_n)


@triton.jit
def decode_down_kernel(
    # pointers
    h_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, rw_ptr, y_ptr,
    # sizes
    N, K, TOP_K,
    # strides
    stride_hs, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_it, stride_rt, stride_ys,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_RTNE: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
):
    """y[s, n] = weights[t, j] * round(h_s . Wd[e, n]) in fp32, for pair s = (t, j)."""
    s = tl.program_id(0).to(tl.int64)  # int64: s * stride passes 2**31 for large batches
    t = s // TOP_K
    j = s % TOP_K
    e = tl.load(ids_ptr + t * stride_it + j).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        hk = tl.load(h_ptr + s * stride_hs + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = _weight_tile(w_ptr, z_ptr, e, offs_n[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :],
                         stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, QUANT, GROUP)
        acc = _gemv_tile(acc, hk, w, s_ptr, e, offs_n, k0, mask_n, stride_se, stride_sn, stride_sg, QUANT, GROUP)
    y = round_to(tl.sum(acc, axis=1), h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    rw = tl.load(rw_ptr + t * stride_rt + j).to(tl.float32)
    tl.store(y_ptr + s * stride_ys + offs_n, y * rw, mask=mask_n)


# --------------------------------------------------------------------------- prefill (grouped GEMM)
@triton.jit
def _grouped_tile(sorted_ptr, block_expert_ptr, N, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of the sorted pairs: (expert, padded rows, their pairs, row mask,
    output columns, column mask). Tiles past the padded end (expert -1) mask everything."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    s_limit = tl.where(e >= 0, S, 0)
    n_limit = tl.where(e >= 0, N, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.maximum(e, 0), offs_m, pair, pair < s_limit, offs_n, offs_n < n_limit


@triton.jit
def grouped_gate_up_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, z_ptr, sorted_ptr, block_expert_ptr, h_ptr,
    # sizes (M_BUCKET is only the autotune key)
    N, K, S, TOP_K, M_BUCKET,
    # strides
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_hm,
    # constexprs
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr,
):
    """h[r, n] for the padded sorted rows r of one BLOCK_M tile, all of one expert."""
    e, offs_m, pair, mask_m, offs_n, mask_n = _grouped_tile(sorted_ptr, block_expert_ptr, N, S, BLOCK_M, BLOCK_N)
    tok = (pair // TOP_K).to(tl.int64)
    x_rows = x_ptr + tok[:, None] * stride_xt
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mw = mask_k[:, None] & mask_n[None, :]
        # [BLOCK_K, BLOCK_N] tiles of Wg^T and Wu^T
        gt = _weight_tile(w_ptr, z_ptr, e, offs_n[None, :], offs_k[:, None], mw, stride_we, stride_wn, stride_wk,
                          stride_se, stride_sn, stride_sg, QUANT, GROUP)
        ut = _weight_tile(w_ptr, z_ptr, e, N + offs_n[None, :], offs_k[:, None], mw, stride_we, stride_wn, stride_wk,
                          stride_se, stride_sn, stride_sg, QUANT, GROUP)
        acc_g = _dot_tile(acc_g, xt, gt, s_ptr, e, offs_n, k0, mask_n, stride_se, stride_sn, stride_sg,
                          DOT_PRECISION, DOT_IN_FP32, QUANT, GROUP)
        acc_u = _dot_tile(acc_u, xt, ut, s_ptr, e, N + offs_n, k0, mask_n, stride_se, stride_sn, stride_sg,
                          DOT_PRECISION, DOT_IN_FP32, QUANT, GROUP)
    g = round_to(acc_g, h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    u = round_to(acc_u, h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    h = apply_activation(g, ACTIVATION) * u
    out = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    tl.store(out, round_to(h, h_ptr.dtype.element_ty, EMULATE_RTNE), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_down_kernel(
    # pointers
    h_ptr, w_ptr, s_ptr, z_ptr, sorted_ptr, block_expert_ptr, rw_ptr, y_ptr,
    # sizes (M_BUCKET is only the autotune key)
    N, K, S, M_BUCKET,
    # strides
    stride_hm, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_ys,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr,
):
    """y[pair, n] = rw[pair] * round(h[r] . Wd[e, n]) in fp32, written at the pair's own row."""
    e, offs_m, pair, mask_m, offs_n, mask_n = _grouped_tile(sorted_ptr, block_expert_ptr, N, S, BLOCK_M, BLOCK_N)
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        ht = tl.load(h_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = _weight_tile(w_ptr, z_ptr, e, offs_n[None, :], offs_k[:, None], mask_k[:, None] & mask_n[None, :],
                          stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, QUANT, GROUP)
        acc = _dot_tile(acc, ht, wt, s_ptr, e, offs_n, k0, mask_n, stride_se, stride_sn, stride_sg,
                        DOT_PRECISION, DOT_IN_FP32, QUANT, GROUP)
    y = round_to(acc, h_ptr.dtype.element_ty, EMULATE_RTNE).to(tl.float32)
    rw = tl.load(rw_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
    out = y_ptr + pair.to(tl.int64)[:, None] * stride_ys + offs_n[None, :]
    tl.store(out, y * rw[:, None], mask=mask_m[:, None] & mask_n[None, :])


_TUNE_KEY = ["N", "K", "M_BUCKET", "BLOCK_M", "QUANT", "GROUP"]
grouped_gate_up_tuned = triton.autotune(
    configs=grouped_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_grouped_configs}
)(grouped_gate_up_kernel)
grouped_down_tuned = triton.autotune(
    configs=grouped_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_grouped_configs}
)(grouped_down_kernel)
