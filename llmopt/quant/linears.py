"""What counts as a linear layer for quantization: ``nn.Linear`` and Hugging Face's ``Conv1D``.

GPT-2 (and OpenAI GPT, GPT-J's ancestors, ...) build their linears from
``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` stored ``[in, out]``,
the transpose of ``nn.Linear``'s ``[out, in]``. Quantization works on ``[N, K]`` =
``[out, in]`` weights; :func:`linear_weight` gives that view for either kind without
copying (the quantizers read it once; no transposed float copy is kept).

transformers is not imported here: a ``Conv1D`` can only exist once transformers is loaded,
so the class is looked up in ``sys.modules``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def hf_conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when transformers is loaded, else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_hf_conv1d(module: nn.Module) -> bool:
    cls = hf_conv1d_class()
    return cls is not None and type(module) is cls


def is_quantizable_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass) or a Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def linear_kind(module: nn.Module) -> str:
    """A short name for messages: ``nn.Linear``, ``Conv1D`` or the class name."""
    return "nn.Linear" if type(module) is nn.Linear else type(module).__name__


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view for ``Conv1D``)."""
    if is_hf_conv1d(module):
        return module.weight.t()
    return module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)``."""
    if is_hf_conv1d(module):
        return module.nf, module.nx
    return module.out_features, module.in_features
