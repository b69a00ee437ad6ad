"""Every private PyTorch API llmopt touches, version-gated, in one place.

llmopt supports torch 2.6 through 2.13. Public APIs come first; where only a private one
does the job (AOTAutograd capture, Inductor as inner executor, Dynamo's marks on module
state), it is wrapped here so that a change in a new torch release is fixed in one file.
``tests/test_compat.py`` exercises each wrapper on the installed version.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import contextlib
import functools

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def aot_inference_capture(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    fw_compiler: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable],
) -> Callable:
    """Lower a Dynamo graph to a functionalized ATen inference graph and compile it.

    ``fw_compiler(aten_gm, fake_inputs)`` receives the graph whose placeholders are, in
    order, the Dynamo graph's inputs (parameters and buffers of inlined modules included),
    and returns a *boxed* callable (``fn(list_of_args)`` with ``fn._boxed_call = True``).
    Input mutations (KV caches written in place) are kept in the graph as ``copy_`` into
    the placeholder (``keep_inference_input_mutations``), so the cache stays an input.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=fw_compiler,
        inference_compiler=fw_compiler,
        keep_inference_input_mutations=True,
    )


def module_state_kind(t: Any) -> str | None:
    """How Dynamo marked a graph input: ``"unguarded"`` for parameters/buffers of an
    inlined ``nn.Module``, ``"guarded"`` for ``mark_static_address`` (e.g. HF StaticCache
    tensors), ``None`` for ordinary inputs."""
    if not isinstance(t, torch.Tensor):
        return None
    return getattr(t, "_dynamo_static_input_type", None)


def graph_input_sources(gm: torch.fx.GraphModule) -> list[str | None]:
    """Dynamo's source name of each input of its graph (``L['self']._modules['lm_head']
    ._parameters['weight']``), None where it recorded none. Reads the private
    ``meta["grapharg"]`` Dynamo attaches to placeholders."""
    names: list[str | None] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
        name = name() if callable(name) else name
        names.append(name if isinstance(name, str) else None)
    return names


def inductor_compile(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cudagraphs: bool = False,
    static_input_idxs: Sequence[int] = (),
    decompositions: dict | None = None,
    decompose: Callable[[torch.fx.GraphModule, Sequence[Any], dict], torch.fx.GraphModule] | None = None,
) -> Callable:
    """Compile an ATen inference graph with Inductor; returns a boxed callable.

    ``cudagraphs`` replays the compiled graph from CUDA graphs (Inductor's cudagraph
    trees); ``static_input_idxs`` are inputs whose address never changes (KV caches marked
    with ``mark_static_address``), which the replay then reads in place instead of copying.
    ``decompositions`` (op overload -> function) are applied on top of Inductor's own when
    the graph is retraced: llmopt ops named there are inlined as ATen (on CPU,
    ``codegen.cpu_decompositions``), the others stay extern calls. ``decompose(gm, inputs,
    table)`` applies the table (default: ``make_fx`` retraces the whole graph;
    ``llmopt.decompose.decompose`` retraces only the nodes that need it).
    """
    from torch._inductor.compile_fx import compile_fx_inner

    # Frozen weights are real tensors in a graph otherwise traced with fake ones; Inductor's
    # own freezing lets the fake mode accept them the same way.
    fake_mode = detect_fake_mode(example_inputs)
    previous = getattr(fake_mode, "allow_non_fake_inputs", None)
    if fake_mode is not None:
        fake_mode.allow_non_fake_inputs = True
    try:
        # Inductor expects its own decompositions applied (AOT would have done it had
        # Inductor been the backend): retrace the rewritten graph with them. llmopt ops
        # have no decomposition and stay intact as extern calls.
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        table = dict(select_decomp_table())
        table.update(decompositions or {})
        if decompose is not None:
            gm = decompose(gm, example_inputs, table)
        else:
            gm = make_fx(gm, decomposition_table=table)(*example_inputs)
        _constants_by_reference(gm)
        # is_inference: the graph has no backward. Without it cudagraph trees record in
        # forward mode, expect a backward that never comes, and never reach their replay
        # fast path; the post-grad passes also assume training.
        kwargs = {"is_inference": True}
        if cudagraphs:
            from torch._inductor.utils import BoxedBool

            kwargs.update(cudagraphs=BoxedBool(True), static_input_idxs=list(static_input_idxs))
        compiled = compile_fx_inner(gm, list(example_inputs), **kwargs)
    finally:
        if fake_mode is not None:
            fake_mode.allow_non_fake_inputs = previous
    if getattr(compiled, "_boxed_call", False) or not callable(getattr(compiled, "forward", None)):

        def run(args):
            return compiled(list(args))

    else:  # pragma: no cover - older torch returned an unboxed callable

        def run(args):
            return compiled(*args)

    run._boxed_call = True
    return run


