"""select_linear_kernel: each linear gets its kernels per M bucket, and its epilogue fused.

In decode a linear is a matrix-vector product (M = batch) bound by reading the weight;
in prefill it is a GEMM. FlashDecoding++ (Hong et al., 2023, §5) picks per weight shape
and per M between a GEMV, a "flat GEMM" and cuBLAS from an offline profile. This pass is
where that choice is made, once per linear, at compile time:

    y = aten.linear(x, w, b)            w: a frozen [N, K] constant
      →  y = llmopt.linear(x, w, b, None, "", "1:gemv,2:flat_gemm,...,64:mm,inf:mm")

The kernels string holds one kernel per M bucket (``min(next_pow2(M), 64)``, ``inf``
above); the op reads M at run time and launches that bucket's kernel, so one graph serves
prefill and decode without recompiling (docs/linear_dispatch.md). The choice per bucket is
``choose_kernels(table, device name, dtype, N, K)``: the tuning table's entry, else the
documented heuristic. Which table (``Options``):

* ``autotune="off"``: no table, the heuristic only;
* ``autotune="cached"`` (default): the table at ``tuning_table``, read for this compile
  only, else the default table (``get_active_table()``: ``$LLMOPT_CACHE_DIR/tuning.json``
  or the XDG cache, loaded lazily). Either way the tuned configs are baked into the
  kernels string (``1:gemv[BLOCK_N=16,...]``), so the graph launches the configs of the
  table it was compiled with, whatever is compiled or made active later;
* ``autotune="on"``: as ``cached``, and on CUDA every (shape, bucket) the table lacks is
  timed now (``tune_shape``, each kernel at its heuristic config, no config sweep; run
  ``llmopt autotune`` for the sweep), stored and saved.

The table is resolved once per compile by the backend (:func:`resolve_tuning_table`, also
for every weight-set variant of one graph) and reaches this pass as ``ctx.tuning_table``;
a compile never installs its table process-wide (``set_active_table`` is only for users
who call it). A ``PassContext`` built outside the backend (tests) carries no table, and
the pass resolves it the same way.

Every linear gets a :class:`~llmopt.report.KernelChoice` in the compile report
(``report.kernel_choices``): the kernels it runs and why as one line prefixed with its
shape (``N=... K=... dtype``), and the same as fields (N, K, dtype; per M bucket the
kernel, its config and the reason) that ``llmopt autotune`` reads.

Branch by ``ctx.device.type``:

* CPU (any non-CUDA device): a linear with a frozen weight becomes ``llmopt.linear`` with
  every bucket ``mm`` and its epilogue fused as in (a) and (b) below; the op's CPU
  implementation runs oneDNN's linear on the plain weight in fp32 (about twice
  ``F.linear``'s bandwidth at decode sizes; ``codegen/linear.py``), ``F.linear`` otherwise.
* CUDA: a linear whose kernels are all ``mm`` (tiny weights, fp64, ...) stays
  ``aten.linear`` too — the custom op would only hide it from Inductor. Any other becomes
  ``llmopt.linear``, with its epilogue fused where the graph allows:

  (a) gated activation — ``llmopt.gated_activation(y[..., 0:I], y[..., I:2I], act)`` over
      a merged ``[gate; up]`` linear (``N = 2 I``) whose output feeds only those two
      slices, which feed only that op → ``llmopt.linear(x, w, b, None, act, kernels)``
      (output width I): the ``[M, 2I]`` product is never written.
  (b) residual add — ``add(y, r)`` or ``add(r, y)`` (``alpha`` 1) where ``y`` (the
      linear, or the gated linear of (a)) has no other user, ``r`` has ``y``'s shape,
      dtype and device, and the sum neither broadcasts nor promotes →
      ``llmopt.linear(..., residual=r)``. Rounding: the Triton kernels add ``r`` to the
      fp32 accumulator and round once; eager rounds ``y`` first, then the sum (the ``mm``
      buckets keep eager's order). Both are within the tolerance table.

  A residual add that ``fuse_residual_norm`` already folded into
  ``llmopt.add_rms_norm(y, r, ...)`` / ``add_layer_norm`` (every residual add of a
  pre-norm decoder) is left there: moving it into the linear would turn
  ``linear + add_rms_norm`` into ``linear(residual) + rms_norm`` — two ops either way, one
  more rounding of ``h`` in eager's order changed, and the norm would re-read ``h``
  instead of having it in registers. Not strictly fewer ops, so not done.

Quantized linears (``llmopt.int8_weight_only_linear``, ``int4_weight_only_linear``,
``int4_weight_only_linear_cpu``, ``w8a8_linear``, from ``quantize_linears``) are left as
they are — they pick their own GEMV / GEMM by M — and are listed in the report with that
reason. A linear whose weight is not a frozen constant (``freeze=False``) stays
``aten.linear`` with a near-miss.

Testing on a machine without a GPU: the branch is keyed on ``ctx.device`` only, and the
device name is read through this module's ``device_name`` (the table key), so the tests run
this pass with a CUDA ``PassContext`` on a graph traced with CPU (fake) tensors and execute
the result on CPU, where ``llmopt.linear`` runs its reference or, with
``LLMOPT_KERNELS=triton``, the chosen Triton kernels in the interpreter.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from .. import compat
from ..codegen import linear as _linear  # noqa: F401  registers llmopt::linear
from ..codegen.tuning_table import (
    M_BUCKETS,
    TuningTable,
    choose_kernels,
    device_name,
    dtype_name,
    get_active_table,
    parse_kernels,
)
from ..codegen.kernels_spec import parse_kernel_configs
from ..codegen.linear_tuning import tune_shape
from ..graph import is_constant, real_tensors, tensor_meta
from ..report import BucketKernel

aten = torch.ops.aten

# The dtypes llmopt.linear's Triton kernels are built for (others: aten.linear stays).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
# The M at which autotune="on" times each bucket ("inf": a short prefill).
BUCKET_M = {"1": 1, "2": 2, "4": 4, "8": 8, "16": 16, "32": 32, "64": 64, "inf": 256}
QUANTIZED_LINEARS = ("int8_weight_only_linear", "int4_weight_only_linear", "int4_weight_only_linear_cpu",
                     "w8a8_linear")

_SHAPE_RE = re.compile(r"^N=(\d+) K=(\d+) (\w+)")


def shape_prefix(N: int, K: int, dtype) -> str:
    """``"N=12288 K=4096 bfloat16"``: how every kernel-choice reason of this pass starts."""
    return f"N={int(N)} K={int(K)} {dtype_name(dtype)}"


def parse_shape_prefix(reason: str) -> tuple[int, int, str] | None:
    """(N, K, dtype name) from a kernel-choice reason written by this pass, else None."""
    m = _SHAPE_RE.match(reason)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def run(gm: fx.GraphModule, ctx) -> int:
    on_cuda = ctx.device.type == "cuda"
    chooser = _Chooser(ctx) if on_cuda else None
    if not on_cuda and ctx.options.autotune == "on":
        ctx.report.notes.append(f"select_linear_kernel: autotune='on' times kernels on CUDA only; "
                                f"{ctx.device.type} runs the PyTorch op")
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            count += _select(gm, node, ctx, chooser)
        elif _quantized_name(node) is not None:
            ctx.report.kernel_choice(
                node, "quantized linear", _quantized_name(node),
                "quantized weights: the op picks its own GEMV / GEMM by M (not in the tuning table)",
            )
    if chooser is not None:
        chooser.finish()
    return count


def _quantized_name(node: fx.Node) -> str | None:
    name = getattr(getattr(node.target, "_schema", None), "name", "")
    short = name.removeprefix("llmopt::")
    return short if name.startswith("llmopt::") and short in QUANTIZED_LINEARS else None


# --------------------------------------------------------------------------- the choice
class _Chooser:
    """The table and device name for one compile, and autotune="on" timing of missing shapes."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.device_name = device_name(ctx.device)
        self.mode = ctx.options.autotune
        self.table = ctx.tuning_table if ctx.tuning_table is not None else resolve_tuning_table(ctx.options, ctx.device)
        self.tuned = 0
        self.tune_failed = None

    def kernels(self, N: int, K: int, dtype) -> tuple[str, dict[str, str]]:
        if self.mode == "on" and self.table is not None and dtype in KERNEL_DTYPES and self.tune_failed is None:
            self._tune_missing(N, K, dtype)
        return choose_kernels(self.table, self.device_name, dtype, N, K)

    def _tune_missing(self, N: int, K: int, dtype) -> None:
        for bucket in M_BUCKETS:
            if self.table.get(self.device_name, dtype, N, K, bucket) is not None:
                continue
            try:
                with real_tensors():  # the pass runs under the fake mode; timing needs real CUDA tensors
                    entry = tune_shape(N, K, BUCKET_M[bucket], dtype, self.ctx.device, sweep=False)
            except RuntimeError as exc:  # no usable GPU (e.g. a CPU-traced test graph)
                self.tune_failed = f"{type(exc).__name__}: {exc}"
                return
            self.table.put(self.device_name, dtype, N, K, bucket, entry)
            self.tuned += 1

    def finish(self) -> None:
        notes = self.ctx.report.notes
        if self.tune_failed is not None:
            notes.append(f"select_linear_kernel: autotune='on' could not time kernels ({self.tune_failed}); "
                         "missing shapes use the heuristic")
        if self.tuned:
            try:
                path = self.table.save()
                notes.append(f"select_linear_kernel: autotune='on' timed {self.tuned} (shape, M bucket) pairs, "
                             f"saved to {path}")
            except OSError as exc:
                notes.append(f"select_linear_kernel: autotune='on' timed {self.tuned} pairs but could not save the "
                             f"table ({exc}); they are used for this process only")


