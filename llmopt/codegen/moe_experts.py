"""Mixture of experts: the gated expert MLPs of a routed batch, one op over float stacks.

A sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) sends each token through ``top_k`` of
``E`` expert MLPs and sums their outputs weighted by the router. Eager transformers runs it
as a Python loop over experts or as a sort + two grouped matmuls + a gather of the
weights; either way many small launches and intermediates. Here it is two ops: the routing
(``llmopt.codegen.moe_route``) and this one.

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

Kernels (Triton, CUDA; the interpreter on CPU in the tests; ``llmopt.codegen.moe_kernels``,
shared with the int8 / int4 stacks of ``llmopt.codegen.moe_quant``):

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
expert (no per-token loop), in x.dtype like eager; under the Inductor executor a decode-sized
call becomes a generated GEMV instead (``llmopt.codegen.moe_cpu``).

Source: vLLM ``fused_moe`` (sorted, block-aligned grouped GEMM); MegaBlocks (Gale et al.,
2022, arXiv:2211.15841) for grouped GEMMs over variable-size expert batches.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton

from .. import compat
from . import moe_kernels as mk
from .gated_activation import ACTIVATIONS
from .kernel_mode import on_tensor_device, use_triton
from .moe_route import KERNEL_DTYPES

__all__ = ["ACTIVATIONS", "ExpertStack", "align_block_size", "fused_experts", "fused_experts_ref", "fused_experts_triton"]


class ExpertStack(NamedTuple):
    """One weight stack as the kernels read it: ``data`` (float ``[E, N, K]``, int8
    ``[E, N, K]`` or packed int4 ``[E, N, K / 2]``), ``scales`` / ``zeros`` ``[E, N, groups]``
    (the data itself, unused, for float), ``quant`` (moe_kernels.QUANT_*) and ``group``."""

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    quant: int
    group: int

    def scale_strides(self) -> tuple[int, int, int]:
        if self.quant == mk.QUANT_FLOAT:
            return 0, 0, 0
        s = self.scales
        return s.stride(0), s.stride(1), (s.stride(2) if s.dim() == 3 else 0)


def float_stack(w: torch.Tensor) -> ExpertStack:
    return ExpertStack(w, w, w, mk.QUANT_FLOAT, 1)


# --------------------------------------------------------------------------- sizes
def grouped_block_m(pairs: int, num_experts: int) -> int:
    """BLOCK_M for the grouped GEMM: the expected rows per expert, 16 (tl.dot's minimum) .. 64."""
    return min(64, max(16, triton.next_power_of_2(max(1, pairs // max(num_experts, 1)))))


def use_decode_path(tokens: int, top_k: int, num_experts: int) -> bool:
    """GEMV per pair while the pairs are no more than the experts (few weights read twice)."""
    return tokens * top_k <= num_experts


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


def active_expert_bytes(w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor) -> int:
    """Weight bytes the decode path reads for ``ids``: each distinct active expert's rows once
    per pair that uses it (an upper bound: a GPU's L2 may serve the repeats)."""
    per_expert = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    return per_expert * ids.numel()


# --------------------------------------------------------------------------- a dense MLP as experts
def chunk_experts(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, inter: int):
    """The dense gated MLP ``(gate [I_s, H], up [I_s, H], down [H, I_s])`` as ``c = ceil(I_s / inter)``
    experts: ``(gate_up [c, 2·inter, H], down [c, H, inter])``, the last chunk zero-padded."""
    i_s, h = w_gate.shape
    c = -(-i_s // inter)
    pad = c * inter - i_s
    gate = torch.nn.functional.pad(w_gate, (0, 0, 0, pad)).view(c, inter, h)
    up = torch.nn.functional.pad(w_up, (0, 0, 0, pad)).view(c, inter, h)
    down = torch.nn.functional.pad(w_down, (0, pad)).view(h, c, inter).transpose(0, 1)
    return torch.cat([gate, up], dim=1).contiguous(), down.contiguous()


def zero_preserving(activation: str) -> bool:
    """``act(0) == 0``: a zero-padded intermediate unit adds nothing."""
    from .gated_activation import gated_activation_ref

    zero = torch.zeros(1, dtype=torch.float64)
    return bool(gated_activation_ref(zero, torch.ones_like(zero), activation).eq(0).all())


# --------------------------------------------------------------------------- checks
def check_routed_shapes(op: str, x, gate_up_shape, down_shape, weights, ids, activation: str) -> None:
    """The contract every fused-experts op shares, on the logical (dequantized) stack shapes
    ``gate_up_shape = (E, 2I, H)`` and ``down_shape = (E, H, I)``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if x.dim() != 2 or len(gate_up_shape) != 3 or len(down_shape) != 3 or weights.dim() != 2 or ids.dim() != 2:
        raise ValueError(
            f"{op}: expected x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], weights [T, k], ids [T, k]; got "
            f"{tuple(x.shape)}, {tuple(gate_up_shape)}, {tuple(down_shape)}, {tuple(weights.shape)}, {tuple(ids.shape)}"
        )
    t, h = x.shape
    e, two_i, h2 = gate_up_shape
    if h2 != h or two_i % 2 or tuple(down_shape) != (e, h, two_i // 2):
        raise ValueError(
            f"{op}: weight shapes do not fit x [T, {h}]: w_gate_up {tuple(gate_up_shape)} must be [E, 2I, {h}] "
            f"and w_down {tuple(down_shape)} must be [E, {h}, I]"
        )
    if weights.shape != ids.shape or ids.shape[0] != t:
        raise ValueError(f"{op}: weights {tuple(weights.shape)} and ids {tuple(ids.shape)} must both be [{t}, k]")
    if ids.dtype not in (torch.int64, torch.int32) or not weights.is_floating_point():
        raise TypeError(f"{op}: ids must be int64/int32 and weights float, got {ids.dtype} and {weights.dtype}")


def _check_experts(x, w_gate_up, w_down, weights, ids, activation: str) -> None:
    check_routed_shapes("fused_experts", x, w_gate_up.shape, w_down.shape, weights, ids, activation)
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError(
            f"fused_experts: x, w_gate_up and w_down must share a dtype, got {x.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )


def check_ids_in_range(op: str, ids: torch.Tensor, num_experts: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(
            f"{op}: expert ids must be in [0, {num_experts}), got ids in [{int(ids.min())}, {int(ids.max())}]"
        )


def check_kernel_dtype(op: str, x: torch.Tensor, num_experts: int, ids: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernels support {KERNEL_DTYPES}, got {x.dtype}")
    if not x.is_cuda:  # on CUDA an out-of-range id would cost a sync to detect
        check_ids_in_range(op, ids, num_experts)


# --------------------------------------------------------------------------- reference
def _sorted_pairs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, tokens) [T k]: the pair indices ``t k + j`` sorted by expert (stable), and
    the token of each."""
    order = torch.argsort(ids.reshape(-1), stable=True)
    return order, order // ids.shape[1]


def _combine(x, ys, tokens, order, weights) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] y_(t, j)`` from the rows ``ys`` in sorted order, in fp32
    (fp64 for fp64 x), rounded once to x.dtype: one ``index_add_``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape[0], x.shape[1], dtype=acc, device=x.device)
    out.index_add_(0, tokens, ys.to(acc) * weights.reshape(-1)[order].to(acc)[:, None])
    return out.to(x.dtype)


def routed_experts_ref(
    x: torch.Tensor, num_experts: int, expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    weights: torch.Tensor, ids: torch.Tensor, activation: str,
) -> torch.Tensor:
    """Sort the pairs by expert; for each non-empty expert ``e`` one gate/up and one down
    matmul in x.dtype with ``expert_weights(e) = (W_gate_up [2I, H], W_down [H, I])``; the
    weighted sum over the k slots in fp32 (fp64 for fp64 x), rounded once.

    The tokens are gathered once in sorted order, so each expert reads a contiguous run of
    rows and writes its down product in place; one ``index_add_`` combines the weighted
    rows at their tokens (one gather and one scatter in all, not one per expert: 10-30%
    faster on the CI machine at 1..512 tokens, 8 experts, hidden 256)."""
    from .gated_activation import gated_activation_ref

    order, tokens = _sorted_pairs(ids)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).tolist()
    xs = x.index_select(0, tokens)
    ys = torch.empty(tokens.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        w_gu, w_d = expert_weights(e)
        inter = w_gu.shape[0] // 2
        gu = torch.mm(xs[start:end], w_gu.t())
        h = gated_activation_ref(gu[:, :inter], gu[:, inter:], activation)
        torch.mm(h, w_d.t(), out=ys[start:end])
        start = end
    return _combine(x, ys, tokens, order, weights)


def _grouped_mm_fits(w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s layout rule on CPU: 16-byte aligned data and strides, for the
    stacks and for the rows of the gathered tokens ``[S, H]`` and activations ``[S, I]``."""
    size = w_gate_up.element_size()
    rows_fit = w_down.shape[1] * size % 16 == 0 and w_down.shape[2] * size % 16 == 0
    return rows_fit and all(t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride() if st != 1)
                            for t in (w_gate_up, w_down))


def grouped_experts_ref(x, w_gate_up, w_down, weights, ids, activation: str, grouped_mm: Callable) -> torch.Tensor:
    """:func:`routed_experts_ref` over float stacks with ``grouped_mm``
    (``compat.cpu_grouped_mm``): the per-expert matmuls in one call each for gate/up and
    down, the gated activation over all rows at once; no Python loop, no host sync."""
    from .gated_activation import gated_activation_ref

    order, tokens = _sorted_pairs(ids)
    counts = torch.bincount(ids.reshape(-1), minlength=w_gate_up.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    gu = grouped_mm(x.index_select(0, tokens), w_gate_up.transpose(1, 2), offs=offs)
    inter = w_gate_up.shape[1] // 2
    h = gated_activation_ref(gu[:, :inter], gu[:, inter:], activation)
    return _combine(x, grouped_mm(h, w_down.transpose(1, 2), offs=offs), tokens, order, weights)


def fused_experts_ref(x, w_gate_up, w_down, weights, ids, activation: str) -> torch.Tensor:
    """The eager reference of :func:`fused_experts`: :func:`grouped_experts_ref` where the
    CPU runs ``torch._grouped_mm`` on these stacks, else :func:`routed_experts_ref`."""
    _check_experts(x, w_gate_up, w_down, weights, ids, activation)
    check_ids_in_range("fused_experts", ids, w_gate_up.shape[0])
    grouped_mm = compat.cpu_grouped_mm(x.dtype) if x.device.type == "cpu" and ids.numel() else None
    if grouped_mm is not None and _grouped_mm_fits(w_gate_up, w_down):
        return grouped_experts_ref(x, w_gate_up, w_down, weights, ids, activation, grouped_mm)
    return routed_experts_ref(x, w_gate_up.shape[0], lambda e: (w_gate_up[e], w_down[e]), weights, ids, activation)


# --------------------------------------------------------------------------- launcher
def _interpreter_block(n: int) -> int:
    """A tile edge for the interpreter: the whole dim up to 64 (16 at least, for tl.dot)."""
    return min(64, max(16, triton.next_power_of_2(n)))


def _block_k(block: int, stack: ExpertStack) -> int:
    """An int4 K tile must not straddle a group (groups are powers of two >= 32)."""
    return min(block, stack.group) if stack.quant == mk.QUANT_INT4 else block


def _stack_args(stack: ExpertStack) -> tuple:
    return (stack.data.stride(0), stack.data.stride(1), stack.data.stride(2), *stack.scale_strides())


def launch_fused_experts(x, gate_up: ExpertStack, down: ExpertStack, inter: int, weights, ids, activation: str,
                         decode: bool | None = None) -> torch.Tensor:
    """The kernels over any stack format; ``decode`` forces a path (None: by size)."""
    # The kernels index the [T, k] routing tensors with a unit slot stride.
    weights, ids = weights.contiguous(), ids.contiguous()
    t, hidden = x.shape
    k = ids.shape[1]
    num_experts = gate_up.data.shape[0]
    s = t * k
    if s == 0 or hidden == 0 or inter == 0:
        return torch.zeros_like(x)
    y = torch.empty(s, hidden, dtype=torch.float32, device=x.device)
    emulate = not x.is_cuda
    gu_q = dict(QUANT=gate_up.quant, GROUP=gate_up.group)
    d_q = dict(QUANT=down.quant, GROUP=down.group)
    gu_w = (gate_up.data, gate_up.scales, gate_up.zeros)
    d_w = (down.data, down.scales, down.zeros)
    if decode is None:
        decode = use_decode_path(t, k, num_experts)
    if decode:
        h = torch.empty(s, inter, dtype=x.dtype, device=x.device)
        gu_n, gu_k = (64, 64) if x.is_cuda else (_interpreter_block(inter), _interpreter_block(hidden))
        d_n, d_k = (64, 64) if x.is_cuda else (_interpreter_block(hidden), _interpreter_block(inter))
        mk.decode_gate_up_kernel[(s, triton.cdiv(inter, gu_n))](
            x, *gu_w, ids, h, inter, hidden, k,
            x.stride(0), x.stride(1), *_stack_args(gate_up), ids.stride(0), h.stride(0),
            ACTIVATION=activation, BLOCK_N=gu_n, BLOCK_K=_block_k(gu_k, gate_up), EMULATE_RTNE=emulate,
            num_warps=4, **gu_q,
        )
        mk.decode_down_kernel[(s, triton.cdiv(hidden, d_n))](
            h, *d_w, ids, weights, y, hidden, inter, k,
            h.stride(0), *_stack_args(down), ids.stride(0), weights.stride(0), y.stride(0),
            BLOCK_N=d_n, BLOCK_K=_block_k(d_k, down), EMULATE_RTNE=emulate, num_warps=4, **d_q,
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
        x, *gu_w, sorted_pairs, block_expert, h, inter, hidden, s, k, m_bucket,
        x.stride(0), x.stride(1), *_stack_args(gate_up), h.stride(0),
    )
    down_args = (
        h, *d_w, sorted_pairs, block_expert, rw, y, hidden, inter, s, m_bucket,
        h.stride(0), *_stack_args(down), y.stride(0),
    )
    common = dict(BLOCK_M=block_m, DOT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32, EMULATE_RTNE=emulate)
    if x.is_cuda:
        grid = lambda meta: (n_blocks, triton.cdiv(meta["N"], meta["BLOCK_N"]))  # noqa: E731
        mk.grouped_gate_up_tuned[grid](*gate_args, ACTIVATION=activation, **common, **gu_q)
        mk.grouped_down_tuned[grid](*down_args, **common, **d_q)
    else:
        # Interpreter: one fixed tile (autotuning there would only time numpy), as few
        # programs as the sizes allow (each costs the interpreter milliseconds).
        for kernel, args, stack, n, kk, extra in (
            (mk.grouped_gate_up_kernel, gate_args, gate_up, inter, hidden, dict(ACTIVATION=activation, **gu_q)),
            (mk.grouped_down_kernel, down_args, down, hidden, inter, d_q),
        ):
            block_n, block_k = _interpreter_block(n), _block_k(_interpreter_block(kk), stack)
            kernel[(n_blocks, triton.cdiv(n, block_n))](
                *args, **extra, **common, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4
            )
    return y.view(t, k, hidden).sum(dim=1).to(x.dtype)


@on_tensor_device
def fused_experts_triton(x, w_gate_up, w_down, weights, ids, activation: str, decode: bool | None = None):
    """The fused experts with the Triton kernels; ``decode`` forces a path (None: by size)."""
    _check_experts(x, w_gate_up, w_down, weights, ids, activation)
    check_kernel_dtype("fused_experts", x, w_gate_up.shape[0], ids)
    return launch_fused_experts(x, float_stack(w_gate_up), float_stack(w_down), w_gate_up.shape[1] // 2,
                                weights, ids, activation, decode)


# --------------------------------------------------------------------------- registered op
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
