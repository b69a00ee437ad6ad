"""Runtime: what runs around a compiled model at inference time.

- :mod:`.static_cache`: ``StaticKVCache``, preallocated K/V in the kernels' layout, usable as
  a Hugging Face ``Cache``;
- :mod:`.sampling`: ``SamplingParams`` and device-side next-token selection (no host sync);
- :mod:`.generate`: ``generate``, prefill + static-shape decode loop over a ``StaticKVCache``;
- :mod:`.cuda_graphs`: decode-step capture and replay per batch-size bucket;
- :mod:`.speculative` / :mod:`.beam_search`: the loops behind ``generate(speculative=...)`` and
  ``generate(num_beams=...)``.
- :mod:`.engine`: ``Engine``, continuous batching over a paged cache, a facade over
  :mod:`.scheduler` (``Scheduler``: requests, admission, preemption, blocks; no model) and
  :mod:`.model_runner` (``ModelRunner``: per-step plan, CUDA graphs, forward, sampling);
- :mod:`.hf_model`: what the runtime reads from a Hugging Face model (shared by the loops).

Depends on ``llmopt.codegen`` at most, never on the backend or the passes. ``transformers``
(a test/extra dependency) is imported only when ``StaticKVCache`` is first used, so that
importing llmopt stays cheap and works without it.
"""
from .cuda_graphs import DEFAULT_BATCH_BUCKETS, DecodeGraphs, batch_bucket, pad_batch
from .generate import generate
from .sampling import SamplingParams, sample_next_token

_LAZY = {"KVCacheFullError": "static_cache", "StaticKVCache": "static_cache"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "DecodeGraphs",
    "KVCacheFullError",
    "SamplingParams",
    "StaticKVCache",
    "batch_bucket",
    "generate",
    "pad_batch",
    "sample_next_token",
]
