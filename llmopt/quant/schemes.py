"""Weight quantization schemes as pure tensor functions: the API the compiler pass uses.

``quantize_weight(weight [N, K], config) -> QuantizedWeight``, ``dequantize(qw)`` and
``concat_quantized([...])`` (merge along N, so the parallel-linear pass can build one
quantized QKV matmul) work on tensors only: no modules, no model structure.

Round-to-nearest (RTN) schemes, all computed in fp32 from the weight:

* int8 (weight-only and the weight side of W8A8): per output channel, symmetric,
  ``s = max|w_n| / 127``, ``q = clamp(round(w / s), -127, 127)``.
* int4 asymmetric: per group of ``G`` inputs, ``lo = min(w, 0)``, ``hi = max(w, 0)``,
  ``s = (hi - lo) / 15``, ``z = clamp(round(-lo / s), 0, 15)``,
  ``q = clamp(round(w / s) + z, 0, 15)``; ``w ~= (q - z) * s``.
* int4 symmetric: ``s = 2 max|w| / 15``, ``z = 8`` (the GPTQ/AutoGPTQ convention).

In each case ``|w - dequantize(q)| <= s / 2`` elementwise (up to float rounding of the
scale when it is stored in a 16-bit dtype). Scales and zeros are stored in the weight's
dtype (float32 for float64 weights); the scale is rounded to that dtype *before* the codes
are computed, so the codes are the nearest ones for the scale actually used.

GPTQ with ``act_order`` quantizes columns in a permuted order, and its groups are
contiguous in that order; such a weight keeps the columns in permuted order plus ``perm``
(``stored column j`` is ``input column perm[j]``), and the linear gathers ``x[..., perm]``
first (the exllama approach). ``dequantize`` returns the weight in the original order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmopt.codegen.quant_packing import dequantize_int4, dequantize_int8, pack_int4

from .config import GPTQ, Int4WeightOnly, Int8WeightOnly, W8A8, parse_quantize

SCHEMES = ("int8", "int4", "w8a8")


@dataclass
class QuantizedWeight:
    """A quantized ``[N, K]`` weight: tensors plus the metadata needed to use them.

    ``scheme``: ``"int8"`` (weight-only), ``"int4"`` (weight-only, packed two per byte) or
    ``"w8a8"`` (int8 weights whose linear also quantizes its activations).
    ``data``: int8 ``[N, K]``, or uint8 ``[N, K // 2]`` for int4 (low nibble = even column).
    ``scales``: ``[N]`` (int8, w8a8) or ``[N, K // group_size]`` (int4).
    ``zeros``: ``[N, K // group_size]`` float zero points (int4 only).
    ``perm``: optional int64 ``[K]`` column order (GPTQ act_order), see the module doc.
    """

    scheme: str
    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None
    perm: torch.Tensor | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        n = self.data.shape[0]
        if self.scheme == "int4":
            if self.data.dtype != torch.uint8 or self.zeros is None or self.group_size is None:
                raise ValueError("an int4 QuantizedWeight needs uint8 data, zeros and group_size")
            k = self.data.shape[1] * 2
            if k % self.group_size or self.scales.shape != (n, k // self.group_size) or self.zeros.shape != self.scales.shape:
                raise ValueError(
                    f"int4 scales/zeros must be [N, K // group_size] = [{n}, {k // self.group_size}], "
                    f"got {tuple(self.scales.shape)} / {tuple(self.zeros.shape)}"
                )
        else:
            if self.data.dtype != torch.int8 or self.scales.shape != (n,):
                raise ValueError(f"{self.scheme} needs int8 data [N, K] and scales [N]")
        if self.perm is not None and self.perm.shape != (self.in_features,):
            raise ValueError(f"perm must be [K]=[{self.in_features}], got {tuple(self.perm.shape)}")

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        return self.data.shape[1] * (2 if self.scheme == "int4" else 1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (what a checkpoint stores)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"data": self.data, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    def to(self, device) -> "QuantizedWeight":
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


def storage_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype in (torch.float64,) or not weight.is_floating_point() else weight.dtype


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight needs a 2-D float weight [N, K], got {weight.dtype} {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("quantize_weight: the weight contains NaN or inf; fix the model before quantizing")


def int8_scales(weight: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Per-row symmetric int8 scales, rounded to ``storage`` (zero rows get scale 1)."""
    amax = weight.to(torch.float32).abs().amax(dim=1)
    s = (amax / 127.0).to(storage)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_int8_with_scales(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.round(weight.to(torch.float32) / scales.to(torch.float32)[:, None]).clamp_(-127, 127).to(torch.int8)


def int4_params(weight: torch.Tensor, symmetric: bool, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``weight [N, G]`` (one group per row)."""
    w = weight.to(torch.float32)
    if symmetric:
        s = (2.0 * w.abs().amax(dim=1) / 15.0).to(storage)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.full_like(s, 8.0)
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        s = ((hi - lo) / 15.0).to(storage)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s.to(torch.float32)).clamp_(0, 15).to(storage)
    return s, z


def quantize_int4_with_params(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes ``clamp(round(w / s) + z, 0, 15)`` for ``weight [N, G]`` and per-row ``s, z [N]``."""
    s = scales.to(torch.float32)[:, None]
    z = zeros.to(torch.float32)[:, None]
    return (torch.round(weight.to(torch.float32) / s) + z).clamp_(0, 15).to(torch.uint8)


def quantize_int8(weight: torch.Tensor, scheme: str = "int8") -> QuantizedWeight:
    _check_weight(weight)
    scales = int8_scales(weight, storage_dtype(weight))
    return QuantizedWeight(scheme, quantize_int8_with_scales(weight, scales), scales)


def quantize_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> QuantizedWeight:
    _check_weight(weight)
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 with group_size={group_size} needs in_features divisible by it, got K={k}")
    groups = weight.reshape(n * (k // group_size), group_size)
    s, z = int4_params(groups, symmetric, storage_dtype(weight))
    q = quantize_int4_with_params(groups, s, z).reshape(n, k)
    return QuantizedWeight("int4", pack_int4(q), s.reshape(n, -1), z.reshape(n, -1), group_size)


def quantize_weight(weight: torch.Tensor, config) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight [N, K]`` under ``config``.

    GPTQ needs calibration data: use :func:`llmopt.quant.gptq.gptq_quantize` with a Hessian,
    or ``quantize_(model, GPTQ(...), calibration=...)``.
    """
    config = parse_quantize(config)
    if isinstance(config, Int8WeightOnly):
        return quantize_int8(weight, "int8")
    if isinstance(config, W8A8):
        return quantize_int8(weight, "w8a8")
    if isinstance(config, Int4WeightOnly):
        return quantize_int4(weight, config.group_size, config.symmetric)
    if isinstance(config, GPTQ):
        raise ValueError("GPTQ needs calibration inputs: use gptq_quantize(weight, hessian, config) "
                         "or quantize_(model, GPTQ(...), calibration=[input_ids, ...])")
    raise ValueError(f"{type(config).__name__} does not quantize linear weights")


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float ``[N, K]`` weight that ``qw`` represents, in the original column order."""
    if qw.scheme == "int4":
        w = dequantize_int4(qw.data, qw.scales, qw.zeros, qw.group_size, dtype)
    else:
        w = dequantize_int8(qw.data, qw.scales, dtype)
    if qw.perm is not None:
        out = torch.empty_like(w)
        out[:, qw.perm] = w
        w = out
    return w


def concat_quantized(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights along N (output features): ``[N1, K] + [N2, K] -> [N1 + N2, K]``.

    All parts must share scheme, in_features, group size, column permutation and dtypes;
    otherwise a ValueError says which differs (the merge pass then leaves them apart).
    """
    if not weights:
        raise ValueError("concat_quantized needs at least one weight")
    first = weights[0]
    for i, w in enumerate(weights[1:], 1):
        for attr in ("scheme", "in_features", "group_size"):
            if getattr(w, attr) != getattr(first, attr):
                raise ValueError(
                    f"concat_quantized: part {i} has {attr}={getattr(w, attr)!r}, part 0 has {getattr(first, attr)!r}"
                )
        if w.scales.dtype != first.scales.dtype:
            raise ValueError(f"concat_quantized: part {i} scales are {w.scales.dtype}, part 0 {first.scales.dtype}")
        if (w.perm is None) != (first.perm is None) or (w.perm is not None and not torch.equal(w.perm, first.perm)):
            raise ValueError(f"concat_quantized: part {i} has a different act_order column permutation than part 0")
    return QuantizedWeight(
        first.scheme,
        torch.cat([w.data for w in weights]),
        torch.cat([w.scales for w in weights]),
        None if first.zeros is None else torch.cat([w.zeros for w in weights]),
        first.group_size,
        first.perm,
    )
