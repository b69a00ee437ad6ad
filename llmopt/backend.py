"""The llmopt backend: capture → freeze → passes → execute.

``torch.compile(model, backend="llmopt", options={...})`` calls :func:`llmopt_backend`
with TorchDynamo's FX graph. We

1. validate the options (before any work, so a typo fails fast);
2. capture: AOTAutograd lowers the graph to a functionalized ATen inference graph; in-place
   updates of inputs (KV caches) stay in it as ``copy_`` into the input;
3. freeze: graph inputs that are module parameters/buffers and are not mutated become
   constants (``get_attr``), so passes may concatenate, re-layout and quantize them;
4. run the pass pipeline (``passes/``), recording everything in a ``CompileReport``;
5. execute with the inner executor: the FX module as is (``aten``) or Inductor for the
   rest (``inductor``); llmopt ops stay intact either way.

Frozen-weight contract (``frozen_weights``): each weight is held once — a merged or
re-laid-out constant becomes the storage and the module's parameters are rebound as views
into it, so in-place writes (``p.copy_``, ``p.data.copy_``, ``load_state_dict``) reach the
compiled graph. A weight whose value the compiler consumed (quantized) raises at the next
call when modified in place through the parameter; a replaced weight (``p.data = new``, a
new ``nn.Parameter``) always raises at the next call. Recompile after such a change
(``torch.compiler.reset()`` then call the compiled model again). A float weight the
graph reads only a quantized or sharded copy of is released after compiling
(``weight_release``; ``options={"release_weights": False}`` keeps it).

Only inference is optimized: a graph compiled with autograd recording (grad mode on and
inputs that require grad) runs unchanged, with a report entry saying so.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import capture_cache, compat, frozen_weights, heap_trim, weight_release
from .codegen.cpu_decompositions import cpu_decompositions, twin_calls
from .codegen.kernel_mode import kernel_mode
from .decompose import decompose
from .frozen_weights import FrozenWeights
from .graph import attr_value, count_ops, networkx_view, op_histogram, tensor_meta
from .options import Options
from .passes import PassContext, run_pipeline
from .passes.select_linear_kernel import resolve_tuning_table
from .report import CompileReport, clean_module_path, one_line_error, register_report

log = logging.getLogger("llmopt")

SUPPORTED_DEVICES = ("cpu", "cuda")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The executor chosen by inner="auto", per device; the measurement behind each choice is
# in the README ("Choosing the inner executor").
DEFAULT_EXECUTOR = {"cpu": "inductor", "cuda": "inductor"}
# Overrides the CPU choice of inner="auto" for a whole process: the test suite sets it to
# "aten" (Inductor's C++ compile of every test model would take the suite past its time
# budget) and runs the shipped default in tests/test_cpu_executor.py.
CPU_EXECUTOR_ENV = "LLMOPT_CPU_EXECUTOR"


def default_executor(device_type: str) -> str:
    """The executor ``inner="auto"`` picks on ``device_type``."""
    if device_type == "cpu" and os.environ.get(CPU_EXECUTOR_ENV):
        value = os.environ[CPU_EXECUTOR_ENV]
        if value not in ("aten", "inductor"):
            raise ValueError(f"{CPU_EXECUTOR_ENV}={value!r} is not an executor; use 'aten' or 'inductor' (or unset it)")
        return value
    return DEFAULT_EXECUTOR.get(device_type, "aten")


def llmopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Any = None, mode: str | None = None):
    """TorchDynamo backend entry point (registered as ``llmopt``)."""
    opts = Options.from_user(options, mode)
    lifted = _lifted_module_state(gm)
    full_inputs = [*lifted, *example_inputs]
    input_names = [*_lifted_module_names(gm), *_input_names(gm)]
    grad_recording = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in full_inputs
    )
    if grad_recording:
        why = "autograd is recording (grad mode on, inputs require grad)"
        remedy = "call the model under torch.no_grad() or torch.inference_mode()"
        weight_release.check_unoptimized_run(full_inputs, why, remedy)
        report = CompileReport(options=opts.to_dict(), executor="eager (dynamo graph)")
        report.fallback("whole graph", f"{why}: llmopt optimizes inference only; {remedy}")
        _finish_report(report, opts)
        _warn_unoptimized_once(f"llmopt: a graph compiled while {why} runs unoptimized (llmopt optimizes inference "
                               f"only); {remedy}. Said once per process; each such graph's report says it too.")
        return gm.forward

    capture_start = time.perf_counter()

    def compile_captured(aten_gm: fx.GraphModule, fake_inputs: Sequence[Any], cache_status: str) -> Callable:
        return compile_inference_graph(aten_gm, list(fake_inputs), full_inputs, len(lifted), opts, input_names,
                                       capture_seconds=time.perf_counter() - capture_start, capture_cache=cache_status)

    cached = capture_cache.Lookup(gm, full_inputs, example_inputs, opts)
    if cached.entry is not None:
        try:
            with compat.aot_compile_context(cached.entry.fake_mode):
                compiled = compile_captured(cached.entry.gm, cached.entry.fake_inputs, "hit")
        except Exception as exc:
            if opts.strict or compat.is_dynamo_control_flow(exc):
                raise
            cached.hit_failed(exc)  # then captured as if there were no entry
        else:
            heap_trim.trim_free_heap()
            return capture_cache.runtime_call(compiled, lifted, cached.entry.plan)

    def fw_compiler(aten_gm: fx.GraphModule, fake_inputs: Sequence[Any]):
        return compile_captured(aten_gm, fake_inputs, cached.store(aten_gm))  # stored before the passes rewrite it

    try:
        compiled = compat.aot_inference_capture(gm, example_inputs, fw_compiler)
    except Exception as exc:
        if opts.strict or compat.is_dynamo_control_flow(exc):
            raise
        weight_release.check_unoptimized_run(
            full_inputs, f"AOTAutograd could not capture it: {one_line_error(exc)}",
            "call torch.compiler.reset() and reload the model")
        report = CompileReport(options=opts.to_dict(), executor="eager (dynamo graph)")
        report.fallback("capture", f"AOTAutograd could not capture the graph: {type(exc).__name__}: {exc}")
        _finish_report(report, opts)
        log.warning("llmopt: capture failed, running the graph unoptimized (detail in llmopt.last_report()): %s",
                    one_line_error(exc))
        return gm.forward
    # The compile's freed native memory back to the OS before Dynamo builds its guards (the
    # next peak of the process); docs/memory.md has the measurement.
    heap_trim.trim_free_heap()
    return compiled


def _lifted_module_state(gm: fx.GraphModule) -> list[torch.Tensor]:
    # When Dynamo does not inline nn.Modules, parameters/buffers live on ``gm`` and
    # aot_module_simplified passes them first; mirror that order.
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    return [*params.values(), *buffers.values()]


def _input_names(gm: fx.GraphModule) -> list[str]:
    """The model path of each Dynamo graph input (``model.layers.0.mlp.up_proj.weight``),
    for error messages; the placeholder name where Dynamo recorded no source."""
    names = []
    for node, source in zip([n for n in gm.graph.nodes if n.op == "placeholder"], compat.graph_input_sources(gm)):
        path = clean_module_path(source) if source else ""
        for hop in ("_parameters.", "_buffers."):
            path = path.replace(hop, "")
        names.append(path or node.name)
    return names


def _lifted_module_names(gm: fx.GraphModule) -> list[str]:
    params = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    buffers = [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    return [*params, *buffers]


# Distinct sets of weight tensors one Dynamo graph is compiled for (see below).
MAX_WEIGHT_SETS = 64


def compile_inference_graph(
    gm: fx.GraphModule,
    fake_inputs: list[Any],
    real_inputs: list[Any],
    n_lifted: int,
    opts: Options,
    input_names: Sequence[str] = (),
    capture_seconds: float = 0.0,
    capture_cache: str = "",
) -> Callable:
    """Freeze, run the passes and pick the executor for one ATen inference graph.

    Dynamo may call one graph with *other* weight tensors than it was compiled with: the
    parameters of inlined modules are graph inputs it does not guard on, so a graph break
    inside a decoder layer (or an expert) makes every layer run the graph traced for the
    first, with that layer's own weights. The frozen graph holds the first set as constants, so each new set of
    weight tensor objects sharing none with a compiled set (another layer's) gets its own
    frozen compile of the same captured graph (a variant, looked up by tensor identity at
    each call, at most ``MAX_WEIGHT_SETS``). A set that shares some tensors with a compiled
    one is that model with weights replaced: its frozen-weight check raises, as the contract
    says (frozen_weights.py).

    The tuning table is resolved here, once for the graph and its variants, and handed to
    the passes in the ``PassContext``: each compile reads its own table and installs none
    process-wide (docs/linear_dispatch.md).

    ``capture_seconds`` (AOTAutograd's capture of ``gm``, or the capture cache's lookup on a
    hit) is counted in the first compile's report, as its ``capture`` phase, and
    ``capture_cache`` is the cache's status line (``CompileReport.capture_cache``)."""
    # Only read when the pass that uses it runs (a corrupt file warns only then).
    table = (resolve_tuning_table(opts, _device_and_dtypes(fake_inputs)[0])
             if opts.enabled("select_linear_kernel") else None)
    job = _FrozenCompile(fake_inputs, n_lifted, opts, tuple(input_names), table)
    pristine = _Pristine(gm) if opts.freeze else None
    first, positions = _compile_frozen(gm, real_inputs, job, capture_seconds, capture_cache)
    if pristine is None or not positions:
        return first

    def compile_variant(args):
        fn, _ = _compile_frozen(pristine.module(), list(args), job)
        return fn

    return _per_weight_set(first, positions, real_inputs, compile_variant)


def _copy_graph(gm: fx.GraphModule | fx.Graph) -> fx.Graph:
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm if isinstance(gm, fx.Graph) else gm.graph, {}))
    return graph


