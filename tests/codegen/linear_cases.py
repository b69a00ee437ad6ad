"""Shared by the GEMV and flat-GEMM kernel tests: the case builder and the three-way check
(kernel vs fp64 truth, reference vs fp64 truth, output written in place)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, poisoned
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen.gemv import ACTIVATIONS
from llmopt.codegen.tuning_table import TuningTable, set_active_table

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def drawn_cases(max_m: int):
    """Hypothesis: :func:`make_case` keyword arguments (M up to ``max_m``, N and K ragged,
    every dtype and epilogue, strided or not) plus the ``split_k`` to launch with."""
    return st.fixed_dictionaries({
        "M": st.integers(1, max_m),
        "n_out": st.sampled_from([1, 7, 17, 100]),
        "K": st.sampled_from([1, 7, 17, 100, 257]),
        "dtype": st.sampled_from(DTYPES),
        "bias": st.booleans(),
        "residual": st.booleans(),
        "activation": st.sampled_from(ACTIVATIONS),
        "strided": st.booleans(),
        "split_k": st.sampled_from([1, 2, 3]),
    })


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


def check_drawn_case(kernel, ref, case: dict, config: dict):
    """:func:`check_against_truth` on a case drawn by :func:`drawn_cases`, its split-K added
    to the kernel ``config``."""
    case = dict(case)
    split_k = case.pop("split_k")
    check_against_truth(kernel, ref, make_case(**case), config={"SPLIT_K": split_k, **config})


def specification_tests(kernel, ref, *, max_m: int, drawn_config: dict, epilogue_rows: int):
    """The two tests both kernels' specifications state the same way, bound to ``kernel``:
    hypothesis-drawn cases (M up to ``max_m``, launched with ``drawn_config``) and every
    epilogue in every dtype on ``epilogue_rows`` rows; an empty reduction (K=0: the
    output is the bias) and zero rows. Returns ``(drawn, every_epilogue, empty)``; a test
    file assigns them to its own ``test_*`` names, which pytest collects."""

    @given(case=drawn_cases(max_m=max_m))
    def drawn(case):
        check_drawn_case(kernel, ref, case, drawn_config)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def every_epilogue(dtype, activation):
        args = make_case(epilogue_rows, 100, 257, dtype, bias=True, residual=True, activation=activation)
        check_against_truth(kernel, ref, args)

    def empty():
        bias = torch.randn(5)
        assert torch.equal(kernel(torch.randn(3, 0), torch.randn(5, 0), bias), bias.expand(3, 5))
        assert kernel(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)

    return drawn, every_epilogue, empty


def check_inside_compile(ref, args, kernels: str, post):
    """``post(llmopt::linear(**args))`` with ``kernels`` forced, inside a fullgraph
    ``torch.compile`` (aot_eager), within tolerance of ``post`` of the fp64 truth."""
    weight, bias, residual, activation = args["weight"], args["bias"], args["residual"], args["activation"]

    def fn(x):
        return post(torch.ops.llmopt.linear(x, weight, bias, residual, activation, kernels))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(args["x"]), post(truth(ref, args)), args["x"].dtype)


def check_opcheck(args, lead: tuple[int, ...], kernels: str):
    """``torch.library.opcheck`` of ``llmopt::linear`` on ``args`` (x and the residual with
    leading dims ``lead``) with the kernels string ``kernels`` forcing one kernel."""
    x = args["x"].reshape(*lead, args["x"].shape[-1])
    residual = args["residual"].reshape(*lead, args["residual"].shape[-1]) if args["residual"] is not None else None
    torch.library.opcheck(
        torch.ops.llmopt.linear.default, (x, args["weight"], args["bias"], residual, args["activation"], kernels)
    )


def check_bad_input(kernel, change: dict, error, match: str):
    """``kernel`` on a valid small case changed by ``change`` raises ``error`` matching ``match``."""
    args = {"x": torch.randn(2, 4), "weight": torch.randn(8, 4), "bias": torch.randn(8), "residual": None,
            "activation": ""}
    args.update(change)
    with pytest.raises(error, match=match):
        kernel(**args)


@pytest.fixture
def empty_table(tmp_path):
    """An empty tuning table for the test's duration (the heuristics decide)."""
    previous = set_active_table(TuningTable(tmp_path / "tuning.json"))
    yield
    set_active_table(previous)