def resolve_tuning_table(options, device) -> TuningTable | None:
    """The tuning table one compile reads (``ctx.tuning_table``): None with
    ``autotune="off"`` or off CUDA (the heuristic, or the PyTorch op); the table at
    ``options.tuning_table``, loaded for this compile only (corrupt or foreign: empty, with
    a RuntimeWarning); else the default table, :func:`get_active_table`. Nothing is made
    process-wide: the configs a graph launches are baked into its kernels strings."""
    device = torch.device(device)
    if options.autotune == "off" or device.type != "cuda":
        return None
    if options.tuning_table is None:
        return get_active_table()
    return TuningTable.load(options.tuning_table, device_name=device_name(device))


def _describe(N: int, K: int, dtype, kernels: str, reasons: dict[str, str]) -> str:
    """Shape prefix, then runs of buckets sharing kernel and reason: ``1: gemv (why); 2-32: ...``."""
    choice = parse_kernels(kernels)
    groups: list[list] = []
    for bucket in M_BUCKETS:
        key = (choice[bucket], reasons.get(bucket, ""))
        if groups and groups[-1][0] == key:
            groups[-1][1].append(bucket)
        else:
            groups.append([key, [bucket]])
    parts = []
    for (kernel, reason), buckets in groups:
        span = buckets[0] if len(buckets) == 1 else f"{buckets[0]}-{buckets[-1]}"
        parts.append(f"M {span}: {kernel} ({reason})")
    return f"{shape_prefix(N, K, dtype)}; " + "; ".join(parts)


