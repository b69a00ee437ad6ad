"""On-disk cache of the captured ATen graph: a warm compile skips AOTAutograd.

Why: on a warm start (a second process over Inductor's filled caches) Inductor skips
AOTAutograd with its AOTAutograd cache, while llmopt, a backend of its own, traced every
graph again: 2.5 of the ~11 s warm compile of ``llama-100m`` (docs/compile_time.md). This
module keeps the functionalized ATen graph AOTAutograd hands llmopt's ``fw_compiler``, as
JSON, keyed by everything that decides it; a hit rebuilds it in milliseconds, and the
freeze, the passes and the executor then run as after a capture. What comes after the
capture is not cached here: the passes read the live weights (merged, quantized and
released weights are rebuilt from them), and Inductor's FX graph cache already keeps the
compiled code of the post-pass graph, which is then the same graph as the first time.

**The key** (SHA-256) covers: the Dynamo graph node by node (op, target by qualified name,
arguments, tensor constants by value), every input's type, shape, stride, offset, dtype,
device, ``requires_grad``, Dynamo mark and storage sharing, the grad mode and default
dtype, the SDPA-kernel and deterministic-algorithm switches, AOTAutograd's settings, the
torch and Python versions, and the source of every llmopt module. A graph whose capture
could depend on anything else is never cached (:class:`Uncacheable` names why, and the
report says it): symbolic shapes, tensor
subclasses, autocast, calls of Python functions outside torch (or closures), custom ops
outside ``aten``/``prims``/``llmopt`` that the capture decomposes (their Python can change
under the same name; one that stays a single call is keyed by the source of its fake
implementation's module), higher-order ops, submodule calls.

**What a hit may skip** is only AOTAutograd's trace: its runtime wrapper must be one
llmopt can replay exactly (:func:`llmopt.compat.aot_output_plan`): outputs returned as
they are or as the very input they are, in-graph input writes with their version-counter
bumps, nothing else. Other graphs are captured every time.

**Files**: ``<Inductor cache dir>/llmopt-capture/<key>.json``, written atomically, with
the SHA-256 of its payload checked on load; a corrupt or unreadable entry is a miss (a
one-line warning), and the next capture replaces it. At most :data:`MAX_ENTRIES` are
kept (least recently used evicted). ``options={"capture_cache": False}``
or ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` turns it off. Clearing Inductor's cache
directory clears it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import compat
from .codegen.locked_file import atomic_write_json
from .graph import attr_value
from .report import one_line_error

log = logging.getLogger("llmopt")

FORMAT = 1
SUBDIR = "llmopt-capture"
# Modules whose functions a cached Dynamo graph may call (their code is fixed by the
# torch and Python versions in the key).
_TRUSTED_MODULES = ("torch", "_operator", "operator", "builtins", "math")
_TRUSTED_OP_NAMESPACES = ("aten", "prims", "llmopt")
# The directory keeps at most MAX_ENTRIES entries: a write past it deletes the least
# recently used (by mtime; a hit touches its entry) down to KEEP_ENTRIES. Every change to
# llmopt's source starts new entries (the key hashes it), so without a cap a developer's
# or a CI machine's directory would only grow (~20 MB per run of the test suite).
MAX_ENTRIES = 1024
KEEP_ENTRIES = 768
_ENTRY_NAME = re.compile(r"^[0-9a-f]{64}\.json$")
# A tensor constant of the Dynamo graph is keyed by its bytes up to this size.
_MAX_CONSTANT_BYTES = 16 << 20
_PLAIN_TENSOR_TYPES = tuple(t for t in (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", None)) if t)


class Uncacheable(Exception):
    """Why a graph's capture is not cached (the report's ``capture_cache`` says it)."""


class Entry:
    """A cache hit: the captured graph, the fake mode and fake inputs its placeholders
    hold, and the runtime plan (:func:`llmopt.compat.aot_output_plan`)."""

    def __init__(self, gm: fx.GraphModule, fake_mode: Any, fake_inputs: list[Any], plan: dict[str, list]):
        self.gm, self.fake_mode, self.fake_inputs, self.plan = gm, fake_mode, fake_inputs, plan


def cache_dir() -> Path:
    return Path(compat.inductor_cache_dir()) / SUBDIR


def enabled(opts: Any) -> bool:
    return bool(getattr(opts, "capture_cache", True)) and not compat.caches_force_disabled()


# --------------------------------------------------------------------------- the key
def key_of(gm: fx.GraphModule, inputs: Sequence[Any]) -> str:
    """The cache key of capturing ``gm`` on ``inputs`` (lifted module state first);
    raises :class:`Uncacheable`."""
    if not isinstance(gm, fx.GraphModule):
        raise Uncacheable(f"the graph is a {type(gm).__name__}, not a GraphModule")
    if compat.any_autocast_enabled():
        raise Uncacheable("autocast is on")
    h = hashlib.sha256()
    for part in (f"format {FORMAT}", f"torch {torch.__version__}", f"python {sys.version_info[:3]}",
                 f"llmopt {_llmopt_source_hash()}", f"grad {torch.is_grad_enabled()}",
                 f"default dtype {torch.get_default_dtype()}", f"functorch {compat.functorch_config_items()!r}",
                 f"switches {_global_switches()!r}"):
        h.update(part.encode() + b"\n")
    h.update(_inputs_fingerprint(inputs).encode())
    h.update(_graph_fingerprint(gm).encode())
    return h.hexdigest()


def _global_switches() -> list[tuple[str, Any]]:
    """Process-wide switches a capture reads: which SDPA kernel the graph records, and
    deterministic algorithms (some decompositions differ)."""
    out: list[tuple[str, Any]] = [("deterministic", torch.are_deterministic_algorithms_enabled())]
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(torch.backends.cuda, name, None)
        if fn is not None:
            out.append((name, bool(fn())))
    return out


@lru_cache(maxsize=None)
def _llmopt_source_hash() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _inputs_fingerprint(inputs: Sequence[Any]) -> str:
    lines, storages = [], {}
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise Uncacheable(f"input {i} is a {type(t).__name__} (a dynamic scalar), not a tensor")
        if type(t) not in _PLAIN_TENSOR_TYPES:
            raise Uncacheable(f"input {i} is a tensor subclass ({type(t).__name__})")
        if t.layout != torch.strided:
            raise Uncacheable(f"input {i} has layout {t.layout}")
        sizes = [*t.shape, *t.stride(), t.storage_offset()]
        if not all(type(s) is int for s in sizes):
            raise Uncacheable(f"input {i} has a symbolic shape")
        storage = (t.device, t.untyped_storage().data_ptr()) if t.untyped_storage().nbytes() else None
        alias = storages.setdefault(storage, i) if storage is not None else i
        lines.append(f"{i} {type(t).__name__} {tuple(t.shape)} {t.stride()} {t.storage_offset()} {t.dtype} {t.device} "
                     f"rg={t.requires_grad} inf={t.is_inference()} conj={t.is_conj()} neg={t.is_neg()} "
                     f"mark={compat.module_state_kind(t)} alias={alias}")
    return "\n".join(lines) + "\n"


def _graph_fingerprint(gm: fx.GraphModule) -> str:
    lines = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise Uncacheable(f"the graph calls the submodule {node.target}")
        if node.op == "get_attr":
            target = f"{node.target}={_constant_fingerprint(gm, node.target)}"
        elif node.op == "call_function":
            target = _callable_name(node.target)
        else:
            target = str(node.target)
        lines.append(f"{node.op} {node.name} {target} {_describe(node.args)} {_describe(node.kwargs)}")
    return "\n".join(lines) + "\n"


def _callable_name(fn: Any) -> str:
    namespace = compat.operator_namespace(fn)
    if namespace is not None:
        if namespace in _TRUSTED_OP_NAMESPACES:
            return f"op {fn}"
        # Another library's custom op: cached only when it stays one call in the capture,
        # keyed by the source of its fake implementation (what the capture reads of it).
        source = compat.custom_op_fake_source(fn)
        if source is None:
            raise Uncacheable(f"the graph calls the {namespace} op {fn} (decomposed by the capture, or not a "
                              "torch.library.custom_op with a readable fake implementation)")
        return f"op {fn} fake {hashlib.sha256(source.encode()).hexdigest()}"
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(qualname, str) or "<" in qualname or module.split(".")[0] not in _TRUSTED_MODULES:
        raise Uncacheable(f"the graph calls {module}.{qualname} (Python outside torch, or a closure)")
    return f"py {module}.{qualname}"


def _constant_fingerprint(gm: fx.GraphModule, target: str) -> str:
    value = attr_value(gm, target)
    if type(value) not in _PLAIN_TENSOR_TYPES:
        raise Uncacheable(f"the graph reads the attribute {target} ({type(value).__name__})")
    nbytes = value.numel() * value.element_size()
    if nbytes > _MAX_CONSTANT_BYTES:
        raise Uncacheable(f"the graph's constant {target} is {nbytes} bytes")
    data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(bytes(data.numpy())).hexdigest()
    return f"{tuple(value.shape)} {value.stride()} {value.dtype} {value.device} {digest}"


def _describe(a: Any) -> str:
    if isinstance(a, fx.Node):
        return "%" + a.name
    if a is None or isinstance(a, (bool, int, float, str)) and type(a) in (bool, int, float, str):
        return repr(a)
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return f"{type(a).__name__}:{a}"
    if isinstance(a, slice):
        return f"slice({_describe(a.start)},{_describe(a.stop)},{_describe(a.step)})"
    if a is Ellipsis:
        return "..."
    if isinstance(a, (list, tuple)):
        return f"{type(a).__name__}(" + ",".join(_describe(x) for x in a) + ")"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v)}" for k, v in a.items()) + "}"
    raise Uncacheable(f"an argument of type {type(a).__name__} in the graph")


# --------------------------------------------------------------------------- the entry
def serialize(gm: fx.GraphModule, plan: dict[str, list]) -> dict:
    """The captured graph and its runtime plan as JSON data; raises :class:`Uncacheable`."""
    nodes, storages = [], _Storages()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            raise Uncacheable(f"the captured graph has a {node.op} node ({node.name})")
        if node.op == "call_function":
            target = _encode_target(node.target)
        else:
            target = node.target
        nodes.append([node.op, node.name, target, _encode(node.args), _encode(node.kwargs), _encode_meta(node, storages)])
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(plan["outputs"]):
        raise Uncacheable("the captured graph's outputs do not match AOTAutograd's output plan")
    return {"nodes": nodes, "plan": plan, "names": compat.fx_name_state(gm.graph)}


def _encode_target(target: Any) -> Any:
    if compat.is_op_overload(target):
        return {"op": list(compat.op_overload_parts(target))}
    module = getattr(target, "__module__", "")
    if module in ("_operator", "operator", "math", "builtins"):
        return {"py": [module, target.__name__]}
    raise Uncacheable(f"the captured graph calls {target!r}")


def _encode(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"n": a.name}
    if a is None or type(a) in (bool, int, str):
        return a
    if type(a) is float:
        return {"f": repr(a)}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format):
        return {"mf": str(a).replace("torch.", "")}
    if isinstance(a, tuple):
        return {"tuple": [_encode(x) for x in a]}
    if isinstance(a, list):
        return [_encode(x) for x in a]
    if isinstance(a, dict) and all(type(k) is str for k in a):
        return {"dict": {k: _encode(v) for k, v in a.items()}}
    raise Uncacheable(f"a {type(a).__name__} argument in the captured graph")


class _Storages:
    """Numbers the storages of a graph's values in order of appearance: a view shares its
    base's storage (and Inductor's reinplacing reads that aliasing), so the entry keeps it."""

    def __init__(self):
        self.ids: dict[Any, tuple[int, torch.dtype]] = {}

    def group(self, v: torch.Tensor) -> tuple[int, bool]:
        """(the storage's number, whether ``v`` is the first value seen over it)."""
        from torch.multiprocessing.reductions import StorageWeakRef

        ref = StorageWeakRef(v.untyped_storage())
        if ref in self.ids:
            number, dtype = self.ids[ref]
            if dtype != v.dtype:
                raise Uncacheable(f"a {v.dtype} view of a {dtype} value in the captured graph")
            return number, False
        self.ids[ref] = (len(self.ids), v.dtype)
        return len(self.ids) - 1, True


def _layout(v: torch.Tensor) -> list:
    """[shape, stride, offset, dtype, device] of a static-shape tensor, as an entry keeps them."""
    sizes = [*v.shape, *v.stride(), v.storage_offset(), v.untyped_storage().nbytes()]
    if not all(type(s) is int for s in sizes):
        raise Uncacheable("a symbolic shape in the captured graph")
    return [list(v.shape), list(v.stride()), v.storage_offset(), str(v.dtype).replace("torch.", ""), str(v.device)]


def _encode_value(v: Any, storages: _Storages) -> Any:
    if isinstance(v, torch.Tensor):
        layout = _layout(v)
        number, first = storages.group(v)
        return {"T": [*layout, number, v.untyped_storage().nbytes() if first else None]}
    if isinstance(v, (list, tuple)):
        return {"tuple" if isinstance(v, tuple) else "list": [_encode_value(x, storages) for x in v]}
    if v is None or type(v) in (bool, int):
        return v
    if type(v) is float:
        return {"f": repr(v)}
    raise Uncacheable(f"a node value of type {type(v).__name__} in the captured graph")


def _encode_meta(node: fx.Node, storages: _Storages) -> dict:
    meta: dict[str, Any] = {}
    if "val" in node.meta:
        meta["val"] = _encode_value(node.meta["val"], storages)
    stack = node.meta.get("nn_module_stack")
    if stack:
        meta["nn_module_stack"] = [[str(k), str(v[0]), _type_name(v[1])] if isinstance(v, tuple) and len(v) == 2
                                   else [str(k), str(v), ""] for k, v in stack.items()]
    original = node.meta.get("original_aten")
    if compat.is_op_overload(original):
        meta["original_aten"] = list(compat.op_overload_parts(original))
    return meta


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', t)}"


class _Stale(Exception):
    """An entry this process cannot rebuild (an op missing, a name that came out different)."""


def deserialize(data: dict, fake_mode: Any, fake_inputs: Sequence[Any]) -> fx.GraphModule:
    """The graph :func:`serialize` wrote, its placeholders holding ``fake_inputs`` and every
    other node a fake value of ``fake_mode``; raises ``_Stale`` when it cannot be rebuilt."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs = iter(fake_inputs)
    bases: dict[int, tuple[str, torch.Tensor]] = {}  # storage number -> ("meta"|"fake", base)
    for op, name, target, args, kwargs, meta in data["nodes"]:
        if op == "placeholder":
            node = graph.placeholder(target)
        elif op == "output":
            node = graph.output(_decode(args, env)[0])
        else:
            node = graph.create_node(op, _decode_target(target), tuple(_decode(args, env)), _decode(kwargs, env), name=name)
        if node.name != name:
            raise _Stale(f"node {name} came out as {node.name}")
        env[name] = node
        if op == "placeholder":
            value = next(inputs, None)
            stored = (meta.get("val") or {}).get("T")
            if not isinstance(value, torch.Tensor) or stored is None or stored[:5] != _layout(value):
                raise _Stale(f"input {name} does not match the entry")
            bases.setdefault(stored[5], ("fake", value))
            node.meta["val"] = value
        elif "val" in meta:
            node.meta["val"] = _decode_value(meta["val"], fake_mode, bases)
        if isinstance(node.meta.get("val"), torch.Tensor):
            node.meta["tensor_meta"] = compat.fx_tensor_metadata(node.meta["val"])
        if "nn_module_stack" in meta:
            node.meta["nn_module_stack"] = {k: (path, kind) for k, path, kind in meta["nn_module_stack"]}
        if "original_aten" in meta:
            node.meta["original_aten"] = _resolve(meta["original_aten"])
    if next(inputs, None) is not None:
        raise _Stale("the entry has fewer inputs than the graph")
    compat.restore_fx_name_state(graph, data.get("names"))
    return compat.make_graph_module(torch.nn.Module(), graph)


def _resolve(parts: list) -> Any:
    try:
        return compat.resolve_op_overload(*parts)
    except AttributeError as exc:
        raise _Stale(str(exc)) from None


def _decode_target(t: dict) -> Any:
    if "op" in t:
        return _resolve(t["op"])
    module, name = t["py"]
    if module not in ("_operator", "operator", "math", "builtins"):
        raise _Stale(f"the entry calls {module}.{name}")
    return getattr(importlib.import_module(module), name)


def _decode(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_decode(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "n":
        return env[v]
    if tag == "f":
        return float(v)
    if tag in ("dtype", "layout", "mf"):
        return getattr(torch, v)
    if tag == "device":
        return torch.device(v)
    if tag == "tuple":
        return tuple(_decode(x, env) for x in v)
    if tag == "dict":
        return {k: _decode(x, env) for k, x in v.items()}
    raise _Stale(f"unknown argument tag {tag!r}")


def _decode_value(v: Any, fake_mode: Any, bases: dict[int, tuple[str, torch.Tensor]]) -> Any:
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "f":
        return float(x)
    if tag in ("list", "tuple"):
        items = [_decode_value(i, fake_mode, bases) for i in x]
        return tuple(items) if tag == "tuple" else items
    shape, stride, offset, dtype, device, number, nbytes = x
    dtype, device = getattr(torch, dtype), torch.device(device)
    if number not in bases:  # the first value over this storage: a meta storage of its size
        if nbytes is None:
            raise _Stale(f"storage {number} has no size")
        bases[number] = ("meta", torch.empty(nbytes // dtype.itemsize, dtype=dtype, device="meta"))
    kind, base = bases[number]
    if base.dtype != dtype:
        raise _Stale(f"storage {number} holds {base.dtype}, not {dtype}")
    if kind == "fake":  # a view of a graph input: a view of its fake tensor
        with fake_mode:
            return base.as_strided(shape, stride, offset)
    return compat.fake_tensor_over_meta(fake_mode, base.as_strided(shape, stride, offset), device)


# --------------------------------------------------------------------------- files
def load(key: str, fake_mode: Any, fake_inputs: Sequence[Any]) -> Entry | None:
    """The entry of ``key`` rebuilt, or None (a miss; a bad file also warns)."""
    path = Path(f"{key}.json")
    try:
        path = cache_dir() / path
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("llmopt: capture cache entry %s unreadable (%s); capturing again", path, exc)
        return None
    try:
        data = json.loads(text)
        payload = data["payload"]
        if data.get("format") != FORMAT or data.get("key") != key or data.get("sha256") != _digest(payload):
            raise ValueError("checksum, key or format mismatch")
        gm = deserialize(payload, fake_mode, fake_inputs)
        plan = payload["plan"]
    except (ValueError, KeyError, TypeError, _Stale) as exc:
        log.warning("llmopt: capture cache entry %s not used (%s: %s); capturing again", path, type(exc).__name__, exc)
        return None
    try:
        os.utime(path)  # recently used: the last to be evicted
    except OSError:
        pass
    return Entry(gm, fake_mode, list(fake_inputs), plan)


def store(key: str, gm: fx.GraphModule, plan: dict[str, list]) -> None:
    """Write ``gm``'s entry (atomically); raises :class:`Uncacheable`, or OSError."""
    payload = serialize(gm, plan)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / f"{key}.json", {"format": FORMAT, "key": key, "torch": torch.__version__,
                                                  "sha256": _digest(payload), "payload": payload})
    evict(directory)


