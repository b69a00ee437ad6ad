"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al. 2022 (arXiv:2211.10438): a few activation channels are much larger than the
rest, which ruins per-token int8 activations. Dividing activation channel ``j`` by
``s_j`` and multiplying weight column ``j`` by ``s_j`` leaves ``X W^T`` unchanged and
balances the two, with ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)`` (``max|W_j|``
over every linear fed by that activation). The division is folded into the preceding
normalization's weight (and bias), so inference costs nothing extra.

Supported structures (per decoder block; a norm whose output feeds exactly these linears):

========================== ====================================== ==========================
norm                        linears                                models
========================== ====================================== ==========================
``input_layernorm``         ``self_attn.{q,k,v}_proj``             Llama, Mistral, Qwen2, ...
``post_attention_layernorm`` ``mlp.{gate,up}_proj``                 Llama, Mistral, Qwen2, ...
``self_attn_layer_norm``    ``self_attn.{q,k,v}_proj``             OPT
``final_layer_norm``        ``fc1``                                OPT
``ln_1``                    ``attn.c_attn`` (``Conv1D``)           GPT-2
``ln_2``                    ``mlp.c_fc`` (``Conv1D``)              GPT-2
========================== ====================================== ==========================

Before folding, each norm is checked numerically to scale its output by ``1 / s`` when its
weight (and bias) are divided by ``s``; a norm that does not (e.g. Gemma's ``x * (1 + w)``)
is left alone. Linears without a foldable predecessor (``o_proj``, ``down_proj``) are
quantized W8A8 without smoothing.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibration import get_submodule, run_calibration
from .linears import linear_shape, linear_weight

SMOOTH_PATTERNS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("final_layer_norm", ("fc1",)),
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
)
_MIN = 1e-5  # floor of max|X| and max|W|: a dead channel must not give s = 0 or inf


def _norm_is_foldable(norm: nn.Module, width: int) -> bool:
    """Does dividing the norm's weight (and bias) by s divide its output by s?"""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,):
        return False
    bias = getattr(norm, "bias", None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen).to(device=weight.device, dtype=weight.dtype)
    s = (torch.rand(width, generator=gen) + 0.5).to(device=weight.device, dtype=weight.dtype)
    w0 = weight.detach().clone()
    b0 = None if not isinstance(bias, torch.Tensor) else bias.detach().clone()
    with torch.no_grad():
        before = norm(x).float()
        weight.div_(s)
        if b0 is not None:
            bias.div_(s)
        after = norm(x).float()
        weight.copy_(w0)
        if b0 is not None:
            bias.copy_(b0)
    expected = before / s.float()
    return bool(torch.allclose(after, expected, rtol=2e-2, atol=1e-3 * float(expected.abs().max()) + 1e-6))


def find_smooth_groups(model: nn.Module, targets: dict[str, nn.Module]) -> list[tuple[str, nn.Module, list[str]]]:
    """``(norm name, norm, [linear names])`` for every supported norm -> linears structure."""
    groups = []
    for block_name, block in model.named_modules():
        for norm_attr, linear_attrs in SMOOTH_PATTERNS:
            norm = get_submodule(block, norm_attr)
            if norm is None:
                continue
            prefix = f"{block_name}." if block_name else ""
            names = [prefix + a for a in linear_attrs]
            if not all(n in targets for n in names):
                continue
            width = linear_shape(targets[names[0]])[1]
            if any(linear_shape(targets[n])[1] != width for n in names) or not _norm_is_foldable(norm, width):
                continue
            groups.append((prefix + norm_attr, norm, names))
    return groups


def activation_absmax(model: nn.Module, batches: list, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` (fp32 ``[K]``) of each linear over all calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        run_calibration(model, batches)
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothing_factors(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)`` (fp32 ``[K]``)."""
    w_amax = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    s = act_amax.to(w_amax.device).clamp(min=_MIN).pow(alpha) / w_amax.clamp(min=_MIN).pow(1.0 - alpha)
    return s.clamp(min=_MIN)


def smooth_model(model: nn.Module, alpha: float, batches: list, targets: dict[str, nn.Module]) -> list[str]:
    """Fold SmoothQuant factors into the supported norms; returns the smoothed norms' names."""
    groups = find_smooth_groups(model, targets)
    if not groups:
        return []
    first = {names[0]: targets[names[0]] for _, _, names in groups}
    stats = activation_absmax(model, batches, first)
    done = []
    with torch.no_grad():
        for norm_name, norm, names in groups:
            if names[0] not in stats:
                continue  # never ran on the calibration data: leave it unsmoothed
            s = smoothing_factors(stats[names[0]], [linear_weight(targets[n]) for n in names], alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            if isinstance(getattr(norm, "bias", None), torch.Tensor):
                norm.bias.div_(s.to(norm.bias.dtype))
            for n in names:
                w = linear_weight(targets[n])  # [N, K] (a view of a Conv1D's [K, N])
                w.mul_(s.to(w.dtype)[None, :])
            done.append(norm_name)
    return done