# --------------------------------------------------------------------------- one linear
def _select(gm: fx.GraphModule, lin: fx.Node, ctx, chooser: _Chooser | None) -> int:
    x, w = lin.args[0], lin.args[1]
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    xv, wv = tensor_meta(x), tensor_meta(w)
    if xv is None or wv is None or wv.dim() != 2:
        ctx.report.kernel_choice(lin, "linear", "mm", "no tensor metadata on x / weight: the PyTorch op")
        return 0
    N, K, dtype = int(wv.shape[0]), int(wv.shape[1]), xv.dtype
    prefix = shape_prefix(N, K, dtype)
    shape = {"N": N, "K": K, "dtype": dtype_name(dtype)}  # the report's structured fields
    if not is_constant(gm, w):
        ctx.report.kernel_choice(lin, "linear", "mm", f"{prefix}; weight is not a frozen constant: the PyTorch op",
                                 **shape)
        ctx.near_miss(lin, "weight is not a frozen constant (freeze=False or a computed weight): kept aten.linear")
        return 0
    bv = tensor_meta(b) if isinstance(b, fx.Node) else None
    if wv.dtype != dtype or (b is not None and (bv is None or bv.dtype != dtype)) or wv.device != xv.device:
        ctx.report.kernel_choice(lin, "linear", "mm", f"{prefix}; mixed dtypes/devices: the PyTorch op", **shape)
        ctx.near_miss(lin, f"x {dtype}, weight {wv.dtype}, bias {bv.dtype if bv is not None else None}: "
                           "llmopt.linear needs one dtype; kept aten.linear")
        return 0
    if chooser is None:
        kernels, reasons = CPU_KERNELS, {bucket: _cpu_reason(dtype, bucket, N, K) for bucket in M_BUCKETS}
    else:
        kernels, reasons = chooser.kernels(N, K, dtype)
    if chooser is not None and set(parse_kernels(kernels).values()) == {"mm"}:
        ctx.report.kernel_choice(lin, "linear", "mm", _describe(N, K, dtype, kernels, reasons), **shape,
                                 buckets=_bucket_kernels(kernels, reasons))
        return 0

    activation, gated, out = "", None, lin
    found = _gated_consumer(lin, N, ctx)
    if found is not None:
        gated, activation = found
        out = gated
    residual, add = _residual_add(out, ctx)

    target = torch.ops.llmopt.linear.default
    anchor = add if add is not None else out
    args = (x, w, b, residual, activation, kernels)
    with gm.graph.inserting_before(anchor):
        new = gm.graph.call_function(target, args)
    new.meta = {k: v for k, v in lin.meta.items() if k != "val"}
    new.meta["val"] = target(xv, wv, bv, tensor_meta(residual), activation, kernels)
    anchor.replace_all_uses_with(new)
    for node in (add, gated, *(list(gated.args[:2]) if gated is not None else []), lin):
        if node is not None and not node.users:
            gm.graph.erase_node(node)

    epilogue = [e for e in ("bias" if b is not None else "", f"gated {activation}" if activation else "",
                            "+ residual" if residual is not None else "") if e]
    detail = f"aten.linear [{prefix}] → llmopt.linear [{kernels}]"
    if epilogue:
        detail += ", epilogue: " + ", ".join(epilogue)
    ctx.rewrite(new, detail)
    ctx.report.kernel_choice(new, "linear", kernels, _describe(N, K, dtype, kernels, reasons), **shape,
                             buckets=_bucket_kernels(kernels, reasons))
    return 1


