"""Save and load quantized models: safetensors for tensors, JSON for the rest; no pickle.

A directory written by :func:`save_quantized` holds

* ``model.safetensors``: the model's ``state_dict()`` (quantized linears as their
  ``qdata``/``scales``/``zeros``/``perm``/``bias`` buffers, everything else as is). Tensors
  shared under several names (tied embeddings) are stored once;
* ``quantization.json``: format name and version, each quantized module's scheme, group
  size and shape, and the aliases of shared tensors.

:func:`load_quantized` rebuilds the float model (``model_or_factory``: a module with the
original architecture, or a callable returning one), swaps in ``QuantizedLinear`` modules
from the file's tensors, and loads every other tensor with a strict key check. Nothing is
unpickled: ``torch.load`` is never called.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .calibration import set_submodule
from .modules import QuantizedLinear
from .schemes import QuantizedWeight

FORMAT = "llmopt-quantized"
VERSION = 1
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "quantization.json"
_QUANT_KEYS = ("qdata", "scales", "zeros", "perm", "bias")


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def unloaded_keys(model: nn.Module, missing: list[str], loaded: set[str]) -> list[str]:
    """The ``missing`` keys not tied (same storage) to a loaded one, e.g. a tied ``lm_head``."""
    state = model.state_dict()
    loaded_storage = {_storage_key(state[k]) for k in loaded if k in state}
    return [k for k in missing if k not in state or _storage_key(state[k]) not in loaded_storage]


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (with its ``QuantizedLinear`` modules) to ``directory``."""
    os.makedirs(directory, exist_ok=True)
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            modules[name] = {
                "scheme": module.scheme,
                "group_size": module.group_size,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "has_bias": module.bias is not None,
                "act_order": module.perm is not None,
                "compute_dtype": None if module.compute_dtype is None else str(module.compute_dtype).split(".")[-1],
            }
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"save_quantized: {key!r} is on the meta device; materialize the model first")
        skey = _storage_key(t)
        if skey in seen:
            aliases[key] = seen[skey]
            continue
        seen[skey] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    save_file(tensors, os.path.join(directory, TENSORS_FILE), metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": VERSION, "torch_version": torch.__version__,
            "modules": modules, "aliases": aliases}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def read_quantization_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory!s} a directory written by save_quantized?")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an llmopt quantized model (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')}; this llmopt reads version {VERSION}")
    return meta


def load_quantized(
    directory: str | os.PathLike,
    model_or_factory: nn.Module | Callable[[], nn.Module],
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a model written by :func:`save_quantized` into ``model_or_factory``'s architecture."""
    meta = read_quantization_config(directory)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError("load_quantized: model_or_factory must be an nn.Module or a callable returning one")
    # clone: fresh, aligned allocations (views into the file may be misaligned for CPU kernels)
    tensors = {k: v.clone() for k, v in load_file(os.path.join(directory, TENSORS_FILE), device=str(device)).items()}
    for key, target in meta["aliases"].items():
        tensors[key] = tensors[target]

    for name, info in meta["modules"].items():
        def get(k, required=True):
            full = f"{name}.{k}"
            if full not in tensors:
                if required:
                    raise KeyError(f"load_quantized: {full!r} missing from {TENSORS_FILE}")
                return None
            return tensors.pop(full)

        qw = QuantizedWeight(
            info["scheme"], get("qdata"), get("scales"), get("zeros", info["scheme"] == "int4"),
            info["group_size"], get("perm", info["act_order"]),
        )
        if (qw.out_features, qw.in_features) != (info["out_features"], info["in_features"]):
            raise ValueError(f"load_quantized: {name!r} tensors are [{qw.out_features}, {qw.in_features}], "
                             f"{CONFIG_FILE} says [{info['out_features']}, {info['in_features']}]")
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear) and (old.out_features, old.in_features) != (qw.out_features, qw.in_features):
            raise ValueError(f"load_quantized: the model's {name!r} is [{old.out_features}, {old.in_features}], "
                             f"the checkpoint's [{qw.out_features}, {qw.in_features}]: wrong architecture?")
        set_submodule(model, name, QuantizedLinear(qw, get("bias", info["has_bias"]), info.get("compute_dtype")))

    model.to(device)
    result = model.load_state_dict(tensors, strict=False)
    quantized_prefixes = tuple(f"{n}." for n in meta["modules"])
    missing = unloaded_keys(model, [k for k in result.missing_keys if not k.startswith(quantized_prefixes)],
                            set(tensors))
    if missing or result.unexpected_keys:
        raise ValueError(f"load_quantized: checkpoint and model differ: missing {missing[:10]}, "
                         f"unexpected {result.unexpected_keys[:10]}")
    return model
