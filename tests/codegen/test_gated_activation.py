"""Specification of llmopt::gated_activation: ``act(gate) * up`` with one rounding.

Kernel (interpreter, NaN-poisoned output) vs eager reference vs fp64 truth, over ragged
widths, all three activations, fp32/fp16/bf16, and the layouts the graph hands over, above
all the two halves of a merged gate/up matmul output (row stride 2 I), read without a copy.
"""
import pytest
import torch
from conftest import assert_close, poisoned
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen import gated_activation as ga
from llmopt.codegen.residual_norm import rows_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
WIDTHS = st.sampled_from([1, 2, 7, 17, 100, 257, 1000, 1376, 2752])
LEADS = st.lists(st.sampled_from([1, 2, 3, 7, 17]), min_size=0, max_size=2)
LAYOUTS = st.sampled_from(["merged_halves", "contiguous", "col_strided", "lead_permuted"])


def make_gate_up(lead, width, dtype, layout):
    """gate, up: [*lead, width] in the given layout, values ~ 3 N(0, 1) (both tails of act)."""
    lead = list(lead)
    if layout == "merged_halves":  # gu = x @ [W_gate; W_up]^T, then gu[..., :I], gu[..., I:]
        gu = (3 * torch.randn(*lead, 2 * width)).to(dtype)
        return gu[..., :width], gu[..., width:]
    if layout == "col_strided":
        both = (3 * torch.randn(2, *lead, 2 * width)).to(dtype)
        return both[0][..., ::2], both[1][..., 1::2]
    if layout == "lead_permuted" and len(lead) >= 2:  # leading dims no single stride describes
        both = (3 * torch.randn(2, lead[1], lead[0], *lead[2:], width)).to(dtype)
        return both[0].transpose(0, 1), both[1].transpose(0, 1)
    both = (3 * torch.randn(2, *lead, width)).to(dtype)
    return both[0], both[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@given(lead=LEADS, width=WIDTHS, layout=LAYOUTS, seed=st.integers(0, 2**16))
def test_kernel_matches_reference_and_fp64(triton_kernels, dtype, activation, lead, width, layout, seed):
    torch.manual_seed(seed)
    gate, up = make_gate_up(lead, width, dtype, layout)
    out = ga.gated_activation_triton(gate, up, activation, out=poisoned(gate.shape, dtype))
    # The fp64 truth, correctly rounded to the output dtype: act(-9) * up underflows fp16, and
    # a tensor of one such element would otherwise measure the dtype's range, not the kernel.
    truth = ga.gated_activation_ref(gate.double(), up.double(), activation).to(dtype).double()
    assert_close(out, truth, dtype, what="kernel")
    assert_close(ga.gated_activation_ref(gate, up, activation), truth, dtype, what="reference")


def test_merged_halves_are_read_in_place():
    """The halves of a merged gate/up output are rows of one strided view: no copy."""
    gu = torch.randn(2, 5, 2 * 96, dtype=torch.bfloat16)
    for half in (gu[..., :96], gu[..., 96:]):
        rows = rows_view(half)
        assert rows is not None and rows.stride() == (2 * 96, 1) and rows.data_ptr() == half.data_ptr()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saturated_inputs_stay_finite_and_exact(triton_kernels, activation):
    """Very negative / positive gates: act -> 0 and act -> g, never inf/inf = NaN."""
    gate = torch.tensor([-1e4, -100.0, -30.0, -8.0, -1e-6, 0.0, 1e-6, 8.0, 30.0, 100.0, 1e4])
    up = torch.ones_like(gate)
    out = ga.gated_activation_triton(gate, up, activation, out=poisoned(gate.shape, torch.float32))
    truth = ga.gated_activation_ref(gate.double(), up.double(), activation)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_element_keeps_fp32_relative_precision(triton_kernels, activation):
    """Elementwise, not just in norm: the negative tails (act ~ 1e-22 at g = -10) are not lost
    to cancellation (eager's fp32 1 + erf(g) has 100% error there)."""
    gate = torch.linspace(-10.0, 10.0, 401)
    up = torch.ones_like(gate)
    out = ga.gated_activation_triton(gate, up, activation).double()
    truth = ga.gated_activation_ref(gate.double(), up.double(), activation)
    normal = truth.abs() > 1e-30
    assert ((out - truth).abs()[normal] / truth.abs()[normal]).max() < 1e-5
    assert ((ga.gated_activation_ref(gate, up, activation) - truth).abs()[normal] / truth.abs()[normal]).max() < 1e-5


def test_reference_is_hf_eager_math_in_fp32():
    """The fp32 reference is what HF's MLP computes, ACT2FN[...](gate) * up (its GELUs in
    cancellation-free forms: equal to torch's within fp32 precision)."""
    gate, up = 3 * torch.randn(4, 64), torch.randn(4, 64)
    f = torch.nn.functional
    assert torch.equal(ga.gated_activation_ref(gate, up, "silu"), f.silu(gate) * up)
    assert_close(ga.gated_activation_ref(gate, up, "gelu"), f.gelu(gate.double()) * up)
    assert_close(ga.gated_activation_ref(gate, up, "gelu_tanh"), f.gelu(gate.double(), approximate="tanh") * up)


@pytest.mark.parametrize(
    "activation, dtype, layout",
    [("silu", torch.bfloat16, "merged_halves"), ("gelu_tanh", torch.float32, "contiguous"),
     ("gelu", torch.float16, "col_strided")],
)
def test_opcheck(triton_kernels, activation, dtype, layout):
    gate, up = make_gate_up([2, 3], 40, dtype, layout)
    torch.library.opcheck(torch.ops.llmopt.gated_activation.default, (gate, up, activation))


def test_op_paths_agree_and_return_fresh_contiguous(monkeypatch):
    gate, up = make_gate_up([3, 5], 33, torch.bfloat16, "merged_halves")
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    kernel = torch.ops.llmopt.gated_activation(gate, up, "silu")
    monkeypatch.setenv("LLMOPT_KERNELS", "reference")
    reference = torch.ops.llmopt.gated_activation(gate, up, "silu")
    assert kernel.is_contiguous() and kernel.shape == gate.shape and kernel.dtype == gate.dtype
    assert kernel.data_ptr() not in (gate.data_ptr(), up.data_ptr())
    assert torch.equal(kernel, reference)
    # fp64 and empty inputs go to the reference even with the kernel forced
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    g64, u64 = gate.double(), up.double()
    assert torch.equal(torch.ops.llmopt.gated_activation(g64, u64, "gelu"), ga.gated_activation_ref(g64, u64, "gelu"))
    empty = torch.empty(0, 4, 8, dtype=torch.float16)
    assert torch.ops.llmopt.gated_activation(empty, empty, "silu").shape == empty.shape


def test_inside_torch_compile_fullgraph(triton_kernels):
    def mlp(x, w_gate_up, w_down):
        gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)  # halves of the merged matmul, views
        return torch.ops.llmopt.gated_activation(gate, up, "silu") @ w_down.t()

    x, w_gu, w_down = torch.randn(2, 3, 16), torch.randn(2 * 24, 16) / 4, torch.randn(16, 24) / 4
    got = torch.compile(mlp, backend="aot_eager", fullgraph=True)(x, w_gu, w_down)
    gate, up = (x @ w_gu.t()).chunk(2, dim=-1)
    assert_close(got, (torch.nn.functional.silu(gate) * up) @ w_down.t())


def test_bad_inputs_raise_clear_errors(triton_kernels):
    gate, up = make_gate_up([2], 8, torch.float32, "contiguous")
    with pytest.raises(ValueError, match="unknown activation 'relu'; valid activations: silu, gelu, gelu_tanh"):
        torch.ops.llmopt.gated_activation(gate, up, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        ga.gated_activation_ref(gate, up, "swish")
    with pytest.raises(ValueError, match="same shape, dtype and device"):
        torch.ops.llmopt.gated_activation(gate, up[:, :4], "silu")
    with pytest.raises(ValueError, match="same shape, dtype and device"):
        ga.gated_activation_triton(gate, up.half(), "silu")
    with pytest.raises(TypeError, match="floating point"):
        torch.ops.llmopt.gated_activation(gate.int(), up.int(), "silu")
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor"):
        ga.gated_activation_triton(gate, up, "silu", out=torch.empty(8, 2))
