"""Device operations per Llama decoder layer in a compiled decode step.

What one decode step of a Llama layer must launch, at the least, once llmopt is done:

    1  add_rms_norm         residual add + input RMSNorm (rms_norm alone in layer 0)
    2  linear               merged Q/K/V projection
    3  rope_kv_cache_append RoPE of q and k, k and v written into the cache in place
    4  attention_decode     split-KV attention over the valid cache length
    5  linear               o_proj
    6  add_rms_norm         residual add + post-attention RMSNorm
    7  linear + silu*up     merged gate/up projection with the gated activation in its
                            epilogue (on CPU too: oneDNN's matmul, then the epilogue)
    8  linear               down_proj (its residual add lives in the next add_rms_norm)

That is 8 on CUDA and on CPU — FlashDecoding++ reports 7 fused kernels per block, with the
residual add in the down-projection epilogue. Views (reshape, transpose, slice)
and tuple indexing launch nothing and are not counted. Per-step bookkeeping shared by
all layers (the mask, the valid lengths, the slot counter of the cache) is computed once
per step outside the layers and is not counted per layer; so is the one scalar add with
which the last layer advances the cache's slot counter (an op whose value only feeds the
write-back ``copy_`` of that counter).
"""
import operator

import torch

import llmopt
from llmopt.graph import VIEW_OPS, op_name
from llmopt.codegen import tuning_table
from llmopt.report import layer_of
from models.tiny import tiny_model, tokens
from passes.final_graphs import capture_final_graphs

CPU_OPS_PER_LAYER = 8
CUDA_OPS_PER_LAYER = 8


def is_counter_update(node) -> bool:
    users = list(node.users)
    return bool(users) and all(
        u.target == torch.ops.aten.copy_.default and u.args[0].op == "placeholder" for u in users
    )


def _is_index_math(node) -> bool:
    val = node.meta.get("val")
    return node.op == "call_function" and isinstance(val, torch.Tensor) and not val.is_floating_point()


def is_shared_index_math(node) -> bool:
    """Integer index arithmetic whose result more than one layer reads: the step's slot
    positions, computed once. Dynamo files it under the first module that computes it,
    which is a layer when the model is given ``cache_position`` (transformers 4.x) and the
    model when it derives it from the cache (5.x); either way it runs once per step."""
    if not _is_index_math(node):
        return False
    layers, stack, seen = set(), [node], set()
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if _is_index_math(user):
                stack.append(user)
            if layer_of(user).startswith("model.layers."):
                layers.add(layer_of(user).split(".")[2])
    return len(layers) > 1


def layer_ops(gm, layer: int) -> list[str]:
    prefix = f"model.layers.{layer}."
    return [
        op_name(n)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target not in VIEW_OPS and n.target is not operator.getitem
        and (layer_of(n) + ".").startswith(prefix) and not is_counter_update(n) and not is_shared_index_math(n)
    ]


def compiled_decode_graph(monkeypatch, as_cuda: bool):
    # as_cuda: the CUDA branch of the kernel selection, as in test_select_linear_kernel
    graphs = capture_final_graphs(monkeypatch, as_cuda=as_cuda)
    # The tiny model stands in for a real one: its weights are below the heuristic's
    # "tiny weight, launch cost dominates -> cuBLAS" threshold, real Llama weights are not.
    monkeypatch.setattr(tuning_table, "TINY_WEIGHT_ELEMENTS", 0)
    monkeypatch.setenv("LLMOPT_CACHE_DIR", "/nonexistent-llmopt-cache")
    torch._dynamo.reset()
    model = tiny_model("llama", torch.bfloat16)
    compiled = torch.compile(model, backend="llmopt", options={"strict": True})
    with torch.no_grad():
        llmopt.generate(compiled, tokens(1, 6), max_new_tokens=3)
    return graphs[-1]  # the decode-step graph (the prefill graph was compiled first)


def test_cpu_decode_layer_op_count(monkeypatch):
    gm = compiled_decode_graph(monkeypatch, as_cuda=False)
    for layer in (0, 1):
        ops = layer_ops(gm, layer)
        assert len(ops) == CPU_OPS_PER_LAYER, ops
    assert "llmopt.rope_kv_cache_append.default" in layer_ops(gm, 1)


def test_cuda_decode_layer_op_count(monkeypatch):
    gm = compiled_decode_graph(monkeypatch, as_cuda=True)
    for layer in (0, 1):
        ops = layer_ops(gm, layer)
        assert len(ops) == CUDA_OPS_PER_LAYER, ops
