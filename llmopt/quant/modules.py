"""``QuantizedLinear``: the ``nn.Linear`` replacement that ``quantize_`` swaps in.

It holds a :class:`~llmopt.quant.schemes.QuantizedWeight` as buffers (``qdata``,
``scales``, ``zeros``, ``perm``; ``bias``) and its forward calls the registered ops, so a
model quantized in eager mode also traces under ``torch.compile`` (the ops have fake
implementations). State-dict keys are stable: they are what ``save_quantized`` writes.

``compute_dtype`` (from the config) casts the input to that dtype and the output back
(on CPU that selects PyTorch's bf16 int4 kernel; float32 decode has its own generated GEMV).

On CPU, the int4 kernel of PyTorch needs its own blocked weight layout. When the module
computes in bfloat16 (bf16 scales or ``compute_dtype``: the only dtype for which that
kernel is fast), the
module keeps that layout next to the portable one, in non-persistent buffers rebuilt after
every ``.to(...)``; it is never saved (it is private to the running torch version). This
costs one extra copy of the int4 weight in memory on CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from llmopt.codegen import int4_weight_only, int8_weight_only, w8a8  # noqa: F401  register the ops called below
from llmopt.codegen.quant_packing import int4pack_cpu_supported, pack_int4_for_cpu

from .linears import linear_weight
from .schemes import QuantizedWeight, dequantize, quantize_weight


class QuantizedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` quantized (int8 / int4 weight-only, or W8A8)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | str | None = None):
        super().__init__()
        if isinstance(compute_dtype, str):
            compute_dtype = getattr(torch, compute_dtype)
        self.compute_dtype = compute_dtype
        self.scheme = qweight.scheme
        self.group_size = qweight.group_size
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.register_buffer("qdata", qweight.data)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)
        self.register_buffer("perm", qweight.perm)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("cpu_int4_packed", None, persistent=False)
        self.register_buffer("cpu_int4_scales_zeros", None, persistent=False)
        self._refresh_cpu_layout()

    @classmethod
    def from_linear(cls, linear: nn.Module, config) -> "QuantizedLinear":
        """Round-to-nearest quantization of ``linear`` (``nn.Linear`` or HF ``Conv1D``) under ``config``."""
        return cls(quantize_weight(linear_weight(linear).detach(), config), linear.bias,
                   getattr(config, "compute_dtype", None))

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.qdata, self.scales, self.zeros, self.group_size, self.perm)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, dtype)

    def _refresh_cpu_layout(self) -> None:
        use = (
            self.scheme == "int4"
            and self.qdata.device.type == "cpu"
            and torch.bfloat16 in (self.scales.dtype, self.compute_dtype)
            and int4pack_cpu_supported(self.out_features, self.in_features, self.group_size)
        )
        if use:
            packed, sz = pack_int4_for_cpu(self.qdata, self.scales, self.zeros, self.group_size)
            self.cpu_int4_packed, self.cpu_int4_scales_zeros = packed, sz.to(torch.bfloat16)
        else:
            self.cpu_int4_packed, self.cpu_int4_scales_zeros = None, None

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.bfloat16() change device or dtype: rebuild (or drop) the CPU layout.
        result = super()._apply(fn, *args, **kwargs)
        self._refresh_cpu_layout()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            return self._forward(x)
        return self._forward(x.to(self.compute_dtype)).to(x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        op, args = self.kernel(x.dtype, x.device.type)
        return op(x, *(getattr(self, a) if isinstance(a, str) else a for a in args))

    def kernel(self, dtype: torch.dtype, device_type: str) -> tuple[object, tuple]:
        """The registered op this module runs on an input of ``dtype`` (after the
        ``compute_dtype`` cast) on ``device_type``, and its arguments after ``x``: buffer
        names (str) and constants. ``quantize_linears`` emits the same call into a graph."""
        if self.scheme == "int8":
            return torch.ops.llmopt.int8_weight_only_linear.default, ("qdata", "scales", "bias")
        if self.scheme == "w8a8":
            return torch.ops.llmopt.w8a8_linear.default, ("qdata", "scales", "bias")
        if self.cpu_int4_packed is not None and dtype == torch.bfloat16 and device_type == "cpu":
            return (torch.ops.llmopt.int4_weight_only_linear_cpu.default,
                    ("cpu_int4_packed", "cpu_int4_scales_zeros", self.group_size, "bias"))
        return (torch.ops.llmopt.int4_weight_only_linear.default,
                ("qdata", "scales", "zeros", self.group_size, "bias"))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        order = ", act_order" if self.perm is not None else ""
        compute = "" if self.compute_dtype is None else f", compute_dtype={self.compute_dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
                f"{group}{order}{compute}, bias={self.bias is not None}")
