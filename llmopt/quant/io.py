"""Save and load quantized models: safetensors for tensors, JSON for the rest; nothing is unpickled.

A directory written by :func:`save_quantized` holds

* ``model.safetensors``: the model's ``state_dict()`` (quantized linears as their
  ``qdata``/``scales``/``zeros``/``perm``/``bias`` buffers, everything else as is). Tensors
  shared under several names (tied embeddings) are stored once. Its header metadata
  (``llmopt_manifest``) records the module table and aliases it was written with;
* ``quantization.json``: format name and version, each quantized module's scheme, group
  size and shape, the aliases of shared tensors, and ``files``: the SHA-256 and size of
  ``model.safetensors``.

Saving never replaces a user's files unasked: a non-empty directory is refused unless
``overwrite=True``, and both files are written under temporary names and renamed.

:func:`load_quantized` checks the manifest's structure (a :class:`CheckpointError` names
the file and the field), the tensor file's size and SHA-256 (a manifest without them, from
an older llmopt, loads with a warning), that the manifest agrees with the record inside the
tensor file (an edited scheme is caught), and that each module's tensors have the dtypes
and shapes its scheme needs. Then it rebuilds the float model (``model_or_factory``: a
module with the original architecture, or a callable returning one), swaps in
``QuantizedLinear`` modules and loads every other tensor with a strict key check. Nothing
is unpickled: ``torch.load`` is never called.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint_files import (
    CheckpointError,
    install_quantized_linear,
    load_safetensors,
    prepare_directory,
    read_json_object,
    safetensors_metadata,
    sha256_of,
    staged_files,
)
from .modules import QuantizedLinear
from .schemes import SCHEMES, QuantizedWeight

FORMAT = "llmopt-quantized"
VERSION = 1
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "quantization.json"
RECORD_KEY = "llmopt_manifest"  # safetensors header metadata: the module table and aliases
_MODULE_FIELDS = {  # field -> (accepted types, description)
    "scheme": ((str,), "a string"),
    "group_size": ((int, type(None)), "an integer or null"),
    "in_features": ((int,), "an integer"),
    "out_features": ((int,), "an integer"),
    "has_bias": ((bool,), "true or false"),
    "act_order": ((bool,), "true or false"),
    "compute_dtype": ((str, type(None)), "a dtype name or null"),
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def unloaded_keys(model: nn.Module, missing: list[str], loaded: set[str]) -> list[str]:
    """The ``missing`` keys not tied (same storage) to a loaded one, e.g. a tied ``lm_head``."""
    state = model.state_dict()
    loaded_storage = {_storage_key(state[k]) for k in loaded if k in state}
    return [k for k in missing if k not in state or _storage_key(state[k]) not in loaded_storage]


def _module_table(model: nn.Module) -> dict[str, dict]:
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
    return modules


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``model`` (with its ``QuantizedLinear`` modules) to ``directory``.

    ``directory`` is created if needed. An existing non-empty directory is refused
    (``FileExistsError`` naming the files that would be replaced) unless ``overwrite=True``,
    which replaces ``model.safetensors`` and ``quantization.json`` and leaves any other file
    alone. Both files are written under temporary names in ``directory`` and renamed once
    complete: an error midway leaves the old files as they were.
    """
    modules = _module_table(model)
    if not modules:
        warnings.warn("save_quantized: the model has no quantized modules; the checkpoint holds its float weights "
                      "only (run quantize_(model, config) first?)", stacklevel=2)
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
    prepare_directory(directory, [TENSORS_FILE, CONFIG_FILE], overwrite, "save_quantized")
    record = json.dumps({"modules": modules, "aliases": aliases}, sort_keys=True)
    with staged_files(directory, [TENSORS_FILE, CONFIG_FILE]) as staged:
        save_file(tensors, staged[TENSORS_FILE], metadata={"format": "pt", RECORD_KEY: record})
        meta = {"format": FORMAT, "version": VERSION, "torch_version": torch.__version__,
                "modules": modules, "aliases": aliases,
                "files": {TENSORS_FILE: {"sha256": sha256_of(staged[TENSORS_FILE]),
                                         "bytes": os.path.getsize(staged[TENSORS_FILE])}}}
        with open(staged[CONFIG_FILE], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)