class _Pristine:
    """A captured graph as it was before freezing and the passes, for the compiles of other
    weight sets: a copy of its nodes and the tensors its ``get_attr`` nodes name. Cheaper
    than a ``GraphModule`` copy, whose Python code would be generated at every compile
    and used only when a second weight set comes (rarely)."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = _copy_graph(gm)
        self.attrs = {n.target: attr_value(gm, n.target) for n in self.graph.nodes if n.op == "get_attr"}

    def module(self) -> fx.GraphModule:
        return fx.GraphModule(self.attrs, _copy_graph(self.graph))


def _per_weight_set(first: Callable, positions: list[int], real_inputs: list[Any],
                    compile_variant: Callable[[list], Callable]) -> Callable:
    variants = [(tuple(real_inputs[i] for i in positions), first)]

    def run(args):
        for tensors, fn in variants:
            if all(args[i] is t for i, t in zip(positions, tensors)):
                return fn(args)
        for tensors, fn in variants:
            if any(args[i] is t for i, t in zip(positions, tensors)):
                # Some of a compiled set's own tensors with others swapped in: the user
                # replaced weights of that model, which its frozen-weight check reports.
                return fn(args)
        if len(variants) >= MAX_WEIGHT_SETS:
            raise RuntimeError(
                f"llmopt: one compiled graph was called with {MAX_WEIGHT_SETS + 1} different sets of weight "
                "tensors (each is compiled with its weights frozen); compile with options={'freeze': False} "
                "to read the weights at every call instead"
            )
        key = tuple(args[i] for i in positions)
        fn = compile_variant(args)
        variants.append((key, fn))
        return fn(args)

    run._boxed_call = True
    return run


@dataclass(frozen=True)
class _FrozenCompile:
    """What every frozen compile of one captured graph shares (the graph's first weight
    set and each variant): its fake inputs, options, input names and tuning table."""

    fake_inputs: list[Any]
    n_lifted: int
    opts: Options
    input_names: tuple[str, ...]
    tuning_table: Any


def _compile_frozen(gm: fx.GraphModule, real_inputs: list[Any], job: _FrozenCompile,
                    capture_seconds: float = 0.0, capture_cache: str = "") -> tuple[Callable, list[int]]:
    """One frozen compile: the callable and the call-input positions of its frozen weights."""
    fake_inputs, n_lifted, opts, input_names = job.fake_inputs, job.n_lifted, job.opts, job.input_names
    start = time.perf_counter()
    report = CompileReport(options=opts.to_dict())
    phases = _PhaseClock(report, start)
    if capture_seconds:
        report.compile_phases["capture"] = capture_seconds
    report.capture_cache = capture_cache
    device, dtypes = _device_and_dtypes(fake_inputs)
    report.device, report.dtypes = str(device), dtypes
    report.nodes_before = count_ops(gm)
    report.ops_before = op_histogram(gm)
    report.graph_before = networkx_view(gm)
    phases.lap("report")

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mutated = _mutated_placeholders(gm)
    report.mutated_inputs = [p.name for p in placeholders if p in mutated]

    weights = FrozenWeights()
    keep = list(range(len(placeholders)))
    if len(placeholders) != len(real_inputs):
        report.fallback("freeze", f"{len(placeholders)} graph inputs but {len(real_inputs)} call inputs; not freezing")
    elif opts.freeze:
        names = list(input_names) if len(input_names) == len(real_inputs) else [p.name for p in placeholders]
        keep = _freeze(gm, placeholders, real_inputs, n_lifted, mutated, names, weights)
        report.frozen_constants = len(weights.weights)
    frozen_weights.attach(gm, weights)
    phases.lap("freeze")

    kept_fake = [fake_inputs[i] for i in keep] if len(fake_inputs) == len(placeholders) else fake_inputs
    executor = opts.inner if opts.inner != "auto" else default_executor(device.type)
    unsupported = _unsupported(device, dtypes)
    if unsupported:
        report.fallback("passes", unsupported)
    else:
        ctx = PassContext(options=opts, report=report, device=device, example_inputs=kept_fake, executor=executor,
                          tuning_table=job.tuning_table)
        run_pipeline(gm, ctx)
    gm.recompile()
    phases.lap("passes")
    if weights.weights:
        released = weight_release.release(gm, weights.weights, weight_release.graph_tensors(gm), weights.reader,
                                          opts.release_weights)
        if released:
            report.notes.append(
                f"weights: {len(released)} released (their memory freed: the graph reads quantized or sharded "
                "copies; eager calls of their modules raise; options={'release_weights': False} keeps them)"
            )
        counts = weights.seal()
        report.notes.append(
            f"weights: {counts['frozen']} frozen; {counts['shared']} read in place by the graph (in-place "
            f"writes reach it), {counts['derived']} derived at compile time (in-place writes raise)"
        )
    phases.lap("freeze")

    static_idxs = [j for j, i in enumerate(keep) if i < len(real_inputs) and compat.module_state_kind(real_inputs[i])]
    inner = _make_executor(gm, kept_fake, executor, report, opts, device, static_idxs)
    phases.lap("executor")
    report.nodes_after = count_ops(gm)
    report.ops_after = op_histogram(gm)
    report.graph_after = networkx_view(gm)
    phases.lap("report")
    report.compile_seconds = phases.last - start + capture_seconds  # the phases add up to it
    _finish_report(report, opts)
    if opts.tensor_parallel is not None:
        from .runtime.distributed import guard_collectives

        inner = guard_collectives(inner, opts.tensor_parallel)
    return _frozen_call(inner, keep, weights, opts.check_weights), [w.index for w in weights.weights]


class _PhaseClock:
    """Adds the time since the previous lap to ``report.compile_phases[name]`` (a phase
    may come back: ``freeze`` before and after the passes, ``report`` at both ends)."""

    def __init__(self, report: CompileReport, start: float):
        self.report, self.last = report, start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        phases = self.report.compile_phases
        phases[name] = phases.get(name, 0.0) + now - self.last
        self.last = now


def _device_and_dtypes(inputs: list[Any]) -> tuple[torch.device, list[str]]:
    devices, dtypes = [], []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            devices.append(t.device)
            name = str(t.dtype).replace("torch.", "")
            if t.is_floating_point() and name not in dtypes:
                dtypes.append(name)
    device = next((d for d in devices if d.type != "cpu"), devices[0] if devices else torch.device("cpu"))
    return device, sorted(dtypes)


def _unsupported(device: torch.device, dtypes: list[str]) -> str | None:
    if device.type not in SUPPORTED_DEVICES:
        return f"device {device.type!r} is not supported by llmopt passes (supported: {', '.join(SUPPORTED_DEVICES)}); running unoptimized"
    names = {str(d).replace("torch.", "") for d in SUPPORTED_DTYPES}
    bad = [d for d in dtypes if d not in names and d != "float64"]
    if bad:
        return f"dtype(s) {bad} are not supported by llmopt passes (supported: {sorted(names)}); running unoptimized"
    return None


def _mutated_placeholders(gm: fx.GraphModule) -> set[fx.Node]:
    """Placeholders written in place by some op of the graph (e.g. KV caches)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        for arg, spec in zip(node.args, node.target._schema.arguments):
            if spec.alias_info is not None and spec.alias_info.is_write and isinstance(arg, fx.Node):
                out.add(_root(arg))
        for name, arg in node.kwargs.items():
            spec = next((a for a in node.target._schema.arguments if a.name == name), None)
            if spec is not None and spec.alias_info is not None and spec.alias_info.is_write and isinstance(arg, fx.Node):
                out.add(_root(arg))
    return out


