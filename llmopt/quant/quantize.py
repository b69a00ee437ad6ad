"""``quantize_(model, config)``: swap a model's linears for quantized ones, in place.

Which linears: by default every module whose type is exactly ``nn.Linear``, except, for
int4, linears whose ``in_features`` the group size does not divide (skipped with a
warning), and except the output head (``lm_head`` / ``embed_out`` / ``output``, or
``model.get_output_embeddings()``) unless the config's ``quantize_head`` is set (the
int8 default) and the head is not tied to an input embedding: a tied head stays float
(quantizing it would add a copy), and int4 / W8A8 / GPTQ keep it float because logits are
the most sensitive output and GPTQ/AWQ checkpoints do so by convention (see
``llmopt.quant.config``). ``filter_fn(module, fqn) -> bool`` replaces the default choice
entirely (return True for ``lm_head`` to quantize it); a linear it selects that the
scheme cannot handle raises an error.

Calibrated schemes: ``GPTQ`` requires ``calibration`` (batches of token ids, or dicts of
model kwargs); ``W8A8`` uses it for SmoothQuant, and without it quantizes without
smoothing (what the compiler's ``quantize="w8a8"`` option does, having no data).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .calibration import calibration_batches, set_submodule
from .config import GPTQ, Int4WeightOnly, Int8KVCache, Int8WeightOnly, W8A8, parse_quantize
from .gptq import gptq_quantize_model
from .modules import QuantizedLinear
from .schemes import QuantizedWeight, quantize_weight
from .smoothquant import smooth_model

HEAD_NAMES = ("lm_head", "embed_out", "output")


def _head_module(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every plain ``nn.Linear`` except the output head (by name; see the module doc)."""
    return type(module) is nn.Linear and fqn.rsplit(".", 1)[-1] not in HEAD_NAMES


def is_head(module: nn.Module, fqn: str, head: nn.Module | None) -> bool:
    """Whether ``module`` is the output head: ``get_output_embeddings()`` or a head name."""
    return module is head or fqn.rsplit(".", 1)[-1] in HEAD_NAMES


def tied_to_embedding(model: nn.Module, linear: nn.Linear) -> bool:
    """Whether the linear's weight shares storage with an ``nn.Embedding`` of ``model``."""
    ptr = linear.weight.data_ptr()
    return any(isinstance(m, nn.Embedding) and m.weight.data_ptr() == ptr for m in model.modules())


def _group_size(config) -> int | None:
    if isinstance(config, Int4WeightOnly):
        return config.group_size
    if isinstance(config, GPTQ) and config.bits == 4:
        return config.group_size
    return None


def _incompatibility(linear: nn.Linear, config) -> str | None:
    """Why ``linear`` cannot take ``config`` (None when it can)."""
    k = linear.in_features
    if isinstance(config, (Int4WeightOnly, GPTQ)) and getattr(config, "bits", 4) == 4:
        group = _group_size(config) or k
        if k % group or group % 32:
            return f"in_features={k} is not a multiple of the group size {group}" + ("" if group % 32 == 0 else " and 32")
    if not linear.weight.is_floating_point():
        return f"weight dtype {linear.weight.dtype} is not a float"
    return None


def select_linears(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, nn.Linear]:
    """The linears ``quantize_`` would replace, by fully qualified name, in module order."""
    head = _head_module(model)
    chosen: dict[str, nn.Linear] = {}
    skipped = []
    with_head = bool(getattr(config, "quantize_head", False))
    for fqn, module in model.named_modules():
        if filter_fn is None:
            if type(module) is not nn.Linear:
                continue
            if is_head(module, fqn, head) and (not with_head or tied_to_embedding(model, module)):
                continue
        elif not filter_fn(module, fqn):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"filter_fn selected {fqn!r} ({type(module).__name__}); only nn.Linear modules can be quantized")
        reason = _incompatibility(module, config)
        if reason is not None:
            if filter_fn is not None:
                raise ValueError(f"cannot quantize {fqn!r} with {config}: {reason}")
            skipped.append(f"{fqn} ({reason})")
            continue
        chosen[fqn] = module
    if skipped:
        warnings.warn(f"quantize_: left {len(skipped)} linear(s) in float: {', '.join(skipped)}", stacklevel=3)
    return chosen


def quantize_(
    model: nn.Module,
    config: Any,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` modules of ``model`` by ``QuantizedLinear``, in place.

    ``config``: a config (``Int8WeightOnly()``, ``Int4WeightOnly(group_size=128)``,
    ``W8A8(smooth_alpha=0.5)``, ``GPTQ(...)``) or a string (``"int8"``, ``"int4-g64"``,
    ``"w8a8"``, ``"gptq"``). Returns ``model``.
    """
    config = parse_quantize(config)
    if isinstance(config, Int8KVCache):
        raise ValueError("Int8KVCache quantizes the KV cache, not linears: give it to the runtime's cache "
                         "(see llmopt.quant.kv_cache.quantize_kv / dequantize_kv)")
    batches = calibration_batches(calibration, "GPTQ") if isinstance(config, GPTQ) else None
    targets = select_linears(model, config, filter_fn)

    compute_dtype = getattr(config, "compute_dtype", None)

    def replace(name: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        set_submodule(model, name, QuantizedLinear(qw, bias, compute_dtype))

    with torch.no_grad():
        if isinstance(config, GPTQ):
            gptq_quantize_model(model, config, batches, targets, replace)
        else:
            if isinstance(config, W8A8) and calibration is not None:
                smooth_model(model, config.smooth_alpha, calibration_batches(calibration, "SmoothQuant"), targets)
            for name, linear in targets.items():
                replace(name, quantize_weight(linear.weight, config), linear.bias)

    int4 = isinstance(config, Int4WeightOnly) or (isinstance(config, GPTQ) and config.bits == 4)
    if int4 and compute_dtype is None and any(
        lin.weight.dtype == torch.float32 and lin.weight.device.type == "cpu" for lin in targets.values()
    ):
        warnings.warn(
            "quantize_: weight-only int4 with float32 activations on CPU runs the dequantize + matmul "
            "reference (PyTorch's fast int4 CPU kernel is bfloat16-only); for speed, pass "
            "compute_dtype='bfloat16' or convert the model with model.to(torch.bfloat16)",
            stacklevel=2,
        )
    return model
