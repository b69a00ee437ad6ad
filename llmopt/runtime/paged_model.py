"""Hugging Face causal LMs on a paged KV cache: the ``"llmopt_paged"`` attention function.

How a Hugging Face model (transformers >= 5) reads the paged cache without any change to
its code. Every decoder attention of Llama, Mistral, Qwen2, GPT-2, Gemma, ... projects Q/K/V,
applies its positional encoding, then calls the function registered under
``config._attn_implementation`` in ``transformers.AttentionInterface`` as
``fn(module, q, k, v, attention_mask, scaling=..., **kwargs)``, where ``kwargs`` are the
keyword arguments given to the model's ``forward`` (plus ``sliding_window`` / ``softcap``
for the models that have them). So:

1. :func:`register_paged_attention` registers :func:`paged_attention_forward` as
   ``"llmopt_paged"`` (once, explicitly: it is a registry like the op registry), and
   :class:`PagedModelRunner` switches the model to it (``set_attn_implementation``; the
   previous implementation is restored by :meth:`PagedModelRunner.restore`).
2. A step calls ``model(input_ids=[1, T], position_ids=[1, T], use_cache=False,
   llmopt_paged=metadata, logits_to_keep=rows)``: the ``T`` new tokens of all scheduled
   sequences packed in one row, their absolute positions (RoPE / learned position
   embeddings read them), and the step's :class:`~.paged_cache.PagedAttentionMetadata`,
   planned once and read by every layer.
3. In each layer the function appends the new K/V into the layer's pools
   (``llmopt::paged_kv_append`` with the step's slot mapping) and attends with
   ``llmopt::paged_attention_decode`` (decode-only steps, on the step's decode plan:
   :meth:`PagedModelRunner.__call__` plans it before the forward, every layer passes its
   workspace) or
   ``llmopt::paged_attention_prefill`` (steps with prompt chunks; decode tokens ride
   along as chunks of one). The model keeps no cache of its own (``use_cache=False``) and
   builds no mask: ``"llmopt_paged"`` is not a mask implementation, so Hugging Face's mask
   creation returns ``None`` early, and causality, sliding windows and sequence boundaries
   all come from the metadata.

Compiled models. ``torch.compile(model, backend="llmopt")`` traces through the same path,
so the graph contains the three paged ops (the metadata's tensors and the pools are graph
inputs). AOTAutograd functionalizes the in-place append: the captured graph holds
``auto_functionalized(paged_kv_append)``, which clones both pools, and a ``copy_`` of the
result into each pool input. The ``reinplace_kv`` pass (:mod:`llmopt.passes.reinplace_kv`)
turns this back into the in-place call when nothing reads a pool in between (always, for
this attention function), so the ``aten`` executor (llmopt's CPU default) writes only the
new tokens; Inductor re-inplaces it on its own. Without the pass the tokens are the same,
but every layer copies its pools at every step (see docs/engine.md, "Compiled models").
The decode step's split workspace, mutated by every layer's attention, is re-inplaced the
same way (a chain of writes to one input).
"""
from __future__ import annotations

import torch

from ..codegen import attention_paged as _paged_ops  # noqa: F401  (registers the llmopt::paged_* ops)
from .hf_model import forward_parameter_names, text_config, unwrap_hf_model
from .paged_cache import PagedAttentionMetadata
from .rank_heads import RankLocalCacheError  # noqa: F401  (registers llmopt::tp_local_heads / tp_full_heads)

__all__ = ["ATTENTION_NAME", "PagedModelRunner", "paged_attention_forward", "register_paged_attention"]

ATTENTION_NAME = "llmopt_paged"