def _root(node: fx.Node) -> fx.Node:
    # Follow views back to the tensor they alias (a write through a view writes the base).
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            break
        node = node.args[0]
    return node


def _freeze(gm, placeholders, real_inputs, n_lifted, mutated, names, weights: FrozenWeights) -> list[int]:
    keep = []
    for i, (ph, real) in enumerate(zip(placeholders, real_inputs)):
        is_state = isinstance(real, torch.Tensor) and (
            i < n_lifted or isinstance(real, torch.nn.Parameter) or compat.module_state_kind(real) == "unguarded"
        )
        if not is_state or ph in mutated or not isinstance(tensor_meta(ph), torch.Tensor):
            keep.append(i)
            continue
        name = "_frozen_" + "".join(c if c.isalnum() else "_" for c in ph.name)
        with compat.real_tensor_mode():
            gm.register_buffer(name, real.detach(), persistent=False)
        with gm.graph.inserting_before(ph):
            const = gm.graph.get_attr(name)
        const.meta = dict(ph.meta)
        ph.replace_all_uses_with(const)
        gm.graph.erase_node(ph)
        weights.add(i, names[i], real, name)
    # get_attr nodes must come after placeholders for readability; FX allows any order.
    gm.graph.lint()
    return keep


def _refuse_nested_capture(run: Callable) -> Callable:
    """Inductor's cudagraph trees own this graph's CUDA graphs: being called while another
    owner captures (llmopt.generate / Engine with CUDA graphs on) is an error, not a hang."""

    def guarded(args):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "this model was compiled with cuda_graphs=True and executor 'inductor', so Inductor's "
                "cudagraph trees own its CUDA graphs, and it is being captured by another CUDA graph "
                "(llmopt.generate / Engine capture the decode step); pass cuda_graphs=False to "
                "generate/Engine, or compile with cuda_graphs='auto' to let the runtime own the graphs"
            )
        return run(args)

    guarded._boxed_call = True
    return guarded


