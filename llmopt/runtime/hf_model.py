"""What the runtime reads from a Hugging Face causal LM, in one place.

``generate``, the paged engine, speculative decoding and beam search all accept a Hugging
Face model or a ``torch.compile`` wrapper of one, and need the same few facts about it: the
``PreTrainedModel`` inside, which keyword arguments its ``forward`` takes
(``logits_to_keep``, ``cache_position``), its decoder (text) config and its generation
settings (``eos_token_id``, ``pad_token_id``). These helpers read them without importing
``transformers`` unless a model is inspected (``import llmopt`` must not need it).
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["as_token_tuple", "floating_parameter", "forward_parameter_names", "generation_attr", "text_config",
           "unwrap_hf_model"]


def unwrap_hf_model(model):
    """The Hugging Face model inside ``model`` (itself, or the module a torch.compile wraps),
    or None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an extra
        return None
    if isinstance(model, PreTrainedModel):
        return model
    if isinstance(model, torch.nn.Module):
        return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return None


def forward_parameter_names(hf_model) -> set[str]:
    """Names of the keyword arguments ``hf_model.forward`` takes (empty when unknown)."""
    if hf_model is None:
        return set()
    try:
        return set(inspect.signature(hf_model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def text_config(hf_model):
    """The decoder's config (``get_text_config(decoder=True)`` of a multimodal model, else
    the model's own config), or None for a model without one."""
    config = getattr(hf_model, "config", None)
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    if getter is not None:
        try:
            config = getter(decoder=True)
        except TypeError:  # older transformers: no ``decoder`` argument
            config = getter()
    return config


def floating_parameter(module) -> torch.Tensor | None:
    """The first floating-point parameter of ``module`` (its device and dtype are the
    model's), or None."""
    if not isinstance(module, torch.nn.Module):
        return None
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def generation_attr(hf_model, name: str):
    """``name`` from the model's generation config, else from its config, else None."""
    for source in (getattr(hf_model, "generation_config", None), getattr(hf_model, "config", None)):
        value = getattr(source, name, None) if source is not None else None
        if value is not None:
            return value
    return None


def as_token_tuple(value) -> tuple[int, ...]:
    """A token id, a list of them or a tensor of them as a tuple of ints (None: empty)."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
