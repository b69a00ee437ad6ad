"""``StaticKVCache``: a preallocated key/value cache that Hugging Face models and llmopt share.

Why a static cache: a decode step that appends into buffers allocated once has the same
shapes and the same tensor addresses at every token, so a compiled forward is traced once
and can be replayed from a CUDA graph; a growing ``DynamicCache`` changes shape every step.

Layout (what the attention kernels read). Per decoder layer, two tensors

    keys, values: [batch, num_kv_heads, max_seq_len, head_dim]   (contiguous, given dtype/device)

On the CPU a buffer of at least a megabyte is fresh anonymous memory that the kernel zeroes
on first touch (``codegen/zero_pages.py``): building a 4096-slot cache costs a system call
per buffer instead of a zero fill of its whole capacity, and its resident memory grows with
the tokens written. ``reset()`` (which zeroes every slot, as Hugging Face's does) touches it
all; ``reset(zero_memory=False)`` does not.

Slot ``s`` of row ``b`` holds the token written by the ``s``-th cache update of that row. All
rows advance together (a batch is left-padded, as in Hugging Face ``generate``): the number
of slots written, ``cumulative_length``, is one int64 device tensor shared by all layers,
advanced in place by the last layer's update (so every layer writes at the same positions,
which the compiled graph then computes once), and a compiled graph never sees a changing
Python int. Row ``b``'s
valid tokens are the slots ``[left_padding[b], cumulative_length)``; ``valid_lengths()``
returns their count. Attention runs over all ``max_seq_len`` slots with a mask (the Hugging
Face contract); the compiler pass ``passes/kv_cache.py`` rewrites it to read only the
valid length.

Room for a paged cache: a block table over this layout is the identity table of
``block_table(block_size)``: block ``j`` of row ``b`` has id ``b * blocks_per_row + j`` and
covers slots ``[j * block_size, (j + 1) * block_size)`` of that row, i.e. element offset
``(id // blocks_per_row) * stride_b + (id % blocks_per_row) * block_size * stride_s``. A paged
attention kernel that addresses blocks through such a table reads a static cache unchanged,
which is how paged attention is checked against the dense kernels.

Hugging Face integration (transformers >= 4.48; checked on 4.48, 4.57, 5.17, 5.23 and 5.25;
the version differences live in :mod:`.hf_cache_compat`). The cache is a
``transformers.StaticCache`` whose layers are ``StaticLayer`` subclasses allocated eagerly
with ``Cache.early_initialization`` (which also marks the buffers as static addresses for
``torch.compile``), so ``model(..., past_key_values=cache)`` and
``model.generate(..., past_key_values=cache)`` use it like a Hugging Face static cache; the
update is Hugging Face's own ``index_copy_`` at ``arange(n) + cumulative_length``, the pattern
the compiler pass recognises. Every attention layer keeps the whole sequence, also under a
sliding window (Mistral) or chunked attention: the model's mask applies the window, which is
exact and keeps one layout for every layer, at the memory cost of ``max_seq_len`` instead of
the window for those layers.

Capacity. A request that would write past ``max_seq_len`` fails with ``KVCacheFullError``
saying what was reserved and what is needed. The check runs on the host from a Python
counter advanced by eager updates (no device sync). Inside a compiled forward the update
must not touch Python state (a changing int would be guarded on and recompile every step),
so there the counter is not advanced: ``llmopt.generate`` checks the whole request before
its first forward, and other loops should call :meth:`StaticKVCache.reserve` themselves.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..codegen import zero_pages
from ..compat import mark_static_address
from .rank_heads import rank_kv_heads  # also registers llmopt::tp_local_heads / tp_full_heads

try:
    from .hf_cache_compat import (
        StaticCacheBase,
        StaticLayerBase,
        check_config_takes_full_length_cache,
        init_cache_layers,
    )
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "llmopt.runtime.static_cache needs transformers >= 4.48 (pip install 'transformers>=4.48')"
    ) from error

__all__ = ["KVCacheFullError", "StaticKVCache", "StaticKVLayer", "kv_cache_shape"]

# Layer types whose attention reads a plain K/V history; a full-length buffer serves them all.
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class KVCacheFullError(RuntimeError):
    """A request needs more KV-cache slots than were reserved."""

    def __init__(self, reserved: int, needed: int):
        self.reserved = reserved
        self.needed = needed
        super().__init__(
            f"KV cache full: {reserved} tokens reserved, {needed} needed; pass max_seq_len >= {needed}"
        )


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:
        return getter()


def kv_cache_shape(config, batch_size: int, max_seq_len: int) -> tuple[int, int, int, int]:
    """``(batch, num_kv_heads, max_seq_len, head_dim)`` of one layer's K (and V) for ``config``."""
    cfg = _text_config(config)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and heads:
        head_dim = cfg.hidden_size // heads
    if not kv_heads or not head_dim:
        raise ValueError(
            f"cannot infer the KV head count and head dim from {type(cfg).__name__}; "
            "pass num_kv_heads= and head_dim= to StaticKVCache"
        )
    return (batch_size, int(kv_heads), max_seq_len, int(head_dim))


