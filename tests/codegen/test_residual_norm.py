"""Specification of the residual + norm ops: llmopt::rms_norm, add_rms_norm, layer_norm, add_layer_norm.

Every kernel result is checked three ways: the Triton kernel (in the interpreter, writing
into a NaN-poisoned output), the eager reference in the same dtype, and the fp64 truth.
The residual stream ``h`` must equal eager's ``x + residual`` bit for bit, and the truth
of ``y`` is the fp64 norm of that ``h`` (rounding ``h`` to x.dtype is part of the contract).
"""
import math

import pytest
import torch
import triton
from conftest import assert_close, poisoned
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen import residual_norm as rn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Row widths: ragged, odd, non-powers of two (2560, 3072 are real hidden sizes).
WIDTHS = st.sampled_from([1, 2, 7, 17, 64, 100, 257, 1000, 2560, 3072])
LEADS = st.lists(st.sampled_from([1, 2, 3, 7]), min_size=0, max_size=2)
LAYOUTS = st.sampled_from(["contiguous", "row_padded", "merged_half", "col_strided", "lead_permuted"])
SEEDS = st.integers(0, 2**16)  # data drawn from torch's RNG, seeded per example: reproducible failures


def make_input(lead, n, dtype, layout, shift=0.0):
    """A ``[*lead, n]`` tensor in the given memory layout (values ~ N(shift, 1))."""
    lead = list(lead)
    if layout == "row_padded":  # a slice of wider rows: row stride n + 5
        base = torch.randn(*lead, n + 5)[..., :n]
    elif layout == "merged_half":  # second half of a merged matmul output: row stride 2n
        base = torch.randn(*lead, 2 * n)[..., n:]
    elif layout == "col_strided":  # every other column: column stride 2
        base = torch.randn(*lead, 2 * n)[..., ::2]
    elif layout == "lead_permuted" and len(lead) >= 2:  # leading dims not mergeable: copied
        base = torch.randn(lead[1], lead[0], *lead[2:], n).transpose(0, 1)
    else:
        base = torch.randn(*lead, n)
    return (base + shift).to(dtype)


def make_weight(n, dtype, weight_dtype):
    return (torch.rand(n) + 0.5).to(dtype if weight_dtype == "same" else torch.float32)


