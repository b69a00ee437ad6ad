"""GEMV kernel (llmopt/codegen/gemv.py): kernel vs reference vs fp64 truth, in the interpreter.

Specification: for one or a few rows of x, ``gemv_triton`` writes every element of
``epilogue(x @ weight.T)`` (bias, gated activation over merged [gate; up] rows, residual)
within the suite's tolerance of the fp64 truth, for any N and K (not multiples of the
block), any strides, fp32/fp16/bf16, with and without split-K.
"""
import functools

import pytest
import torch
from codegen import linear_cases
from codegen.linear_cases import empty_table, make_case  # noqa: F401  (empty_table: a fixture)
from conftest import assert_close, poisoned

import llmopt.codegen.linear  # noqa: F401  (registers llmopt::linear)
from llmopt.codegen.gemv import (
    gemv_configs, gemv_heuristic_config, gemv_ref, gemv_triton, prune_gemv_configs,
)

ALL_GEMV = "1:gemv,2:gemv,4:gemv,8:gemv,16:gemv,32:gemv,64:gemv,inf:gemv"


# The shared case builder and checks (tests/codegen/linear_cases.py), bound to this kernel.
check_against_truth = functools.partial(linear_cases.check_against_truth, gemv_triton, gemv_ref)


(test_gemv_matches_fp64, test_every_epilogue_single_row,
 test_empty_reduction_and_empty_rows) = linear_cases.specification_tests(
    gemv_triton, gemv_ref, max_m=4, drawn_config={"BLOCK_K": 32, "BLOCK_N": 16}, epilogue_rows=1)


@pytest.mark.parametrize("split_k", [4, 8])
def test_split_k_with_empty_splits(split_k):
    # K=100 in 16-wide blocks over 8 splits: the last splits have no columns and must write zeros
    args = make_case(2, 17, 100, torch.float32, bias=True, residual=False, activation="silu")
    check_against_truth(args, config={"SPLIT_K": split_k, "BLOCK_K": 16, "BLOCK_N": 8})


def test_more_rows_than_a_decode_batch():
    args = make_case(33, 17, 65, torch.float16, bias=True, residual=True, activation="gelu_tanh")
    check_against_truth(args)


def test_activation_extremes_stay_finite():
    # silu/gelu_tanh of +-1e4 must not produce inf * 0 = NaN in the exp-based formulas
    x = torch.tensor([[1.0]])
    weight = torch.tensor([[1e4], [-1e4], [1.0], [1.0]])
    for activation in ("silu", "gelu", "gelu_tanh"):
        out = gemv_triton(x, weight, activation=activation, out=poisoned((1, 2), torch.float32))
        assert_close(out, gemv_ref(x.double(), weight.double(), activation=activation), torch.float32)


def test_opcheck_with_gemv_forced(triton_kernels, empty_table):
    args = make_case(3, 24, 40, torch.float32, bias=True, residual=True, activation="gelu")
    linear_cases.check_opcheck(args, (1, 3), ALL_GEMV)


def test_inside_torch_compile_fullgraph(triton_kernels, empty_table):
    args = make_case(2, 16, 48, torch.float32, bias=True, residual=False, activation="")
    linear_cases.check_inside_compile(gemv_ref, args, ALL_GEMV, torch.relu)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"weight": torch.randn(8, 5)}, ValueError, "K=4 columns"),
        ({"x": torch.randn(4)}, ValueError, r"x \[M, K\]"),
        ({"weight": torch.randn(8, 4, dtype=torch.float16)}, TypeError, "weight dtype"),
        ({"x": torch.randn(2, 4, dtype=torch.float64), "weight": torch.randn(8, 4, dtype=torch.float64)},
         TypeError, "float16, bfloat16 or float32"),
        ({"bias": torch.randn(7)}, ValueError, "bias must have shape"),
        ({"residual": torch.randn(2, 7)}, ValueError, "residual must have the output shape"),
        ({"activation": "relu"}, ValueError, "not supported"),
        ({"activation": "silu", "weight": torch.randn(7, 4), "bias": None}, ValueError, "even N"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    linear_cases.check_bad_input(gemv_triton, change, error, match)


def test_bad_config_and_out_raise():
    x, weight = torch.randn(2, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="unknown keys"):
        gemv_triton(x, weight, config={"BLOCK_Q": 4})
    with pytest.raises(ValueError, match="power of two"):
        gemv_triton(x, weight, config={"BLOCK_N": 12})
    with pytest.raises(ValueError, match="out must be"):
        gemv_triton(x, weight, out=torch.empty(2, 7))


def test_config_space_prunes_to_something_for_llama_shapes():
    for N, K in [(4096, 4096), (6144, 4096), (2 * 14336, 4096), (4096, 14336), (128256, 4096)]:
        kept = prune_gemv_configs(gemv_configs(), N, K)
        assert kept, (N, K)
        assert all(c["SPLIT_K"] == 1 or K >= 2 * c["BLOCK_K"] * c["SPLIT_K"] for c in kept)
    # a tiny problem keeps only tiles that fit it
    assert all(c["BLOCK_N"] <= 8 and c["SPLIT_K"] == 1 for c in prune_gemv_configs(gemv_configs(), 8, 256))


def test_interpreter_heuristic_uses_one_split():
    config = gemv_heuristic_config(4096, 4096, 1, False, torch.device("cpu"))
    assert config["SPLIT_K"] == 1 and config["BLOCK_N"] == 64