def _constants_by_reference(gm: torch.fx.GraphModule) -> None:
    """Make Inductor read the graph's constants (frozen weights) in place, never a copy.

    Inductor's FX graph cache otherwise hashes every constant's values (``tolist()`` of the
    whole model) and, on a cache hit, runs on the copies stored in the cache: double the
    weight memory, and in-place writes to the weights would not reach the graph. Tagged as
    frozen parameters (what Inductor's own freezing does), constants are keyed by metadata
    only and looked up by name on this module when the compiled graph is loaded."""
    from torch._inductor.freezing_utils import record_has_frozen_params

    _flat_constant_names(gm)
    for _, tensor in gm.named_buffers():
        tensor._is_frozen_param = True
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor):
            value._is_frozen_param = True
    record_has_frozen_params(gm)


def _flat_constant_names(gm: torch.fx.GraphModule) -> None:
    """Point every ``get_attr`` of a submodule's tensor (``llmopt_qlinear_<layer>.qdata``,
    what the quantize passes register) at a top-level alias of the same tensor.

    On an FX graph cache hit, Inductor (up to 2.13 at least) looks each frozen constant up
    with a flat ``getattr(gm, name)``, which fails for a dotted name: every warm compile
    of a quantized model raised ``AttributeError`` there and fell back to the aten
    executor. The alias is the same tensor (no copy); only this executor's graph (the
    decomposed copy) changes, not the module the passes built."""
    aliases: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        if node.target not in aliases:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                continue
            flat = node.target.replace(".", "_")
            while hasattr(gm, flat):
                flat += "_"
            object.__setattr__(gm, flat, value)  # a plain attribute, as Inductor's freezing makes them
            aliases[node.target] = flat
        node.target = aliases[node.target]
    if aliases:
        gm.recompile()


def is_op_overload(target: Any) -> bool:
    """Whether an FX node's target is a dispatcher op overload (``aten.mm.default``, an
    llmopt op), rather than a Python function or a higher-order op."""
    return isinstance(target, torch._ops.OpOverload)


def has_composite_implicit_kernel(op: Any) -> bool:
    """Whether ``op`` (an ATen op overload) has a ``CompositeImplicitAutograd`` kernel: a
    trace below autograd (``make_fx``) records its parts, never the op itself."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    # A Python kernel (``op.py_impl``) counts too: make_fx traces with the Python dispatcher.
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key) or key in getattr(op, "py_kernels", {})


def custom_op_python_impl(op: Any, device_type: str) -> Callable | None:
    """The Python function a ``torch.library.custom_op`` runs on ``device_type``, or None.

    The aten executor on CPU calls it directly instead of going through the dispatcher and
    the custom-op wrapper (about 60 us per call on torch 2.13, as much as the op itself for
    decode-sized tensors): what runs is exactly what the dispatcher would run. Uses the
    private ``torch._library.custom_ops.OPDEFS`` registry (torch >= 2.4): the kernel given to
    ``register_kernel(device_type)`` if any, else the decorated function. None when the
    registry or the op is not there (then the op is called as usual).
    """
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    schema = getattr(op, "_schema", None)
    if schema is None or getattr(schema, "overload_name", "") not in ("", "default"):
        return None
    opdef = OPDEFS.get(schema.name)
    if opdef is None:
        return None
    fn = getattr(opdef, "_backend_fns", {}).get(device_type) or getattr(opdef, "_init_fn", None)
    return fn if callable(fn) else None


def detect_fake_mode(inputs: Sequence[Any]):
    """The FakeTensorMode the inputs of a compiled graph live in, or None."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(inputs)


def list_dynamo_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends()


def reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def maybe_mark_dynamic(t: torch.Tensor, dims: Sequence[int]) -> None:
    """Hint Dynamo that these dims of ``t`` vary between calls (compile them symbolic from the
    first graph that sees ``t``, unless the graph pins them); no effect outside torch.compile."""
    import torch._dynamo

    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(t, dim)


def graph_break_reasons() -> Any:
    """Dynamo's explanation object for a function (graph count, break reasons)."""
    import torch._dynamo

    return torch._dynamo.explain


def skipped_data_dependent_loops() -> int:
    """Frames Dynamo has run eagerly so far (this process, since its last reset) because a
    data-dependent ``nonzero`` (``torch.where(mask)``) broke the graph inside a loop: the
    per-expert MoE loop of transformers 4.4x. Read from Dynamo's ``unimplemented`` counter,
    whose keys are its graph-break messages (matched on the op and on "loop")."""
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters.get("unimplemented", {}).items()
               if "nonzero" in reason and "loop" in reason)


def statically_true(expr: Any) -> bool:
    """True when a (possibly symbolic) boolean is known true without adding a guard."""
    if isinstance(expr, bool):
        return expr
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(expr))


def size_hint(value: Any) -> int | None:
    """A concrete value for a size: the int itself, or the example value Dynamo traced a
    ``SymInt`` with (its hint); None when there is none (an unbacked size)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else None
    return None


def real_tensor_mode():
    """Context manager that suspends the active FakeTensorMode.

    The compiler of an AOT graph runs with fake tensors active; computing on frozen
    constants (concatenating, transposing, quantizing weights) needs real tensors.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def explain_graph_breaks(fn: Callable, args: Sequence[Any] = (), kwargs: dict | None = None) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` once under Dynamo's ``explain`` and return its findings.

    Returns ``{"graph_count", "graph_break_count", "break_reasons": [{"reason",
    "location", "stack"}], "ops_per_graph": [int]}`` as plain data. Dynamo traces with its
    own recording backend (the ops run eagerly, nothing is optimized); ``explain`` resets
    Dynamo's caches before and after, so compiled functions recompile on their next call.
    """
    import torch._dynamo

    out = torch._dynamo.explain(fn)(*args, **(kwargs or {}))
    breaks = []
    for reason in out.break_reasons:
        frames = list(getattr(reason, "user_stack", None) or [])
        stack = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]
        breaks.append({"reason": str(reason.reason).strip(), "location": stack[-1] if stack else "", "stack": stack})
    return {
        "graph_count": int(out.graph_count),
        "graph_break_count": int(out.graph_break_count),
        "break_reasons": breaks,
        "ops_per_graph": [len(ops) for ops in (out.ops_per_graph or [])],
    }


class _RecompileRecorder:
    """Collects Dynamo's "Recompiling function ..." messages (with the failed guards)."""

    def __init__(self) -> None:
        import logging

        self.messages: list[str] = []
        self.available = False
        self._saved: list[tuple[Any, int, bool]] = []
        self._enabled_here = False
        recorder = self

        class _Handler(logging.Handler):
            def emit(self, record):  # noqa: D401 - logging API
                recorder.messages.append(record.getMessage())

        self._handler = _Handler(level=logging.DEBUG)

    def __enter__(self) -> "_RecompileRecorder":
        import logging

        try:
            import torch._dynamo.guards  # noqa: F401 - registers the artifact logger
            from torch._logging import _internal

            state = _internal.log_state
            qnames = [q for q in _internal.log_registry.artifact_log_qnames if q.endswith(".__recompiles")]
        except (ImportError, AttributeError):
            return self  # this torch names things differently: no messages, available=False
        if not qnames:
            return self
        for qname in qnames:
            logger = logging.getLogger(qname)
            self._saved.append((logger, logger.level, logger.propagate))
            logger.addHandler(self._handler)
            logger.setLevel(logging.DEBUG)
            # Ours alone: do not also print them unless the user asked (TORCH_LOGS).
            if not state.is_artifact_enabled("recompiles"):
                logger.propagate = False
        if not state.is_artifact_enabled("recompiles"):
            state.enable_artifact("recompiles")
            self._enabled_here = True
        self._state = state
        self.available = True
        return self

    def __exit__(self, *exc) -> None:
        for logger, level, propagate in self._saved:
            logger.removeHandler(self._handler)
            logger.setLevel(level)
            logger.propagate = propagate
        if self._enabled_here:
            self._state.artifact_names.discard("recompiles")
        self._saved.clear()


def recording_recompiles() -> _RecompileRecorder:
    """Context manager collecting Dynamo's recompilation messages while active.

    ``with recording_recompiles() as rec: ...`` then ``rec.messages`` lists one message per
    recompilation (function, file:line and the guards that failed); ``rec.available`` is
    False on a torch whose logging internals differ (then no messages are collected).
    """
    return _RecompileRecorder()


# Dynamo's config flag that lets it trace data-dependent output shapes (``nonzero``,
# ``torch.where`` of one argument) into the graph instead of breaking it; llmopt only names
# it in user messages (a per-expert MoE loop is traced whole with it set).
DYNAMIC_OUTPUT_SHAPES_FLAG = "torch._dynamo.config.capture_dynamic_output_shape_ops"


def dynamo_control_flow_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions with which Dynamo steers its own tracing (restart the analysis with other
    settings, skip a frame). A backend must let them propagate: catching one as a failure
    runs the graph unoptimized for no reason (``dynamic=True`` raises
    ``TensorifyScalarRestartAnalysis`` from inside AOTAutograd)."""
    import torch._dynamo.exc as dynamo_exc

    names = ("RestartAnalysis", "SkipFrame", "ResetRequired", "RecompileError")
    return tuple(c for c in (getattr(dynamo_exc, n, None) for n in names) if isinstance(c, type))


def is_dynamo_control_flow(exc: BaseException) -> bool:
    """True when ``exc`` is one of Dynamo's control-flow exceptions (never swallow it)."""
    return isinstance(exc, dynamo_control_flow_exceptions())


def functional_collectives() -> Any:
    """The traceable collectives of ``torch.distributed._functional_collectives`` as ATen
    ops: ``(all_reduce, all_gather_into_tensor, wait_tensor)`` (``broadcast(x, src,
    group_name)`` through :func:`functional_broadcast`).

    ``all_reduce(x, "sum", group_name)`` and ``all_gather_into_tensor(x, world_size,
    group_name)`` return a tensor that ``wait_tensor`` completes; Dynamo, AOTAutograd and
    Inductor all know them (gpt-fast's tensor parallelism relies on the same ops), so a
    sharded decode step stays one graph. The ``_c10d_functional`` namespace is private.
    """
    import torch.distributed._functional_collectives  # noqa: F401 - registers the ops

    ops = torch.ops._c10d_functional
    return ops.all_reduce.default, ops.all_gather_into_tensor.default, ops.wait_tensor.default


def functional_broadcast() -> Any:
    """``_c10d_functional.broadcast(x, src, group_name)`` (complete it with ``wait_tensor``)."""
    import torch.distributed._functional_collectives  # noqa: F401 - registers the ops

    return torch.ops._c10d_functional.broadcast.default


def mark_static_address(t: torch.Tensor) -> None:
    """Tell Dynamo that ``t`` keeps its address across calls (a preallocated KV buffer), so a
    compiled graph reads it in place and CUDA graphs do not copy it."""
    torch._dynamo.mark_static_address(t)


def is_traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced rather than computed: a fake tensor, or a call made
    under ``make_fx``'s proxy mode (Inductor's retrace in :func:`inductor_compile` runs the
    CPU decompositions that way). Code with a traced and an eager form (the bf16 CPU GEMV:
    an expression for Inductor, a precompiled kernel when called) branches on it."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor):
        return True
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
    except ImportError:  # older builds: ask the dispatch-mode stack directly
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    return get_proxy_mode() is not None


def inductor_generated_code(fn: Callable, *args: Any) -> tuple[Any, list[str]]:
    """``fn(*args)`` and the source of every graph Inductor compiled during the call
    (``torch._inductor.utils.run_and_get_code``): what tests read to check what a CPU
    decomposition became (an indirect load inside a reduction, no gathered copy)."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn, *args)


@functools.lru_cache(maxsize=None)
def cpu_grouped_mm(dtype: torch.dtype) -> Callable | None:
    """``torch._grouped_mm`` (``(x [S, K], w [G, K, N], offs [G] int32) -> [S, N]``, rows
    ``offs[g-1]:offs[g]`` times ``w[g]``: the matmuls of all groups in one call, no host
    sync) where it runs eagerly on CPU tensors of ``dtype``, else None (the caller loops
    over the groups). Probed once per dtype on a tiny call: CPU support arrived in later
    2.x releases. Not for traced code: Inductor's meta function accepts bf16 only."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None
    # Strides must be multiples of 16 bytes (the caller checks its own sizes).
    x, w = torch.ones(3, 8, dtype=dtype), torch.ones(2, 16, 8, dtype=dtype).transpose(1, 2)
    try:
        y = fn(x, w, offs=torch.tensor([1, 3], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return fn if tuple(y.shape) == (3, 16) and bool((y == 8).all()) else None


def fake_tensor_mode() -> Any:
    """A fresh ``FakeTensorMode``: tensors made inside have shapes, dtypes and devices but
    no memory (the AOT GPU build check makes "CUDA" tensors with it on a CPU machine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` (oneDNN's linear, the op Inductor's
    CPU freezing lowers linears to) exists in this build: torch built with mkldnn, on x86
    or arm64 with oneDNN. Present on every supported torch (2.6-2.13) built that way.
    Looked up once: it is a fact of the build, asked at every CPU linear call."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN on a plain (strided, unpacked) ``weight [N, K]``.

    Why: on CPU, for the few rows of decode (M = 1..8), oneDNN's kernel streams the weight
    at about twice the bandwidth of ``F.linear`` (MKL sgemm) in fp32 on the CI machine
    (``benchmarks/bench_linear.py``), with no packed copy of the weight (a packed copy would
    hold it twice). ``torch.ops.mkldnn._linear_pointwise`` is Inductor's private op: its
    signature ``(x, w, b, attr, scalars, algorithm)`` has been stable from torch 2.0 to 2.13,
    and it has a meta kernel, so it traces under fake tensors.
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def compile_options(model: Any, backend: str = "llmopt") -> dict | None:
    """The ``options`` dict given to ``torch.compile(model, backend=backend, options=...)``
    for ``model`` (a ``torch.compile`` wrapper of a module or a function), ``{}`` when it was
    compiled with that backend and no options, None when it was not compiled with it.

    Dynamo keeps the backend behind a chain of wrappers (``OptimizedModule.dynamo_ctx`` →
    the frame callback → ``ConvertFrame`` → ``WrapBackendDebug`` → ``torch._TorchCompileWrapper``,
    whose ``kwargs`` hold the options); the chain differs across releases, so it is walked
    through every attribute that links one wrapper to the next, until the wrapper that names
    the backend.
    """
    ctx = getattr(model, "dynamo_ctx", None)
    start = getattr(ctx, "callback", None)
    if start is None:  # a compiled function: the context sits in its closure
        for cell in getattr(model, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if hasattr(value, "callback"):
                start = value.callback
                break
    seen, stack = set(), [start]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or len(seen) > 32:
            continue
        seen.add(id(obj))
        if getattr(obj, "compiler_name", None) == backend and isinstance(getattr(obj, "kwargs", None), dict):
            return dict(obj.kwargs.get("options") or {})
        for link in ("_torchdynamo_orig_backend", "_torchdynamo_orig_callable", "__wrapped__", "_inner_convert",
                     "compiler_fn"):
            stack.append(getattr(obj, link, None))
    return None


# --------------------------------------------------------------------------- capture cache
def aot_output_plan(n_inputs: int) -> dict[str, list] | None:
    """Inside the ``fw_compiler`` of :func:`aot_inference_capture`: what AOTAutograd's
    runtime wrapper does around the compiled graph, when it does almost nothing.

    ``outputs``: one entry per output, None (the graph's output is returned as is) or an
    input index (the output *is* that input, returned as the very input object).
    ``versions``: the inputs the graph writes in place whose version counter the wrapper
    bumps at each call (the compiled code writes them without autograd seeing it). None
    for the whole plan when the wrapper does more: an input mutation it replays outside the graph, an
    output that aliases an input or another output, deduplicated or synthetic-base inputs,
    tensor subclasses, functionalized RNG, effect tokens. Only a plain plan lets the
    capture cache (``llmopt/capture_cache.py``) skip AOTAutograd: it reads the private
    ``ViewAndMutationMeta`` AOTAutograd leaves on the tracing context."""
    try:
        from torch._functorch._aot_autograd.schemas import MutationType, OutputType
        from torch._guards import TracingContext
    except ImportError:
        return None
    meta = getattr(TracingContext.try_get(), "fw_metadata", None)
    if meta is None or len(getattr(meta, "input_info", ())) != n_inputs:
        return None
    if any(i.mutation_type not in (MutationType.NOT_MUTATED, MutationType.MUTATED_IN_GRAPH) for i in meta.input_info):
        return None
    if (getattr(meta, "num_intermediate_bases", 1) or getattr(meta, "tokens", None)
            or getattr(meta, "is_rng_op_functionalized", True)
            or any(type(m).__name__ == "SubclassCreationMeta" for m in getattr(meta, "subclass_inp_meta", None) or ())):
        return None
    plan: list[int | None] = []
    for out in meta.output_info:
        if out.output_type == OutputType.non_alias:
            plan.append(None)
        elif out.output_type == OutputType.is_input and isinstance(out.base_idx, int):
            plan.append(out.base_idx)
        else:
            return None
    versions = getattr(meta, "mutated_graph_handled_indices_seen_by_autograd", None)
    if versions is None:  # pragma: no cover - torch before the field: the same rule
        versions = [i for i, info in enumerate(meta.input_info) if info.mutation_type == MutationType.MUTATED_IN_GRAPH
                    and not getattr(info, "mutations_hidden_from_autograd", False)]
    return {"outputs": plan, "versions": [int(i) for i in versions]}


@contextlib.contextmanager
def aot_compile_context(fake_mode: Any) -> Iterator[None]:
    """The state AOTAutograd compiles a captured graph in (its ``fw_compiler`` runs inside
    it): ``fake_mode`` active, the Python dispatcher on when the mode has a shape
    environment, autograd's multithreading off, the RNG state restored afterwards. A capture
    cache hit compiles in the same state, so that what a pass or a decomposition traces
    there (``torch.arange`` inside a decomposition is fake, not a real constant) comes out
    the same as after a capture. A context manager: if entering one of the states raises,
    those entered before it are left again."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._dynamo.utils import preserve_rng_state

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autograd.set_multithreading_enabled(False))
        stack.enter_context(preserve_rng_state())
        stack.enter_context(fake_mode)
        if getattr(fake_mode, "shape_env", None) is not None:
            stack.enter_context(enable_python_dispatcher())
        yield


def inductor_cache_dir() -> str:
    """The directory Inductor keeps its on-disk caches in (``TORCHINDUCTOR_CACHE_DIR``,
    default ``<tmp>/torchinductor_<user>``); the capture cache lives under it, so that
    clearing Inductor's caches clears it too."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # pragma: no cover - older layouts
        try:
            from torch._inductor.runtime.runtime_utils import cache_dir
        except ImportError:
            import getpass
            import os
            import tempfile

            return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
                tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return cache_dir()


def caches_force_disabled() -> bool:
    """Whether Inductor was told to use no cache (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``)."""
    import torch._inductor.config as inductor_config

    return bool(getattr(inductor_config, "force_disable_caches", False))


def functorch_config_items() -> list[tuple[str, Any]]:
    """AOTAutograd's settings that are plain values, sorted (part of the capture cache's
    key: they shape the captured graph)."""
    import torch._functorch.config as functorch_config

    plain = (bool, int, float, str, type(None))
    items = functorch_config.get_config_copy().items()
    return sorted((k, v) for k, v in items if isinstance(v, plain))


def fake_input(fake_mode: Any, t: Any) -> Any:
    """``t`` as a static-shape fake tensor of ``fake_mode`` (Dynamo's, for a graph input)."""
    return fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t


def fx_tensor_metadata(t: torch.Tensor) -> Any:
    """The ``meta["tensor_meta"]`` FX's shape propagation gives a node of value ``t``."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    return _extract_tensor_metadata(t)


def operator_namespace(target: Any) -> str | None:
    """The namespace of a dispatcher operator an FX node calls (``"aten"`` for
    ``aten.mm.default`` or the packet ``aten.mm``, ``"higher_order"`` for a higher-order
    op), None for anything else (a Python function)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(getattr(target, "_qualified_op_name", "?::")).split("::")[0]
    if isinstance(target, torch._ops.OperatorBase):
        return str(getattr(target, "namespace", "?"))
    return None


@functools.lru_cache(maxsize=None)
def op_overload_parts(op: Any) -> tuple[str, str, str]:
    """``aten.mm.default`` as ``("aten", "mm", "default")``; :func:`resolve_op_overload`
    is its inverse."""
    name, overload = op.__name__.rsplit(".", 1)
    return op.namespace, name, overload


def resolve_op_overload(namespace: str, name: str, overload: str) -> Any:
    """The op overload ``torch.ops.<namespace>.<name>.<overload>``; AttributeError when
    this process has no such op (a library not loaded, another torch)."""
    op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if not is_op_overload(op):
        raise AttributeError(f"torch.ops.{namespace}.{name}.{overload} is not an op overload")
    return op


def any_autocast_enabled() -> bool:
    """Whether autocast is on for any device type (a captured graph then has its casts
    baked in, and AOTAutograd runs it with autocast off)."""
    fn = getattr(torch._C, "_is_any_autocast_enabled", None)
    if fn is not None:
        return bool(fn())
    return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()  # pragma: no cover


def fx_name_state(graph: torch.fx.Graph) -> dict[str, Any] | None:
    """The names an FX graph has handed out (erased nodes' included) and its counter per
    base name: what decides the name of the next node a pass creates (``getitem_7``)."""
    ns = getattr(graph, "_graph_namespace", None)
    used, counts = getattr(ns, "_used_names", None), getattr(ns, "_base_count", None)
    if not isinstance(used, set) or not isinstance(counts, dict):
        return None
    return {"used": sorted(used), "counts": dict(counts)}


def restore_fx_name_state(graph: torch.fx.Graph, state: dict[str, Any] | None) -> None:
    """Give a rebuilt graph the name state :func:`fx_name_state` read from the original, so
    that the nodes passes create get the same names (and Inductor's FX graph cache, which
    keys on the graph's code, finds the same graph)."""
    ns = getattr(graph, "_graph_namespace", None)
    if state is None or not isinstance(getattr(ns, "_used_names", None), set):
        return
    ns._used_names.update(state["used"])
    ns._base_count.clear()
    ns._base_count.update(state["counts"])


def fake_tensor_over_meta(fake_mode: Any, meta: torch.Tensor, device: torch.device) -> Any:
    """A fake tensor of ``fake_mode`` on ``device`` whose data is the meta tensor ``meta``
    (its storage shared with every other tensor over the same meta storage): 10 us, where
    a factory call under the mode is 50-140 us."""
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor(fake_mode, meta, device)


def make_graph_module(root: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule as ``make_fx`` makes one: inside Dynamo's compile a lazy one, whose
    Python code is generated on first call rather than at every ``recompile()`` (a pass
    pipeline recompiles many times)."""
    try:
        from torch.fx._lazy_graph_module import _make_graph_module
    except ImportError:  # pragma: no cover
        return torch.fx.GraphModule(root, graph)
    return _make_graph_module(root, graph)


def custom_op_fake_source(op: Any) -> str | None:
    """The source of the module holding the fake (meta) implementation of a
    ``torch.library.custom_op`` the graph calls, when the op stays one call in a captured
    graph (no ``CompositeImplicitAutograd`` kernel): then the capture depends on the op only
    through that implementation (its outputs' shapes and strides). None when the op is
    decomposed by a capture, is not a ``custom_op``, or its source cannot be read (the
    capture cache then does not cache the graph). Reads the private
    ``torch._library.custom_ops.OPDEFS`` registry."""
    import inspect

    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover
        return None
    qualname = getattr(op, "_qualified_op_name", None) or getattr(getattr(op, "_schema", None), "name", None)
    opdef = OPDEFS.get(qualname) if isinstance(qualname, str) else None
    fake = getattr(opdef, "_abstract_fn", None)
    overloads = [getattr(op, name) for name in op.overloads()] if hasattr(op, "overloads") else [op]
    if fake is None or any(has_composite_implicit_kernel(o) for o in overloads):
        return None
    try:
        return inspect.getsource(inspect.getmodule(fake))
    except (OSError, TypeError):
        return None