def force_chunks(monkeypatch, n):
    """Make rows of ``n`` take the chunked two-pass path, in about four chunks (the last ragged)."""
    monkeypatch.setattr(rn, "MAX_BLOCK_N", max(8, triton.next_power_of_2(n) // 4))


def fp64(t):
    return None if t is None else t.to(torch.float64)


# --------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("chunked", [False, True], ids=["one_block", "chunked"])
@given(
    lead=LEADS, n=WIDTHS, layout=LAYOUTS, weight_dtype=st.sampled_from(["same", "fp32"]),
    weight_offset=st.sampled_from([0.0, 1.0]), eps=st.sampled_from([1e-6, 1e-5]), seed=SEEDS,
)
def test_add_rms_norm_matches_reference_and_fp64(
    triton_kernels, monkeypatch, dtype, chunked, lead, n, layout, weight_dtype, weight_offset, eps, seed
):
    torch.manual_seed(seed)
    if chunked:
        force_chunks(monkeypatch, n)
    x = make_input(lead, n, dtype, layout)
    r = make_input(lead, n, dtype, "contiguous")
    w = make_weight(n, dtype, weight_dtype)
    shape = x.shape
    y, h = rn.add_rms_norm_triton(
        x, r, w, eps, weight_offset, out=poisoned(shape, dtype), residual_out=poisoned(shape, dtype)
    )
    y_ref, h_ref = rn.add_rms_norm_ref(x, r, w, eps, weight_offset)
    h_eager = x + r
    y_true = rn.rms_norm_ref(fp64(h_eager), fp64(w), eps, weight_offset)
    assert torch.equal(h, h_eager), "h must be eager's x + residual bit for bit"
    assert torch.equal(h_ref, h_eager)
    assert_close(y, y_true, dtype, what="kernel y")
    assert_close(y_ref, y_true, dtype, what="reference y")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(lead=LEADS, n=WIDTHS, layout=LAYOUTS, weight_offset=st.sampled_from([0.0, 1.0]), seed=SEEDS)
def test_rms_norm_matches_reference_and_fp64(triton_kernels, dtype, lead, n, layout, weight_offset, seed):
    torch.manual_seed(seed)
    x = make_input(lead, n, dtype, layout)
    w = make_weight(n, dtype, "same")
    y = rn.rms_norm_triton(x, w, 1e-6, weight_offset, out=poisoned(x.shape, dtype))
    y_true = rn.rms_norm_ref(fp64(x), fp64(w), 1e-6, weight_offset)
    assert_close(y, y_true, dtype, what="kernel")
    assert_close(rn.rms_norm_ref(x, w, 1e-6, weight_offset), y_true, dtype, what="reference")


# --------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("chunked", [False, True], ids=["one_block", "chunked"])
@given(
    lead=LEADS, n=WIDTHS, layout=LAYOUTS, affine=st.sampled_from(["weight_bias", "weight", "none"]),
    shift=st.sampled_from([0.0, 3.0]), seed=SEEDS,
)
def test_add_layer_norm_matches_reference_and_fp64(
    triton_kernels, monkeypatch, dtype, chunked, lead, n, layout, affine, shift, seed
):
    torch.manual_seed(seed)
    if chunked:
        force_chunks(monkeypatch, n)
    x = make_input(lead, n, dtype, layout, shift=shift)
    r = make_input(lead, n, dtype, "row_padded")
    w = make_weight(n, dtype, "same") if affine != "none" else None
    b = torch.randn(n).to(dtype) if affine == "weight_bias" else None
    y, h = rn.add_layer_norm_triton(
        x, r, w, b, 1e-5, out=poisoned(x.shape, dtype), residual_out=poisoned(x.shape, dtype)
    )
    y_ref, h_ref = rn.add_layer_norm_ref(x, r, w, b, 1e-5)
    h_eager = x + r
    y_true = rn.layer_norm_ref(fp64(h_eager), fp64(w), fp64(b), 1e-5)
    assert torch.equal(h, h_eager), "h must be eager's x + residual bit for bit"
    assert torch.equal(h_ref, h_eager)
    assert_close(y, y_true, dtype, what="kernel y")
    assert_close(y_ref, y_true, dtype, what="reference y")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(lead=LEADS, n=WIDTHS, layout=LAYOUTS, with_bias=st.booleans(), seed=SEEDS)
def test_layer_norm_matches_reference_and_fp64(triton_kernels, dtype, lead, n, layout, with_bias, seed):
    torch.manual_seed(seed)
    x = make_input(lead, n, dtype, layout, shift=1.0)
    w = make_weight(n, dtype, "fp32")
    b = torch.randn(n).to(dtype) if with_bias else None
    y = rn.layer_norm_triton(x, w, b, 1e-5, out=poisoned(x.shape, dtype))
    y_true = rn.layer_norm_ref(fp64(x), fp64(w), fp64(b), 1e-5)
    assert_close(y, y_true, dtype, what="kernel")
    assert_close(rn.layer_norm_ref(x, w, b, 1e-5), y_true, dtype, what="reference")


# --------------------------------------------------------------------------- long rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [8193, 20000])
def test_long_rows_are_chunked_and_exact(triton_kernels, dtype, n):
    """Rows wider than MAX_BLOCK_N (16k/32k hidden sizes) take the chunked two-pass path."""
    assert n > rn.MAX_BLOCK_N
    x, r = torch.randn(3, n).to(dtype), torch.randn(3, n).to(dtype)
    w, b = torch.rand(n) + 0.5, torch.randn(n)
    y, h = rn.add_rms_norm_triton(
        x, r, w, 1e-6, 1.0, out=poisoned(x.shape, dtype), residual_out=poisoned(x.shape, dtype)
    )
    assert torch.equal(h, x + r)
    assert_close(y, rn.rms_norm_ref(fp64(x + r), fp64(w), 1e-6, 1.0), dtype, what="rms")
    y, h = rn.add_layer_norm_triton(x + 2, r, w, b, 1e-5, out=poisoned(x.shape, dtype))
    assert torch.equal(h, x + 2 + r)
    assert_close(y, rn.layer_norm_ref(fp64(x + 2 + r), fp64(w), fp64(b), 1e-5), dtype, what="layer")


def test_reference_agrees_with_torch_functional():
    """fp32 references equal PyTorch's own norms (the semantics, not just our algebra)."""
    x, w, b = torch.randn(4, 5, 96), torch.randn(96), torch.randn(96)
    assert_close(rn.layer_norm_ref(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (96,), w, b, 1e-5))
    if hasattr(torch.nn.functional, "rms_norm"):
        assert_close(rn.rms_norm_ref(x, w, 1e-6), torch.nn.functional.rms_norm(x, (96,), w, 1e-6))
    assert_close(rn.rms_norm_ref(x, w, 1e-6, 1.0), rn.rms_norm_ref(x, w + 1.0, 1e-6))


# --------------------------------------------------------------------------- registered ops
def _op_cases():
    x = make_input([2, 3], 40, torch.bfloat16, "merged_half")
    r = make_input([2, 3], 40, torch.bfloat16, "contiguous")
    w32, w16 = torch.rand(40) + 0.5, (torch.rand(40) + 0.5).to(torch.bfloat16)
    b16 = torch.randn(40).to(torch.bfloat16)
    return [
        (torch.ops.llmopt.rms_norm.default, (x, w32, 1e-6, 1.0)),
        (torch.ops.llmopt.add_rms_norm.default, (x, r, w16, 1e-6, 0.0)),
        (torch.ops.llmopt.layer_norm.default, (x, None, b16, 1e-5)),
        (torch.ops.llmopt.add_layer_norm.default, (x, r, w16, b16, 1e-5)),
        (torch.ops.llmopt.add_layer_norm.default, (x.float(), r.float(), None, None, 1e-5)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(triton_kernels, case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_kernel_and_reference_paths_agree(monkeypatch):
    """The registered ops give the same result through the kernel and the reference, and
    return fresh contiguous tensors that alias no input."""
    for op, args in _op_cases():
        monkeypatch.setenv("LLMOPT_KERNELS", "triton")
        kernel = op(*args)
        monkeypatch.setenv("LLMOPT_KERNELS", "reference")
        reference = op(*args)
        kernel = kernel if isinstance(kernel, tuple) else (kernel,)
        reference = reference if isinstance(reference, tuple) else (reference,)
        for k, e in zip(kernel, reference):
            assert k.is_contiguous() and k.shape == args[0].shape and k.dtype == args[0].dtype
            assert all(k.data_ptr() != a.data_ptr() for a in args if isinstance(a, torch.Tensor))
            assert_close(k, e.double(), what=str(op))


def test_fp64_and_empty_inputs_take_the_reference(triton_kernels):
    x, r, w = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64), torch.rand(10)
    y, h = torch.ops.llmopt.add_rms_norm(x, r, w, 1e-6)
    assert y.dtype == torch.float64 and torch.equal(h, x + r)
    empty = torch.empty(0, 7, 16, dtype=torch.bfloat16)
    y, h = torch.ops.llmopt.add_layer_norm(empty, empty, None, None, 1e-5)
    assert y.shape == h.shape == empty.shape


def test_inside_torch_compile_fullgraph(triton_kernels):
    def block(x, residual, w_attn, w_mlp):
        y, h = torch.ops.llmopt.add_rms_norm(x, residual, w_attn, 1e-6)
        y2, h2 = torch.ops.llmopt.add_rms_norm(y * 2.0, h, w_mlp, 1e-6, 1.0)
        return y2, h2

    x, r = torch.randn(2, 5, 48, dtype=torch.bfloat16), torch.randn(2, 5, 48, dtype=torch.bfloat16)
    w1, w2 = torch.rand(48) + 0.5, torch.rand(48)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = compiled(x, r, w1, w2)
    y, h = rn.add_rms_norm_ref(x, r, w1, 1e-6)
    want = rn.add_rms_norm_ref(y * 2.0, h, w2, 1e-6, 1.0)
    for g, e in zip(got, want):
        assert_close(g, e.double(), what="compiled")


# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(triton_kernels):
    x = torch.randn(2, 8, dtype=torch.float16)
    w = torch.rand(8)
    with pytest.raises(ValueError, match="residual must match x"):
        rn.add_rms_norm_triton(x, torch.randn(2, 7, dtype=torch.float16), w, 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        torch.ops.llmopt.add_layer_norm(x, x.float(), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be a floating-point \[8\] tensor"):
        torch.ops.llmopt.rms_norm(x, torch.rand(9), 1e-6)
    with pytest.raises(ValueError, match=r"bias must be a floating-point \[8\] tensor"):
        rn.layer_norm_triton(x, None, torch.rand(4, 2), 1e-5)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.llmopt.rms_norm(torch.ones(2, 8, dtype=torch.int32), w, 1e-6)
    with pytest.raises(TypeError, match="Triton kernel supports"):
        rn.rms_norm_triton(x.double(), w, 1e-6)
    with pytest.raises(ValueError, match="non-empty last dim"):
        rn.rms_norm_triton(torch.empty(3, 0), torch.empty(0), 1e-6)
    with pytest.raises(ValueError, match="out must be a torch.float16 tensor of shape"):
        rn.rms_norm_triton(x, w, 1e-6, out=torch.empty(2, 8))


def test_rows_view_shares_storage_when_strides_allow():
    gu = torch.randn(2, 3, 10)
    rows = rn.rows_view(gu[..., 5:])
    assert rows.shape == (6, 5) and rows.stride() == (10, 1) and rows.data_ptr() == gu[..., 5:].data_ptr()
    assert rn.rows_view(torch.randn(3, 2, 4).transpose(0, 1)) is None
    assert rn.rows_view(torch.randn(1, 1, 4)[:, :, ::2]).shape == (1, 2)
    assert math.prod(rn.rows_view(torch.randn(4, 1, 3)[:, :, :]).shape) == 12
