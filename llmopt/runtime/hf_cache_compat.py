"""The Hugging Face cache and attention APIs llmopt's runtime builds on, for transformers 4.48 to 5.x.

Why this module: llmopt supports ``transformers>=4.48`` (setup.py), and the cache API changed
under it. transformers 5 stores a static cache as per-layer ``StaticLayer`` objects that
advance a device counter (``cumulative_length``), built with ``Cache(layers=...)`` and
allocated with ``Cache.early_initialization``; 4.48 keeps ``key_cache`` / ``value_cache``
lists in a ``StaticCache`` that writes at the model's ``cache_position``, and 4.5x has
layers again but no counter. ``StaticKVCache`` needs the 5.x semantics (one shared device
counter, ``index_copy_`` at ``arange(n) + counter``: the pattern ``passes/kv_cache.py``
recognises), so this module gives it, on every version, the same three things:

- :data:`StaticLayerBase`: transformers 5's ``StaticLayer`` itself; before 5.0, a small
  class with the same surface (``keys``/``values``/``cumulative_length``/``max_cache_len``,
  ``lazy_initialization(k, v)``, ``update``, ``get_seq_length``, ``get_mask_sizes``,
  ``reset``) written here, on transformers 5.x semantics;
- :data:`StaticCacheBase`: transformers' ``StaticCache`` itself on 5.x (so models and
  ``generate`` treat the cache as a Hugging Face static cache); before 5.0, a subclass of
  4.x's ``StaticCache`` (the models' ``isinstance`` checks choose the static-cache mask from
  it) that dispatches every call to the layers above;
- :func:`init_cache_layers`: ``Cache.__init__(cache, layers=...)`` on 5.x, its equivalent
  on 4.x.

On 5.x nothing here changes transformers' behaviour: the names are re-exports. The 4.x
code follows 5.x's ``StaticLayer`` line by line where it matters (buffers allocated once,
marked as static addresses for ``torch.compile``, ``index_copy_`` at the counter).

What cannot work on 4.x says so, naming the installed version and the minimum that works:
on 4.48 some models (GPT-2, ...) keep their cache as per-layer tuples and cannot be given a
``Cache`` object at all (:func:`check_model_takes_cache_objects`), and Gemma 2 / Cohere 2
expect window-sized buffers in their sliding layers
(:func:`check_config_takes_full_length_cache`).

The paged Engine registers its attention function with :func:`register_attention_function`:
``transformers.AttentionInterface`` on versions that have it, the ``ALL_ATTENTION_FUNCTIONS``
mapping it replaced on 4.48.
"""
from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, StaticCache

from ..compat import mark_static_address

__all__ = [
    "LAYERED_STATIC_CACHE",
    "TRANSFORMERS_VERSION",
    "StaticCacheBase",
    "StaticLayerBase",
    "check_config_takes_full_length_cache",
    "check_model_takes_cache_objects",
    "init_cache_layers",
    "register_attention_function",
]

TRANSFORMERS_VERSION = Version(transformers.__version__)
# transformers 5.0: StaticLayer with a device counter, Cache(layers=...), early_initialization.
LAYERED_STATIC_CACHE = TRANSFORMERS_VERSION >= Version("5.0.0.dev0")