def _make_executor(gm, fake_inputs, executor, report, opts, device, static_idxs) -> Callable:
    report.executor = executor
    if executor == "inductor":
        # One CUDA-graph owner per executor (docs/executors.md): by default ("auto") the llmopt
        # runtime (generate, Engine) captures the whole decode step (runtime/cuda_graphs.py),
        # for both executors; Inductor's cudagraph trees only on cuda_graphs=True, and then the
        # runtime must not capture around them (a capture inside a capture breaks both).
        graphs = device.type == "cuda" and opts.cuda_graphs is True
        if graphs:
            report.notes.append("executor: CUDA graphs (Inductor cudagraph trees; run the runtime with "
                                "cuda_graphs=False)")
        try:
            run = compat.inductor_compile(gm, fake_inputs, cudagraphs=graphs, static_input_idxs=static_idxs,
                                          decompositions=_cpu_inductor_decompositions(gm, device.type),
                                          decompose=decompose)
            return _refuse_nested_capture(run) if graphs else run
        except Exception as exc:
            if opts.strict or compat.is_dynamo_control_flow(exc):
                raise
            report.fallback("executor", f"Inductor failed ({type(exc).__name__}: {exc}); using the aten executor")
            report.executor = "aten"

    module = gm
    if device.type == "cpu":
        module, direct = _call_python_impls(gm, "cpu")
        if direct:
            report.notes.append(f"executor: {direct} llmopt op call(s) run their CPU implementation directly "
                                "(no dispatcher round trip)")

    def run(args):
        return module(*args)

    run._boxed_call = True
    return run