def _bucket_kernels(kernels: str, reasons: dict[str, str]) -> list[BucketKernel]:
    """The kernels string and its reasons as the report's per-bucket records."""
    configs = parse_kernel_configs(kernels)
    return [BucketKernel(bucket, kernel, dict(configs[bucket]) if configs.get(bucket) else None,
                         reasons.get(bucket, ""))
            for bucket, kernel in parse_kernels(kernels).items()]


# On CPU every bucket runs the op's CPU implementation (codegen.linear.linear_cpu); the
# rewrite still pays: the gated activation and the residual add fold into the op (fewer
# nodes for the aten executor's Python loop; one fused C++ epilogue under Inductor).
CPU_KERNELS = ",".join(f"{bucket}:mm" for bucket in M_BUCKETS)


def _cpu_reason(dtype, bucket: str, n: int | None = None, k: int | None = None) -> str:
    # A bucket's largest M; the GEMVs' limits are powers of two, so a bucket is all in or out.
    kernel = _linear.cpu_linear_kernel(dtype, int(bucket) if bucket.isdigit() else None, k, n)
    if kernel == "fp32_gemv":
        return (f"CPU: generated fp32 GEMV in the Inductor executor's code for K <= {_linear.FP32_GEMV_MAX_K} "
                f"(or K <= {_linear.FP32_GEMV_SMALL_MAX_K} and N*K <= {_linear.FP32_GEMV_SMALL_WEIGHT}), "
                "oneDNN linear on the plain weight otherwise and when the op is called")
    if kernel == "onednn":
        return "CPU: oneDNN linear on the plain weight"
    if kernel == "bf16_gemv":
        if bucket.isdigit() and int(bucket) > _linear.BF16_GEMV_MAX_M:
            return ("CPU: generated bf16 GEMV in the Inductor executor's code (streams the weight once, fp32 "
                    "accumulation), the PyTorch op when the op is called")
        return "CPU: generated bf16 GEMV (streams the weight once, fp32 accumulation)"
    return "CPU: the PyTorch op"


