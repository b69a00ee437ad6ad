"""Flat GEMM kernel (llmopt/codegen/flat_gemm.py): kernel vs reference vs fp64 truth, in the interpreter.

Specification: for M in 1..64 (odd included), ``flat_gemm_triton`` writes every element of
``epilogue(x @ weight.T)`` (bias, gated activation over merged [gate; up] rows, residual)
within the suite's tolerance of the fp64 truth, for N and K not multiples of the tiles,
any strides, fp32 (ieee dot) / fp16 / bf16, with and without split-K, and with M spread
over several BLOCK_M tiles.
"""
import functools

import pytest
import torch
from codegen import linear_cases
from codegen.linear_cases import empty_table, make_case  # noqa: F401  (empty_table: a fixture)

import llmopt.codegen.linear  # noqa: F401  (registers llmopt::linear)
from llmopt.codegen.flat_gemm import (
    flat_gemm_block_m, flat_gemm_configs, flat_gemm_heuristic_config, flat_gemm_ref, flat_gemm_triton,
    prune_flat_gemm_configs, shared_memory_bytes,
)

ALL_FLAT = "1:flat_gemm,2:flat_gemm,4:flat_gemm,8:flat_gemm,16:flat_gemm,32:flat_gemm,64:flat_gemm,inf:flat_gemm"


# The shared case builder and checks (tests/codegen/linear_cases.py), bound to this kernel.
check_against_truth = functools.partial(linear_cases.check_against_truth, flat_gemm_triton, flat_gemm_ref)


(test_flat_gemm_matches_fp64, test_every_epilogue,
 test_empty_reduction_and_empty_rows) = linear_cases.specification_tests(
    flat_gemm_triton, flat_gemm_ref, max_m=64, drawn_config={"BLOCK_K": 32, "BLOCK_N": 32}, epilogue_rows=9)


@pytest.mark.parametrize("M", [17, 33, 63])
def test_rows_over_several_m_tiles(M):
    args = make_case(M, 17, 100, torch.float32, bias=True, residual=True, activation="silu", strided=True)
    check_against_truth(args, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 8})


def test_fp32_long_reduction_holds_fp32_tolerance():
    # on GPU the launcher asks tl.dot for ieee fp32 (tf32 would give ~1e-3); here the
    # interpreter checks the fp32 accumulation over a long K
    args = make_case(16, 64, 512, torch.float32, bias=False, residual=False, activation="")
    check_against_truth(args)


def test_opcheck_with_flat_gemm_forced(triton_kernels, empty_table):
    args = make_case(6, 24, 40, torch.float32, bias=True, residual=True, activation="silu")
    linear_cases.check_opcheck(args, (2, 3), ALL_FLAT)


def test_inside_torch_compile_fullgraph(triton_kernels, empty_table):
    args = make_case(5, 16, 48, torch.bfloat16, bias=False, residual=True, activation="gelu_tanh")
    linear_cases.check_inside_compile(flat_gemm_ref, args, ALL_FLAT, lambda y: y * 2)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"weight": torch.randn(8, 5)}, ValueError, "K=4 columns"),
        ({"weight": torch.randn(8, 4, dtype=torch.bfloat16)}, TypeError, "weight dtype"),
        ({"bias": torch.randn(8, dtype=torch.float16)}, TypeError, "bias is"),
        ({"residual": torch.randn(3, 8)}, ValueError, "residual must have the output shape"),
        ({"activation": "gelu", "residual": torch.randn(2, 8)}, ValueError, r"output shape \(2, 4\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    linear_cases.check_bad_input(flat_gemm_triton, change, error, match)


def test_block_m_pads_to_dot_minimum():
    assert [flat_gemm_block_m(m) for m in (1, 2, 9, 16, 17, 33, 64, 500)] == [16, 16, 16, 16, 32, 64, 64, 64]


def test_config_space_prunes_by_shared_memory_and_shape():
    for N, K in [(4096, 4096), (6144, 4096), (2 * 11008, 4096), (4096, 11008), (32000, 4096)]:
        for M in (1, 8, 33):
            kept = prune_flat_gemm_configs(flat_gemm_configs(M), N, K, element_size=2, gated=False)
            assert kept, (N, K, M)
            assert all(shared_memory_bytes(c, 2, False) <= 160 * 1024 for c in kept)
            assert all(c["BLOCK_M"] == flat_gemm_block_m(M) for c in kept)
    gated = prune_flat_gemm_configs(flat_gemm_configs(64), 2 * 14336, 4096, element_size=2, gated=True)
    assert gated and all(shared_memory_bytes(c, 2, True) <= 160 * 1024 for c in gated)


def test_interpreter_heuristic_uses_large_tiles_and_one_split():
    config = flat_gemm_heuristic_config(4096, 4096, 3, False, torch.float16, torch.device("cpu"))
    assert config == {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