def _field_error(path, where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {where} {problem}")


def _check_manifest(meta: dict, path: str) -> None:
    """Structure and values of a ``quantization.json`` (see the module doc)."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an llmopt quantized model (format={meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')!r}; this llmopt reads version "
                              f"{VERSION}: use the llmopt that wrote it, or save the model again")
    for key in ("modules", "aliases"):
        if key not in meta:
            raise _field_error(path, f"{key!r}", "is missing")
        if not isinstance(meta[key], dict):
            raise _field_error(path, f"{key!r}", f"must be a JSON object, found a {type(meta[key]).__name__}")
    for name, info in meta["modules"].items():
        where = f"modules[{name!r}]"
        if not isinstance(info, dict):
            raise _field_error(path, where, f"must be a JSON object, found a {type(info).__name__}")
        for field, (types, described) in _MODULE_FIELDS.items():
            if field not in info:
                raise _field_error(path, f"{where}.{field}", "is missing")
            value = info[field]
            # bool is an int in Python: refuse true/false where a number is wanted
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise _field_error(path, f"{where}.{field}", f"must be {described}, found {value!r}")
        if info["scheme"] not in SCHEMES:
            raise _field_error(path, f"{where}.scheme", f"is {info['scheme']!r}; valid: {', '.join(SCHEMES)}")
        for field in ("in_features", "out_features"):
            if info[field] <= 0:
                raise _field_error(path, f"{where}.{field}", f"must be positive, found {info[field]}")
        group = info["group_size"]
        if info["scheme"] == "int4":
            if group is None or group <= 0 or info["in_features"] % group or group % 2:
                raise _field_error(path, f"{where}.group_size", f"is {group!r}: int4 needs an even group size that "
                                   f"divides in_features={info['in_features']}")
        elif group is not None:
            raise _field_error(path, f"{where}.group_size", f"is {group!r}; scheme {info['scheme']!r} has none (null)")
        dtype = info["compute_dtype"]
        if dtype is not None and not (isinstance(getattr(torch, dtype, None), torch.dtype)
                                      and getattr(torch, dtype).is_floating_point):
            raise _field_error(path, f"{where}.compute_dtype", f"is {dtype!r}, not a floating-point torch dtype "
                               "(e.g. 'bfloat16', 'float16', 'float32', or null)")
    for key, target in meta["aliases"].items():
        if not isinstance(target, str):
            raise _field_error(path, f"aliases[{key!r}]", f"must be a tensor name (a string), found {target!r}")
    files = meta.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise _field_error(path, "'files'", f"must be a JSON object, found a {type(files).__name__}")
    for name in files:
        if name != TENSORS_FILE:
            raise _field_error(path, "'files'", f"names {name!r}; an llmopt checkpoint has only {TENSORS_FILE}")
    entry = files.get(TENSORS_FILE)
    where = f"files[{TENSORS_FILE!r}]"
    if not isinstance(entry, dict):
        raise _field_error(path, where, f"must be a JSON object with sha256 and bytes, found {entry!r}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _field_error(path, f"{where}.sha256", f"must be 64 hex digits (lowercase), found {digest!r}")
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _field_error(path, f"{where}.bytes", f"must be a non-negative integer, found {size!r}")


def read_quantization_config(directory: str | os.PathLike) -> dict:
    """The checked ``quantization.json`` of ``directory`` (see :func:`load_quantized`)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory!s} a directory written by save_quantized?")
    meta = read_json_object(path)
    _check_manifest(meta, path)
    return meta


def _verify_tensor_file(meta: dict, manifest: str, tensor_path: str) -> None:
    """Size and SHA-256 against the manifest; the manifest against the record in the file."""
    if not os.path.isfile(tensor_path):
        raise FileNotFoundError(f"{tensor_path} not found: the checkpoint is incomplete (its manifest is {manifest})")
    entry = meta.get("files", {}).get(TENSORS_FILE)
    if entry is None:
        warnings.warn(f"{manifest} has no sha256 for {TENSORS_FILE} (written by an older llmopt): its bytes cannot "
                      "be verified; re-save the model with save_quantized to add it", stacklevel=3)
    else:
        size = os.path.getsize(tensor_path)
        if size != entry["bytes"]:
            raise CheckpointError(f"{tensor_path} is {size} bytes, but {manifest} records {entry['bytes']} bytes "
                                  f"(files[{TENSORS_FILE!r}].bytes): the file is truncated or was changed after "
                                  "saving; save the model again")
        digest = sha256_of(tensor_path)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{tensor_path} has sha256 {digest}, but {manifest} records {entry['sha256']} "
                                  f"(files[{TENSORS_FILE!r}].sha256): the file is corrupted or was changed after "
                                  "saving; save the model again")
    record_text = safetensors_metadata(tensor_path).get(RECORD_KEY)
    if record_text is None:
        return  # older checkpoint: the dtype/shape checks still run
    try:
        record = json.loads(record_text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tensor_path}: header metadata {RECORD_KEY!r} is not valid JSON ({e.msg})") from e
    for table in ("modules", "aliases"):
        written, now = record.get(table, {}), meta[table]
        for key in sorted(set(written) | set(now)):
            where = f"{table}[{key!r}]"
            if key not in now:
                raise CheckpointError(f"{manifest}: {where} is missing, but {tensor_path} was written with it: the "
                                      "manifest was edited after saving; restore it or save the model again")
            if key not in written:
                raise CheckpointError(f"{manifest}: {where} was not in the checkpoint {tensor_path} was written "
                                      "with: the manifest was edited after saving; restore it or save the model again")
            if table == "aliases":
                if now[key] != written[key]:
                    raise CheckpointError(f"{manifest}: {where} is {now[key]!r}, but {tensor_path} was written with "
                                          f"{written[key]!r}: the manifest was edited after saving")
                continue
            for field in sorted(set(written[key]) | set(now[key])):
                if now[key].get(field) != written[key].get(field):
                    raise CheckpointError(
                        f"{manifest}: {where}.{field} is {now[key].get(field)!r}, but {tensor_path} was written with "
                        f"{written[key].get(field)!r}: the manifest was edited after saving; restore it or save the "
                        "model again")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).split('.')[-1]} {list(t.shape)}"