def _slice_range(node: fx.Node, source: fx.Node, width: int) -> tuple[int, int] | None:
    """(start, end) of ``node = source[..., start:end]`` along the last dim (step 1), else None."""
    if node.op != "call_function" or node.target != aten.slice.Tensor or node.args[0] is not source:
        return None
    sv = tensor_meta(source)
    if sv is None:
        return None
    names = ("self", "dim", "start", "end", "step")
    values = dict(dim=0, start=None, end=None, step=1)
    values.update(dict(zip(names[1:], node.args[1:])))
    values.update({k: v for k, v in node.kwargs.items() if k in values})
    dim, start, end, step = values["dim"], values["start"], values["end"], values["step"]
    if not all(isinstance(v, int) or v is None for v in (dim, start, end, step)) or step != 1:
        return None
    if dim % sv.dim() != sv.dim() - 1:
        return None
    start = 0 if start is None else (start + width if start < 0 else start)
    end = width if end is None else (end + width if end < 0 else min(end, width))
    return start, end


def _gated_consumer(lin: fx.Node, N: int, ctx) -> tuple[fx.Node, str] | None:
    """(gated_activation node, activation) when ``lin`` feeds only ``gated_activation(lin[..., :I], lin[..., I:])``."""
    gated = None
    for user in lin.users:
        for g in user.users:
            if g.op == "call_function" and g.target == torch.ops.llmopt.gated_activation.default:
                gated = g
    if gated is None:
        return None
    gate, up, activation = gated.args[0], gated.args[1], gated.args[2] if len(gated.args) > 2 else None
    half = N // 2
    if N % 2 or not isinstance(gate, fx.Node) or not isinstance(up, fx.Node):
        return None
    if _slice_range(gate, lin, N) != (0, half) or _slice_range(up, lin, N) != (half, N):
        ctx.near_miss(gated, f"gated activation does not read the halves [0:{half}] and [{half}:{N}] of "
                             f"{lin.name} (gate then up): not fused into the linear")
        return None
    if activation not in GATED_ACTIVATIONS:
        ctx.near_miss(gated, f"activation {activation!r} has no linear epilogue: not fused into the linear")
        return None
    others = [u.name for u in lin.users if u not in (gate, up)]
    others += [u.name for s in (gate, up) for u in s.users if u is not gated]
    if others:
        ctx.near_miss(gated, f"the gate/up product {lin.name} has other users ({', '.join(others)}): "
                             "gated activation not fused into the linear")
        return None
    return gated, activation


def _residual_add(out: fx.Node, ctx) -> tuple[fx.Node | None, fx.Node | None]:
    """(residual, add node) when ``out``'s only user is ``out + residual`` without broadcast or promotion."""
    if len(out.users) != 1:
        return None, None
    add = next(iter(out.users))
    if add.op != "call_function" or add.target != aten.add.Tensor or len(add.args) != 2:
        return None, None
    if add.kwargs.get("alpha", 1) != 1:
        return None, None
    a, c = add.args
    residual = c if a is out else a if c is out else None
    if not isinstance(residual, fx.Node) or residual is out:
        return None, None
    ov, rv, sv = tensor_meta(out), tensor_meta(residual), tensor_meta(add)
    if ov is None or rv is None or sv is None:
        return None, None
    if not (_same_shape(rv, ov) and _same_shape(sv, ov)):
        ctx.near_miss(add, f"residual add broadcasts ({tuple(rv.shape)} + {tuple(ov.shape)}): "
                           "not fused into the linear")
        return None, None
    if not (rv.dtype == ov.dtype == sv.dtype) or rv.device != ov.device:
        ctx.near_miss(add, f"residual add mixes dtypes ({ov.dtype} + {rv.dtype} → {sv.dtype}): "
                           "not fused into the linear")
        return None, None
    return residual, add


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(compat.statically_true(p == q) for p, q in zip(a.shape, b.shape))


__all__ = ["BUCKET_M", "parse_shape_prefix", "resolve_tuning_table", "run", "shape_prefix"]
