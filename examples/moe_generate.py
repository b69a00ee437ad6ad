"""A mixture-of-experts model with llmopt: each sparse block becomes two fused ops.

    python examples/moe_generate.py [--layers 2] [--hidden 256] [--experts 8] [--top-k 2]
    python examples/moe_generate.py --quantize int8      # or int4: int4 weight-only experts (group 32)

Builds a Mixtral-shaped model from a config (random weights, nothing downloaded), compiles
it with ``backend="llmopt"``, generates greedily with ``llmopt.generate``, and prints what
the ``fuse_moe`` pass did (one ``moe_route`` + ``fused_experts`` per layer), whether the
tokens equal eager's, and the expert bytes a decode step reads (the active experts only).
With ``--quantize`` the experts (and the other linears, the router excepted) are stored
int8 / int4 and run ``fused_experts_int8`` / ``_int4``; the tokens are then compared with
the same model quantized eagerly by ``llmopt.quantize_`` (same codes and scales).
"""
import argparse
import copy

import torch
import transformers as tf

import llmopt
from _options import add_model_options
from llmopt.quant import Int4WeightOnly

QUANTIZE = {"none": None, "int8": "int8", "int4": Int4WeightOnly(group_size=32)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p, layers=2, hidden=256, intermediate=512, experts=8, top_k=2, new_tokens=16)
    p.add_argument("--quantize", choices=sorted(QUANTIZE), default="none")
    args = p.parse_args()

    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
    )
    model = tf.MixtralForCausalLM(config).eval()
    prompt = torch.randint(1, 1024, (1, 8))

    quantize = QUANTIZE[args.quantize]
    compiled = torch.compile(model, backend="llmopt", options={"quantize": quantize})
    # The eager reference: the float model, or the same model quantized by quantize_.
    reference = model if quantize is None else llmopt.quantize_(copy.deepcopy(model), quantize)
    with torch.no_grad():
        expected = llmopt.generate(reference, prompt, args.new_tokens)
        first = len(llmopt.reports())
        actual = llmopt.generate(compiled, prompt, args.new_tokens)
    for report in llmopt.reports()[first:]:
        for rewrite in report.rewrites:
            if rewrite.pass_name == "fuse_moe" or "experts" in rewrite.detail:
                print(f"graph {report.graph_index}: {rewrite.detail}")
    print(f"tokens equal to eager{'' if quantize is None else ' (quantize_)'}:", torch.equal(actual, expected))

    experts = model.model.layers[0].mlp.experts
    # From the shapes: with --quantize the float stacks' memory was released after compiling.
    per_expert = (experts.gate_up_proj.shape[1:].numel() + experts.down_proj.shape[1:].numel()) \
        * experts.gate_up_proj.element_size()
    print(f"expert weights read per decode step and layer: {args.top_k} x {per_expert / 1e6:.2f} MB "
          f"(all {args.experts} experts: {args.experts * per_expert / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
