"""The persisted tuning table of the linear dispatch and its heuristic (the timing that fills
it: :mod:`llmopt.codegen.linear_tuning`).

Which kernel is fastest for ``x [M, K] @ weight.T`` depends on the GPU, the dtype, the
weight shape (N, K) and the number of rows M. FlashDecoding++ (Hong et al., 2023, §5)
profiles the candidates offline and switches kernels at the "inflection points" of M; we
do the same with one entry per (device name, dtype, N, K, M bucket), where the bucket is
``min(next_pow2(M), 64)`` and every M above 64 shares the bucket ``"inf"``, so a growing
sequence never re-tunes.

Candidates (:data:`KERNELS`): ``gemv`` (:mod:`llmopt.codegen.gemv`), ``flat_gemm``
(:mod:`llmopt.codegen.flat_gemm`) and ``mm`` (``torch.matmul`` / ``addmm``: cuBLAS on CUDA,
oneDNN on CPU, the epilogue done in torch).

The table is a plain JSON file (nothing is unpickled), by default
``$LLMOPT_CACHE_DIR/tuning.json``, else ``$XDG_CACHE_HOME/llmopt/tuning.json``, else
``~/.cache/llmopt/tuning.json``. Its header records the llmopt and Triton versions and the
device it was tuned on; a file that is corrupt or comes from another version or device is
ignored with a warning (the heuristic is used), never a crash; an impossible entry
(:func:`config_problem`) is skipped with a warning naming the file and the entry, and the
others are kept. :meth:`TuningTable.save` merges with the file on disk under an exclusive
lock and replaces it atomically (:mod:`llmopt.codegen.locked_file`), so concurrent
``llmopt autotune`` runs add up and an interrupted one resumes where it stopped.

Heuristic used where the table has no entry (:func:`heuristic_kernel`):

* CPU (any non-CUDA device) → ``mm``: the PyTorch op.
* dtype other than fp16 / bf16 / fp32 → ``mm`` (the Triton kernels are built for those).
* tiny weights, ``N * K < 2**18`` (e.g. 512 x 512) → ``mm``: launch cost dominates.
* M bucket 1 → ``gemv``: a matrix-vector product, bound by reading the weight.
* M buckets 2..32 → ``flat_gemm``: still weight-bound; small M tile, fine N tiling.
* M buckets 64 and ``inf`` → ``mm``: compute starts to matter, cuBLAS tiles win.

The active table (:func:`get_active_table`) is, with the op registry, the only global
mutable state of llmopt: it is loaded lazily on first use and replaced explicitly with
:func:`set_active_table`. Compiled graphs do not read it at run time: their tuned configs
are baked into their kernels strings (:mod:`llmopt.codegen.kernels_spec`).
"""
from __future__ import annotations

import functools
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import triton

from llmopt.codegen.kernels_spec import (  # noqa: F401  the kernels string, re-exported as the table's API
    KERNELS,
    M_BUCKETS,
    config_keys,
    config_problem,
    format_kernels,
    m_bucket_label,
    parse_kernel_configs,
    parse_kernels,
)
from llmopt.codegen.locked_file import LockTimeout, atomic_write_json, exclusive_lock

