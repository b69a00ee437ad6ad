"""Quantized-weight layouts and contracts: int4 packing, dequantization, the CPU weight-pack
layouts and the argument checks of the quantized-linear ops.

Why a module of its own: the layouts are shared by the three kernel families
(``int8_weight_only``, ``int4_weight_only``, ``w8a8``), by ``llmopt.quant`` (quantizers,
checkpoint loaders) and by the quantized MoE experts; it imports nothing but torch, so
every one of them can import it without pulling in a kernel.

Layouts (``N`` output features, ``K`` input features):

* int8: ``w_int8: [N, K]`` int8, ``scales: [N]``; ``W[n, k] = w_int8[n, k] * scales[n]``.
* int4: ``w_packed: [N, K // 2]`` uint8, two 4-bit codes per byte: the low nibble is column
  ``2j``, the high nibble column ``2j + 1``; ``scales, zeros: [N, K // G]`` (G = group size
  along K); ``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``. Zeros are
  floats: integer zero points (RTN, GPTQ, AWQ) are exact in any dtype.
* PyTorch's CPU weight-pack kernels: ``aten._weight_int8pack_mm`` reads the int8 layout as
  is (with alignment and K rules, :func:`int8pack_cpu_supported`);
  ``aten._weight_int4pack_mm_for_cpu`` reads its own blocked layout, made once at load time
  by :func:`pack_int4_for_cpu`.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# _weight_int8pack_mm reads its operands with aligned vector loads (torch 2.13): a weight
# or activation that does not start on a 64-byte boundary (a view into a safetensors file,
# a slice) crashes the process. torch's allocator aligns to 64 bytes.
INT8PACK_ALIGN = 64


# ----------------------------------------------------------------------------------------
# int4 packing and dequantization
# ----------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``q: [N, K]`` (integers in [0, 15], K even) into ``uint8 [N, K // 2]``.

    Column ``2j`` goes to the low nibble of byte ``j``, column ``2j + 1`` to the high nibble.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got K={q.shape[-1]}")
    q = q.to(torch.int16)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [N, K // 2]`` -> ``uint8 [N, K]`` codes in [0, 15]."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_int8(w_int8: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``w_int8 [N, K] * scales [N]`` in ``dtype``."""
    return w_int8.to(dtype) * scales.to(dtype)[:, None]