class StaticKVLayer(StaticLayerBase):
    """One decoder layer's K/V buffers, ``[B, Hkv, max_seq_len, D]``, allocated up front.

    The update itself is Hugging Face's ``StaticLayer.update``; this class adds, outside
    compiled code only, the checks a user can trip (capacity, batch, heads, dtype) with
    messages that say what to pass, and the host-side token counter behind them.
    """

    is_sliding = False

    def __init__(self, max_cache_len: int, owner: StaticKVCache | None = None, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        # Host mirror of cumulative_length, advanced only by eager updates (see module doc).
        self.num_tokens = 0
        self._owner = owner
        self._advances_counter = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        """Hugging Face's, with K and V allocated by ``zero_pages.zeros`` (lazily zeroed pages
        on the CPU, see the module docstring). Hugging Face's own runs first with no capacity,
        so that every attribute its version sets is set; then the buffers get their size."""
        capacity, self.max_cache_len = self.max_cache_len, 0
        try:
            super().lazy_initialization(key_states, value_states, *args, **kwargs)
        finally:
            self.max_cache_len = capacity
        for name in ("keys", "values"):
            empty = getattr(self, name)
            batch, heads, _, dim = empty.shape
            buffer = zero_pages.zeros((batch, heads, capacity, dim), empty.dtype, empty.device)
            if not torch.compiler.is_compiling():
                mark_static_address(buffer)
            setattr(self, name, buffer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rank_heads = self._owner.rank_heads if self._owner is not None else None
        if rank_heads is not None:
            # A tensor-parallel cache: keep this rank's heads of what the traced (still
            # unsharded) model computes, and read the cache back as all heads; the sharding
            # pass removes both markers (see .rank_heads).
            start, end, _ = rank_heads
            key_states = torch.ops.llmopt.tp_local_heads(key_states, 1, start, end)
            value_states = torch.ops.llmopt.tp_local_heads(value_states, 1, start, end)
        if not torch.compiler.is_compiling():
            self._check_update(key_states, value_states)
        if self._owner is None:
            return super().update(key_states, value_states, *args, **kwargs)
        # Hugging Face's update, with one difference: every layer reads the cache's single
        # slot counter and only the last layer advances it. All layers then write at the
        # same ``arange(n) + counter`` — one value in the compiled graph, so the positions
        # and the valid lengths the attention kernels need are computed once per step, not
        # once per layer (passes/kv_cache.py).
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self.keys.device) + self.cumulative_length
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)
        if self._advances_counter:
            self.cumulative_length.add_(n)
        if rank_heads is not None:
            start, _, total = rank_heads
            return (torch.ops.llmopt.tp_full_heads(self.keys, 1, total, start),
                    torch.ops.llmopt.tp_full_heads(self.values, 1, total, start))
        return self.keys, self.values

    def _check_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        for name, states, buffer in (("keys", key_states, self.keys), ("values", value_states, self.values)):
            got = (states.shape[0], states.shape[1], states.shape[3]) if states.dim() == 4 else None
            if got != expected:
                raise ValueError(
                    f"StaticKVCache was built for {name} [batch={expected[0]}, kv_heads={expected[1]}, "
                    f"seq, head_dim={expected[2]}], the model wrote shape {tuple(states.shape)}; build the "
                    "cache with the batch size of the call and the model's config"
                )
            if states.dtype != buffer.dtype or states.device != buffer.device:
                raise ValueError(
                    f"StaticKVCache holds {buffer.dtype} on {buffer.device}, the model wrote {states.dtype} "
                    f"on {states.device}; build the cache with dtype= and device= of the model"
                )
        needed = self.num_tokens + key_states.shape[-2]
        if needed > self.max_cache_len:
            raise KVCacheFullError(self.max_cache_len, needed)
        if self._owner is None or self._owner._count_writes:
            self.num_tokens = needed

    def reset(self) -> None:
        super().reset()
        self.num_tokens = 0


