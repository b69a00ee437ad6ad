"""The generated CPU int4 GEMV (llmopt/codegen/int4_weight_only_cpu.py) vs the int4
reference and an fp64 truth; how ``int4_weight_only_linear`` routes CPU calls to it or to
the reference; a compiled Llama decoding through it gives the reference path's tokens.

The truth is the reference run in fp64 on the same codes, scales, zeros and activations.
Each new (M, N, K, group, dtype, bias) signature compiles one Inductor kernel (~0.3-1 s),
hence the small hypothesis budget of the CI profile.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codegen.quant_cases import DTYPES, activations, assert_compiles_fullgraph, f64, int4_weight
from conftest import assert_close

import llmopt.codegen.int4_weight_only as i4
import llmopt.codegen.int4_weight_only_cpu as i4cpu
import llmopt.codegen.int8_weight_only_cpu as i8cpu


@given(m=st.integers(1, i4cpu.CPU_INT4_GEMV_MAX_M), n=st.sampled_from([1, 7, 40, 130]),
       kg=st.sampled_from([(32, 32), (96, 32), (128, 64), (256, 128), (768, 128)]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       with_bias=st.booleans())
def test_generated_gemv_matches_reference_and_truth(m, n, kg, dtype, layout, with_bias):
    k, group = kg
    x = activations(m, k, dtype, layout)
    wp, s, z = int4_weight(n, k, group)
    bias = torch.randn(n) if with_bias else None
    out = i4cpu.int4_gemv_cpu(x, wp, s, z, bias)
    assert out is not None and out.shape == (m, n) and out.dtype == dtype
    truth = i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group, f64(bias))
    assert_close(out, truth, dtype, "generated int4 GEMV vs fp64")
    reference = i4.int4_weight_only_linear_ref(x, wp, s, z, group, bias)
    assert_close(out, reference.double(), dtype, "generated int4 GEMV vs the int4 reference")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_low_precision_scales_and_zeros(storage):
    """Scales and zeros stored in the model's half dtype (``schemes.storage_dtype``) are
    widened inside the kernel: same result as the fp64 truth on the same stored values."""
    n, k, group = 48, 128, 64
    wp, s, z = int4_weight(n, k, group)
    s, z = s.to(storage), z.to(storage)
    x = torch.randn(1, k)
    truth = i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group)
    assert_close(i4cpu.int4_gemv_cpu(x, wp, s, z), truth, torch.float32, "half scales")


def test_nan_in_activations_propagates():
    """A NaN in one row of x poisons exactly that row's outputs (no cross-row leak through
    the de-interleave copy or the zero-point correction)."""
    n, k, group = 16, 64, 32
    wp, s, z = int4_weight(n, k, group)
    x = torch.randn(3, k)
    x[1, 5] = float("nan")
    out = i4cpu.int4_gemv_cpu(x, wp, s, z)
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


def test_registered_op_uses_it_for_few_rows():
    """On CPU (kernel mode auto) a decode-sized call goes to the generated GEMV; a
    prefill-sized one (M > CPU_INT4_GEMV_MAX_M) to the reference."""
    n, k, group = 48, 64, 32
    wp, s, z = int4_weight(n, k, group)
    x = torch.randn(2, 1, k)
    before = len(i4cpu.COMPILED_INT4_GEMVS)
    y = torch.ops.llmopt.int4_weight_only_linear(x, wp, s, z, group)
    assert len(i4cpu.COMPILED_INT4_GEMVS) == before + 1 and y.shape == (2, 1, n)
    assert_close(y, i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group), torch.float32)
    big = torch.randn(i4cpu.CPU_INT4_GEMV_MAX_M + 1, k)
    assert_close(torch.ops.llmopt.int4_weight_only_linear(big, wp, s, z, group),
                 i4.int4_weight_only_linear_ref(f64(big), wp, f64(s), f64(z), group), torch.float32)
    assert len(i4cpu.COMPILED_INT4_GEMVS) == before + 1, "no GEMV compiled for prefill sizes"
    assert any(key[1][0] == tuple(wp.shape) for key in i4cpu.COMPILED_INT4_DEQUANTIZERS.keys()), \
        "prefill sizes take the generated dequantize"
    torch.ops.llmopt.int4_weight_only_linear(torch.randn(2, 1, k), wp, s, z, group)
    assert len(i4cpu.COMPILED_INT4_GEMVS) == before + 1, "same signature: the compiled kernel is reused"


def test_opcheck_and_fullgraph_compile_on_the_cpu_path():
    n, k, group = 32, 64, 32
    wp, s, z = int4_weight(n, k, group)
    x = torch.randn(1, k)
    bias = torch.randn(n)
    torch.library.opcheck(torch.ops.llmopt.int4_weight_only_linear.default, (x, wp, s, z, group, bias))
    assert_compiles_fullgraph(torch.ops.llmopt.int4_weight_only_linear, x, wp, s, z, group, bias)


def test_reference_mode_bypasses_it(reference_kernels):
    wp, s, z = int4_weight(24, 64, 32)
    before = len(i4cpu.COMPILED_INT4_GEMVS), len(i4cpu.COMPILED_INT4_DEQUANTIZERS)
    torch.ops.llmopt.int4_weight_only_linear(torch.randn(3, 64), wp, s, z, 32)
    torch.ops.llmopt.int4_weight_only_linear(torch.randn(i4cpu.CPU_INT4_GEMV_MAX_M + 5, 64), wp, s, z, 32)
    assert (len(i4cpu.COMPILED_INT4_GEMVS), len(i4cpu.COMPILED_INT4_DEQUANTIZERS)) == before


@pytest.mark.parametrize("cache, label, rows, entry", [
    ("COMPILED_INT4_GEMVS", "int4", 1, "int4_gemv_cpu"),
    ("COMPILED_INT4_DEQUANTIZERS", "int4 prefill", i4cpu.CPU_INT4_GEMV_MAX_M + 1, "int4_prefill_cpu"),
])
def test_compile_failure_falls_back_to_the_reference(monkeypatch, caplog, cache, label, rows, entry):
    """The GEMV (decode) and the prefill dequantize each fall back to the reference when
    Inductor cannot compile, with one warning, and do not retry."""
    def no_compiler(args):
        raise RuntimeError("no C++ compiler")

    kernels = i4cpu.CompiledCpuGemv(compiler=no_compiler, label=label)
    monkeypatch.setattr(i4cpu, cache, kernels)
    wp, s, z = int4_weight(16, 64, 32)
    x = torch.randn(rows, 64)
    run = getattr(i4cpu, entry)
    with caplog.at_level(logging.WARNING, logger="llmopt.codegen.int8_weight_only_cpu"):
        assert run(x, wp, s, z) is None
        y = torch.ops.llmopt.int4_weight_only_linear(x, wp, s, z, 32)
    assert "no C++ compiler" in caplog.text and f"{label} GEMV" in caplog.text and kernels.failed
    assert_close(y, i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), 32), torch.float32)
    assert run(x, wp, s, z) is None, "a failed compiler is not retried on every call"


def test_out_of_contract_calls_are_declined():
    wp, s, z = int4_weight(8, 64, 32)
    assert i4cpu.int4_gemv_cpu(torch.randn(i4cpu.CPU_INT4_GEMV_MAX_M + 1, 64), wp, s, z) is None
    assert i4cpu.int4_gemv_cpu(torch.randn(0, 64), wp, s, z) is None
    assert i4cpu.int4_gemv_cpu(torch.randn(1, 64, dtype=torch.float64), wp, s, z) is None


def test_an_explicit_cache_is_filled_instead_of_the_process_one():
    gemvs = i4cpu.CompiledCpuGemv(compiler=i4cpu.compile_int4_gemv, label="int4")
    wp, s, z = int4_weight(8, 64, 32)
    before = len(i4cpu.COMPILED_INT4_GEMVS)
    x = torch.randn(1, 64)
    assert_close(i4cpu.int4_gemv_cpu(x, wp, s, z, gemvs=gemvs),
                 i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), 32), torch.float32)
    assert len(gemvs) == 1 and len(i4cpu.COMPILED_INT4_GEMVS) == before


# ---------------------------------------------------------------------------- prefill
@given(m=st.integers(i4cpu.CPU_INT4_GEMV_MAX_M + 1, 70), n=st.sampled_from([1, 7, 40, 130]),
       kg=st.sampled_from([(32, 32), (96, 32), (128, 64), (256, 128), (768, 128)]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       with_bias=st.booleans(), block_bytes=st.sampled_from([256, 4096, i8cpu.PREFILL_BLOCK_BYTES]))
def test_prefill_matches_reference_and_truth(m, n, kg, dtype, layout, with_bias, block_bytes):
    """The blocked dequantize + ``F.linear`` (several blocks, a remainder block, one block)
    against the fp64 truth and the int4 reference, any row count past the GEMV's."""
    k, group = kg
    x = activations(m, k, dtype, layout)
    wp, s, z = int4_weight(n, k, group)
    bias = torch.randn(n) if with_bias else None
    saved = i8cpu.PREFILL_BLOCK_BYTES
    i8cpu.PREFILL_BLOCK_BYTES = block_bytes
    try:
        out = i4cpu.int4_prefill_cpu(x, wp, s, z, bias)
    finally:
        i8cpu.PREFILL_BLOCK_BYTES = saved
    assert out is not None and out.shape == (m, n) and out.dtype == dtype
    truth = i4.int4_weight_only_linear_ref(f64(x), wp, f64(s), f64(z), group, f64(bias))
    assert_close(out, truth, dtype, "int4 prefill vs fp64")
    reference = i4.int4_weight_only_linear_ref(x, wp, s, z, group, bias)
    assert_close(out, reference.double(), dtype, "int4 prefill vs the int4 reference")


