"""The process group a tensor-parallel compile shards over, resolved from the user's option.

``options={"tensor_parallel": ...}`` accepts ``"auto"`` (the default ``torch.distributed``
process group, as ``torchrun`` sets it up), an explicit ``ProcessGroup`` or a 1-D
``DeviceMesh``. This module turns that into a :class:`TensorParallelGroup` (rank, world
size and the group name the functional collectives take) and says clearly what is wrong
when it cannot: ``torch.distributed`` missing or not initialized, a mesh that is not 1-D,
a value of another type. Kept apart from the pass so that ``Options`` can fail fast at
construction, before any compilation work.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


class TensorParallelError(ValueError):
    """Tensor parallelism cannot be set up as asked (a user error, always raised: the pass
    manager re-raises errors marked ``llmopt_user_error`` instead of skipping the pass)."""

    llmopt_user_error = True


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int
    group_name: str
    backend: str


def _dist():
    import torch.distributed as dist

    return dist


def check_tensor_parallel_option(value: Any) -> None:
    """Validate ``options["tensor_parallel"]``; raises :class:`TensorParallelError`."""
    resolve_tensor_parallel(value)


def resolve_tensor_parallel(value: Any) -> TensorParallelGroup | None:
    """The group ``value`` names, or None for ``None``."""
    if value is None:
        return None
    if not torch.distributed.is_available():
        raise TensorParallelError(
            "llmopt option 'tensor_parallel' needs torch.distributed, which this PyTorch build does not have"
        )
    dist = _dist()
    group = _as_process_group(value, dist)
    if not dist.is_initialized():
        raise TensorParallelError(
            f"llmopt option 'tensor_parallel'={value!r} but no torch.distributed process group is "
            "initialized: launch with `torchrun --nproc-per-node N script.py` and call "
            "torch.distributed.init_process_group() before compiling (or drop the option to run on one device)"
        )
    if group is None:
        group = dist.group.WORLD
    return TensorParallelGroup(
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        group_name=group.group_name,
        backend=str(dist.get_backend(group)),
    )


def process_group_of(value: Any) -> Any:
    """The ``ProcessGroup`` the option ``value`` names (checked as :func:`resolve_tensor_parallel`
    checks it), for the runtime's own host-side collectives."""
    resolve_tensor_parallel(value)
    dist = _dist()
    return _as_process_group(value, dist) or dist.group.WORLD


def _as_process_group(value: Any, dist) -> Any:
    if isinstance(value, str):
        if value != "auto":
            raise TensorParallelError(
                f"llmopt option 'tensor_parallel': {value!r} is not valid; use \"auto\", a "
                "torch.distributed ProcessGroup or a 1-D DeviceMesh"
            )
        return None
    if isinstance(value, dist.ProcessGroup):
        return value
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without device meshes
        DeviceMesh = ()
    if DeviceMesh and isinstance(value, DeviceMesh):
        if value.ndim != 1:
            raise TensorParallelError(
                f"llmopt option 'tensor_parallel': a {value.ndim}-D DeviceMesh was given; pass its "
                "tensor-parallel dimension, e.g. mesh['tp'] (a 1-D mesh)"
            )
        return value.get_group()
    raise TensorParallelError(
        f"llmopt option 'tensor_parallel': {type(value).__name__} {value!r} is not valid; use "
        "\"auto\", a torch.distributed ProcessGroup or a 1-D DeviceMesh"
    )


def compiled_tensor_parallel(model: Any) -> Any:
    """The ``tensor_parallel`` option ``model`` was compiled with (``torch.compile(model,
    backend="llmopt", options={"tensor_parallel": ...})``, or a module whose ``forward`` was
    compiled so), None when it was not: what the runtime's own caches (``llmopt.generate``'s
    static cache, the Engine's paged pools) read to hold only this rank's K/V heads."""
    from .. import compat

    for candidate in (model, getattr(model, "forward", None)):
        options = compat.compile_options(candidate)
        if options is not None:
            return options.get("tensor_parallel")
    return None


class CollectiveFailedError(RuntimeError):
    """A collective of a tensor-parallel graph failed: another rank exited or timed out."""


def guard_collectives(run, value: Any):
    """Wrap a compiled (boxed) graph of a tensor-parallel compile so that a failed
    collective says what happened and what to do instead of a bare transport error.

    A rank that dies closes its connections: the others fail in their next collective at
    once (gloo: "Connection closed by peer", NCCL: an aborted communicator). A rank that
    stalls without dying makes the others wait for the process group's timeout, which
    ``init_process_group(timeout=...)`` sets.
    """
    tp = resolve_tensor_parallel(value)

    def call(args):
        with collectives_guarded(tp):
            return run(args)

    call._boxed_call = True
    return call


@contextlib.contextmanager
def collectives_guarded(tp: TensorParallelGroup):
    """Turn a failed collective inside the block into :class:`CollectiveFailedError`."""
    try:
        yield
    except RuntimeError as exc:
        if not _is_collective_failure(exc):
            raise
        raise CollectiveFailedError(
            f"llmopt tensor parallelism: a collective over {tp.world_size} ranks failed on rank {tp.rank} "
            f"({tp.backend}): another rank probably exited or did not reach the same step within the "
            f"process group's timeout. Check the other ranks' logs; every rank must run the same calls. "
            f"Cause: {exc}"
        ) from exc


def _is_collective_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "c10d"))