def dequantize_int4(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    """``(q - zeros) * scales`` with per-group parameters broadcast along K; ``[N, K]`` in ``dtype``."""
    q = unpack_int4(w_packed).to(dtype)
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    w = (q - zeros.to(dtype)[:, :, None]) * scales.to(dtype)[:, :, None]
    return w.view(n, k)


# ----------------------------------------------------------------------------------------
# PyTorch's CPU weight-pack kernels: when they apply, and their layouts
# ----------------------------------------------------------------------------------------
def has_aten(name: str) -> bool:
    """Whether the running torch has ``torch.ops.aten.<name>`` (the CPU kernels come and go
    between releases)."""
    return hasattr(torch.ops.aten, name)


def int8pack_cpu_supported(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    """Whether ``aten._weight_int8pack_mm`` is the fast, safe choice for this call.

    bfloat16 activations only (its float32/float16 paths are slower than dequantize +
    matmul); the weight must be contiguous and 64-byte aligned (the activations are copied
    when they are not: :func:`aligned`); K must be a multiple of 16 (it crashes or returns
    garbage otherwise, torch 2.13).
    """
    return (
        has_aten("_weight_int8pack_mm")
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and w_int8.shape[1] % 16 == 0
        and w_int8.is_contiguous()
        and w_int8.data_ptr() % INT8PACK_ALIGN == 0
        and x.numel() > 0
    )


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 64-byte boundary (copied only when it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % INT8PACK_ALIGN == 0 else t.clone()


def int4pack_cpu_supported(n: int, k: int, group_size: int) -> bool:
    """Whether the CPU int4 weight-pack kernel accepts a ``[n, k]`` weight with this group size."""
    return (
        has_aten("_weight_int4pack_mm_for_cpu")
        and has_aten("_convert_weight_to_int4pack_for_cpu")
        and n % 16 == 0
        and group_size in (32, 64, 128, 256)
        and k % group_size == 0
    )


def pack_int4_for_cpu(
    w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert llmopt's int4 layout to the CPU kernel's: ``(packed uint8, scales_and_zeros)``.

    The CPU kernel computes ``W = (q - 8) * scale + zero_offset``; with llmopt's
    ``W = (q - z) * s`` that is ``zero_offset = (8 - z) * s``. ``scales_and_zeros`` is
    ``[K // G, N, 2]`` fp32. The packed layout is private to the running torch: never save it.
    """
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    if not int4pack_cpu_supported(n, k, group_size):
        raise ValueError(
            f"the CPU int4 kernel needs N % 16 == 0, group_size in (32, 64, 128, 256) and K % group_size == 0 "
            f"(got N={n}, K={k}, group_size={group_size}) and a torch that has aten._weight_int4pack_mm_for_cpu"
        )
    q = unpack_int4(w_packed.cpu()).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s = scales.cpu().to(torch.float32)
    offset = (8.0 - zeros.cpu().to(torch.float32)) * s
    scales_and_zeros = torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


# ----------------------------------------------------------------------------------------
# Contracts of the quantized-linear ops (shared by their references, launchers and fakes)
# ----------------------------------------------------------------------------------------
def check_activations(op: str, x: torch.Tensor, k: int) -> None:
    """``x: [..., K]`` in a float dtype."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., K] with K={k} (the weight's in_features), got {tuple(x.shape)}")


def check_bias(op: str, bias, n: int, x: torch.Tensor) -> None:
    """``bias``: None or ``[N]`` on x's device."""
    if bias is None:
        return
    if bias.shape != (n,):
        raise ValueError(f"{op}: bias must be [N]=[{n}], got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}; move them to one device")


def check_int8_weight(op: str, x, w_int8, scales, bias) -> tuple[int, int]:
    """The int8 layout (weight-only and W8A8) and its activations; returns ``(N, K)``."""
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError(f"{op}: weight must be a 2-D int8 tensor [N, K], got {w_int8.dtype} {tuple(w_int8.shape)}")
    n, k = w_int8.shape
    check_activations(op, x, k)
    if scales.shape != (n,) or not scales.is_floating_point():
        raise ValueError(f"{op}: scales must be a float tensor [N]=[{n}], got {scales.dtype} {tuple(scales.shape)}")
    if w_int8.device != x.device or scales.device != x.device:
        raise ValueError(f"{op}: x ({x.device}), weight ({w_int8.device}) and scales ({scales.device}) must share a device")
    check_bias(op, bias, n, x)
    return n, k


def check_int4_weight(op: str, x, w_packed, scales, zeros, group_size, bias) -> tuple[int, int]:
    """The portable int4 layout and its activations; returns ``(N, K)``. The group size is
    a multiple of 32: the kernels' narrowest K tile must fit inside one group."""
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(
            f"{op}: w_packed must be a 2-D uint8 tensor [N, K // 2] (two int4 codes per byte), "
            f"got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    check_activations(op, x, k)
    if group_size <= 0 or group_size % 32 != 0 or k % group_size != 0:
        raise ValueError(
            f"{op}: group_size must be a positive multiple of 32 dividing K={k}, got {group_size}"
        )
    groups = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (n, groups) or not t.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a float tensor [N, K // group_size]=[{n}, {groups}], "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if w_packed.device != x.device:
        raise ValueError(f"{op}: w_packed is on {w_packed.device} but x is on {x.device}")
    check_bias(op, bias, n, x)
    return n, k


def check_out(op: str, out, shape, x) -> None:
    """A caller's ``out`` buffer: ``shape`` in x's dtype, on x's device."""
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"{op}: out must be {tuple(shape)} {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype}")


__all__ = [
    "FLOAT_DTYPES", "INT8PACK_ALIGN", "aligned", "check_activations", "check_bias", "check_int4_weight",
    "check_int8_weight", "check_out", "dequantize_int4", "dequantize_int8", "has_aten", "int4pack_cpu_supported",
    "int8pack_cpu_supported", "pack_int4", "pack_int4_for_cpu", "unpack_int4",
]