def evict(directory: Path) -> int:
    """Past :data:`MAX_ENTRIES` entries, delete the least recently used down to
    :data:`KEEP_ENTRIES`; only files named like an entry. Returns how many went."""
    entries = []
    with os.scandir(directory) as it:
        for e in it:
            if _ENTRY_NAME.match(e.name):
                try:
                    entries.append((e.stat().st_mtime, e.path))
                except OSError:  # deleted meanwhile by another process
                    pass
    if len(entries) <= MAX_ENTRIES:
        return 0
    entries.sort()
    removed = 0
    for _, path in entries[:len(entries) - KEEP_ENTRIES]:
        try:
            os.remove(path)
            removed += 1
        except OSError:
            pass
    return removed


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode()).hexdigest()


# --------------------------------------------------------------------------- the backend's use
class Lookup:
    """One graph's trip through the cache, as the backend uses it: the key and the entry
    (None on a miss) at construction, :meth:`store` from AOTAutograd's ``fw_compiler``
    after a capture, :meth:`hit_failed` when compiling a hit raised. Never fails a
    compile: an unexpected error here is logged in one line and the graph is captured as
    without a cache (in ``strict`` mode it is raised); ``status`` is the report's line."""

    def __init__(self, gm: fx.GraphModule, full_inputs: Sequence[Any], example_inputs: Sequence[Any], opts: Any):
        self.key: str | None = None
        self.entry: Entry | None = None
        self.status = "off"
        self.n_inputs, self.strict = len(full_inputs), bool(getattr(opts, "strict", False))
        if not enabled(opts):
            return
        try:
            self.key = key_of(gm, full_inputs)
            fake_mode = compat.detect_fake_mode(example_inputs)
            if fake_mode is not None:
                self.entry = load(self.key, fake_mode, [compat.fake_input(fake_mode, t) for t in full_inputs])
        except Uncacheable as exc:
            self.key, self.status = None, f"not cached: {exc}"
        except Exception as exc:
            self._unexpected("lookup", exc)

    def store(self, aten_gm: fx.GraphModule) -> str:
        """Keep AOTAutograd's captured ``aten_gm`` for the next compile; the status line."""
        if self.key is None:
            return self.status
        plan = compat.aot_output_plan(self.n_inputs)
        if plan is None:
            return ("not cached: AOTAutograd's runtime wrapper does more than llmopt replays (aliased outputs, "
                    "mutations outside the graph, subclasses or RNG state)")
        try:
            store(self.key, aten_gm, plan)
        except Uncacheable as exc:
            return f"not cached: {exc}"
        except OSError as exc:  # a full disk or a read-only cache directory is no error of the model
            log.warning("llmopt: capture cache entry not written (%s)", one_line_error(exc))
            return f"not cached: the entry could not be written ({one_line_error(exc)})"
        except Exception as exc:
            self._unexpected("store", exc)
            return self.status
        return "stored"

    def hit_failed(self, exc: BaseException) -> None:
        log.warning("llmopt: compiling the cached capture failed, capturing again: %s", one_line_error(exc))
        self.entry, self.key = None, None
        self.status = f"not used: compiling the cached capture failed ({one_line_error(exc)})"

    def _unexpected(self, what: str, exc: Exception) -> None:
        if self.strict or compat.is_dynamo_control_flow(exc):
            raise exc
        log.warning("llmopt: capture cache %s failed, capturing without it: %s", what, one_line_error(exc))
        self.key, self.entry = None, None
        self.status = f"not cached: the {what} failed ({one_line_error(exc)})"