def _module_weight(name: str, info: dict, tensors: dict[str, torch.Tensor], tensor_path: str) -> tuple:
    """The module's ``QuantizedWeight`` and bias, after checking each tensor against the
    scheme: presence, dtype and shape (and that ``perm`` is a permutation)."""
    scheme, n, k, group = info["scheme"], info["out_features"], info["in_features"], info["group_size"]

    def fail(field, problem):
        return CheckpointError(f"{tensor_path}: {name}.{field} {problem} (per {CONFIG_FILE}: {name} is "
                               f"{scheme}, [{n}, {k}]" + (f", group_size {group}" if group else "") + ")")

    def take(field, needed: bool, why: str) -> torch.Tensor | None:
        t = tensors.pop(f"{name}.{field}", None)
        if needed and t is None:
            raise fail(field, f"is missing ({why})")
        if not needed and t is not None:
            raise fail(field, f"is present, but {why}")
        return t

    def expect(field, t, dtypes, shape, what):
        if t.dtype not in dtypes or tuple(t.shape) != shape:
            raise fail(field, f"is {_describe(t)}; {what} needs {' or '.join(str(d).split('.')[-1] for d in dtypes)} "
                       f"{list(shape)}")

    int4 = scheme == "int4"
    qdata = take("qdata", True, "every quantized module has one")
    if int4:
        expect("qdata", qdata, (torch.uint8,), (n, k // 2), "int4 (two codes per byte)")
    else:
        expect("qdata", qdata, (torch.int8,), (n, k), f"scheme {scheme!r}")
    scales = take("scales", True, "every quantized module has them")
    scale_shape = (n, k // group) if int4 else (n,)
    expect("scales", scales, _FLOAT_DTYPES, scale_shape, f"scheme {scheme!r}" + (f" with group_size {group}" if int4 else ""))
    zeros = take("zeros", int4, "int4 has zero points" if int4 else f"{scheme} has no zero points")
    if zeros is not None:
        expect("zeros", zeros, (scales.dtype,), scale_shape, "int4 (like its scales)")
    perm = take("perm", info["act_order"], "act_order is " + ("true" if info["act_order"] else "false"))
    if perm is not None:
        expect("perm", perm, (torch.int64,), (k,), "act_order")
        if not torch.equal(torch.sort(perm).values, torch.arange(k, device=perm.device)):
            raise fail("perm", f"is not a permutation of 0..{k - 1}")
    bias = take("bias", info["has_bias"], "has_bias is " + ("true" if info["has_bias"] else "false"))
    if bias is not None:
        expect("bias", bias, _FLOAT_DTYPES, (n,), "the bias")
    return QuantizedWeight(scheme, qdata, scales, zeros, group, perm), bias


def load_quantized(
    directory: str | os.PathLike,
    model_or_factory: nn.Module | Callable[[], nn.Module],
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a model written by :func:`save_quantized` into ``model_or_factory``'s architecture.

    Raises :class:`CheckpointError` (a ``ValueError``) naming the file and the field when the
    checkpoint is malformed, corrupted (SHA-256) or inconsistent, ``FileNotFoundError`` when
    a file is missing; see the module doc for every check.
    """
    manifest = os.path.join(directory, CONFIG_FILE)
    tensor_path = os.path.join(directory, TENSORS_FILE)
    meta = read_quantization_config(directory)
    _verify_tensor_file(meta, manifest, tensor_path)
    tensors = load_safetensors(tensor_path, device=str(device))
    for key, target in meta["aliases"].items():
        if target not in tensors:
            raise CheckpointError(f"{manifest}: aliases[{key!r}] names {target!r}, which is not in {tensor_path}")
        tensors[key] = tensors[target]
    weights = {name: _module_weight(name, info, tensors, tensor_path) for name, info in meta["modules"].items()}

    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError("load_quantized: model_or_factory must be an nn.Module or a callable returning one")
    for name, (qw, bias) in weights.items():
        install_quantized_linear(model, name, qw, bias, f"load_quantized: {manifest}",
                                 meta["modules"][name]["compute_dtype"])

    model.to(device)
    result = model.load_state_dict(tensors, strict=False)
    quantized_prefixes = tuple(f"{n}." for n in meta["modules"])
    missing = unloaded_keys(model, [k for k in result.missing_keys if not k.startswith(quantized_prefixes)],
                            set(tensors))
    if missing or result.unexpected_keys:
        raise ValueError(f"load_quantized: checkpoint and model differ: missing {missing[:10]}, "
                         f"unexpected {result.unexpected_keys[:10]}")
    return model
