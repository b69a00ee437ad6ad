"""Triton kernels built for a GPU on a machine without one: launches recorded, specialized
and compiled ahead of time (the mechanism of :mod:`llmopt.tools.gpu_build`).

- :func:`recording`: within it, tensors made on ``"cuda"`` are fake (``FakeTensorMode``),
  the CUDA device reports a :class:`Target`'s properties (SM count, shared memory), and
  every Triton launch (``@triton.jit``, autotuned, heuristics) is recorded as a
  :class:`Launch` instead of run; an autotuned launch records the configs that survive
  the kernel's own pruning (the smallest tile, optionally the largest, or all).
- :func:`plan_build`: the signature, constexprs and specialization Triton's own binder
  derives for a launch (tensors 16-byte aligned, as allocations are), as one
  :class:`BuildResult` to compile, one per (kernel, target, pointer dtypes, constexprs,
  warps, stages).
- :func:`compile_all`: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
  in a process pool, then registers, shared memory and LOCAL (spill) bytes from the
  ``cuobjdump`` shipped in the Triton wheel and the widest global load from the PTX.
- :func:`discover_kernels`: every ``@triton.jit`` kernel of ``llmopt.codegen`` (so that one
  no exercise launches is found).

Which kernels, at which shapes, and the rules a build must pass are
:mod:`llmopt.tools.gpu_build`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import pkgutil
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from llmopt import compat

_VECTOR_LOAD = re.compile(r"ld\.global(?:\.[a-z]+)*\.v(\d)\.([a-z])(\d+)")


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the kernels are built for."""

    cc: int
    name: str
    sm_count: int
    shared_limit: int  # bytes of shared memory one block may opt into


# ---------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the JIT function and its bound arguments."""
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    origin: str  # which exercise made it
    current_device: int = 0  # the CUDA device current at the launch (Triton launches there)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def module(self) -> str:
        return self.kernel.fn.__module__


class _Pointer:
    """What Triton's binder sees of a tensor argument: its dtype and the alignment of its
    data pointer (allocations are 256-byte aligned; a view adds its storage offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 256 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr

    @staticmethod
    def ptr_range() -> int:
        return 0


def _as_binder_arg(value):
    return _Pointer(value) if isinstance(value, torch.Tensor) else value


def _tile_size(config) -> tuple:
    size = 1
    for key, value in config.kwargs.items():
        if key.startswith("BLOCK") and isinstance(value, int):
            size *= value
    return (size * max(1, config.num_stages or 1), config.num_warps)


class Recorder:
    """The launches recorded so far, and what the next ones are recorded as."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.origin = "?"
        self.full_space = False  # record every pruned config of an autotuned launch
        self.ends = False  # else the smallest and the largest (else only the smallest)
        self.current_device = 0

    def device(self, device):
        """Stands for ``torch.cuda.device(device)``: makes ``device`` current within."""
        index = device.index if isinstance(device, torch.device) else device
        recorder = self

        class _Current:
            def __enter__(self):
                self.previous, recorder.current_device = recorder.current_device, index or 0

            def __exit__(self, *exc):
                recorder.current_device = self.previous

        return _Current()

    @contextlib.contextmanager
    def exercise(self, name: str):
        self.origin = name
        try:
            yield
        finally:
            self.origin = "?"


