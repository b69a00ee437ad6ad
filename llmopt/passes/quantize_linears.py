"""quantize_linears: ``options={"quantize": ...}`` quantizes the frozen weights in the graph.

Each ``aten.linear(x, W, b)`` whose weight is a frozen constant becomes a call of a
:class:`llmopt.quant.QuantizedLinear` holding ``quantize_weight(W, config)`` — the same
module ``llmopt.quantize_`` swaps into eager models, so compiled and eager quantization
share one implementation (scheme ops, CPU int4 layout, ``compute_dtype``). It runs after
``merge_parallel_linears``: a merged Q/K/V or gate/up weight is quantized as one matrix,
giving one quantized QKV matmul per layer (per-output-channel and per-group scales do not
cross the members' boundaries, so this equals quantizing the members separately).

Which linears: as ``quantize_``'s default, all but the output head (``lm_head``,
``embed_out``, ``output``: often tied to the embeddings and the most sensitive output);
int4 skips a linear whose ``K`` the group size does not divide. Schemes that need
calibration data cannot run inside the compiler: ``GPTQ`` is refused with a fallback
entry pointing to ``llmopt.quantize_(model, GPTQ(...), calibration=...)``; ``W8A8``
quantizes without SmoothQuant smoothing (no activation statistics), as its config
documents.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import constant_value, is_constant, real_tensors, tensor_meta
from ..report import layer_of

aten = torch.ops.aten

HEAD_NAMES = ("lm_head", "embed_out", "output")


def run(gm: fx.GraphModule, ctx) -> int:
    config = ctx.options.quantize
    if config is None:
        return 0
    from ..quant import GPTQ, Int4WeightOnly, Int8KVCache
    from ..quant.modules import QuantizedLinear
    from ..quant.schemes import quantize_weight

    if isinstance(config, GPTQ):
        ctx.report.fallback(
            "quantize", "GPTQ needs calibration data, which a compiler does not have: run "
            "llmopt.quantize_(model, GPTQ(...), calibration=batches) before torch.compile"
        )
        return 0
    if isinstance(config, Int8KVCache):
        ctx.report.fallback("quantize", "Int8KVCache quantizes the KV cache, not linears: pass it to the runtime cache")
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        layer = layer_of(node)
        if layer.rsplit(".", 1)[-1] in HEAD_NAMES:
            ctx.near_miss(node, "output head kept in floating point (as quantize_ does by default)")
            continue
        if not is_constant(gm, w) or (b is not None and not is_constant(gm, b)):
            ctx.near_miss(node, "weight or bias is not a frozen constant")
            continue
        wv = tensor_meta(w)
        if isinstance(config, Int4WeightOnly) and wv.shape[1] % config.group_size:
            ctx.near_miss(node, f"K={wv.shape[1]} is not a multiple of group_size={config.group_size}")
            continue
        with real_tensors():
            weight = constant_value(gm, w)
            bias = constant_value(gm, b) if b is not None else None
            module = QuantizedLinear(quantize_weight(weight.detach(), config), bias, getattr(config, "compute_dtype", None))
            module.to(weight.device)
        name = _free_name(gm, "llmopt_qlinear_" + (layer.replace(".", "_") or node.name))
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        count += 1
        ctx.rewrite(call, f"{module.scheme} linear N={module.out_features} K={module.in_features}"
                    + (f" g{module.group_size}" if module.scheme == "int4" else ""))
    return count


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