def test_prefill_block_rows():
    cap_rows = i8cpu.PREFILL_BLOCK_BYTES // (768 * 4)  # 1365 float32 rows of K = 768
    assert i8cpu.prefill_block_rows(1280, 768, 4) == 1280, "fits: one block"
    assert i8cpu.prefill_block_rows(2048, 768, 4) == 1024, "a divisor: one kernel signature"
    assert i8cpu.prefill_block_rows(16000, 768, 4) == 1000
    rows = i8cpu.prefill_block_rows(1367 * 2 + 1, 768, 4)  # odd: no multiple of 8 divides it
    assert rows == cap_rows // 8 * 8
    assert i8cpu.prefill_block_rows(3, 10**9, 4) == 3, "at least 8 rows (or all of them) per block"


def test_prefill_nan_in_activations_stays_in_its_row():
    n, k, group = 16, 64, 32
    wp, s, z = int4_weight(n, k, group)
    x = torch.randn(i4cpu.CPU_INT4_GEMV_MAX_M + 3, k)
    x[2, 7] = float("nan")
    out = i4cpu.int4_prefill_cpu(x, wp, s, z)
    assert out[2].isnan().all() and not out[torch.arange(len(x)) != 2].isnan().any()


def test_prefill_declines_out_of_contract_calls():
    wp, s, z = int4_weight(8, 64, 32)
    assert i4cpu.int4_prefill_cpu(torch.randn(0, 64), wp, s, z) is None
    assert i4cpu.int4_prefill_cpu(torch.randn(20, 64, dtype=torch.float64), wp, s, z) is None


