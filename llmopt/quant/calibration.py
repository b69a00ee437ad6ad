"""Running a model over calibration batches, optionally only up to one decoder block.

GPTQ and SmoothQuant need the inputs that each linear sees on real data. They capture
them with forward pre-hooks while the model runs over the user's calibration batches.
GPTQ goes block by block (a block = one element of the model's decoder ``ModuleList``);
to spare the layers after the current block, a hook on that block stops the forward pass
as soon as the block has run (an exception caught here), so quantizing block ``i`` costs
``i + 1`` layer forwards per batch. This needs no knowledge of the model's forward
signature (rotary embeddings, masks, caches): the model itself prepares every input.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .linears import is_quantizable_linear


class _StopForward(Exception):
    """Raised by the hook on the last block of interest; caught by run_calibration."""


def calibration_batches(calibration: Iterable[Any] | None, what: str) -> list:
    """The calibration data as a list (it is iterated more than once), or a clear error."""
    if calibration is None:
        raise ValueError(f"{what} needs calibration data: quantize_(model, config, calibration=[input_ids, ...]) "
                         "with a few batches of token ids [B, S] from representative text")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = list(calibration)
    if not batches:
        raise ValueError(f"{what}: calibration is empty; pass at least one batch of token ids")
    return batches


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one calibration batch: a tensor (input ids), a dict of kwargs or a tuple."""
    device = _model_device(model)

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    if isinstance(batch, torch.Tensor):
        return model(move(batch))
    if isinstance(batch, dict):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return model(*[move(v) for v in batch])
    raise TypeError(f"a calibration batch must be a tensor of token ids, a dict of model kwargs or a tuple; "
                    f"got {type(batch).__name__}")


def run_calibration(model: nn.Module, batches: list, stop_after: nn.Module | None = None) -> None:
    """Forward every batch (no grad); stop each pass right after ``stop_after`` has run."""
    handle = None
    if stop_after is not None:
        def stop(module, args, output):
            raise _StopForward

        handle = stop_after.register_forward_hook(stop)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call_model(model, batch)
                except _StopForward:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks: the elements of the longest ``ModuleList`` whose items hold linears."""
    best_name, best = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(is_quantizable_linear(m) for m in module[0].modules()):
                if best is None or len(module) > len(best):
                    best_name, best = name, module
    if best is None:
        return []
    prefix = f"{best_name}." if best_name else ""
    return [(f"{prefix}{i}", block) for i, block in enumerate(best)]


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.c`` for ``"a.b.c"``, or None when a part is missing."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module if isinstance(module, nn.Module) else None


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)