class StaticKVCache(StaticCacheBase):
    """Preallocated per-layer K/V ``[batch, num_kv_heads, max_seq_len, head_dim]`` (see module doc).

    ``StaticKVCache(model.config, batch_size=4, max_seq_len=4096, dtype=torch.bfloat16,
    device="cuda")``; ``num_kv_heads`` / ``head_dim`` override what the config says.

    ``tensor_parallel=`` (the value given to the compile option: ``"auto"``, a process group
    or a 1-D mesh) allocates only this rank's K/V heads (``Hkv/W``, or the one replicated
    head when ``Hkv < W``; :func:`.rank_heads.kv_heads_of_rank`); ``shape`` then says the
    local count. Such a cache is read only by a model compiled with the same
    ``tensor_parallel``: anything else raises ``RankLocalCacheError``. (A model with a single
    KV head keeps it on every rank: its cache is an ordinary one.)
    """

    def __init__(
        self,
        config,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        tensor_parallel=None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"StaticKVCache batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"StaticKVCache max_seq_len must be an int >= 1, got {max_seq_len!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"StaticKVCache dtype must be a floating torch.dtype, got {dtype!r}")
        cfg = _text_config(config)
        num_layers = getattr(cfg, "num_hidden_layers", None)
        if not num_layers:
            raise ValueError(f"cannot read num_hidden_layers from {type(cfg).__name__}")
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers
        unsupported = sorted({t for t in layer_types if t not in _ATTENTION_LAYER_TYPES})
        if unsupported:
            raise NotImplementedError(
                f"StaticKVCache holds attention K/V only; this model has layer types {unsupported} "
                f"(supported: {', '.join(_ATTENTION_LAYER_TYPES)}); use the model's own cache"
            )
        check_config_takes_full_length_cache(cfg)
        _, kv_heads, _, dim = kv_cache_shape(cfg, batch_size, max_seq_len)
        kv_heads = num_kv_heads or kv_heads
        dim = head_dim or dim
        # (start, end, all heads) of this rank's K/V heads under tensor parallelism, else None.
        self.rank_heads = rank_kv_heads(tensor_parallel, kv_heads, "StaticKVCache")
        if self.rank_heads is not None:
            kv_heads = self.rank_heads[1] - self.rank_heads[0]

        self._count_writes = True
        layers = [StaticKVLayer(max_cache_len=max_seq_len, owner=self) for _ in range(num_layers)]
        # StaticCache.__init__ would pick Hugging Face's layer classes (window-sized buffers for
        # sliding layers); the base Cache takes our layers as they are.
        init_cache_layers(self, layers)
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.early_initialization(batch_size, kv_heads, dim, dtype, self.device)
        # One slot counter for all layers, advanced by the last layer's update (see
        # StaticKVLayer.update): all rows and layers advance together anyway.
        counter = layers[0].cumulative_length
        for layer in layers:
            layer.cumulative_length = counter
            layer._advances_counter = layer is layers[-1]
        # Left padding per row (set by generate from the attention mask); see valid_lengths().
        self.left_padding = torch.zeros(batch_size, dtype=torch.int64, device=self.device)

    # -- shape and lengths ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, num_kv_heads, max_seq_len, head_dim)`` of every layer's K and V."""
        return tuple(self.layers[0].keys.shape)

    @property
    def num_tokens(self) -> int:
        """Slots written so far as known on the host (no sync); see the module doc."""
        return self.layers[0].num_tokens

    def slots_written(self) -> torch.Tensor:
        """Slots written so far: the device counter the model's masks read (int64 scalar)."""
        return self.layers[0].cumulative_length

    def valid_lengths(self) -> torch.Tensor:
        """Valid (non-padding) tokens per row, ``[batch]`` int64 on the cache's device."""
        return self.slots_written() - self.left_padding

    def set_left_padding(self, attention_mask: torch.Tensor) -> None:
        """Record each row's left padding from a ``[batch, prompt_len]`` 0/1 mask (device op)."""
        if attention_mask.dim() != 2 or attention_mask.shape[0] != self.left_padding.shape[0]:
            raise ValueError(
                f"attention_mask must be [batch={self.left_padding.shape[0]}, prompt_len], "
                f"got {tuple(attention_mask.shape)}"
            )
        # Left padding = zeros before the first one of each row.
        mask = attention_mask.to(device=self.device, dtype=torch.int64)
        self.left_padding.copy_((mask.cumsum(-1) == 0).sum(-1))

    def block_table(self, block_size: int) -> torch.Tensor:
        """Identity block table ``[batch, max_seq_len // block_size]`` (int32) over this layout."""
        if block_size < 1 or self.max_seq_len % block_size:
            raise ValueError(
                f"block_size must divide max_seq_len={self.max_seq_len}, got {block_size}"
            )
        batch = self.left_padding.shape[0]
        per_row = self.max_seq_len // block_size
        return torch.arange(batch * per_row, dtype=torch.int32, device=self.device).view(batch, per_row)

    # -- capacity --------------------------------------------------------------------------
    def reserve(self, total_tokens: int) -> None:
        """Fail now, with what to pass, if ``total_tokens`` slots would not fit."""
        if total_tokens > self.max_seq_len:
            raise KVCacheFullError(self.max_seq_len, total_tokens)

    @contextlib.contextmanager
    def uncounted_writes(self) -> Iterator[None]:
        """Within the block, eager updates check capacity but do not advance ``num_tokens``.

        For a driver that accounts for the tokens itself (``generate`` with CUDA graphs, where a
        capture runs the Python of a step that only the replay performs).
        """
        previous = self._count_writes
        self._count_writes = False
        try:
            yield
        finally:
            self._count_writes = previous

    def set_num_tokens(self, num_tokens: int) -> None:
        """Set the host counter (after a compiled or graph-replayed run that could not advance it)."""
        for layer in self.layers:
            layer.num_tokens = int(num_tokens)

    def reset(self, zero_memory: bool = True) -> None:
        """Empty the cache. ``zero_memory=False`` only rewinds the lengths (masked slots are never
        read as valid, so a new request does not need them zeroed) and costs no memory traffic."""
        if zero_memory:
            super().reset()
        else:
            for layer in self.layers:
                layer.cumulative_length.zero_()
                layer.num_tokens = 0
        self.left_padding.zero_()

    def __repr__(self) -> str:
        b, h, s, d = self.shape
        return (
            f"StaticKVCache(layers={len(self.layers)}, batch={b}, kv_heads={h}, max_seq_len={s}, "
            f"head_dim={d}, dtype={self.dtype}, device={self.device}, num_tokens={self.num_tokens})"
        )