class _StaticLayer4x:
    """transformers 5's ``StaticLayer`` for transformers 4.x: ``[B, H, max_cache_len, D]``
    buffers written at ``arange(n) + cumulative_length``, a device counter advanced in place."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, **kwargs):
        self.max_cache_len = max_cache_len
        # A tensor, not an int: a compiled graph reads it instead of guarding on a number.
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = torch.zeros((batch, heads, self.max_cache_len, key_states.shape[-1]),
                                dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros((batch, heads, self.max_cache_len, value_states.shape[-1]),
                                  dtype=value_states.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for buffer in (self.keys, self.values, self.cumulative_length):
                mark_static_address(buffer)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        # Attention spans every slot; the model's mask hides the unwritten ones.
        return self.max_cache_len, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.cumulative_length.zero_()


class _StaticCache4x(StaticCache):
    """transformers 4.x ``StaticCache`` over :class:`_StaticLayer4x`-like layers.

    Subclassing 4.x's ``StaticCache`` keeps the models' ``isinstance(past_key_values,
    StaticCache)`` checks (4.48 picks the full-length static mask from it); none of its
    storage is used: every method a model or ``generate`` calls dispatches to ``layers``.
    """

    layers: list

    def early_initialization(self, batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                             device: torch.device) -> None:
        fake = torch.zeros((batch_size, num_heads, 0, head_dim), dtype=dtype, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(fake, fake)

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        # The model's cache_position is not used: the layers write at their own counter,
        # which equals it whenever the caller's positions are consistent with the cache.
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def get_seq_length(self, layer_idx: int | None = 0):
        return self.layers[layer_idx or 0].get_seq_length()

    def get_max_cache_shape(self, *args) -> int:
        return self.layers[0].max_cache_len

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        return self.layers[0].get_mask_sizes()

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    # Attributes 4.x code reads (generate, mask creation, beam reordering); properties so that
    # they are one truth with the layers and override the base class's properties where it has them.
    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def max_batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def key_cache(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.layers]

    @property
    def value_cache(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx):
        # Models of 4.48 that keep a tuple cache (GPT-2, ...) index it as past[layer][0]; this
        # cache cannot serve them, say so instead of a shape error deep inside the model.
        raise TypeError(
            f"StaticKVCache was indexed like a tuple cache (past_key_values[{layer_idx!r}]): this model reads "
            f"its cache as per-layer tuples on transformers {transformers.__version__} and cannot use a "
            "StaticKVCache; pip install 'transformers>=4.57' or use the model's own cache"
        )


if LAYERED_STATIC_CACHE:
    from transformers.cache_utils import StaticLayer as StaticLayerBase

    StaticCacheBase = StaticCache
else:
    StaticLayerBase = _StaticLayer4x
    StaticCacheBase = _StaticCache4x


def init_cache_layers(cache, layers: list) -> None:
    """Initialise ``cache`` (a :data:`StaticCacheBase`) as the base ``Cache`` over ``layers``,
    bypassing ``StaticCache.__init__`` (which would allocate its own layers)."""
    if LAYERED_STATIC_CACHE:
        Cache.__init__(cache, layers=layers)
        return
    if "layers" in inspect.signature(Cache.__init__).parameters:
        Cache.__init__(cache, layers=layers)  # 4.5x: keeps what it needs beside the layers
    else:
        Cache.__init__(cache)  # 4.48: an nn.Module
    cache.layers = layers


def check_model_takes_cache_objects(hf_model) -> None:
    """Raise when ``hf_model`` cannot be given a ``Cache`` object (a 4.x model with a tuple cache)."""
    if hf_model is None or LAYERED_STATIC_CACHE:
        return
    if getattr(hf_model, "_supports_static_cache", True) is False:
        raise NotImplementedError(
            f"{type(hf_model).__name__} on transformers {transformers.__version__} keeps its KV cache as "
            "per-layer tuples and cannot use a StaticKVCache (llmopt.generate); this needs transformers >= 4.57 (the oldest checked that passes Cache objects to every model): "
            "pip install 'transformers>=4.57', or use model.generate"
        )


def check_config_takes_full_length_cache(config) -> None:
    """Raise for a config whose 4.x model expects window-sized buffers in its sliding layers.

    Gemma 2 / Cohere 2 of transformers 4.48 (``cache_implementation="hybrid"``, no
    ``layer_types``) slice each sliding layer's mask to the window, assuming Hugging Face's
    ``HybridCache``; over a full-length cache the mask and the keys disagree (an error, or
    with a window of 1 a silent broadcast). Later versions build those masks from the
    cache's own sizes (``layer_types``), which a full-length cache serves exactly."""
    if LAYERED_STATIC_CACHE:
        return
    if getattr(config, "cache_implementation", None) == "hybrid" and getattr(config, "layer_types", None) is None:
        raise NotImplementedError(
            f"{type(config).__name__} on transformers {transformers.__version__} expects a window-sized "
            "cache (HybridCache) for its sliding-window layers, which StaticKVCache does not hold; this needs "
            "transformers >= 4.57: pip install 'transformers>=4.57', or use the model's own cache"
        )


def register_attention_function(name: str, function) -> None:
    """Make ``function`` selectable as ``config._attn_implementation = name`` (idempotent)."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.50: the mapping AttentionInterface replaced
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = function
        return
    AttentionInterface.register(name, function)
