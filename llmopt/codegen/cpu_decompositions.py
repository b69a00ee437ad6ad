"""What llmopt ops become when Inductor compiles a graph for the CPU: their ATen references.

On CUDA an llmopt op is a Triton kernel that Inductor must keep as an extern call. On the
CPU the op's implementation is itself a handful of ATen ops (the ``<op>_ref`` of its
codegen module), and keeping it opaque would cost twice: a custom-op call through the
dispatcher per node (tens of microseconds, as much as a decode-sized op), and no fusion of
its pointwise math with its neighbours. So the Inductor executor on CPU retraces the graph
with this table (``compat.inductor_compile(..., decompositions=...)``): norms, RoPE and
gated activations become ATen that Inductor fuses into vectorized C++ loops, and
``llmopt.linear`` becomes what :func:`linear_cpu` runs — oneDNN's linear in fp32; in bf16
at decode rows the generated GEMV's multiply-and-reduce expression, which Inductor turns
into a C++ loop in the graph's code (``bf16_gemv_cpu``) — plus its epilogue, fused by
Inductor.

The KV-cache writes are in the table too: ``kv_cache_append`` (and RoPE fused with it)
becomes an ``index_put_`` into the cache, which Inductor lowers to an in-place scatter
fused with the rotation (one C++ loop per layer, no copy of the cache).

MoE routing is in the table as ATen, and the fused-experts ops (float, int8, int4) too:
at decode sizes a GEMV whose weight loads are indexed by the expert id, at prefill sizes
their sorted path through the CPU twin (``codegen.moe_cpu``).

Decode attention is in the table with two forms: over a static cache of at most
``attention_decode_masked.FULL_CAPACITY_MAX_SLOTS`` slots, ATen over the whole capacity
masked by the valid lengths (Inductor fuses it into the layer's C++, no Python per layer);
over a larger cache, a call to its CPU twin, which reads only the valid prefix.

Kept opaque (not in the table): the ops whose work depends on run-time lengths (paged
attention), and the quantized linears (their CPU GEMVs are compiled on their own, ``int8_weight_only_cpu``). Inductor
calls those through the dispatcher, and a ``torch.library.custom_op`` call pays Python
autograd and in-place/view wrappers there (about 30 us, twice that for an op that mutates,
measured on the CI machine, against about 5 us for a plain library op). So each opaque op
is called through its *CPU twin* (:func:`cpu_twin`): ``llmopt_cpu::<name>``, the same schema
and the same Python function the dispatcher would run on CPU
(``compat.custom_op_python_impl``), registered on the CPU key alone. The twins exist only
inside Inductor-compiled CPU graphs (nothing requires grad there, and the in-place ops'
version counters are not read); every other caller, the report and the tests see the
``llmopt::`` op. A twin runs the op's CPU function, or where :data:`TRACED_CPU_IMPLS` names
one, a version that skips the contract checks the op's fake implementation already made
when the graph was traced (the twin's fake calls the op's): ``attention_decode``'s Python
checks cost as much as its SDPA at decode sizes (``attention_decode_cpu_traced``), and
``attention_prefill``'s reference computes in fp32, four casts per call in bf16
(``attention_prefill_cpu_traced``).

Each entry takes the op's arguments in schema order and returns what the op returns, with
the op's contract (fresh outputs; the reference is the tests' oracle, so the decomposed
graph computes what the op computes).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from llmopt import compat

import llmopt.codegen.attention_decode  # noqa: F401 - registers llmopt::attention_decode, which _attention_decode names

from llmopt.codegen.attention_decode_masked import attention_decode_full_capacity, full_capacity_applies
from llmopt.codegen.attention_decode_ref import attention_decode_cpu_traced, attention_decode_fallback
from llmopt.codegen.attention_prefill_ref import attention_prefill_cpu_traced
from llmopt.codegen.gated_activation import gated_activation_ref
from llmopt.codegen.kv_cache import kv_cache_append_ref, rope_kv_cache_append_ref
from llmopt.codegen.linear import linear_cpu
from llmopt.codegen.moe_cpu import fused_experts_cpu, fused_experts_int4_cpu, fused_experts_int8_cpu, moe_route_cpu
from llmopt.codegen.moe_experts import fused_experts_ref
from llmopt.codegen.moe_quant import fused_experts_int4_ref, fused_experts_int8_ref
from llmopt.codegen.residual_norm import add_layer_norm_ref, add_rms_norm_ref, layer_norm_ref, rms_norm_ref
from llmopt.codegen.rope import rope_ref


def _linear(x, weight, bias, residual, activation, kernels):
    # ``kernels`` names GPU kernels per M bucket; the CPU has one implementation.
    return linear_cpu(x, weight, bias, residual, activation)


def _sorted_experts(op: torch._ops.OpOverload, reference: Callable) -> Callable:
    # The per-expert path of a fused-experts op (``codegen.moe_cpu``): its CPU twin when
    # traced (it reads the counts per expert at run time), its reference when called.
    def run(*args):
        return cpu_twin(op)(*args) if compat.is_traced(args[0]) else reference(*args)

    return run


def _moe(decomposition: Callable, op: torch._ops.OpOverload, reference: Callable) -> Callable:
    sorted_path = _sorted_experts(op, reference)

    def run(*args):
        return decomposition(*args, sorted_path=sorted_path)

    run.__name__ = decomposition.__name__  # what the aten executor's graph code names
    return run


def _attention_decode(q, k_cache, v_cache, kv_lens, mask, scale, window=0, softcap=0.0, unified_max=None):
    # Traced for Inductor: over a small cache's whole capacity as fused ATen (no Python per
    # layer), else the CPU twin over the valid prefix (``codegen.attention_decode_masked``).
    # Called (the aten executor): what the op runs on CPU.
    args = (q, k_cache, v_cache, kv_lens, mask, scale, window, softcap, unified_max)
    if not compat.is_traced(q):
        return attention_decode_fallback(*args)
    if full_capacity_applies(q, k_cache):
        return attention_decode_full_capacity(*args)
    return cpu_twin(torch.ops.llmopt.attention_decode.default)(*args)


def cpu_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """op overload -> its CPU decomposition (see the module docstring)."""
    ops = torch.ops.llmopt
    return {
        ops.linear.default: _linear,
        ops.attention_decode.default: _attention_decode,
        ops.rms_norm.default: rms_norm_ref,
        ops.add_rms_norm.default: add_rms_norm_ref,
        ops.layer_norm.default: layer_norm_ref,
        ops.add_layer_norm.default: add_layer_norm_ref,
        ops.gated_activation.default: gated_activation_ref,
        ops.rope.default: rope_ref,
        ops.kv_cache_append.default: kv_cache_append_ref,
        ops.rope_kv_cache_append.default: rope_kv_cache_append_ref,
        ops.moe_route.default: moe_route_cpu,
        ops.fused_experts.default: _moe(fused_experts_cpu, ops.fused_experts.default, fused_experts_ref),
        ops.fused_experts_int8.default: _moe(fused_experts_int8_cpu, ops.fused_experts_int8.default,
                                             fused_experts_int8_ref),
        ops.fused_experts_int4.default: _moe(fused_experts_int4_cpu, ops.fused_experts_int4.default,
                                             fused_experts_int4_ref),
    }


# The namespace of the CPU twins; created on first use (no import-time registration) and
# kept for the process, like the llmopt:: ops themselves.
TWIN_NAMESPACE = "llmopt_cpu"
_twin_library: torch.library.Library | None = None

# op name -> the CPU function its twin runs instead of the op's own: the same result for
# every input the op's fake implementation accepts, with the shape/dtype checks left to
# the trace (a twin is only ever called from a graph traced through that fake).
TRACED_CPU_IMPLS: dict[str, Callable] = {
    "attention_decode": attention_decode_cpu_traced,
    "attention_prefill": attention_prefill_cpu_traced,  # SDPA in the inputs' dtype
}


def cpu_twin(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``llmopt_cpu::<name>.default`` for the ``llmopt::<name>`` custom op ``op`` (see the
    module docstring), registered on first use; None when ``op`` is not a default overload of
    an llmopt custom op whose CPU function can be found (then the op is called as it is)."""
    global _twin_library
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.name.startswith("llmopt::") or schema.overload_name not in ("", "default"):
        return None
    name = schema.name.split("::", 1)[1]
    namespace = getattr(torch.ops, TWIN_NAMESPACE)
    if hasattr(namespace, name):
        return getattr(namespace, name).default
    impl = TRACED_CPU_IMPLS.get(name) or compat.custom_op_python_impl(op, "cpu")
    if impl is None:
        return None
    if _twin_library is None:
        _twin_library = torch.library.Library(TWIN_NAMESPACE, "FRAGMENT")
    _twin_library.define(str(schema).split("::", 1)[1])
    _twin_library.impl(name, impl, "CPU")

    def fake(*args, **kwargs):
        # Shapes and contract checks: the llmopt op's own fake implementation.
        return op(*args, **kwargs)

    torch.library.register_fake(f"{TWIN_NAMESPACE}::{name}", fake, lib=_twin_library)
    return getattr(namespace, name).default


def twin_calls(ops: Iterable[torch._ops.OpOverload]) -> dict[torch._ops.OpOverload, Callable]:
    """Decompositions that route each of ``ops`` (those with a twin) to its CPU twin."""
    table = {}
    for op in ops:
        twin = cpu_twin(op)
        if twin is not None:
            table[op] = twin
    return table


__all__ = ["TRACED_CPU_IMPLS", "TWIN_NAMESPACE", "cpu_decompositions", "cpu_twin", "twin_calls"]
