"""llmopt: a torch.compile backend for fast, memory-lean LLM inference.

    model = torch.compile(model, backend="llmopt", options={...})
    llmopt.last_report()   # what the backend did to the last compiled graph
"""
from .options import Options
from .report import CompileReport, clear_reports, last_report, reports
from .runtime import SamplingParams, generate

__version__ = "0.1.0"

# Imported on first use only, so that the backend's discovery by TorchDynamo (which imports
# this package) never pulls in transformers, the quantization kernels or the engine.
_LAZY = {
    "StaticKVCache": "llmopt.runtime",
    "KVCacheFullError": "llmopt.runtime",
    "Engine": "llmopt.runtime.engine",
    "Speculative": "llmopt.runtime.speculative",
    "EngineCallbackError": "llmopt.runtime.engine",
    "PagedKVCache": "llmopt.runtime.paged_cache",
    "KVCacheExhaustedError": "llmopt.runtime.paged_cache",
    "prepare_moe": "llmopt.moe_prepare",
    "quantize_": "llmopt.quant",
    "save_quantized": "llmopt.quant",
    "load_quantized": "llmopt.quant",
    "load_hf_quantized": "llmopt.quant",
    "CheckpointError": "llmopt.quant",
    "Int8WeightOnly": "llmopt.quant",
    "Int4WeightOnly": "llmopt.quant",
    "W8A8": "llmopt.quant",
    "GPTQ": "llmopt.quant",
    "Int8KVCache": "llmopt.quant",
    "explain": "llmopt.tools.inspection",
}

__all__ = [
    "Options", "CompileReport", "last_report", "reports", "clear_reports", "compile",
    "generate", "SamplingParams", "__version__", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")


def compile(model, *, options=None, **torch_compile_kwargs):
    """``torch.compile(model, backend="llmopt", options=options)`` with the options
    validated now rather than at the first call, and ``llmopt.prepare_moe`` applied to
    ``model`` first (per-expert-loop MoE blocks become fusable; a no-op otherwise)."""
    import torch

    from .moe_prepare import prepare_moe_automatically

    Options.from_user(options)
    prepare_moe_automatically(model)  # per-expert-loop MoE blocks become fusable (proven equal)
    return torch.compile(model, backend="llmopt", options=dict(options or {}), **torch_compile_kwargs)
