"""Shared by the GEMV and flat-GEMM kernel tests: the case builder and the three-way check
(kernel vs fp64 truth, reference vs fp64 truth, output written in place)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, poisoned

from llmopt.codegen.tuning_table import TuningTable, set_active_table


def make_case(M, n_out, K, dtype, *, bias, residual, activation, strided=False, seed=0):
    """Inputs scaled so outputs are O(1); ``strided``: x and weight are non-contiguous views."""
    g = torch.Generator().manual_seed(seed)
    N = 2 * n_out if activation else n_out
    x = torch.randn(M, 2 * K if strided else K, generator=g).to(dtype)
    weight = (torch.randn(K, N, generator=g).t() if strided else torch.randn(N, K, generator=g)) / math.sqrt(K)
    weight = weight.to(dtype)  # keeps the transposed strides (a dense permutation)
    if strided:
        x = x[:, ::2]
    return {
        "x": x,
        "weight": weight,
        "bias": torch.randn(N, generator=g).to(dtype) if bias else None,
        "residual": torch.randn(M, n_out, generator=g).to(dtype) if residual else None,
        "activation": activation,
    }


def truth(ref, args):
    """The reference run on fp64 copies of the same (rounded) inputs."""
    as64 = {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return ref(**as64)


def check_against_truth(kernel, ref, args, config=None):
    """``kernel`` writes into a NaN-poisoned ``out`` within tolerance of the fp64 truth;
    ``ref`` (the CPU implementation) is within tolerance too."""
    dtype = args["x"].dtype
    M = args["x"].shape[0]
    n_out = args["weight"].shape[0] // (2 if args["activation"] else 1)
    out = poisoned((M, n_out), dtype)
    result = kernel(**args, config=config, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = truth(ref, args)
    name = kernel.__name__.removesuffix("_triton")
    assert_close(out, expected, dtype, what=f"{name} kernel vs fp64")
    assert_close(ref(**args), expected, dtype, what=f"{ref.__name__} vs fp64")


@pytest.fixture
def empty_table(tmp_path):
    """An empty tuning table for the test's duration (the heuristics decide)."""
    previous = set_active_table(TuningTable(tmp_path / "tuning.json"))
    yield
    set_active_table(previous)