# --------------------------------------------------------------------------- the call
def runtime_call(compiled: Callable, lifted: Sequence[torch.Tensor], plan: dict[str, list]) -> Callable:
    """What a hit returns to Dynamo in place of AOTAutograd's wrapper: the compiled (boxed)
    graph called on the lifted module state and the graph's inputs, the inputs it writes in
    place given a new version, and each output that *is* an input returned as that input."""
    lifted = list(lifted)
    versions = list(plan["versions"])
    aliased = [(j, i) for j, i in enumerate(plan["outputs"]) if i is not None]

    def forward(*args):
        full = [*lifted, *args]
        same = [(j, full[i]) for j, i in aliased]  # before the call: a boxed callee may clear ``full``
        if versions:
            _increment_versions(tuple(full[i] for i in versions))
        outs = compiled(full)
        if same:
            outs = list(outs)
            for j, t in same:
                outs[j] = t
        return outs

    return forward


# Whether torch.autograd.graph.increment_version takes several tensors in one call (newer
# torch; 1.4 us for 24 KV-cache tensors where a call each takes 6 us, per decode step).
_INCREMENT_MANY = True


def _increment_versions(tensors: tuple) -> None:
    global _INCREMENT_MANY
    if _INCREMENT_MANY:
        try:
            torch.autograd.graph.increment_version(tensors)
            return
        except TypeError:  # an older torch: one tensor per call (it rejects the tuple before bumping any)
            _INCREMENT_MANY = False
    for t in tensors:
        torch.autograd.graph.increment_version(t)