def _cpu_inlined_ops(device_type: str) -> dict:
    """The llmopt ops both executors run as their ATen CPU code on ``device_type`` (op ->
    function): on CPU with the kernel mode left to llmopt, the CPU decompositions — what the
    ops run there, minus their contract checks (done when the graph was traced). Empty
    elsewhere, and when ``LLMOPT_KERNELS`` forces a kernel mode (the ops must then go
    through their own bodies)."""
    return cpu_decompositions() if device_type == "cpu" and kernel_mode() == "auto" else {}


def _cpu_inductor_decompositions(gm: fx.GraphModule, device_type: str) -> dict:
    """What the Inductor executor retraces ``gm``'s llmopt ops into on ``device_type``: the
    inlined ones (:func:`_cpu_inlined_ops`) as ATen, every other llmopt op of the graph as
    a call to its CPU twin (``codegen.cpu_decompositions.cpu_twin``: the same function
    without the custom-op wrapper). Empty off the CPU."""
    inlined = _cpu_inlined_ops(device_type)
    if device_type != "cpu":
        return inlined
    opaque = {node.target for node in gm.graph.nodes if node.op == "call_function"
              and getattr(getattr(node.target, "_schema", None), "name", "").startswith("llmopt::")}
    return {**twin_calls(opaque - set(inlined)), **inlined}


