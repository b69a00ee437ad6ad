"""Options of the llmopt backend: ``torch.compile(model, backend="llmopt", options={...})``.

One dataclass, validated on construction, so a typo or a bad value is rejected before any
compilation work starts, with a message naming the valid keys or values.

Where it sits: Options belongs to the backend layer (``backend.py`` parses it), above
``passes``, ``quant`` and ``distributed``; nothing below the backend imports it. Three
checks need those packages — the pass names of ``disable``/``only``
(``passes.PASS_NAMES``), the quantization config (``quant.parse_quantize``) and the
tensor-parallel option — and import them inside ``__post_init__``'s helpers, so that
``import llmopt.options`` stays a leaf import and the errors are raised where they always
were, at construction.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

INNER_EXECUTORS = ("auto", "aten", "inductor")
AUTOTUNE_MODES = ("off", "cached", "on")
CUDA_GRAPH_MODES = ("auto", True, False)


@dataclass(frozen=True)
class Options:
    """Everything a user can set. Field docs are the README's options table.

    disable: names of passes to switch off (e.g. ``("fuse_rope",)``).
    only: when given, run only these passes (in pipeline order).
    inner: executor for the rewritten graph: ``"aten"`` (run the FX module as is),
        ``"inductor"`` (Inductor compiles what is left; llmopt ops stay intact) or
        ``"auto"`` (the measured default per device, see README).
    strict: raise when a pass fails instead of logging it and skipping the pass.
    cuda_graphs: who replays CUDA graphs on CUDA (docs/executors.md). ``"auto"`` and
        ``False``: the compiled graph runs without them and the llmopt runtime
        (``llmopt.generate``, ``Engine``) captures the whole decode step per batch bucket
        (their own ``cuda_graphs`` argument). ``True``: with the ``inductor`` executor,
        every CUDA graph this backend compiles is also run under Inductor's cudagraph trees,
        whatever its shape (then run the runtime with ``cuda_graphs=False``); with ``aten``,
        as ``"auto"``. Off CUDA it does nothing.
    quantize: ``None`` or a quantization config / string (``"int8"``, ``"int4-g128"``,
        ``"w8a8"``) applied to frozen weights inside the graph.
    autotune: ``"off"`` (heuristics only), ``"cached"`` (use the tuning table where it has
        an entry), ``"on"`` (also time missing shapes at compile time, CUDA only).
    tuning_table: path of the tuning table JSON (default: the user cache directory).
    freeze: turn parameters/buffers the model does not mutate into graph constants.
    check_weights: at every call, raise when a frozen weight was replaced (``p.data =``,
        a new Parameter) or a weight the graph holds a derived copy of (quantized) was
        modified in place (``llmopt/frozen_weights.py``).
    release_weights: free the memory of the float weights the graph no longer reads (it
        reads their quantized or sharded copies); eager calls of their modules then raise
        (``llmopt/weight_release.py``, README "Frozen weights"). ``False`` keeps them.
    unified_max_softmax: decode attention uses FlashDecoding++'s unified max value
        (exact fallback for rows that overflow it).
    log: print the compile report at compile time (also ``LLMOPT_LOG=1``).
    tensor_parallel: ``None`` (one device), ``"auto"`` (shard over the default
        ``torch.distributed`` process group) or an explicit ``ProcessGroup`` / 1-D
        ``DeviceMesh``; see docs/tensor_parallel.md.
    capture_cache: keep each graph's AOTAutograd capture on disk (under Inductor's cache
        directory) and reuse it when the same graph is compiled again, in any process
        (llmopt/capture_cache.py, docs/compile_time.md).
    """

    disable: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    inner: str = "auto"
    strict: bool = False
    cuda_graphs: Any = "auto"
    quantize: Any = None
    autotune: str = "cached"
    tuning_table: str | None = None
    freeze: bool = True
    check_weights: bool = True
    release_weights: bool = True
    unified_max_softmax: bool = False
    log: bool = field(default_factory=lambda: os.environ.get("LLMOPT_LOG", "0") not in ("", "0"))
    tensor_parallel: Any = None
    capture_cache: bool = True

    def __post_init__(self):
        for name in ("disable", "only"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _pass_names(name, value))
        _check_choice("inner", self.inner, INNER_EXECUTORS)
        _check_choice("autotune", self.autotune, AUTOTUNE_MODES)
        _check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        for name in ("strict", "freeze", "check_weights", "release_weights", "unified_max_softmax", "log", "capture_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"llmopt option {name!r} must be True or False, got {getattr(self, name)!r}")
        if self.tuning_table is not None and not isinstance(self.tuning_table, (str, os.PathLike)):
            raise TypeError(f"llmopt option 'tuning_table' must be a path, got {self.tuning_table!r}")
        if self.quantize is not None:
            object.__setattr__(self, "quantize", _parse_quantize(self.quantize))
        if self.tensor_parallel is not None:
            from .runtime.distributed import check_tensor_parallel_option

            check_tensor_parallel_option(self.tensor_parallel)

    def enabled(self, pass_name: str) -> bool:
        if self.only is not None and pass_name not in self.only:
            return False
        return pass_name not in self.disable

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v if isinstance(v, (str, int, float, bool, type(None), tuple, list)) else repr(v)
        return out

    @classmethod
    def from_user(cls, options: "Options | dict[str, Any] | None", mode: str | None = None) -> "Options":
        """Build from what ``torch.compile(..., options=..., mode=...)`` passed."""
        if isinstance(options, Options):
            return options
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise ValueError(f"unknown llmopt option(s) {unknown}; valid options: {', '.join(valid)}")
        if mode is not None:
            modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
            _check_choice("mode", mode, modes)
            if mode in ("reduce-overhead", "max-autotune"):
                options.setdefault("cuda_graphs", True)
            if mode.startswith("max-autotune"):
                options.setdefault("autotune", "on")
        return cls(**options)


def _pass_names(name: str, value: Any) -> tuple[str, ...]:
    """``value`` (a pass name or an iterable of them) as a tuple of known pass names."""
    from .passes import PASS_NAMES  # lazy: see the module docstring

    value = (value,) if isinstance(value, str) else tuple(value)
    unknown = [p for p in value if p not in PASS_NAMES]
    if unknown:
        raise ValueError(f"llmopt option {name!r}: unknown pass(es) {unknown}; valid passes: {', '.join(PASS_NAMES)}")
    return value


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    # Booleans compare by identity so that 1 is not taken for True (or 0 for False).
    ok = any(value is c if isinstance(c, bool) or isinstance(value, bool) else value == c for c in choices)
    if not ok:
        raise ValueError(f"llmopt option {name!r}: {value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _parse_quantize(value: Any) -> Any:
    from .quant import parse_quantize  # lazy: see the module docstring

    return parse_quantize(value)
