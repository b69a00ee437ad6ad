"""The CUDA-path bugs of issue 17, each pinned by a test that runs on CPU.

Each test exercises the code a GPU would run — the CUDA config selection and pruning,
the launcher's device handling, the shared device functions — in Triton's interpreter or
with the CUDA pieces faked, since no session has a GPU. Each failed before its fix.
"""
from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
import triton
import triton.language as tl

from conftest import assert_close, count_allocations, poisoned

import llmopt.codegen.int4_weight_only as i4
from llmopt.codegen.quant_launch import autotune_configs
from llmopt.codegen.quant_packing import pack_int4
from llmopt.codegen import linear_tuning
from llmopt.codegen.device_math import apply_activation, tanh
from llmopt.tools.model_spec import PRESETS

GROUP_SIZES = (32, 64, 128, 256)


def _preset_linear_shapes():
    shapes = set()
    for preset in PRESETS.values():
        c = preset.config
        if "hidden_size" not in c or preset.encoder:
            continue
        h, heads = c["hidden_size"], c["num_attention_heads"]
        d = c.get("head_dim", h // heads)
        kv = c.get("num_key_value_heads", heads)
        shapes |= {((heads + 2 * kv) * d, h), (h, heads * d), (2 * c["intermediate_size"], h),
                   (h, c["intermediate_size"]), (c["vocab_size"], h)}
    return sorted(shapes)


# --------------------------------------------------------------------------- int4 group size 32
@pytest.mark.parametrize("n,k", _preset_linear_shapes())
def test_int4_config_selection_keeps_every_k_tile_inside_one_group(n, k):
    """For every preset shape, group size and row bucket, each config the CUDA autotuner
    would time has BLOCK_K dividing the group (it applies one group's scale to a tile);
    before the fix group 32 pruned every GEMV config and fell back to BLOCK_K 64."""
    for group in GROUP_SIZES:
        if k % group:
            continue
        for m_bucket in (1, 2, 4, 16, 64):
            for name in ("int4_gemv", "int4_gemm"):
                configs = autotune_configs(name, K=k, M_BUCKET=m_bucket, GROUP_SIZE=group)
                assert configs, (name, group, m_bucket)
                assert all(group % c["BLOCK_K"] == 0 for c in configs), (name, group, m_bucket, configs)


@pytest.mark.parametrize("m", [1, 2])
def test_int4_gemv_group_32_with_the_cuda_configs_matches_fp64(triton_kernels, m):
    """M <= 2 takes the GEMV; run it in the interpreter with each config CUDA would pick
    (narrowest tiles first, to stay fast) for group size 32."""
    n, k, group = 48, 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, k // group) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (n, k // group)).float()
    packed = pack_int4(q)
    x = torch.randn(m, k)
    truth = i4.int4_weight_only_linear_ref(x.double(), packed, scales.double(), zeros.double(), group)
    configs = autotune_configs("int4_gemv", K=k, M_BUCKET=m, GROUP_SIZE=group)
    for config in sorted(configs, key=lambda c: c["BLOCK_N"])[:2]:
        out = i4.int4_weight_only_linear_triton(x, packed, scales, zeros, group, config=config,
                                                out=poisoned((m, n), torch.float32))
        assert_close(out, truth, torch.float32, f"int4 GEMV group 32 with {config}")


def test_int4_rejects_a_config_that_straddles_groups(triton_kernels):
    packed = pack_int4(torch.zeros(16, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="straddles groups"):
        i4.int4_weight_only_linear_triton(torch.randn(1, 64), packed, torch.ones(16, 2), torch.zeros(16, 2), 32,
                                          config={"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2})


# --------------------------------------------------------------------------- time_configs
def test_time_configs_skips_a_failing_config_and_keeps_the_shape(monkeypatch, triton_kernels):
    """A config that fails with anything (here a compile-time error of a bad config) is
    skipped and reported; the shape keeps the timings of the others. Before the fix any
    error but OutOfResources dropped the whole shape."""
    monkeypatch.setattr(linear_tuning, "_require_cuda", lambda device: torch.device("cpu"))
    monkeypatch.setattr(linear_tuning, "cold_weight_copies",
                        lambda n, k, dtype, device: [torch.randn(n, k).to(dtype)])
    monkeypatch.setattr(linear_tuning, "cuda_time_us", lambda fn, warmup, rep: (fn(0), 1.0)[1])
    good = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
    bad = dict(good, BLOCK_K=24)  # not a power of two: the launcher raises ValueError
    failures = []
    timed = linear_tuning.time_configs("gemv", 32, 64, 1, torch.float32, "cuda", configs=[good, bad, None],
                                      warmup=0, rep=1, failures=failures)
    assert [c for c, _ in timed] == [good, None]
    assert len(failures) == 1 and failures[0][0] == bad and "ValueError" in failures[0][1]
    with pytest.warns(RuntimeWarning, match="failed"):
        timed = linear_tuning.time_configs("gemv", 32, 64, 1, torch.float32, "cuda", configs=[bad, good],
                                          warmup=0, rep=1)
    assert [c for c, _ in timed] == [good]


# --------------------------------------------------------------------------- Inductor / CUDA graphs
def _capture_inductor_kwargs(monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    seen = {}

    def spy(gm, example_inputs, **kwargs):  # no GPU (and no time for a C++ compile): run the graph
        seen.update(kwargs)

        def run(args):
            return gm(*args)

        run._boxed_call = True
        return run

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    return seen


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_inductor_compile_marks_the_graph_as_inference(monkeypatch, cudagraphs):
    """Without is_inference=True, cudagraph trees record in forward mode and wait for a
    backward that never comes: their replay fast path is never reached."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from llmopt import compat

    seen = _capture_inductor_kwargs(monkeypatch)
    x = torch.randn(2, 8)
    run = compat.inductor_compile(make_fx(lambda x: (x * 2,))(x), [x], cudagraphs=cudagraphs)
    assert seen["is_inference"] is True
    assert bool(seen.get("cudagraphs")) == cudagraphs
    torch.testing.assert_close(run([x])[0], x * 2)


@pytest.mark.parametrize("cuda_graphs,trees", [("auto", False), (False, False), (True, True)])
def test_one_cuda_graph_owner_per_executor(monkeypatch, cuda_graphs, trees):
    """The inductor executor on CUDA turns on Inductor's cudagraph trees only when asked
    (cuda_graphs=True); by default the llmopt runtime owns the graphs. Before the fix both
    captured ("auto" turned the trees on under the runtime's own capture)."""
    from llmopt import backend, compat
    from llmopt.options import Options
    from llmopt.report import CompileReport

    calls = []
    monkeypatch.setattr(compat, "inductor_compile",
                        lambda gm, inputs, cudagraphs=False, **_: calls.append(cudagraphs) or (
                            lambda args: [a * 2 for a in args]))
    report = CompileReport()
    run = backend._make_executor(None, [], "inductor", report, Options(cuda_graphs=cuda_graphs),
                                 torch.device("cuda"), [])
    assert calls == [trees]
    x = torch.ones(2)
    torch.testing.assert_close(run([x])[0], x * 2)
    if trees:
        # called while the runtime captures: a clear error, not a capture inside a capture
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with pytest.raises(RuntimeError, match="cuda_graphs=False"):
            run([x])


# --------------------------------------------------------------------------- shared device functions
@triton.jit
def _elementwise_kernel(x_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if FN == "tanh":
        y = tanh(x)
    else:
        y = apply_activation(x, FN)
    tl.store(out_ptr + offs, y, mask=mask)


def _truth(fn: str, x: torch.Tensor) -> torch.Tensor:
    """fp64 truth in forms that do not cancel in the tails (1 + erf and 1 + tanh would)."""
    x = x.double()
    if fn == "gelu":
        return x * 0.5 * torch.special.erfc(-x / math.sqrt(2.0))
    if fn == "gelu_tanh":
        return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))
    if fn == "silu":
        return x * torch.sigmoid(x)
    return torch.tanh(x)


TAILS = {
    "gelu": [(-12.0, -9.0), (-9.0, -6.0), (-6.0, -3.0), (-3.0, 3.0), (3.0, 12.0)],
    "gelu_tanh": [(-10.0, -6.0), (-6.0, -3.0), (-3.0, 3.0)],
    "silu": [(-80.0, -20.0), (-20.0, 20.0)],
    "tanh": [(-1e-3, 1e-3), (0.02, 0.2), (-0.2, -0.02), (-30.0, -1.0), (1.0, 30.0)],
}


@pytest.mark.parametrize("fn", sorted(TAILS))
def test_shared_device_functions_match_fp64_at_the_tails(triton_kernels, fn):
    for lo, hi in TAILS[fn]:
        x = torch.linspace(lo, hi, 61)
        out = poisoned((61,), torch.float32)
        _elementwise_kernel[(1,)](x, out, 61, FN=fn, BLOCK=64)
        assert_close(out, _truth(fn, x), torch.float32, f"{fn} on [{lo}, {hi}]")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gemv_gated_epilogue_is_precise_at_the_negative_tail(triton_kernels, activation):
    """The GEMV epilogue uses the shared GELU: before, its 1 + erf form lost every digit
    for very negative gates (relative error ~1 at -6, 100% at -9)."""
    from llmopt.codegen.gemv import gemv_triton

    for lo, hi in TAILS[activation][:2]:
        gate = torch.linspace(lo, hi, 32)
        weight = torch.cat([gate, torch.ones(32)])[:, None]  # K = 1: acc = the weight column
        out = gemv_triton(torch.ones(1, 1), weight, activation=activation, out=poisoned((1, 32), torch.float32))
        assert_close(out[0], _truth(activation, gate), torch.float32, f"GEMV {activation} on [{lo}, {hi}]")


def test_one_gelu_and_one_tanh_in_codegen():
    """Kernels import the device functions from llmopt/codegen/device_math.py; no copy."""
    import llmopt.codegen

    root = pathlib.Path(llmopt.codegen.__file__).parent
    for path in root.glob("*.py"):
        src = path.read_text()
        if path.name == "device_math.py":
            continue
        assert "tl.math.erf" not in src, f"{path.name}: use device_math.apply_activation (erfc form)"
        assert not re.search(r"^def _?(tanh|erfc\w*)\(", src, re.M), f"{path.name}: use device_math's tanh/erfc"


# --------------------------------------------------------------------------- multi-GPU device context
def test_every_launcher_launches_on_its_tensors_device():
    """Triton launches on the current CUDA device, not on the tensors': every launcher must
    make its tensors' device current. All launchers, driven by the GPU build check's
    exercises on fake ``cuda:1`` tensors, with each launch's current device recorded."""
    from llmopt.tools import gpu_build

    token = gpu_build.EXERCISE_DEVICE.set("cuda:1")
    try:
        launches, errors = gpu_build.collect_launches(gpu_build.TARGETS[90])
    finally:
        gpu_build.EXERCISE_DEVICE.reset(token)
    assert not errors
    wrong = sorted({f"{launch.module}.{launch.name} (from {launch.origin})"
                    for launch in launches if launch.current_device != 1})
    assert not wrong, f"launched on the current device instead of cuda:1: {wrong}"
    assert len({launch.name for launch in launches}) >= 20


# --------------------------------------------------------------------------- paged decode: plan once per step
def test_paged_decode_plans_once_per_step_and_runs_per_layer(monkeypatch):
    """Paged decode allocated its split workspaces (partial outputs and LSEs) in every layer at
    every step. On a faked H100 (132 SMs, fake CUDA tensors, launches recorded): the step's
    plan takes the decisions the launcher took (split count, kernel config) and allocates the
    one workspace; each of the L layers then launches with the plan's split count and
    allocates nothing."""
    from llmopt.tools import gpu_build
    from llmopt.codegen import attention_decode as ad
    from llmopt.codegen import attention_paged as ap

    target = gpu_build.TARGETS[90]
    b, hq, hkv, d, bs, width, layers = 2, 32, 8, 128, 16, 256, 4
    with gpu_build.recording(target) as recorder:
        plan = ap.plan_paged_decode(b, hq, hkv, d, width, bs, torch.bfloat16, "cuda")
        assert plan.num_splits == ad.decode_num_splits(b, hkv, width * bs, target.sm_count) > 1
        assert plan.config == ad.decode_heuristic_config(d, hq // hkv, torch.bfloat16, torch.device("cuda"))
        ws = plan.workspace
        # rows of 128 partial outputs + 1 LSE, padded to 16 floats
        assert ws.is_cuda and ws.dtype == torch.float32 and tuple(ws.shape) == (b, hq, plan.num_splits, 144)
        q = torch.empty(b, hq, 1, d, dtype=torch.bfloat16, device="cuda")
        pool = torch.empty(64, hkv, bs, d, dtype=torch.bfloat16, device="cuda")
        tables = torch.empty(b, width, dtype=torch.int32, device="cuda")
        lens = torch.empty(b, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        calls = count_allocations(monkeypatch, ap.__name__)
        for _ in range(layers):
            ap.paged_attention_decode_triton(q, pool, pool, tables, lens, 0.1, out=out, plan=plan)
        assert calls == [], "a planned layer allocates nothing"
        ap.paged_attention_decode_triton(q, pool, pool, tables, lens, 0.1, out=out)
        assert calls == ["empty"], "an unplanned call plans (and allocates) for itself"
    # the dense split kernel with PAGED=True (one decode kernel serves both KV layouts)
    splits = [launch for launch in recorder.launches
              if launch.name == "_decode_split_kernel" and launch.kwargs["PAGED"]]
    combines = [launch for launch in recorder.launches if launch.name == "_decode_combine_kernel"]
    assert len(splits) == len(combines) == layers + 1
    assert all(launch.args[10] == plan.num_splits for launch in splits)  # (…, S_max, num_splits, …)
    assert all(launch.kwargs["BLOCK_N"] == plan.config["BLOCK_N"] for launch in splits)