@contextlib.contextmanager
def recording(target: Target) -> Iterator[Recorder]:
    """Within: tensors made with ``device="cuda"`` are fake, the CUDA device reports the
    target's properties, and every Triton launch is recorded instead of run."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from llmopt.codegen import gemv

    recorder = Recorder()
    props = SimpleNamespace(
        name=target.name, major=target.cc // 10, minor=target.cc % 10,
        multi_processor_count=target.sm_count, L2_cache_size=50 << 20,
        shared_memory_per_block_optin=target.shared_limit, total_memory=80 << 30,
    )

    def jit_run(self, *args, grid, warmup, **kwargs):
        recorder.launches.append(Launch(self, args, kwargs, recorder.origin, recorder.current_device))

    def autotune_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        if not recorder.full_space:
            # CI: the smallest tile (every code path, quick to build) and the largest (the
            # shared memory and register high-water mark) of the pruned space
            ordered = sorted(configs, key=_tile_size)
            configs = [ordered[0], ordered[-1]] if recorder.ends and len(ordered) > 1 else ordered[:1]
        for config in configs:
            recorder.launches.append(Launch(self.fn, args, {**kwargs, **config.all_kwargs()}, recorder.origin,
                                            recorder.current_device))
        self.nargs = None

    def heuristics_run(self, *args, **kwargs):
        for name, rule in self.values.items():
            kwargs[name] = rule({**dict(zip(self.arg_names, args)), **kwargs})
        return self.fn.run(*args, **kwargs)

    patches = [
        (JITFunction, "run", jit_run), (Autotuner, "run", autotune_run), (Heuristics, "run", heuristics_run),
        (InterpretedFunction, "run", jit_run),  # recording also works in a TRITON_INTERPRET=1 session
        (torch.cuda, "device", recorder.device),
        (torch.cuda, "get_device_properties", lambda *a, **k: props),
        (torch.cuda, "get_device_name", lambda *a, **k: target.name),
        (torch.cuda, "current_device", lambda: recorder.current_device),
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 8),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    gemv._sm_count.cache_clear()
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        with compat.fake_tensor_mode():
            yield recorder
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        gemv._sm_count.cache_clear()


# ---------------------------------------------------------------------------------------
# Discovering kernels
# ---------------------------------------------------------------------------------------


def discover_kernels() -> dict[str, Any]:
    """Every ``@triton.jit`` function defined in ``llmopt.codegen`` that is a kernel (not
    a device function called from another kernel), by ``module.name``."""
    import llmopt.codegen as codegen
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kinds = (JITFunction, InterpretedFunction)  # the latter under TRITON_INTERPRET=1
    functions = {}
    for info in pkgutil.iter_modules(codegen.__path__):
        module = importlib.import_module(f"llmopt.codegen.{info.name}")
        for value in vars(module).values():
            fn = value
            while not isinstance(fn, kinds) and hasattr(fn, "fn"):  # autotune/heuristics wrap it
                fn = fn.fn
            if isinstance(fn, kinds) and fn.fn.__module__ == module.__name__:
                functions[f"{module.__name__}.{fn.fn.__name__}"] = fn
    sources = {key: inspect.getsource(fn.fn) for key, fn in functions.items()}
    kernels = {}
    for key, fn in functions.items():
        name = fn.fn.__name__
        called = any(re.search(rf"\b{re.escape(name)}\s*\(", src) for other, src in sources.items() if other != key)
        if not called:
            kernels[key] = fn
    return kernels


# ---------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildResult:
    kernel: str  # module.name
    target: int
    config: str  # the constexprs and launch options, readable
    dtype: str
    origin: str
    registers: int = -1
    shared: int = -1
    spills: int = -1  # LOCAL bytes per thread
    vector_bits: int = 0  # widest global load in the PTX
    params: dict = dataclasses.field(default_factory=dict)  # integer constexprs and num_warps
    weight_bits: int = 0  # bits per weight element of w_ptr (int4: 4), 0 when none
    seconds: float = 0.0
    error: str = ""
    problems: list = dataclasses.field(default_factory=list)


_BINDERS: dict = {}  # (id of the JIT function, cc) -> (backend, binder): building a binder execs code


def specialize(launch: Launch, target: Target):
    """(key, ASTSource, options) exactly as Triton's launcher would build them."""
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    if (id(fn), target.cc) not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", target.cc, 32))
        _BINDERS[id(fn), target.cc] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[id(fn), target.cc]
    args = tuple(_as_binder_arg(a) for a in launch.args)
    kwargs = {k: _as_binder_arg(v) for k, v in launch.kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = repr((fn.fn.__module__, fn.fn.__name__, target.cc, sorted(signature.items()), sorted(constexprs.items()),
                sorted(attrs.items()), sorted((k, repr(v)) for k, v in options.__dict__.items())))
    return key, ASTSource(fn, signature, constexprs, attrs), options, signature, constexprs


def _describe(launch: Launch, signature: dict, constexprs: dict) -> tuple[str, str]:
    names = list(signature)
    upper = {names[path[0]]: value for path, value in constexprs.items()
             if len(path) == 1 and names[path[0]].isupper()}
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    parts = [f"{k}={v}" for k, v in upper.items() if v not in (None,)] + [f"{k}={v}" for k, v in opts.items()]
    dtypes = sorted({v[1:] for v in signature.values() if isinstance(v, str) and v.startswith("*")})
    return " ".join(parts), "/".join(dtypes)


_CUOBJDUMP_LINE = re.compile(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, static shared bytes, LOCAL bytes) of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = _CUOBJDUMP_LINE.search(out)
    if not match:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def widest_global_load(ptx: str) -> int:
    """Bits of the widest global load in ``ptx``: ``ld.global`` (a vector counts as its
    total width) or an asynchronous copy to shared memory (``cp.async`` of 16 bytes: how
    pipelined ``tl.dot`` loops load on sm_80+), or a TMA bulk copy (counted as 128)."""
    best = 0
    for count, _, bits in _VECTOR_LOAD.findall(ptx):
        best = max(best, int(count) * int(bits))
    for bits in re.findall(r"ld\.global(?:\.[a-z0-9]+)*?\.[bfsu](\d+)\s", ptx):
        best = max(best, int(bits))
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    for nbytes in copies:
        best = max(best, 8 * int(nbytes, 0))
    if re.search(r"cp\.async\.bulk\.tensor", ptx):
        best = max(best, 128)
    return best


POINTER_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "i8": 8, "u8": 8}


