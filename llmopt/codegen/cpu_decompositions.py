"""What llmopt ops become when Inductor compiles a graph for the CPU: their ATen references.

On CUDA an llmopt op is a Triton kernel that Inductor must keep as an extern call. On the
CPU the op's implementation is itself a handful of ATen ops (the ``<op>_ref`` of its
codegen module), and keeping it opaque would cost twice: a custom-op call through the
dispatcher per node (tens of microseconds, as much as a decode-sized op), and no fusion of
its pointwise math with its neighbours. So the Inductor executor on CPU retraces the graph
with this table (``compat.inductor_compile(..., decompositions=...)``): norms, RoPE and
gated activations become ATen that Inductor fuses into vectorized C++ loops, and
``llmopt.linear`` becomes oneDNN's linear plus its epilogue (:func:`linear_cpu`), the
epilogue fused by Inductor.

Kept opaque (not in the table): the ops whose work depends on run-time lengths (attention
over the valid KV prefix, the KV-cache writes, paged attention), MoE routing and experts,
and the quantized linears (their CPU GEMVs are compiled on their own,
``quant_linear_cpu``).

Each entry takes the op's arguments in schema order and returns what the op returns, with
the op's contract (fresh outputs; the reference is the tests' oracle, so the decomposed
graph computes what the op computes).
"""
from __future__ import annotations

from typing import Callable

import torch

from llmopt.codegen.gated_activation import gated_activation_ref
from llmopt.codegen.linear import linear_cpu
from llmopt.codegen.residual_norm import add_layer_norm_ref, add_rms_norm_ref, layer_norm_ref, rms_norm_ref
from llmopt.codegen.rope import rope_ref


def _linear(x, weight, bias, residual, activation, kernels):
    # ``kernels`` names GPU kernels per M bucket; the CPU has one implementation.
    return linear_cpu(x, weight, bias, residual, activation)


def cpu_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """op overload -> its CPU decomposition (see the module docstring)."""
    ops = torch.ops.llmopt
    return {
        ops.linear.default: _linear,
        ops.rms_norm.default: rms_norm_ref,
        ops.add_rms_norm.default: add_rms_norm_ref,
        ops.layer_norm.default: layer_norm_ref,
        ops.add_layer_norm.default: add_layer_norm_ref,
        ops.gated_activation.default: gated_activation_ref,
        ops.rope.default: rope_ref,
    }


__all__ = ["cpu_decompositions"]