TINY_WEIGHT_ELEMENTS = 1 << 18
_HALF_AND_FLOAT = ("float16", "bfloat16", "float32")
_FORMAT = "llmopt-tuning-table"
_SCHEMA = 1
# How long save() waits for another writer's lock before giving up (a save holds it for
# one read-merge-write, milliseconds).
LOCK_TIMEOUT_S = 60.0


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` → ``"bfloat16"`` (the table's dtype key)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return aliases.get(name, name)


@functools.lru_cache(maxsize=16)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device) -> str:
    """The table's device key: the CUDA device name (``"NVIDIA H100 80GB HBM3"``) or the device type."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def current_llmopt_version() -> str:
    """This llmopt's version (package metadata), ``"0+unknown"`` when not installed."""
    try:
        return version("llmopt")
    except PackageNotFoundError:
        return "0+unknown"


def current_triton_version() -> str:
    return triton.__version__


def default_table_path() -> Path:
    """``$LLMOPT_CACHE_DIR/tuning.json``, else ``$XDG_CACHE_HOME/llmopt/tuning.json``,
    else ``~/.cache/llmopt/tuning.json``."""
    if os.environ.get("LLMOPT_CACHE_DIR"):
        return Path(os.environ["LLMOPT_CACHE_DIR"]) / "tuning.json"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "llmopt" / "tuning.json"
    return Path.home() / ".cache" / "llmopt" / "tuning.json"


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


@dataclass
class TuningEntry:
    """The winner for one (device, dtype, N, K, M bucket): its kernel and launch config,
    its median time and the cuBLAS (``mm``) time it was compared with, in microseconds."""

    kernel: str
    config: dict = field(default_factory=dict)
    time_us: float = math.nan
    baseline_us: float = math.nan

    @property
    def speedup(self) -> float:
        """cuBLAS time / this kernel's time (> 1: faster than cuBLAS)."""
        return self.baseline_us / self.time_us if self.time_us > 0 else math.nan


Key = tuple[str, str, int, int, str]


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None  # JSON has no NaN


def _float_or_nan(value) -> float:
    return math.nan if value is None else float(value)


class TuningTableError(ValueError):
    """A tuning table file that cannot be used (unreadable, malformed or foreign)."""


# Raised by save() when another writer holds the table's lock too long (an OSError).
TuningTableLocked = LockTimeout


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_label(raw: dict) -> str:
    """``"NVIDIA H100 float16 N=4096 K=4096 M bucket 1"``: an entry's key as far as it has one."""
    parts = [str(raw[f]) for f in ("device", "dtype") if f in raw]
    parts += [f"{f}={raw[f]!r}" if not _is_int(raw[f]) else f"{f}={raw[f]}" for f in ("N", "K") if f in raw]
    if "m_bucket" in raw:
        parts.append(f"M bucket {raw['m_bucket']}")
    return " ".join(parts)


def _entry_from_json(raw, table_device: str | None) -> tuple[Key, "TuningEntry"]:
    """One JSON entry → (key, entry); ValueError saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise ValueError(f"an entry must be an object, got {type(raw).__name__}")
    missing = [f for f in ("device", "dtype", "N", "K", "m_bucket", "kernel", "config") if f not in raw]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    device, dtype, N, K, bucket, kernel = (raw[f] for f in ("device", "dtype", "N", "K", "m_bucket", "kernel"))
    if not isinstance(device, str) or (table_device is not None and device != table_device):
        raise ValueError(f"device {device!r} is not the table's device {table_device!r} (one table per device)")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype_name(dtype), None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
    for name, value in (("N", N), ("K", K)):
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if bucket not in M_BUCKETS:
        raise ValueError(f"M bucket {bucket!r} is not one of {', '.join(M_BUCKETS)}")
    problem = config_problem(kernel, raw["config"]) if isinstance(kernel, str) else f"kernel {kernel!r} is not a name"
    if problem:
        raise ValueError(problem)
    times = []
    for name in ("time_us", "baseline_us"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{name}={value!r} must be a number or null")
        times.append(_float_or_nan(value))
    return (device, dtype_name(dtype), N, K, bucket), TuningEntry(kernel, dict(raw["config"]), *times)


class TuningTable:
    """Tuning entries keyed by (device name, dtype, N, K, M bucket), persisted as JSON.

    ``device_name`` is the device the table is tuned on (recorded in the file header);
    ``path`` is where :meth:`save` writes (default :func:`default_table_path`).
    """

    def __init__(self, path=None, *, device_name: str | None = None, llmopt_version: str | None = None,
                 triton_version: str | None = None):
        self.path = Path(path) if path is not None else default_table_path()
        self.device_name = device_name
        self.llmopt_version = llmopt_version if llmopt_version is not None else current_llmopt_version()
        self.triton_version = triton_version if triton_version is not None else current_triton_version()
        self._entries: dict[Key, TuningEntry] = {}

    # -- entries --------------------------------------------------------------------
    @staticmethod
    def key(device_name: str, dtype, N: int, K: int, bucket) -> Key:
        bucket = str(bucket)
        if bucket not in M_BUCKETS:
            raise ValueError(f"M bucket {bucket!r} is not one of {', '.join(M_BUCKETS)}; use m_bucket_label(M)")
        return (device_name, dtype_name(dtype), int(N), int(K), bucket)

    def get(self, device_name: str, dtype, N: int, K: int, bucket) -> TuningEntry | None:
        return self._entries.get(self.key(device_name, dtype, N, K, bucket))

    def put(self, device_name: str, dtype, N: int, K: int, bucket, entry: TuningEntry) -> None:
        problem = config_problem(entry.kernel, entry.config)
        if problem:
            raise ValueError(f"tuning entry for N={N} K={K} M bucket {bucket}: {problem}")
        if self.device_name is None:
            self.device_name = device_name
        elif device_name != self.device_name:
            raise ValueError(
                f"this tuning table is for {self.device_name!r}, not {device_name!r}; "
                "use a separate table (path) per device"
            )
        self._entries[self.key(device_name, dtype, N, K, bucket)] = entry

    def __contains__(self, key) -> bool:
        return self.key(*key) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return sorted(self._entries.items(), key=lambda kv: (kv[0][:4], M_BUCKETS.index(kv[0][4])))

    def update(self, other: "TuningTable") -> None:
        """Merge ``other``'s entries into this table (``other`` wins on equal keys)."""
        for key, entry in other._entries.items():
            self.put(*key, entry)

    # -- JSON -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": _FORMAT,
            "schema": _SCHEMA,
            "llmopt_version": self.llmopt_version,
            "triton_version": self.triton_version,
            "device_name": self.device_name,
            "entries": [
                {
                    "device": dev, "dtype": dt, "N": n, "K": k, "m_bucket": b,
                    "kernel": e.kernel, "config": e.config,
                    "time_us": _finite_or_none(e.time_us), "baseline_us": _finite_or_none(e.baseline_us),
                }
                for (dev, dt, n, k, b), e in self.items()
            ],
        }

    @classmethod
    def from_json(cls, data, path=None) -> "TuningTable":
        """Build a table from parsed JSON.

        A malformed header raises :class:`TuningTableError`. A malformed or impossible entry
        (:func:`config_problem`, an unknown kernel, M bucket or dtype, N or K <= 0, another
        device) is skipped with one ``RuntimeWarning`` naming the file and the entry; the
        other entries are kept.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise TuningTableError("not an llmopt tuning table (missing format header)")
        if data.get("schema") != _SCHEMA:
            raise TuningTableError(f"schema {data.get('schema')!r}, this llmopt reads schema {_SCHEMA}")
        device = data.get("device_name")
        if device is not None and not isinstance(device, str):
            raise TuningTableError(f"device_name {device!r} is not a string")
        table = cls(path, device_name=device, llmopt_version=str(data.get("llmopt_version")),
                    triton_version=str(data.get("triton_version")))
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise TuningTableError("'entries' is not a list")
        for i, raw in enumerate(entries):
            try:
                key, entry = _entry_from_json(raw, table.device_name)
            except ValueError as err:
                label = _entry_label(raw) if isinstance(raw, dict) else ""
                warnings.warn(
                    f"tuning table {path if path is not None else '(in memory)'}: entry {i} "
                    f"{f'({label}) ' if label else ''}skipped: {err}. The other entries are used; this shape "
                    "and M bucket falls back to the heuristic. Fix or delete the entry, or re-run "
                    "`llmopt autotune` to time it again.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            table.device_name = table.device_name or key[0]
            table._entries[key] = entry
        return table

    @classmethod
    def _read(cls, path: Path) -> "TuningTable":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise TuningTableError(f"not UTF-8 text: {err}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TuningTableError(f"invalid JSON: {err}") from err
        return cls.from_json(data, path)

    def _foreign_reason(self, device_name: str | None) -> str | None:
        """Why a loaded table does not apply to this llmopt / Triton / device, or None."""
        mine = (current_llmopt_version(), current_triton_version())
        if (self.llmopt_version, self.triton_version) != mine:
            return (f"it was written by llmopt {self.llmopt_version} with triton {self.triton_version}, "
                    f"this is llmopt {mine[0]} with triton {mine[1]}")
        if device_name is not None and self.device_name is not None and self.device_name != device_name:
            return f"it was tuned on {self.device_name!r}, this device is {device_name!r}"
        return None

    @classmethod
    def load(cls, path=None, *, device_name: str | None = None) -> "TuningTable":
        """Load the table at ``path`` (default :func:`default_table_path`).

        A missing file gives an empty table. A corrupt file, or one written by another
        llmopt / Triton version or (when ``device_name`` is given) for another device, gives
        an empty table and a warning saying what to do; it never raises.
        """
        path = Path(path) if path is not None else default_table_path()
        empty = cls(path, device_name=device_name)
        if not path.exists():
            return empty
        try:
            table = cls._read(path)
        except (OSError, TuningTableError) as err:
            warnings.warn(
                f"ignoring the tuning table {path}: {err}. The linear kernels fall back to the heuristic; "
                "delete the file or re-run `llmopt autotune` to rewrite it.",
                RuntimeWarning,
                stacklevel=2,
            )
            return empty
        reason = table._foreign_reason(device_name)
        if reason:
            warnings.warn(
                f"ignoring the tuning table {path}: {reason}. The linear kernels fall back to the heuristic; "
                "re-run `llmopt autotune` on this machine to rebuild it.",
                RuntimeWarning,
                stacklevel=2,
            )
            return empty
        return table

    def save(self, path=None, *, merge: bool = True, lock_timeout: float | None = None) -> Path:
        """Write the table and return its path; concurrent writers lose nothing.

        Under an exclusive lock on ``<path>.lock`` (waiting at most ``lock_timeout`` seconds,
        default :data:`LOCK_TIMEOUT_S`, then :class:`TuningTableLocked`): with ``merge``
        (default), entries already in a compatible file on disk and not in this table are
        added to it (this table wins on equal keys; an incompatible or corrupt file is
        replaced); then the file is replaced atomically (temporary file in the same
        directory, fsync, ``os.replace``), so a reader sees the old table or the new one,
        never a part. With ``fcntl`` the ``.lock`` file stays: removing it while another
        writer waits on it would let two writers in.
        """
        path = Path(path) if path is not None else self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        timeout = LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout
        holders = "another process (an `llmopt autotune`, a compile with autotune='on')"
        with exclusive_lock(path.with_name(path.name + ".lock"), timeout, holders):
            if merge and path.exists():
                self._merge_from_disk(path)
            atomic_write_json(path, self.to_json())
        self.path = path
        return path

    def _merge_from_disk(self, path: Path) -> None:
        try:
            on_disk = type(self)._read(path)
        except (OSError, TuningTableError):
            return  # corrupt: replaced
        if on_disk._foreign_reason(self.device_name) is not None:
            return  # another version or device: replaced
        if self.device_name is None or on_disk.device_name in (None, self.device_name):
            for key, entry in on_disk._entries.items():
                self._entries.setdefault(key, entry)
            if self.device_name is None:
                self.device_name = on_disk.device_name


# ---------------------------------------------------------------------------------------
# The active table (explicit global state) and the choice of kernel
# ---------------------------------------------------------------------------------------

_active_table: TuningTable | None = None
_active_lock = threading.Lock()


def get_active_table() -> TuningTable:
    """The table the linear op and the ``select_linear_kernel`` pass consult.

    Loaded on first use from :func:`default_table_path` for the current CUDA device (an
    empty table on a machine without one); replace it with :func:`set_active_table`.
    """
    global _active_table
    with _active_lock:
        if _active_table is None:
            name = device_name("cuda") if torch.cuda.is_available() else None
            _active_table = TuningTable.load(device_name=name)
        return _active_table


def set_active_table(table: TuningTable | None) -> TuningTable | None:
    """Make ``table`` the active table (``None``: reload from disk on next use); returns the previous one."""
    global _active_table
    with _active_lock:
        previous, _active_table = _active_table, table
    return previous


def heuristic_kernel(device_name: str, dtype, N: int, K: int, bucket: str) -> tuple[str, str]:
    """The documented default (module docstring) → (kernel, reason)."""
    if device_name == "cpu" or device_name in ("mps", "xpu", "meta"):
        return "mm", f"{device_name}: the PyTorch op"
    dt = dtype_name(dtype)
    if dt not in _HALF_AND_FLOAT:
        return "mm", f"heuristic: {dt} has no Triton linear kernel"
    if N * K < TINY_WEIGHT_ELEMENTS:
        return "mm", f"heuristic: tiny weight {N}x{K}, launch cost dominates"
    if bucket == "1":
        return "gemv", "heuristic: M=1 is a matrix-vector product, bound by reading the weight"
    if bucket in ("2", "4", "8", "16", "32"):
        return "flat_gemm", f"heuristic: M<={bucket} is still weight-bound; flat GEMM (small M tile)"
    return "mm", f"heuristic: M bucket {bucket} is large enough for cuBLAS tiles"


def choose_kernel(table: TuningTable | None, device_name: str, dtype, N: int, K: int,
                  bucket: str) -> tuple[str, dict | None, str]:
    """(kernel, tuned config or None, reason) for one M bucket: the table's entry, else the heuristic."""
    if device_name != "cpu" and table is not None:
        entry = table.get(device_name, dtype, N, K, bucket)
        if entry is not None:
            return entry.kernel, entry.config, (
                f"tuning table: {entry.kernel} {entry.time_us:.1f} us vs cuBLAS {entry.baseline_us:.1f} us "
                f"({entry.speedup:.2f}x)"
            )
    kernel, reason = heuristic_kernel(device_name, dtype, N, K, bucket)
    return kernel, None, reason


def choose_kernels(table: TuningTable | None, device_name: str, dtype, N: int, K: int) -> tuple[str, dict[str, str]]:
    """The kernels string for a linear with weight [N, K] and the reason for each bucket.

    ``N`` is the weight's row count (2 I for a merged gate/up weight). Returns e.g.
    ``("1:gemv[BLOCK_N=16,...],2:flat_gemm,...,inf:mm", {"1": "tuning table: ...", ...})``:
    a bucket whose table entry has a config carries it, so the string alone says what runs.
    """
    choice, configs, reasons = {}, {}, {}
    for bucket in M_BUCKETS:
        choice[bucket], configs[bucket], reasons[bucket] = choose_kernel(table, device_name, dtype, N, K, bucket)
    return format_kernels(choice, configs), reasons


__all__ = [
    "KERNELS",
    "LOCK_TIMEOUT_S",
    "M_BUCKETS",
    "TuningEntry",
    "TuningTable",
    "TuningTableError",
    "TuningTableLocked",
    "choose_kernel",
    "choose_kernels",
    "config_keys",
    "config_problem",
    "default_table_path",
    "device_name",
    "dtype_name",
    "format_kernels",
    "get_active_table",
    "heuristic_kernel",
    "m_bucket_label",
    "parse_kernel_configs",
    "parse_kernels",
    "set_active_table",
]
