"""llmopt: a torch.compile backend for fast, memory-lean LLM inference.

    model = torch.compile(model, backend="llmopt", options={...})
    llmopt.last_report()   # what the backend did to the last compiled graph
"""
from .options import Options
from .report import CompileReport, clear_reports, last_report, reports
from .runtime import SamplingParams, generate

__version__ = "0.1.0"

__all__ = [
    "Options", "CompileReport", "last_report", "reports", "clear_reports", "compile",
    "generate", "SamplingParams", "StaticKVCache", "KVCacheFullError", "__version__",
]


def __getattr__(name):
    # StaticKVCache needs transformers: import it on first use only, so that the backend's
    # discovery by TorchDynamo never pulls transformers in.
    if name in ("StaticKVCache", "KVCacheFullError"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")


def compile(model, *, options=None, **torch_compile_kwargs):
    """``torch.compile(model, backend="llmopt", options=options)`` with the options
    validated now rather than at the first call."""
    import torch

    Options.from_user(options)
    return torch.compile(model, backend="llmopt", options=dict(options or {}), **torch_compile_kwargs)
