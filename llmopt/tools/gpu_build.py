"""Ahead-of-time GPU build check: every Triton kernel of ``llmopt/codegen`` compiled for
sm_80 (A100) and sm_90 (H100/H200) on a machine with no GPU.

Why: the kernel tests run in Triton's interpreter, which checks what a kernel computes but
not whether it compiles for a real GPU, fits its shared memory, spills registers or
vectorizes its weight loads. Triton compiles to PTX and cubin without a device
(``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
cc, 32))``), and the ``cuobjdump`` shipped in the Triton wheel reads a cubin's registers,
shared memory and LOCAL (spill) bytes. This module does that for every variant the
launchers can produce.

Where the variants come from: the launchers themselves. The check runs the real
``*_triton`` launchers on fake CUDA tensors (``FakeTensorMode``; no memory, no device) at
the shapes of the model presets (:mod:`llmopt.tools.model_spec`), with the device properties
of the target faked (SM count), and records each launch instead of running it: a
``@triton.jit`` launch records its exact arguments; an autotuned launch records every
config that survives the kernel's own pruning for those arguments. The signature and
specialization (pointer dtypes, divisibility by 16, ``== 1`` integers) are then derived by
Triton's own binder, as a real launch would, with tensors 16-byte aligned (allocations
are). A new constexpr in a launcher is therefore covered without editing this file, and a
``@triton.jit`` kernel that no exercise launches fails the check (a new kernel module,
e.g. ``moe*.py``, must add its exercise to :data:`EXERCISES`).

Coverage, a covering design rather than the product of every axis (thousands of builds,
hours on two cores): in bf16, the presets' dtype, every preset layer shape with the
launcher's own config and, for autotuned kernels, the smallest and the largest tile of
the pruned space; fp16 and fp32 at one shape; every flag value the launchers offer once.
``--full`` (``run_check(full_space=True)``) adds every config of each pruned space,
including the tuning sweep's (``linear_tuning.candidate_configs``). One build stands for
each (kernel, target, pointer dtypes, constexprs, warps, stages): the integer
specializations of the first shape that produced it stand for the others.

It fails on: a compile error; shared memory above the target (sm_80 164 KiB, sm_90 227
KiB); LOCAL (spill) bytes in a decode-path kernel (:data:`DECODE_PATH`); a
weight-streaming kernel (:data:`WEIGHT_STREAMING`) whose PTX has no 128-bit global load.

Compiled kernels are cached by Triton (keyed by source hash and options) in
``$LLMOPT_GPU_BUILD_CACHE`` (default ``~/.cache/llmopt/gpu_build``), so a rerun after a
small change compiles only what changed.

The mechanism (recording launches, Triton's specialization, compiling for a target,
reading resource usage and PTX) is :mod:`llmopt.tools.triton_aot`; this module holds what
is built (the targets, the presets, :data:`EXERCISES`), the rules, and the table.

Run: ``python -m llmopt.tools.gpu_build [--targets 80,90] [--jobs 2] [--table docs/gpu_build.md]``.
It must run without ``TRITON_INTERPRET`` (``@triton.jit`` then builds real kernels); the
test (tests/tools/test_gpu_build.py) runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from llmopt.codegen.locked_file import atomic_write_text

from .triton_aot import (
    BuildResult,
    Launch,
    Target,
    compile_all,
    discover_kernels,
    plan_build,
    recording,
    weight_bytes_per_thread,
)

TARGETS = {
    80: Target(80, "A100 (sm_80)", 108, 164 * 1024),
    90: Target(90, "H100/H200 (sm_90)", 132, 227 * 1024),
}

# Kernels on the per-token decode path: a spill there costs every generated token.
DECODE_PATH = frozenset({
    "_gemv_kernel", "_split_k_reduce_kernel", "_flat_gemm_kernel",
    "_int8_wo_gemv_kernel", "_int4_wo_gemv_kernel",
    "_decode_split_kernel", "_decode_combine_kernel",
    "_kv_append_kernel", "_rope_append_kernel", "_paged_kv_append_kernel",
    "decode_gate_up_kernel", "decode_down_kernel", "_moe_route_kernel",
})
# Kernels whose main loop streams a weight matrix: with a contiguous, 16-byte aligned
# weight the loads must be 128 bits wide, or the kernel cannot reach HBM bandwidth.
WEIGHT_STREAMING = frozenset({"_gemv_kernel", "_flat_gemm_kernel", "_int8_wo_gemv_kernel", "_int4_wo_gemv_kernel"})

# The presets whose shapes the check builds for (GPU-sized models plus one tiny one for
# the small-shape edges of pruning).
PRESETS = ("llama-3-8b",)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Exercises: the launchers driven at the presets' shapes
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    preset: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @property
    def linears(self) -> list[tuple[str, int, int, str, bool]]:
        """(role, N, K, activation, residual) of each linear a decoder layer runs."""
        h, d = self.hidden, self.head_dim
        return [
            ("qkv", (self.heads + 2 * self.kv_heads) * d, h, "", False),
            ("o_proj", h, self.heads * d, "", True),
            ("gate_up", 2 * self.intermediate, h, "silu", False),
            ("down_proj", h, self.intermediate, "", True),
            ("lm_head", self.vocab, h, "", False),
        ]


def preset_shapes(names=PRESETS) -> list[ModelShapes]:
    from llmopt.tools.model_spec import PRESETS as ALL
    shapes = []
    for name in names:
        c = ALL[name].config
        heads = c["num_attention_heads"]
        shapes.append(ModelShapes(
            name, c["hidden_size"], c["intermediate_size"], heads, c.get("num_key_value_heads", heads),
            c.get("head_dim", c["hidden_size"] // heads), c["vocab_size"], c.get("max_position_embeddings", 2048),
        ))
    return shapes


# The device the exercises allocate on: "cuda" (cuda:0), or "cuda:1" to check that every
# launcher makes its tensors' device current (tests/codegen/test_cuda_fixes.py).
EXERCISE_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("EXERCISE_DEVICE", default="cuda")


def _cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device=EXERCISE_DEVICE.get())


@dataclasses.dataclass(frozen=True)
class Call:
    """One launcher call of an exercise. ``full_space``: at the full level, record every
    config that survives an autotuned kernel's pruning, at the CI level its smallest and
    largest tile; otherwise (variants of flags and dtypes) only its smallest tile."""
    run: Callable[[], Any]
    full_space: bool = False


# The dtype the config spaces are built in full (the presets run bf16 on GPU); the other
# dtypes the launchers accept are built at their heuristic (or first pruned) config.
FULL_SPACE_DTYPE = torch.bfloat16


def _dtype_axis():
    return [(dtype, dtype == FULL_SPACE_DTYPE) for dtype in KERNEL_DTYPES]


def _unique_linear_shapes(models) -> list[tuple[int, int, str, bool]]:
    seen = {}
    for m in models:
        for _, n, k, act, res in m.linears:
            seen.setdefault((n, k, act, res), None)
    return list(seen)


def exercise_linear(models: list[ModelShapes], full_space: bool) -> Iterator[Call]:
    """GEMV (M = 1) and flat GEMM (M = 16, 64) at every preset layer shape in the model
    dtype (with ``full_space``: each config of the tuning sweep's pruned space), the other
    dtypes at one shape, and each epilogue flag value once."""
    from llmopt.codegen import flat_gemm, gemv
    from llmopt.codegen.linear_tuning import candidate_configs

    launchers = ((1, "gemv", gemv.gemv_triton), (16, "flat_gemm", flat_gemm.flat_gemm_triton),
                 (64, "flat_gemm", flat_gemm.flat_gemm_triton))  # BLOCK_M 16 and 64
    for dtype, primary in _dtype_axis():
        shapes = _unique_linear_shapes(models) if primary else _unique_linear_shapes(models)[-1:]
        for n, k, act, res in shapes:
            w = _cuda(n, k, dtype=dtype)
            n_out = n // 2 if act else n
            for m, kernel, launch in launchers:
                x = _cuda(m, k, dtype=dtype)
                r = _cuda(m, n_out, dtype=dtype) if res else None
                for cfg in candidate_configs(kernel, n, k, m, dtype) if primary and full_space else [None]:
                    yield Call(lambda launch=launch, x=x, w=w, r=r, act=act, cfg=cfg: launch(
                        x, w, None, r, act, config=cfg))
    # each epilogue flag value once (bias, residual, each activation, split-K), model dtype
    n, k = 512, 256
    w = _cuda(n, k)
    for m, _, launch in launchers[:2]:
        x = _cuda(m, k)
        for act in gemv.ACTIVATIONS:
            yield Call(lambda launch=launch, x=x, act=act: launch(x, w, None, None, act))
        yield Call(lambda launch=launch, x=x: launch(x, w, _cuda(n), _cuda(m, n), ""))
        yield Call(lambda launch=launch, x=x: launch(x, w, _cuda(n), _cuda(m, n // 2), "silu", config={"SPLIT_K": 2}))


def exercise_quant_linear(models: list[ModelShapes], full_space: bool) -> Iterator[Call]:
    """int8/int4 weight-only and w8a8 at every preset layer shape (GEMV at M = 1, flat GEMM
    at M = 64; with ``full_space``: every config the autotuner keeps), every row bucket and
    int4 group size at one shape, bias once, the other dtypes at one shape."""
    from llmopt.codegen.int4_weight_only import int4_weight_only_linear_triton
    from llmopt.codegen.int8_weight_only import int8_weight_only_linear_triton
    from llmopt.codegen.w8a8 import w8a8_linear_triton

    for dtype, primary in _dtype_axis():
        shapes = _unique_linear_shapes(models) if primary else _unique_linear_shapes(models)[-1:]
        for i, (n, k, _, _) in enumerate(shapes):
            w8 = _cuda(n, k, dtype=torch.int8)
            s8 = _cuda(n, dtype=dtype)
            wp = _cuda(n, k // 2, dtype=torch.uint8)
            g4 = 128 if k % 128 == 0 else 32
            s4 = _cuda(n, k // g4, dtype=dtype)
            for m in (1, 64):
                space = primary and m in (1, 64)
                x = _cuda(m, k, dtype=dtype)
                yield Call(lambda x=x, w8=w8, s8=s8: int8_weight_only_linear_triton(x, w8, s8), space)
                yield Call(lambda x=x, w8=w8, s8=s8: w8a8_linear_triton(x, w8, s8), space)
                yield Call(lambda x=x, wp=wp, s4=s4, g4=g4: int4_weight_only_linear_triton(x, wp, s4, s4, g4), space)
                if i == 0 and primary:
                    b = _cuda(n, dtype=dtype)
                    yield Call(lambda x=x, w8=w8, s8=s8, b=b: int8_weight_only_linear_triton(x, w8, s8, b))
                    yield Call(lambda x=x, w8=w8, s8=s8, b=b: w8a8_linear_triton(x, w8, s8, b))
                    for group in (32, 64, 256):
                        if k % group == 0:
                            s4g = _cuda(n, k // group, dtype=dtype)
                            yield Call(lambda x=x, wp=wp, s=s4g, g=group, b=b: int4_weight_only_linear_triton(
                                x, wp, s, s, g, b))


def exercise_attention(models: list[ModelShapes], full_space: bool) -> Iterator[Call]:
    """Dense and paged decode (one split and many; with ``full_space`` the split kernel's
    pruned config space), prefill (the autotuner's configs), KV appends, at every preset
    head shape in the model dtype; the other dtypes at one head shape; each mask, window,
    softcap and index-dtype flag value once."""
    from llmopt.codegen import attention_decode as ad
    from llmopt.codegen import attention_paged as ap
    from llmopt.codegen import attention_prefill as apf
    from llmopt.codegen import kv_cache

    heads = list(dict.fromkeys((m.heads, m.kv_heads, m.head_dim) for m in models))
    bs = ap.DEFAULT_BLOCK_SIZE
    for dtype, primary in _dtype_axis():
        for hq, hkv, d in heads if primary else heads[-1:]:
            configs = ad.prune_decode_configs(ad.decode_configs(), d, hq // hkv, dtype) if primary and full_space else []
            for b, s in ((1, 4096), (64, 1024)):  # one split and many splits (at 132 or 108 SMs)
                q = _cuda(b, hq, 1, d, dtype=dtype)
                kc = _cuda(b, hkv, s, d, dtype=dtype)
                lens = _cuda(b, dtype=torch.int32)
                pool = _cuda(b * s // bs, hkv, bs, d, dtype=dtype)
                tables = _cuda(b, s // bs, dtype=torch.int32)
                for cfg in [None, *configs]:
                    yield Call(lambda q=q, kc=kc, lens=lens, cfg=cfg: ad.attention_decode_triton(
                        q, kc, kc, lens, None, 0.1, config=cfg))
                    yield Call(lambda q=q, pool=pool, t=tables, pl=lens, cfg=cfg: ap.paged_attention_decode_triton(
                        q, pool, pool, t, pl, 0.1, config=cfg))
            kn = _cuda(8, hkv, d, dtype=dtype)
            pool = _cuda(64, hkv, bs, d, dtype=dtype)
            yield Call(lambda pool=pool, kn=kn: ap.paged_kv_append_triton(
                pool, pool, _cuda(8, dtype=torch.int32), kn, kn))
            q = _cuda(1, hq, 512, d, dtype=dtype)
            kk = _cuda(1, hkv, 512, d, dtype=dtype)
            yield Call(lambda q=q, kk=kk: apf.attention_prefill_triton(q, kk, kk, None, None, None, 0.1, True),
                       primary)
            tq = _cuda(512, hq, d, dtype=dtype)
            t2, l2, qsl = _cuda(2, 32, dtype=torch.int32), _cuda(2, dtype=torch.int32), _cuda(3, dtype=torch.int32)
            yield Call(lambda tq=tq, pool=pool, t=t2, pl=l2, qsl=qsl: ap.paged_attention_prefill_triton(
                tq, pool, pool, t, pl, qsl, 0.1), primary)
            kc = _cuda(4, hkv, 1024, d, dtype=dtype)
            kn = _cuda(4, hkv, 1, d, dtype=dtype)
            yield Call(lambda kc=kc, kn=kn: kv_cache.kv_cache_append_triton(
                kc, kc, _cuda(4, 1, dtype=torch.int64), kn, kn))
            cos = _cuda(4, 1, d, dtype=dtype)
            qn = _cuda(4, hq, 1, d, dtype=dtype)
            yield Call(lambda qn=qn, kn=kn, cos=cos, kc=kc, d=d: kv_cache.rope_kv_cache_append_triton(
                qn, kn, kn, cos, cos, d, False, kc, kc, _cuda(1, dtype=torch.int64)))
    # each flag value once, at the largest head shape in the model dtype
    hq, hkv, d = heads[-1]
    b, s = 64, 1024
    q = _cuda(b, hq, 1, d)
    kc = _cuda(b, hkv, s, d)
    lens = _cuda(b, dtype=torch.int32)
    for mask in (_cuda(b, 1, 1, s, dtype=torch.bool), _cuda(b, 1, 1, s)):
        yield Call(lambda mask=mask: ad.attention_decode_triton(q, kc, kc, lens, mask, 0.1))
    for window, softcap, unified in ((128, 0.0, None), (0, 30.0, None), (0, 0.0, 20.0)):
        yield Call(lambda w=window, sc=softcap, u=unified: ad.attention_decode_triton(q, kc, kc, lens, None, 0.1, w, sc, u))
    yield Call(lambda: ad.attention_decode_triton(q, kc, kc, lens, None, 0.1, exact_fallback=False))
    pool = _cuda(b * s // bs, hkv, bs, d)
    t64 = _cuda(b, s // bs, dtype=torch.int64)
    l64 = _cuda(b, dtype=torch.int64)
    for window, softcap in ((0, 0.0), (128, 0.0), (0, 30.0)):
        yield Call(lambda w=window, sc=softcap: ap.paged_attention_decode_triton(q, pool, pool, t64, l64, 0.1, w, sc))
    kn = _cuda(8, hkv, d)
    yield Call(lambda: ap.paged_kv_append_triton(pool, pool, _cuda(8, dtype=torch.int64), kn, kn))
    q = _cuda(1, hq, 64, d)
    kk = _cuda(1, hkv, 64, d)
    lens = _cuda(1, dtype=torch.int32)
    for mask in (_cuda(1, 1, 64, 64, dtype=torch.bool), _cuda(1, 1, 64, 64)):
        yield Call(lambda mask=mask: apf.attention_prefill_triton(q, kk, kk, mask, None, None, 0.1, False))
    for window, softcap in ((32, 0.0), (0, 30.0)):
        yield Call(lambda w=window, sc=softcap: apf.attention_prefill_triton(q, kk, kk, None, None, None, 0.1, True, w, sc))
    yield Call(lambda: apf.attention_prefill_triton(q, kk, kk, None, lens, lens, 0.1, True))
    tq = _cuda(64, hq, d)
    t2, l2, qsl = _cuda(2, 32, dtype=torch.int32), _cuda(2, dtype=torch.int32), _cuda(3, dtype=torch.int32)
    for window, softcap in ((64, 0.0), (0, 30.0)):
        yield Call(lambda w=window, sc=softcap: ap.paged_attention_prefill_triton(tq, pool, pool, t2, l2, qsl, 0.1, w, sc))
    kc = _cuda(4, hkv, 1024, d)
    kn = _cuda(4, hkv, 1, d)
    qn = _cuda(4, hq, 1, d)
    cos = _cuda(4, 1, d // 2)
    for interleaved in (False, True):
        yield Call(lambda il=interleaved: kv_cache.rope_kv_cache_append_triton(
            qn, kn, kn, cos, cos, d // 2, il, kc, kc, _cuda(1, dtype=torch.int64)))


def exercise_rowwise(models: list[ModelShapes], full_space: bool) -> Iterator[Call]:
    """RMSNorm / LayerNorm, gated activation and RoPE at the presets' widths (with
    ``full_space``: every config their autotuners keep), the other dtypes at one width,
    each flag value (residual, weight/bias, activation, partial and interleaved rotary) once."""
    from llmopt.codegen import gated_activation as ga
    from llmopt.codegen import residual_norm as rn
    from llmopt.codegen import rope

    for dtype, primary in _dtype_axis():
        space = primary
        for m in models if primary else models[-1:]:
            x = _cuda(64, m.hidden, dtype=dtype)
            w = _cuda(m.hidden, dtype=dtype)
            yield Call(lambda x=x, w=w: rn.rms_norm_triton(x, w, 1e-5), space)
            yield Call(lambda x=x, w=w: rn.add_layer_norm_triton(x, x, w, w, 1e-5), space)
            g = _cuda(64, m.intermediate, dtype=dtype)
            yield Call(lambda g=g: ga.gated_activation_triton(g, g, "silu"), space)
            q = _cuda(1, m.heads, 16, m.head_dim, dtype=dtype)
            k = _cuda(1, m.kv_heads, 16, m.head_dim, dtype=dtype)
            cos = _cuda(1, 16, m.head_dim, dtype=dtype)
            yield Call(lambda q=q, k=k, cos=cos, d=m.head_dim: rope.rope_triton(q, k, cos, cos, d, False), space)
    m = models[-1]
    x = _cuda(1, m.hidden)
    w = _cuda(m.hidden)
    yield Call(lambda: rn.add_rms_norm_triton(x, x, w, 1e-5))
    yield Call(lambda: rn.layer_norm_triton(x, w, w, 1e-5))
    yield Call(lambda: rn.layer_norm_triton(x, None, None, 1e-5))
    g = _cuda(1, m.intermediate)
    for act in ga.ACTIVATIONS:
        yield Call(lambda act=act: ga.gated_activation_triton(g, g, act))
    q = _cuda(1, m.heads, 16, m.head_dim)
    k = _cuda(1, m.kv_heads, 16, m.head_dim)
    cos = _cuda(1, 16, m.head_dim // 2)
    for interleaved in (False, True):
        yield Call(lambda il=interleaved: rope.rope_triton(q, k, cos, cos, m.head_dim // 2, il))


@contextlib.contextmanager
def _moe_alignment_by_size(moe):
    """``align_block_size`` as it sizes its output on CUDA (the upper bound, no sync),
    without its data-dependent ``bincount``, which fake tensors cannot run."""
    real = moe.align_block_size

    def aligned(ids, num_experts, block_m, exact=False):
        length = -(-(ids.numel() + num_experts * (block_m - 1)) // block_m) * block_m
        return _cuda(length, dtype=torch.int32), _cuda(length // block_m, dtype=torch.int32)

    moe.align_block_size = aligned
    try:
        yield
    finally:
        moe.align_block_size = real


# Mixtral-8x7B's expert shapes (hidden 4096, intermediate 14336, 8 experts, top-2) and a
# Qwen-MoE-like many-small-experts shape; the model presets are dense.
MOE_SHAPES = ((4096, 14336, 8, 2), (2048, 1408, 64, 8))


def exercise_moe(models: list[ModelShapes], full_space: bool) -> Iterator[Call]:
    """Routing and the fused experts at the MoE shapes: decode (GEMV per active expert), prefill
    (grouped GEMM, pruned configs); float stacks in every dtype, int8/int4 g128 in 16-bit; flags once."""
    from llmopt.codegen import moe_experts as moe, moe_quant, moe_route

    def experts(*args, launcher=moe.fused_experts_triton):
        with _moe_alignment_by_size(moe):
            return launcher(*args)

    def stacks(e, n, k, dtype):  # [(launcher, stack tensors)]: float, int8, int4
        int4 = (_cuda(e, n, k // 2, dtype=torch.uint8), *[_cuda(e, n, k // 128, dtype=dtype)] * 2)
        quant = [(moe_quant.fused_experts_int8_triton, (_cuda(e, n, k, dtype=torch.int8), _cuda(e, n, dtype=dtype))),
                 (moe_quant.fused_experts_int4_triton, int4)] if dtype != torch.float32 else []
        return [(moe.fused_experts_triton, (_cuda(e, n, k, dtype=dtype),)), *quant]

    for dtype, primary in _dtype_axis():
        for hidden, inter, num_experts, top_k in MOE_SHAPES if primary else MOE_SHAPES[:1]:
            gate_up, down = stacks(num_experts, 2 * inter, hidden, dtype), stacks(num_experts, hidden, inter, dtype)
            for tokens in (1, 256):
                x, w = _cuda(tokens, hidden, dtype=dtype), _cuda(tokens, top_k, dtype=torch.float32)
                ids = _cuda(tokens, top_k, dtype=torch.int64)
                for (f, gu), (_, d), group in zip(gate_up, down, ((), (), (128,))):
                    yield Call(lambda f=f, a=(x, *gu, *d, w, ids, "silu", *group): experts(*a, launcher=f), primary)
            logits = _cuda(64, num_experts, dtype=dtype)
            yield Call(lambda logits=logits, k=top_k: moe_route.moe_route_triton(logits, k, "softmax", True))
    hidden, inter, num_experts, top_k = MOE_SHAPES[0]
    logits = _cuda(64, num_experts)
    for scoring, renormalize in (("sigmoid", False), ("softmax", False)):
        yield Call(lambda s=scoring, r=renormalize: moe_route.moe_route_triton(logits, top_k, s, r))
    wgu, wd = _cuda(num_experts, 2 * inter, hidden), _cuda(num_experts, hidden, inter)
    for tokens in (1, 64):
        x, w, ids = _cuda(tokens, hidden), _cuda(tokens, top_k, dtype=torch.float32), _cuda(tokens, top_k, dtype=torch.int64)
        for act in moe.ACTIVATIONS:
            yield Call(lambda x=x, w=w, ids=ids, act=act: experts(x, wgu, wd, w, ids, act))


EXERCISES: dict[str, Callable[[list[ModelShapes], bool], Iterator[Call]]] = {
    "linear": exercise_linear,
    "quant_linear": exercise_quant_linear,
    "attention": exercise_attention,
    "rowwise": exercise_rowwise,
    "moe": exercise_moe,
}


def collect_launches(target: Target, presets=PRESETS, full_space: bool = False) -> tuple[list[Launch], list[str]]:
    """Run every exercise under :func:`recording`; returns the launches and the errors of
    calls that raised (a launcher that rejects a preset shape is a finding too)."""
    models = preset_shapes(presets)
    errors = []
    with recording(target) as launches:
        for name, exercise in EXERCISES.items():
            with launches.exercise(name):
                for call in exercise(models, full_space):
                    launches.full_space = call.full_space and full_space
                    launches.ends = call.full_space
                    try:
                        call.run()
                    except Exception as exc:  # noqa: BLE001 - reported, the check fails on it
                        errors.append(f"{name}: {type(exc).__name__}: {exc}")
        return launches.launches, errors


def evaluate(result: BuildResult) -> list[str]:
    """The rules the build check enforces on one compiled variant."""
    target = TARGETS[result.target]
    name = result.kernel.rsplit(".", 1)[-1]
    where = f"{result.kernel} [{result.config}] {result.dtype} sm_{result.target}"
    if result.error:
        return [f"{where}: compile error: {result.error}"]
    problems = []
    if result.shared > target.shared_limit:
        problems.append(f"{where}: {result.shared} bytes of shared memory > {target.shared_limit} on {target.name}")
    if name in DECODE_PATH and result.spills > 0:
        problems.append(f"{where}: {result.spills} LOCAL (spill) bytes per thread in a decode-path kernel")
    if (name in WEIGHT_STREAMING and result.vector_bits < 128
            and weight_bytes_per_thread(result.params, result.weight_bits) >= 16):
        problems.append(f"{where}: widest global load is {result.vector_bits} bits; a contiguous, 16-byte "
                        "aligned weight must stream with 128-bit loads")
    return problems


@dataclasses.dataclass
class BuildReport:
    results: list[BuildResult]
    problems: list[str]
    launch_errors: list[str]
    unexercised: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.problems or self.launch_errors or self.unexercised)


def run_check(targets=(80, 90), jobs: int = 2, presets=PRESETS, full_space: bool = False) -> BuildReport:
    """Record, specialize, compile and evaluate. ``full_space=False`` (CI): every kernel,
    dtype and constexpr variant at the launcher's own config; ``True``: plus each pruned
    config space (thousands of compiles: an hour cold, then cached)."""
    start = time.perf_counter()
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(os.environ.get(
        "LLMOPT_GPU_BUILD_CACHE", Path.home() / ".cache" / "llmopt" / "gpu_build"))))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    work, seen, launch_errors = [], set(), []
    launched = set()
    for cc in targets:
        target = TARGETS[cc]
        launches, errors = collect_launches(target, presets, full_space)
        launch_errors += [f"sm_{cc}: {e}" for e in errors]
        for launch in launches:
            launched.add(f"{launch.module}.{launch.name}")
            build = plan_build(launch, target, seen)
            if build is not None:
                work.append(build)
    unexercised = sorted(set(discover_kernels()) - launched)
    results = compile_all(work, jobs)
    problems = []
    for r in results:
        r.problems = evaluate(r)
        problems += r.problems
    return BuildReport(results, problems, sorted(set(launch_errors)), unexercised, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def render_table(report: BuildReport) -> str:
    """docs/gpu_build.md: per kernel and target, the range over its variants, then the
    decode-path kernels at every config."""
    lines = [
        "# GPU build table (generated)",
        "",
        "Generated by `python -m llmopt.tools.gpu_build --table docs/gpu_build.md` (the ahead-of-time",
        "build check, see docs/gpu_check.md); do not edit by hand. Registers per thread, shared",
        "memory per block (bytes), LOCAL (spill) bytes per thread from `cuobjdump -res-usage`,",
        "and the widest global load in the PTX (bits), for every variant the launchers produce at",
        "the presets' shapes (" + ", ".join(PRESETS) + ").",
        "",
        f"{len(report.results)} variants compiled, {len(report.problems)} problems.",
        "",
        "## Summary per kernel",
        "",
        "| kernel | target | variants | registers | shared (B) | max spills (B) | widest load (bits) |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[BuildResult]] = {}
    for r in report.results:
        groups.setdefault((r.kernel.rsplit(".", 1)[-1], r.target), []).append(r)
    for (name, cc), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        if not ok:
            lines.append(f"| {name} | sm_{cc} | {len(rs)} | error | | | |")
            continue
        regs = [r.registers for r in ok]
        shared = [r.shared for r in ok]
        vec = [r.vector_bits for r in ok]
        lines.append(f"| {name} | sm_{cc} | {len(rs)} | {min(regs)}-{max(regs)} | {min(shared)}-{max(shared)} | "
                     f"{max(r.spills for r in ok)} | {min(vec)}-{max(vec)} |")
    lines += ["", "## Decode-path kernels, every variant", "",
              "| kernel | target | dtype | config | registers | shared (B) | spills (B) | widest load (bits) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(report.results, key=lambda r: (r.kernel, r.target, r.dtype, r.config)):
        name = r.kernel.rsplit(".", 1)[-1]
        if name in DECODE_PATH and not r.error:
            lines.append(f"| {name} | sm_{r.target} | {r.dtype} | `{r.config}` | {r.registers} | {r.shared} | "
                         f"{r.spills} | {r.vector_bits} |")
    return "\n".join(lines) + "\n"



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmopt.tools.gpu_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--table", default=None, help="write the markdown table here (e.g. docs/gpu_build.md)")
    parser.add_argument("--json", default=None, help="write every result as JSON here")
    parser.add_argument("--presets", default=",".join(PRESETS), help="model presets whose shapes are built")
    parser.add_argument("--full", action="store_true",
                        help="also every config of each pruned config space (thousands of builds; cached)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("llmopt.tools.gpu_build: unset TRITON_INTERPRET (it turns @triton.jit into the CPU interpreter, "
              "which cannot compile for a GPU)", file=sys.stderr)
        return 2
    targets = tuple(int(t) for t in args.targets.split(","))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"llmopt.tools.gpu_build: unknown targets {unknown}; use some of {sorted(TARGETS)}", file=sys.stderr)
        return 2
    report = run_check(targets, args.jobs, tuple(args.presets.split(",")), full_space=args.full)
    if args.table:
        atomic_write_text(Path(args.table), render_table(report))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({
            "ok": report.ok, "seconds": report.seconds, "problems": report.problems,
            "launch_errors": report.launch_errors, "unexercised": report.unexercised,
            "results": [dataclasses.asdict(r) for r in report.results],
        }, indent=1))
    compile_s = sum(r.seconds for r in report.results)
    print(f"llmopt.tools.gpu_build: {len(report.results)} variants for sm_{'/sm_'.join(map(str, targets))} in "
          f"{report.seconds:.0f} s ({compile_s:.0f} s compiling over {args.jobs} processes)")
    for line in report.launch_errors:
        print(f"LAUNCHER ERROR {line}")
    for name in report.unexercised:
        print(f"UNEXERCISED {name}: no exercise in llmopt/tools/gpu_build.py launches this kernel; add one to EXERCISES")
    for line in report.problems:
        print(f"FAIL {line}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
