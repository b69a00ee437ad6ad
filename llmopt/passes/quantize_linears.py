"""quantize_linears: ``options={"quantize": ...}`` quantizes the frozen weights in the graph.

Each ``aten.linear(x, W, b)`` whose weight is a frozen constant becomes a call of a
:class:`llmopt.quant.QuantizedLinear` holding ``quantize_weight(W, config)`` — the same
module ``llmopt.quantize_`` swaps into eager models, so compiled and eager quantization
share one implementation (scheme ops, CPU int4 layout, ``compute_dtype``). It runs after
``merge_parallel_linears``: a merged Q/K/V or gate/up weight is quantized as one matrix,
giving one quantized QKV matmul per layer (per-output-channel and per-group scales do not
cross the members' boundaries, so this equals quantizing the members separately).

Memory and weight changes: the quantized module is a derived constant
(``weight_release.derived``): after compiling, the float weight's memory is released (the
parameter keeps its shape; eager calls of its module raise) and a Dynamo recompile for a
new shape reuses the cached module. With ``options={"release_weights": False}`` the float
weights stay, and an in-place change to a quantized weight through the parameter raises
at the next call (``frozen_weights``); one through ``p.data`` cannot be seen (README,
"Frozen weights"). ``llmopt.quantize_`` before compiling holds only the quantized weights.

Which linears: as ``quantize_``'s default, all of them, except the output head
(``lm_head``, ``embed_out``, ``output``) unless the config's ``quantize_head`` is set (the
int8 default) and the head's weight is not also read by an embedding lookup (tied: the
float copy would stay for the lookup, so quantizing would add memory); int4 skips a linear
whose ``K`` the group size does not divide; a MoE router (the linear whose logits feed
``llmopt.moe_route``) stays float. The fused MoE experts are quantized by
``llmopt.passes.quantize_experts``, called first. Schemes that need
calibration data cannot run inside the compiler: ``GPTQ`` is refused with a fallback
entry pointing to ``llmopt.quantize_(model, GPTQ(...), calibration=...)``; ``W8A8``
quantizes without SmoothQuant smoothing (no activation statistics), as its config
documents.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import constant_value, fake_like, free_attr_name, is_constant, real_tensors, tensor_meta
from ..report import layer_of
from ..weight_release import derived, release_unread, storage_serial

aten = torch.ops.aten


def run(gm: fx.GraphModule, ctx) -> int:
    config = ctx.options.quantize
    if config is None:
        return 0
    from ..quant import GPTQ, Int4WeightOnly, Int8KVCache
    from ..quant.modules import QuantizedLinear
    from ..quant.quantize import HEAD_NAMES

    if isinstance(config, GPTQ):
        ctx.report.fallback(
            "quantize", "GPTQ needs calibration data, which a compiler does not have: run "
            "llmopt.quantize_(model, GPTQ(...), calibration=batches) before torch.compile"
        )
        return 0
    if isinstance(config, Int8KVCache):
        ctx.report.fallback("quantize", "Int8KVCache quantizes the KV cache, not linears: pass it to the runtime cache")
        return 0
    from . import quantize_experts

    count = quantize_experts.run(gm, ctx, config)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        if quantize_experts.is_router(node):
            ctx.near_miss(node, "MoE router kept in floating point: its top-k choice of experts is sensitive to rounding")
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        layer = layer_of(node)
        if layer.rsplit(".", 1)[-1] in HEAD_NAMES:
            if not getattr(config, "quantize_head", False):
                ctx.near_miss(node, f"output head kept in floating point ({type(config).__name__}(quantize_head=False))")
                continue
            if _tied_to_embedding(w):
                ctx.near_miss(node, "output head kept in floating point: its weight is tied to the input embedding")
                continue
        if not is_constant(gm, w) or (b is not None and not is_constant(gm, b)):
            ctx.near_miss(node, "weight or bias is not a frozen constant")
            continue
        wv = tensor_meta(w)
        if isinstance(config, Int4WeightOnly) and wv.shape[1] % config.group_size:
            ctx.near_miss(node, f"K={wv.shape[1]} is not a multiple of group_size={config.group_size}")
            continue
        with real_tensors():
            bias = constant_value(gm, b) if b is not None else None

            def make(weight, bias=bias):
                module = QuantizedLinear(quantize_in_row_blocks(weight.detach(), config), bias,
                                         getattr(config, "compute_dtype", None))
                return module.to(weight.device)

            # The graph reads the quantized copy: the float weight is derived (an in-place
            # write raises) and released after compiling; a recompile reuses this module
            # (weight_release). The bias is part of the key: the module holds it.
            kind = ("QuantizedLinear", repr(config), None if bias is None else (storage_serial(bias),
                                                                                 bias.storage_offset()))
            module = derived(gm, w, kind, make, f"it was quantized with {type(config).__name__}")
        name = free_attr_name(gm, "llmopt_qlinear_" + (layer.replace(".", "_") or node.name))
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = _emit_kernel_call(gm, name, module, x, node)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        if not w.users:
            gm.graph.erase_node(w)
            release_unread(gm, w, ctx)
        count += 1
        ctx.rewrite(call, f"{module.scheme} linear N={module.out_features} K={module.in_features}"
                    + (f" g{module.group_size}" if module.scheme == "int4" else ""))
    return count


# Rows quantized at once: the float temporaries of quantizing one block stay a few MiB,
# not a copy of the largest weight (a merged gate/up), which alone can exceed 10% of a
# small model's weights (the memory bound, tests/test_weight_storage.py).
QUANTIZE_BLOCK_BYTES = 1 << 20


def quantize_in_row_blocks(weight: torch.Tensor, config):
    """``quantize_weight(weight, config)``, computed in blocks of output rows. Equal to it:
    every scheme here scales per output row (int4 per group of one row's columns)."""
    from ..quant.schemes import concat_quantized, quantize_weight

    n, k = weight.shape
    rows = max(1, QUANTIZE_BLOCK_BYTES // max(1, k * weight.element_size()))
    if n <= rows:
        return quantize_weight(weight, config)
    return concat_quantized([quantize_weight(weight[i:i + rows], config) for i in range(0, n, rows)])


def _emit_kernel_call(gm: fx.GraphModule, name: str, module, x: fx.Node, anchor: fx.Node) -> fx.Node:
    """The module's forward as graph nodes: ``compute_dtype`` casts around the registered
    op it runs (``QuantizedLinear.kernel``), its buffers as ``get_attr`` of the submodule.

    A direct op call rather than ``call_module``: the aten executor then calls the op's
    Python implementation without the module and dispatcher layers (~50 us per linear on
    CPU, 48-84 linears per decode step), and Inductor sees the op itself."""
    xv = tensor_meta(x)
    graph = gm.graph

    def emit(target, args, kwargs=None):
        n = graph.call_function(target, tuple(args), kwargs or {})
        fake = fx.node.map_arg((tuple(args), kwargs or {}), lambda a: a.meta.get("val"))
        n.meta = {**anchor.meta, "val": target(*fake[0], **fake[1])}
        return n

    cast = module.compute_dtype is not None and xv.dtype != module.compute_dtype
    inp = emit(aten._to_copy.default, (x,), {"dtype": module.compute_dtype}) if cast else x
    op, spec = module.kernel(module.compute_dtype if cast else xv.dtype, xv.device.type)
    args = [inp]
    for a in spec:
        if isinstance(a, str):
            tensor = getattr(module, a)
            if tensor is None:
                args.append(None)
                continue
            attr = graph.get_attr(f"{name}.{a}")
            attr.meta["val"] = fake_like(anchor, tensor)
            args.append(attr)
        else:
            args.append(a)
    out = emit(op, args)
    return emit(aten._to_copy.default, (out,), {"dtype": xv.dtype}) if cast else out


def _tied_to_embedding(w: fx.Node) -> bool:
    """The head's frozen weight is also the table of an embedding lookup (tied weights are
    one constant after freezing)."""
    return any(u.op == "call_function" and u.target == aten.embedding.default and u.args[0] is w for u in w.users)
