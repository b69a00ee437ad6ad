"""The file side of checkpoints: atomic writes that never replace a user's files unasked,
SHA-256 of files, and readers whose errors name the file and the field.

Shared by llmopt's own format (``io.py``) and the GPTQ/AWQ loaders (``checkpoints.py``).

* :func:`prepare_directory` refuses a non-empty directory unless ``overwrite=True``
  (a user's Hugging Face checkpoint also has a ``model.safetensors``).
* :func:`staged_files` gives a temporary name in the target directory for each file; the
  caller writes them all, then they are renamed over the final names in order
  (``os.replace`` is atomic within a directory). On any error the temporary files are
  removed and the old files stay whole. A reader can still see a new file next to an old
  one if the process dies between two renames; llmopt's manifest records the SHA-256 of
  the tensor file, so that mix fails to load instead of loading wrong.
* :class:`CheckpointError` (a ``ValueError``): a checkpoint on disk is malformed,
  corrupted, or disagrees with itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file is malformed, corrupted or inconsistent; the message names the
    file and the field (and, for a quantized module, the module)."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; a truncated file, invalid JSON or another type raises
    :class:`CheckpointError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                              "the file is truncated or corrupted") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason}); the file is corrupted") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, found a {type(value).__name__}")
    return value


def _require_file(path: str | os.PathLike) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (or not a file)")


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (``{}`` when absent)."""
    _require_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is corrupted or truncated") from e


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as fresh (aligned, writable) allocations."""
    _require_file(path)
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is corrupted or truncated") from e
    # clone: views into the file may be misaligned for the CPU kernels
    return {k: v.clone() for k, v in tensors.items()}


def prepare_directory(directory: str | os.PathLike, replaces: list[str], overwrite: bool, what: str) -> None:
    """Create ``directory``, or check that writing there is allowed: an existing directory
    must be empty unless ``overwrite``; ``replaces`` are the names the write will replace."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{what}: {directory} is a file, not a directory; choose a directory path")
    os.makedirs(directory, exist_ok=True)
    entries = sorted(os.listdir(directory))
    if entries and not overwrite:
        existing = [name for name in replaces if name in entries]
        shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
        effect = (f"saving would replace {', '.join(existing)}" if existing
                  else "saving would mix the checkpoint's files with them")
        raise FileExistsError(f"{what}: {directory} is not empty (it holds {shown}); {effect}. "
                              "Pass overwrite=True to replace the checkpoint's files there (others are left "
                              "alone), or choose an empty directory")


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(path: str) -> None:
    """Make the renames durable where the platform allows it (not on Windows, nor on some
    network file systems): best effort, the files themselves are already synced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_files(directory: str | os.PathLike, names: list[str]) -> Iterator[dict[str, str]]:
    """Temporary paths (in ``directory``) for ``names``; the caller writes each one. On a
    normal exit they are synced and renamed over ``names`` in the given order; on an error,
    or for a file the caller did not write, nothing is renamed and the temporaries go."""
    directory = os.fspath(directory)
    token = secrets.token_hex(4)
    staged = {name: os.path.join(directory, f".{name}.{token}.tmp") for name in names}
    try:
        yield staged
        for name in names:
            if not os.path.isfile(staged[name]):
                raise RuntimeError(f"staged_files: {name} was not written")
            _fsync_file(staged[name])
        for name in names:
            os.replace(staged[name], os.path.join(directory, name))
        _fsync_directory(directory)
    finally:
        for path in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def install_quantized_linear(model, name: str, qweight, bias, where: str, compute_dtype=None) -> None:
    """Replace ``model``'s linear ``name`` by a ``QuantizedLinear`` loaded from a checkpoint,
    after checking the module exists and has the checkpoint's shape (``where`` names the
    file); the one place both loaders (llmopt's and GPTQ/AWQ's) swap a module in."""
    from .calibration import set_submodule
    from .linears import is_quantizable_linear, linear_shape
    from .modules import QuantizedLinear

    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: {name!r} is quantized there, but the model has no such module: "
                              "wrong architecture?") from None
    if is_quantizable_linear(old) and linear_shape(old) != (qweight.out_features, qweight.in_features):
        shape = linear_shape(old)
        raise CheckpointError(f"{where}: the model's {name!r} is [{shape[0]}, {shape[1]}], the checkpoint's "
                              f"[{qweight.out_features}, {qweight.in_features}]: wrong architecture?")
    set_submodule(model, name, QuantizedLinear(qweight, bias, compute_dtype))