def _call_python_impls(gm: fx.GraphModule, device_type: str) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` whose llmopt op nodes call the Python function the dispatcher would
    run for them, and how many were redirected.

    Only for the aten executor, which runs the module as Python code anyway: the result is
    the same, minus the dispatcher and custom-op wrapper (about 60 us per call, which on
    CPU is as much as a decode-sized op itself). A copy, so that ``gm`` (what the report,
    the inspection tools and the tests read) still names the ops.
    """
    graph = _copy_graph(gm)
    count = 0
    direct = _cpu_inlined_ops(device_type)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if not getattr(getattr(node.target, "_schema", None), "name", "").startswith("llmopt::"):
            continue
        fn = direct.get(node.target) or compat.custom_op_python_impl(node.target, device_type)
        if fn is not None:
            node.target = fn
            count += 1
    if not count:
        return gm, 0
    return fx.GraphModule(gm, graph), count


def _frozen_call(inner: Callable, keep: list[int], weights: FrozenWeights, check_weights: bool) -> Callable:
    if not weights.weights and keep == list(range(len(keep))):
        return inner
    check = weights.checker() if check_weights and weights.weights else None

    def run(args):
        if check is not None:
            check(args)
        kept = [args[i] for i in keep]
        args.clear()
        return inner(kept)

    run._boxed_call = True
    run.llmopt_reader = weights.reader  # alive as long as this graph: it reads those storages
    return run


_WARNED: set[str] = set()


def _warn_unoptimized_once(message: str) -> None:
    """One log warning per process for a model that runs unoptimized for a reason the user
    controls (a training-mode call would otherwise be as slow as eager without a word)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _finish_report(report: CompileReport, opts: Options) -> None:
    register_report(report)
    if opts.log:
        print(report, file=sys.stderr)
