"""Writing a file that several processes update: an exclusive lock and an atomic replace.

A read-merge-write by two processes at once loses the entries of one of them (the
tuning table lost ~10 of 100 entries with 4 concurrent writers). :func:`exclusive_lock`
serializes the writers through a sidecar lock file; :func:`atomic_write_json` replaces the
file so that a reader, or a crash, sees the old content or the new, never a part.

The lock is ``fcntl.flock`` where there is ``fcntl`` (POSIX): the kernel releases it when
its holder exits, even on a crash, so the sidecar file is left in place (deleting it while
another writer waits on it would let two writers in). Elsewhere (Windows) it is a file
created with ``O_EXCL`` and deleted afterwards; one left by a crashed writer is named in
the timeout error so that it can be deleted.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Callable

try:
    import fcntl
except ImportError:  # Windows: the O_EXCL lock file
    fcntl = None


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller was willing to wait."""


def atomic_write(path, write: Callable[[IO[str]], object], *, mode: int | None = None) -> None:
    """Replace the text file ``path`` with what ``write(f)`` writes, atomically.

    ``write`` fills a temporary file next to ``path``; it is fsynced, given ``mode`` (else
    mkstemp's private 0600), renamed over ``path`` with ``os.replace`` and the directory is
    fsynced (so the rename itself survives a power cut). An exception or interrupt midway
    removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # directories cannot be opened on Windows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path, text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` atomically (:func:`atomic_write`), creating its
    directory first; a report or table a user reads, so world-readable by default."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text), mode=mode)


def atomic_write_json(path, data: dict) -> None:
    """:func:`atomic_write` of ``data`` as strict JSON (no NaN), one item per line."""
    atomic_write(path, lambda f: (json.dump(data, f, indent=1, allow_nan=False), f.write("\n")))


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, timeout: float, holders: str = "another process"):
    """Hold an exclusive inter-process lock on ``lock_path`` for the ``with`` block; after
    ``timeout`` seconds of waiting raise :class:`LockTimeout`, whose message names
    ``holders`` (who may hold it) and, for the ``O_EXCL`` file, what to delete."""
    deadline = time.monotonic() + timeout
    if fcntl is not None:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"could not lock {lock_path} within {timeout:g} s: {holders} is writing the file; "
                            "wait for it to finish and retry"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the flock
        return
    while True:
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"could not lock {lock_path} within {timeout:g} s: {holders} is writing the file, or one "
                    f"crashed while writing it; if none is running, delete {lock_path} and retry"
                ) from None
            time.sleep(0.01)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        Path(lock_path).unlink(missing_ok=True)


__all__ = ["LockTimeout", "atomic_write", "atomic_write_json", "exclusive_lock"]
