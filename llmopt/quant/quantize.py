"""``quantize_(model, config)``: swap a model's linears for quantized ones, in place.

Which linears: by default every module whose type is exactly ``nn.Linear`` or Hugging
Face's ``Conv1D`` (GPT-2; its ``[in, out]`` weight is quantized as its ``[out, in]``
transpose, a view: no float copy is kept), except, for
int4, linears whose ``in_features`` the group size does not divide (skipped with a
warning), and except the output head (``lm_head`` / ``embed_out`` / ``output``, or
``model.get_output_embeddings()``) unless the config's ``quantize_head`` is set (the
int8 default) and the head is not tied to an input embedding: a tied head stays float
(quantizing it would add a copy), and int4 / W8A8 / GPTQ keep it float because logits are
the most sensitive output and GPTQ/AWQ checkpoints do so by convention (see
``llmopt.quant.config``). ``filter_fn(module, fqn) -> bool`` replaces the default choice
entirely (return True for ``lm_head`` to quantize it); a linear it selects that the
scheme cannot handle raises an error. When nothing is selected, a warning gives the number
of candidate modules (linears, their subclasses, Conv1D, already quantized ones) and why
each kind was left alone.

Calibrated schemes: ``GPTQ`` requires ``calibration`` (batches of token ids, or dicts of
model kwargs); ``W8A8`` uses it for SmoothQuant, and without it quantizes without
smoothing (what the compiler's ``quantize="w8a8"`` option does, having no data).

MoE experts: with int8 / int4 weight-only, every experts module holding transformers'
stacks (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) becomes a
``QuantizedExperts`` (``llmopt.quant.experts``); ``filter_fn`` sees it too. The router
stays float. W8A8 and GPTQ leave experts in float, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .calibration import calibration_batches, set_submodule
from .config import GPTQ, Int4WeightOnly, Int8KVCache, Int8WeightOnly, W8A8, parse_quantize
from .experts import quantize_experts_
from .gptq import gptq_quantize_model
from .linears import is_hf_conv1d, is_quantizable_linear, linear_kind, linear_shape, linear_weight
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
    """Every plain ``nn.Linear`` or HF ``Conv1D`` except the output head (by name; see the module doc)."""
    return (type(module) is nn.Linear or is_hf_conv1d(module)) and fqn.rsplit(".", 1)[-1] not in HEAD_NAMES


def is_head(module: nn.Module, fqn: str, head: nn.Module | None) -> bool:
    """Whether ``module`` is the output head: ``get_output_embeddings()`` or a head name."""
    return module is head or fqn.rsplit(".", 1)[-1] in HEAD_NAMES


def tied_to_embedding(model: nn.Module, linear: nn.Module) -> bool:
    """Whether the linear's weight shares storage with an ``nn.Embedding`` of ``model``."""
    ptr = linear.weight.data_ptr()
    return any(isinstance(m, nn.Embedding) and m.weight.data_ptr() == ptr for m in model.modules())


def _group_size(config) -> int | None:
    if isinstance(config, Int4WeightOnly):
        return config.group_size
    if isinstance(config, GPTQ) and config.bits == 4:
        return config.group_size
    return None


def _incompatibility(linear: nn.Module, config) -> str | None:
    """Why ``linear`` cannot take ``config`` (None when it can)."""
    k = linear_shape(linear)[1]
    if isinstance(config, (Int4WeightOnly, GPTQ)) and getattr(config, "bits", 4) == 4:
        group = _group_size(config) or k
        if k % group or group % 32:
            return f"in_features={k} is not a multiple of the group size {group}" + ("" if group % 32 == 0 else " and 32")
    if not linear.weight.is_floating_point():
        return f"weight dtype {linear.weight.dtype} is not a float"
    return None