class MissingPagedMetadataError(RuntimeError):
    """The ``"llmopt_paged"`` attention ran without the step's metadata."""


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                            llmopt_paged: PagedAttentionMetadata | None = None, sliding_window=None,
                            softcap=None, **kwargs):
    """The ``"llmopt_paged"`` attention: append this step's K/V, attend through the block tables.

    ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]`` (the new tokens, packed);
    returns ``([1, T, Hq, D], None)`` as Hugging Face attention functions do.
    """
    meta = llmopt_paged
    if meta is None:
        raise MissingPagedMetadataError(
            f"attention implementation {ATTENTION_NAME!r} needs the step's paged-cache metadata "
            "(llmopt_paged=...); run the model through llmopt.Engine, or switch it back with "
            "model.set_attn_implementation('sdpa')"
        )
    if query.shape[0] != 1:
        raise ValueError(
            f"{ATTENTION_NAME}: the engine packs all new tokens in one batch row, got query {tuple(query.shape)}"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None or not 0 <= layer < len(meta.k_pools):
        raise ValueError(
            f"{ATTENTION_NAME}: attention module {type(module).__name__} has layer_idx={layer!r}, but the cache "
            f"has {len(meta.k_pools)} layers"
        )
    if meta.layers_seen is not None:
        meta.layers_seen.append(layer)
    k_pool, v_pool = meta.k_pools[layer], meta.v_pools[layer]
    if meta.rank_heads is not None:
        # pools of this rank's K/V heads (tensor parallelism): write those heads, read the pools
        # as if they held all; shard_tensor_parallel removes both markers (see .rank_heads)
        start, end, total = meta.rank_heads
        key = torch.ops.llmopt.tp_local_heads(key, 1, start, end)
        value = torch.ops.llmopt.tp_local_heads(value, 1, start, end)
    # [1, H, T, D] -> [T, H, D]: views, no copy
    torch.ops.llmopt.paged_kv_append(k_pool, v_pool, meta.slot_mapping, key[0].transpose(0, 1),
                                     value[0].transpose(0, 1))
    if meta.rank_heads is not None:
        k_pool = torch.ops.llmopt.tp_full_heads(k_pool, 1, total, start)
        v_pool = torch.ops.llmopt.tp_full_heads(v_pool, 1, total, start)
    q = query[0].transpose(0, 1)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    window = int(sliding_window) if sliding_window else 0
    cap = float(softcap) if softcap else 0.0
    if meta.decode_only:
        q = q.unsqueeze(2)
        # the step's split workspace, planned once (by the runner, else the first layer) and
        # overwritten by every layer: no per-layer allocation
        out = torch.ops.llmopt.paged_attention_decode(q, k_pool, v_pool, meta.block_tables, meta.seq_lens, scale,
                                                      window, cap, meta.decode_workspace(q)).squeeze(2)
    else:
        out = torch.ops.llmopt.paged_attention_prefill(q, k_pool, v_pool, meta.block_tables, meta.seq_lens,
                                                       meta.query_start_loc, scale, window, cap)
    return out.unsqueeze(0), None


def register_paged_attention() -> None:
    """Register :func:`paged_attention_forward` as ``"llmopt_paged"`` in transformers'
    ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS`` before 4.50; idempotent)."""
    try:
        from .hf_cache_compat import register_attention_function
    except ImportError as error:  # pragma: no cover - exercised only without transformers
        raise ImportError("the paged engine needs transformers >= 4.48 (pip install 'transformers>=4.48')") from error
    register_attention_function(ATTENTION_NAME, paged_attention_forward)


class PagedModelRunner:
    """Runs a Hugging Face causal LM (eager or ``torch.compile``d) on packed tokens + metadata.

    On creation it registers and selects the ``"llmopt_paged"`` attention on the model
    (the Hugging Face model inside a compiled wrapper); :meth:`restore` puts the previous
    implementation back. :meth:`check` runs one token through the eager model and fails if
    some layer did not call the paged attention (a model whose attention does not go
    through ``AttentionInterface`` would otherwise silently attend to the new tokens only).
    """

    def __init__(self, model):
        self.model = model
        self.hf_model = unwrap_hf_model(model)
        if self.hf_model is None or not hasattr(self.hf_model, "config"):
            raise TypeError(
                f"llmopt.Engine needs a Hugging Face causal LM (transformers PreTrainedModel), or "
                f"torch.compile of one; got {type(model).__name__}"
            )
        can_set = getattr(self.hf_model, "_can_set_attn_implementation", None)
        if callable(can_set) and not can_set():
            raise NotImplementedError(
                f"{type(self.hf_model).__name__} does not route attention through transformers' AttentionInterface, "
                "so it cannot read a paged KV cache; use llmopt.generate with a StaticKVCache instead"
            )
        register_paged_attention()
        self.previous_attention = self.hf_model.config._attn_implementation
        self._select(ATTENTION_NAME)
        self.wants_logits_to_keep = "logits_to_keep" in forward_parameter_names(self.hf_model)

    def _select(self, name: str) -> None:
        setter = getattr(self.hf_model, "set_attn_implementation", None)
        if callable(setter):
            setter(name)
        if self.hf_model.config._attn_implementation != name:
            self.hf_model.config._attn_implementation = name

    def restore(self) -> None:
        """Give the model back its previous attention implementation."""
        if self.previous_attention is not None and self.hf_model.config._attn_implementation == ATTENTION_NAME:
            self._select(self.previous_attention)

    @property
    def num_layers(self) -> int:
        return int(text_config(self.hf_model).num_hidden_layers)

    @property
    def num_q_heads(self) -> int:
        """Query heads of a decoder attention (a layer whose query differs, e.g. a sharded
        one, re-plans on first use)."""
        return int(getattr(text_config(self.hf_model), "num_attention_heads", 0) or 0)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: PagedAttentionMetadata,
                 logits_rows: torch.Tensor | None = None, *, model=None) -> torch.Tensor:
        """Logits ``[R, V]`` of the packed rows ``logits_rows`` (all ``T`` rows when None).

        ``input_ids``, ``positions``: ``[T]`` int64 on the model's device.
        """
        if metadata.decode_only and metadata.decode_plan is None and metadata.k_pools and self.num_q_heads:
            # plan the decode step before the forward, so that a compiled model receives the
            # workspace as a graph input (one buffer for all layers) instead of creating it
            metadata.plan_decode(self.num_q_heads, metadata.k_pools[0].shape[3])
        kwargs = {}
        if logits_rows is not None and self.wants_logits_to_keep:
            kwargs["logits_to_keep"] = logits_rows
        out = (model or self.model)(
            input_ids=input_ids[None],
            position_ids=positions[None],
            use_cache=False,
            llmopt_paged=metadata,
            **kwargs,
        )
        logits = (out.logits if hasattr(out, "logits") else out[0])[0]
        if logits_rows is not None and not self.wants_logits_to_keep:
            logits = logits.index_select(0, logits_rows)
        return logits

    def check(self, metadata: PagedAttentionMetadata) -> None:
        """Run one padding token (slot -1, length 0: reads and writes nothing) through the
        eager model and check that every decoder layer used the paged attention."""
        metadata.layers_seen = []
        dev = metadata.slot_mapping.device
        token = torch.zeros(1, dtype=torch.int64, device=dev)
        try:
            with torch.no_grad():
                self(token, token, metadata, None, model=self.hf_model)
            seen = sorted(set(metadata.layers_seen))
        except MissingPagedMetadataError as error:
            # The model called the paged attention but dropped the forward's keyword
            # arguments on the way (GPT-2 of transformers 4.x, ...).
            import transformers

            self.restore()
            raise NotImplementedError(
                f"{type(self.hf_model).__name__} on transformers {transformers.__version__} does not pass its "
                f"forward's keyword arguments to the attention function, so it cannot read a paged KV cache; "
                "the Engine needs transformers >= 5.0 for this model (pip install 'transformers>=5')"
            ) from error
        finally:
            metadata.layers_seen = None
        if seen != list(range(self.num_layers)):
            self.restore()
            raise NotImplementedError(
                f"{type(self.hf_model).__name__}: only layers {seen} of {self.num_layers} called the "
                f"{ATTENTION_NAME!r} attention; this model cannot run on a paged KV cache"
            )
