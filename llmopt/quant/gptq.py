"""GPTQ: Hessian-aware post-training quantization (Frantar et al. 2022, arXiv:2210.17323).

For one linear with weight ``W [N, K]`` and calibration inputs ``X [n, K]``, GPTQ
minimises ``||X W^T - X Q^T||^2`` column by column. With ``H = 2/n X^T X`` (the Hessian of
that error), after quantizing column ``k`` it spreads the error ``(w_k - q_k) / [H^-1]_kk``
over the not-yet-quantized columns through row ``k`` of ``H^-1`` (OBS update). The paper's
implementation tricks are kept: the upper Cholesky factor of ``H^-1`` replaces repeated
inverse updates, columns are processed in lazy batches of ``block_size`` (the update of
the remaining columns is one matmul per batch), ``damp * mean(diag(H))`` is added to the
diagonal, dead inputs (``H_kk = 0``) are zeroed, and ``act_order`` processes columns by
decreasing ``H_kk``. With groups, a group's scale and zero point are computed when the
quantization reaches its first column, from the error-updated weights; batches are
aligned to groups so a group never straddles two batches.

With ``act_order`` and groups, the groups are contiguous in the permuted column order:
the result keeps that order plus ``perm`` (see :mod:`llmopt.quant.schemes`). Without groups
(per-row scales) the permutation does not matter to the format and is undone.

Model level (``gptq_quantize_model``): blocks are quantized in order; the Hessians of one
block's linears are accumulated from forward pre-hooks while the calibration batches run
up to that block, whose earlier blocks are already quantized (so each block is calibrated
on the inputs it will see). Memory: one block's Hessians at a time (``K x K`` fp32 each;
linears fed by the same tensor, like q/k/v, share one). Within a block all linears see
unquantized in-block activations (the paper's default, not its "true sequential" option).
"""
from __future__ import annotations

import torch
from torch import nn

from llmopt.codegen.quant_packing import pack_int4

from .calibration import find_blocks, run_calibration
from .config import GPTQ
from .linears import linear_weight
from .schemes import QuantizedWeight, storage_dtype, int4_params, int8_scales, quantize_int4_with_params


class HessianAccumulator:
    """Running ``H = 2/n sum_i x_i x_i^T`` over the rows of every input added (fp32)."""

    def __init__(self, in_features: int, device=None):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian.mul_(self.count / (self.count + m))
        self.count += m
        x = x * (2.0 / self.count) ** 0.5
        self.hessian.addmm_(x.t(), x)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQ = GPTQ()) -> QuantizedWeight:
    """GPTQ-quantize ``weight [N, K]`` given the Hessian ``[K, K]`` of its inputs."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq_quantize: weight [N, K] and hessian [K, K] expected, got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    storage = storage_dtype(weight)
    W = weight.detach().to(torch.float32).clone()
    n, k = W.shape
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    H.diagonal().add_(config.damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    grouped = config.bits == 4 and config.group_size is not None
    group = config.group_size if grouped else k
    if grouped and k % group:
        raise ValueError(f"GPTQ group_size={group} needs in_features divisible by it, got K={k}")
    block = max(group, (config.block_size // group) * group) if grouped else config.block_size

    if config.bits == 8:
        row_scales = int8_scales(W, storage)
    elif not grouped:
        row_scales, row_zeros = int4_params(W, config.symmetric, storage)
    codes = torch.zeros(n, k, dtype=torch.int16, device=W.device)
    scales = torch.zeros(n, k // group, dtype=storage, device=W.device)
    zeros = torch.zeros(n, k // group, dtype=storage, device=W.device)

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if config.bits == 8:
                s = row_scales
                q = torch.round(W1[:, i] / s.float()).clamp_(-127, 127)
                dq = q * s.float()
            else:
                if grouped and col % group == 0:
                    s_g, z_g = int4_params(W1[:, i:i + group], config.symmetric, storage)
                    scales[:, col // group], zeros[:, col // group] = s_g, z_g
                elif not grouped and col == 0:
                    scales[:, 0], zeros[:, 0] = row_scales, row_zeros
                s, z = scales[:, col // group], zeros[:, col // group]
                q = quantize_int4_with_params(W1[:, i:i + 1], s, z)[:, 0].to(torch.float32)
                dq = (q - z.float()) * s.float()
            codes[:, col] = q.to(torch.int16)
            err = (W1[:, i] - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]

    if perm is not None and not grouped:
        # per-row parameters: the column order is irrelevant to the format, undo it
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes, perm = unperm, None
    if config.bits == 8:
        return QuantizedWeight("int8", codes.to(torch.int8), row_scales)
    return QuantizedWeight("int4", pack_int4(codes), scales, zeros, group, perm)


def reconstruction_error(weight: torch.Tensor, qweight_dequantized: torch.Tensor, inputs: torch.Tensor) -> float:
    """``||X W^T - X Q^T||_F^2 / ||X W^T||_F^2``: the layer output error GPTQ minimises."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    ref = x @ weight.to(torch.float64).t()
    return float(((x @ qweight_dequantized.to(torch.float64).t() - ref).pow(2).sum() / ref.pow(2).sum()))


def gptq_quantize_model(model: nn.Module, config: GPTQ, batches: list, targets: dict[str, nn.Module], replace) -> None:
    """Quantize ``targets`` (name -> linear) block by block; ``replace(name, QuantizedWeight, bias)``."""
    blocks = find_blocks(model)
    groups: list[tuple[nn.Module | None, list[str]]] = []
    assigned: set[str] = set()
    for block_name, block in blocks:
        names = [n for n in targets if n.startswith(block_name + ".")]
        if names:
            groups.append((block, names))
            assigned.update(names)
    rest = [n for n in targets if n not in assigned]
    if rest:
        groups.append((None, rest))

    for stop_after, names in groups:
        accumulators: dict[str, HessianAccumulator] = {}
        shares: dict[str, str] = {}  # linear -> linear whose accumulator it shares (same input tensor)
        # id of each input tensor seen in the first batch -> (first linear, the tensor); the
        # reference keeps the tensor alive, so a later tensor cannot reuse its id
        first_batch_inputs: dict[int, tuple[str, torch.Tensor]] = {}
        seen_batches = {"n": 0}
        handles = []

        def make_hook(name):
            def hook(module, args):
                x = args[0]
                if seen_batches["n"] == 0:
                    owner, _ = first_batch_inputs.setdefault(id(x), (name, x))
                    if owner != name:
                        shares[name] = owner
                if name in shares:
                    return
                acc = accumulators.get(name)
                if acc is None:
                    acc = accumulators[name] = HessianAccumulator(x.shape[-1], x.device)
                acc.add(x)
            return hook

        for name in names:
            handles.append(targets[name].register_forward_pre_hook(make_hook(name)))
        try:
            for batch in batches:
                run_calibration(model, [batch], stop_after=stop_after)
                seen_batches["n"] = 1
                first_batch_inputs.clear()
        finally:
            for h in handles:
                h.remove()

        for name in names:
            owner = shares.get(name, name)
            if owner not in accumulators:
                raise RuntimeError(f"GPTQ: linear {name!r} never ran on the calibration batches; "
                                   "exclude it with filter_fn or use calibration data that reaches it")
            linear = targets[name]
            qw = gptq_quantize(linear_weight(linear), accumulators[owner].hessian, config)
            replace(name, qw, linear.bias)
        accumulators.clear()