def _by_design_skip(model: nn.Module, module: nn.Module, fqn: str, head, with_head: bool, config) -> str | None:
    """Why the default selection leaves the candidate ``module`` alone by design (None: it
    is a plain linear the selection wants)."""
    if isinstance(module, QuantizedLinear):
        return "already quantized"
    if type(module) is not nn.Linear and not is_hf_conv1d(module):
        return (f"a subclass of nn.Linear ({type(module).__name__}) may compute something else; "
                "select it with filter_fn to quantize it")
    if is_head(module, fqn, head):
        if tied_to_embedding(model, module):
            return "output head tied to the input embedding (kept float: quantizing would add a copy)"
        if not with_head:
            return f"output head kept float ({type(config).__name__}(quantize_head=False))"
    return None


def _summary(skipped: dict[tuple[str, str], list[str]]) -> str:
    parts = []
    for (kind, reason), names in skipped.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        parts.append(f"{len(names)} {kind}: {reason} ({shown})")
    return "; ".join(parts)


def select_linears(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, nn.Module]:
    """The linears (``nn.Linear`` / HF ``Conv1D``) ``quantize_`` would replace, by fully
    qualified name, in module order. Warns when some are left in float, and when none is
    selected (with the number of candidates and why each kind was skipped)."""
    head = _head_module(model)
    chosen: dict[str, nn.Module] = {}
    skipped: dict[tuple[str, str], list[str]] = {}  # (kind, reason) -> names, every skip
    unfit: dict[tuple[str, str], list[str]] = {}  # the skips because the scheme cannot take the linear
    candidates = 0
    with_head = bool(getattr(config, "quantize_head", False))
    for fqn, module in model.named_modules():
        is_candidate = is_quantizable_linear(module) or isinstance(module, QuantizedLinear)
        candidates += is_candidate
        if filter_fn is None:
            if not is_candidate:
                continue
            reason = _by_design_skip(model, module, fqn, head, with_head, config)
            if reason is None:
                reason = _incompatibility(module, config)
                if reason is not None:
                    unfit.setdefault((linear_kind(module), reason), []).append(fqn)
            if reason is not None:
                skipped.setdefault((linear_kind(module), reason), []).append(fqn)
                continue
        else:
            if not filter_fn(module, fqn):
                continue
            if not is_quantizable_linear(module):
                raise TypeError(f"filter_fn selected {fqn!r} ({type(module).__name__}); only nn.Linear and "
                                "Hugging Face Conv1D modules can be quantized")
            reason = _incompatibility(module, config)
            if reason is not None:
                raise ValueError(f"cannot quantize {fqn!r} with {config}: {reason}")
        chosen[fqn] = module
    if not chosen:
        what = "filter_fn selected none of the" if filter_fn is not None else "quantized 0 of"
        detail = f": {_summary(skipped)}" if skipped else ""
        if candidates == 0:
            detail = ": the model has no nn.Linear or Hugging Face Conv1D module"
        warnings.warn(f"quantize_: {what} {candidates} candidate modules (nn.Linear, its subclasses, "
                      f"Conv1D, QuantizedLinear){detail}", stacklevel=3)
    elif unfit:  # the head and subclasses are skipped by design; a linear the scheme cannot take is news
        count = sum(len(names) for names in unfit.values())
        warnings.warn(f"quantize_: left {count} linear(s) in float: {_summary(unfit)}", stacklevel=3)
    return chosen


def quantize_(
    model: nn.Module,
    config: Any,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` / ``Conv1D`` modules of ``model`` by ``QuantizedLinear``, in place.

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
            for name in list(targets):
                # pop: the float module is released as soon as its quantized one is in place
                linear = targets.pop(name)
                replace(name, quantize_weight(linear_weight(linear), config), linear.bias)

    # MoE experts: their 3-D stacks are most of such a model's weights (llmopt.quant.experts).
    left = quantize_experts_(model, config, filter_fn)
    if left:
        warnings.warn(f"quantize_: left {len(left)} MoE experts module(s) in float: {next(iter(left.values()))}",
                      stacklevel=2)
    return model