def weight_bytes_per_thread(params: dict, weight_bits: int) -> float:
    """Weight bytes one thread loads per K step of a [BLOCK_N, BLOCK_K] weight tile: under
    16, no code can give it a 128-bit load (a narrow tile, not a code generation miss)."""
    tile = params.get("BLOCK_N", 1) * params.get("BLOCK_K", 1)
    return tile * weight_bits / 8 / (32 * params.get("num_warps", 4))

def plan_build(launch: Launch, target: Target, seen: set) -> tuple | None:
    """``(BuildResult, source, options)`` to compile for ``launch`` on ``target``, or None
    when a build in ``seen`` (updated) stands for it already."""
    _, src, options, signature, constexprs = specialize(launch, target)
    # one build per kernel, target, pointer dtypes, constexprs and launch options: the
    # integer specializations (== 1, % 16) of the first shape that produced it stand
    # for the others (the presets' sizes are multiples of 16)
    names = list(signature)
    key = (launch.module, launch.name, target.cc,
           tuple(sorted((k, v) for k, v in signature.items() if str(v).startswith("*"))),
           tuple(sorted((p, repr(v)) for p, v in constexprs.items() if names[p[0]].isupper())),
           options.num_warps, options.num_stages)
    if key in seen:
        return None
    seen.add(key)
    config, dtype = _describe(launch, signature, constexprs)
    params = {names[p[0]]: v for p, v in constexprs.items()
              if names[p[0]].isupper() and isinstance(v, int) and not isinstance(v, bool)}
    params["num_warps"] = options.num_warps
    weight = str(signature.get("w_ptr", ""))[1:]
    weight_bits = POINTER_BITS.get(weight, 0) // (2 if "GROUP_SIZE" in params else 1)
    return (BuildResult(f"{launch.module}.{launch.name}", target.cc, config, dtype, launch.origin,
                        params=params, weight_bits=weight_bits), src, options)


# The planned builds, read by the compile workers: a forked worker inherits them, so only
# an index crosses the process boundary.
_WORK: list = []


def _compile_one(index: int) -> BuildResult:
    import triton

    result, src, options = _WORK[index]
    start = time.perf_counter()
    try:
        from triton.backends.compiler import GPUTarget
        compiled = triton.compile(src, target=GPUTarget("cuda", result.target, 32), options=options.__dict__)
        result.shared = int(compiled.metadata.shared)
        result.registers, _, result.spills = resource_usage(compiled.asm["cubin"])
        result.vector_bits = widest_global_load(compiled.asm["ptx"])
    except Exception as exc:  # noqa: BLE001 - a compile error is the finding
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def compile_all(work: list[tuple], jobs: int) -> list[BuildResult]:
    """Compile every planned build (:func:`plan_build`), ``jobs`` processes at a time."""
    _WORK[:] = work
    try:
        if jobs > 1:
            import multiprocessing
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_compile_one, range(len(work)), chunksize=4))
        return [_compile_one(i) for i in range(len(work))]
    finally:
        _WORK.clear()


__all__ = ["BuildResult", "Launch", "POINTER_BITS", "Recorder", "Target", "compile_all", "discover_kernels",
           "plan_build", "recording", "resource_usage", "specialize", "weight_bytes_per_thread",
           "widest_global_load"]
