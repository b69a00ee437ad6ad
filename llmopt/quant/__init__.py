"""Quantization: configs, weight schemes, GPTQ, SmoothQuant, checkpoint I/O, int8 KV cache.

``quantize_(model, config)`` swaps linears for :class:`QuantizedLinear` modules in place;
:func:`quantize_weight` / :func:`dequantize` / :func:`concat_quantized` are the pure-tensor
API the compiler's quantization pass uses; ``save_quantized`` / ``load_quantized`` store
models as safetensors + JSON; ``load_hf_quantized`` reads GPTQ/AWQ checkpoints. The kernels
(``llmopt::int8_weight_only_linear``, ``int4_weight_only_linear``, ``w8a8_linear``) live in
``llmopt.codegen.int8_weight_only``, ``int4_weight_only`` and ``w8a8``; the weight layouts
(int4 packing) in ``llmopt.codegen.quant_packing``. See docs/quantization.md.
"""
from .checkpoints import (
    awq_to_quantized,
    gptq_to_quantized,
    load_hf_quantized,
    quantized_to_awq,
    quantized_to_gptq,
)
from .config import (
    GPTQ,
    W8A8,
    Int4WeightOnly,
    Int8KVCache,
    Int8WeightOnly,
    config_from_dict,
    config_to_dict,
    parse_quantize,
)
from .gptq import HessianAccumulator, gptq_quantize, reconstruction_error
from .checkpoint_files import CheckpointError
from .io import load_quantized, save_quantized
from .kv_cache import dequantize_kv, kv_head_scales, quantize_kv
from .modules import QuantizedLinear
from .quantize import default_filter, quantize_, select_linears
from .schemes import QuantizedWeight, concat_quantized, dequantize, quantize_weight

__all__ = [
    "GPTQ", "W8A8", "Int4WeightOnly", "Int8KVCache", "Int8WeightOnly", "parse_quantize",
    "config_to_dict", "config_from_dict",
    "QuantizedWeight", "quantize_weight", "dequantize", "concat_quantized",
    "QuantizedLinear", "quantize_", "default_filter", "select_linears",
    "gptq_quantize", "HessianAccumulator", "reconstruction_error",
    "save_quantized", "load_quantized", "CheckpointError",
    "load_hf_quantized", "gptq_to_quantized", "quantized_to_gptq", "awq_to_quantized", "quantized_to_awq",
    "quantize_kv", "dequantize_kv", "kv_head_scales",
]
