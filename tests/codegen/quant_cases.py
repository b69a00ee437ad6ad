"""Shared inputs of the quantized-linear kernel tests (int8 / int4 weight-only, W8A8).

The truth of a weight-only linear is the reference run in fp64 on the same codes, scales
and (float-rounded) activations; for W8A8 it is the fp64 product of the same per-token
int8 activations (quantized in fp32 by ``quantize_rows_int8_ref``) and int8 weights.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from conftest import assert_close

from llmopt.codegen.quant_packing import pack_int4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_VALUES = [1, 2, 3, 7, 17, 33]
N_VALUES = [1, 7, 17, 40]
# int8 layouts take any K; int4 ones need K a multiple of the group size (a multiple of 32).
INT8_K_VALUES = [7, 16, 17, 48, 96]

layouts = st.sampled_from(["contiguous", "transposed", "strided"])


def int8_case_strategy():
    """Hypothesis keywords of one int8-layout linear call: rows, features, dtype, layout, bias."""
    return dict(m=st.sampled_from(M_VALUES), n=st.sampled_from(N_VALUES), k=st.sampled_from(INT8_K_VALUES),
                dtype=st.sampled_from(DTYPES), layout=layouts, with_bias=st.booleans())


def activations(m, k, dtype, layout="contiguous"):
    """``[m, k]`` activations: contiguous, transposed (stride (1, m)) or a strided slice."""
    if layout == "contiguous":
        return torch.randn(m, k).to(dtype)
    if layout == "transposed":
        return torch.randn(k, m).to(dtype).t()
    return torch.randn(m, 2 * k).to(dtype)[:, ::2]


def int8_weight(n, k):
    """``(w_int8 [n, k], scales [n])``."""
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.02 + 1e-3


def int4_weight(n, k, group):
    """``(w_packed [n, k // 2], scales, zeros [n, k // group])``."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, k // group) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (n, k // group)).float()
    return pack_int4(q), scales, zeros


def f64(t):
    return None if t is None else t.to(torch.float64)


def assert_compiles_fullgraph(op, x, *rest):
    """``op(silu(x), *rest) * 2`` under ``torch.compile(fullgraph=True)`` equals eager."""
    def fn(x):
        return op(torch.nn.functional.silu(x), *rest) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), fn(x), torch.float32, "compiled")


def int8_call(m, n, k, dtype, layout, with_bias):
    """``(x, w_int8, scales, bias)`` of one int8-layout linear call."""
    w, s = int8_weight(n, k)
    return activations(m, k, dtype, layout), w, s, torch.randn(n) if with_bias else None
