"""int8 K/V cache quantization with one symmetric scale per attention head.

Decode attention reads the whole cache at every step, so an int8 cache halves those bytes
against bf16 (and doubles the tokens that fit). Scales are per head (``[H]``): heads differ
in range by orders of magnitude, while within a head the range is stable along the
sequence, which lets the runtime fix the scales once (from the prompt, or calibration) and
quantize every appended token with them: ``q = clamp(round(x / s_h), -127, 127)``,
``x ~= q * s_h``. A token whose values exceed ``127 * s_h`` is clipped; calibrate with a
margin (``margin``) when the prompt may not show the full range.

Layout: ``[B, H, S, D]`` (batch, heads, sequence, head dim), the layout of Hugging Face
caches and of llmopt's attention kernels.
"""
from __future__ import annotations

import torch


def _check_kv(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} must be [B, H, S, D], got shape {tuple(x.shape)}")


def kv_head_scales(x: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Per-head symmetric int8 scales ``[H]`` (fp32) of ``x: [B, H, S, D]``, times ``margin``."""
    _check_kv(x, "kv_head_scales: x")
    if not x.is_floating_point():
        raise TypeError(f"kv_head_scales: x must be a float tensor, got {x.dtype}")
    if margin < 1.0:
        raise ValueError(f"kv_head_scales: margin={margin} must be >= 1 (it widens the range)")
    amax = x.detach().to(torch.float32).abs().amax(dim=(0, 2, 3)) * margin
    s = amax / 127.0
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_kv(x: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize K or V ``[B, H, S, D]`` to int8 with per-head ``scales [H]``.

    With ``scales=None`` they are computed from ``x`` (:func:`kv_head_scales`). Returns
    ``(q int8 [B, H, S, D], scales fp32 [H])``.
    """
    _check_kv(x, "quantize_kv: x")
    if scales is None:
        scales = kv_head_scales(x)
    if scales.shape != (x.shape[1],):
        raise ValueError(f"quantize_kv: scales must be [H]=[{x.shape[1]}], got {tuple(scales.shape)}")
    s = scales.to(device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    q = torch.round(x.to(torch.float32) / s).clamp_(-127, 127).to(torch.int8)
    return q, scales.to(torch.float32)


def dequantize_kv(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q [B, H, S, D] int8 * scales [H]`` in ``dtype``."""
    _check_kv(q, "dequantize_kv: q")
    if q.dtype != torch.int8:
        raise TypeError(f"dequantize_kv: q must be int8, got {q.dtype}")
    if scales.shape != (q.shape[1],):
        raise ValueError(f"dequantize_kv: scales must be [H]=[{q.shape[1]}], got {tuple(scales.shape)}")
    s = scales.to(device=q.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (q.to(torch.float32) * s).to(dtype)