def test_compiled_llama_decodes_the_reference_tokens(monkeypatch):
    """A tiny Llama compiled with ``quantize="int4-g32"`` decodes (M = 1, through the
    generated GEMV) the same greedy tokens, with the same logits to float32 tolerance, as
    the same compiled model under ``LLMOPT_KERNELS=reference`` (dequantize + matmul)."""
    from transformers import StaticCache

    from models.tiny import tiny_model, tokens

    model = tiny_model("llama")
    prompt = tokens(1, 7)

    def greedy(steps=5):
        torch._dynamo.reset()
        forward = torch.compile(model.forward, backend="llmopt", options={"strict": True, "quantize": "int4-g32"})
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            out = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(7), use_cache=True)
            tok, seq, logits = out.logits[:, -1:].argmax(-1), [], []
            for pos in range(7, 7 + steps):
                seq.append(int(tok))
                out = forward(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([pos]), use_cache=True)
                logits.append(out.logits)
                tok = out.logits[:, -1:].argmax(-1)
        return seq, torch.cat(logits)

    before = len(i4cpu.COMPILED_INT4_GEMVS)
    tokens_auto, logits_auto = greedy()
    assert len(i4cpu.COMPILED_INT4_GEMVS) > before, "decode ran the generated int4 GEMV"
    monkeypatch.setenv("LLMOPT_KERNELS", "reference")
    tokens_ref, logits_ref = greedy()
    torch._dynamo.reset()
    assert tokens_auto == tokens_ref
    assert_close(logits_auto, logits_ref.double(), torch.float32, "int4 GEMV model vs int4 reference model")
