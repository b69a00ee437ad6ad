"""codegen/zero_pages.py: lazily zeroed CPU tensors and llmopt::zeros_index_copy.

No Triton kernel here (an allocation and an ATen ``index_copy_``): the op is checked against
eager ``torch.zeros(...).index_copy_`` and an fp64 truth, lazy and not, and the allocation
for what makes it worth having: pages are faulted in on first write, and given back when
the tensor dies.
"""
import resource

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen import zero_pages as Z
from llmopt.tools.peak_memory import _proc_status_kb

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64, torch.bool]
MB = 1 << 20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_bytes() -> int:
    kb = _proc_status_kb("VmRSS")
    assert kb is not None, "no VmRSS in /proc/self/status"
    return kb * 1024


@pytest.fixture
def lazy_everything(monkeypatch):
    """Every non-empty CPU allocation of zero_pages maps lazily."""
    monkeypatch.setattr(Z, "MIN_BYTES", 1)


@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=4), dtype=st.sampled_from(DTYPES), lazy=st.booleans())
def test_zeros_is_torch_zeros(shape, dtype, lazy):
    saved = Z.MIN_BYTES
    Z.MIN_BYTES = 1 if lazy else saved
    try:
        got = Z.zeros(shape, dtype)
    finally:
        Z.MIN_BYTES = saved
    want = torch.zeros(shape, dtype=dtype)
    assert got.shape == want.shape and got.dtype == dtype and got.device == want.device
    assert got.is_contiguous() and torch.equal(got, want)
    assert not torch.signbit(got.float()).any()  # +0.0, not -0.0
    if got.numel():
        got.view(-1)[-1] = 1  # writable
        assert int(got.view(-1)[-1]) == 1 and int(got.sum()) == 1
        assert got.untyped_storage().resizable() == (not lazy)  # the lazy form is foreign memory


def test_small_and_non_cpu_allocations_are_torch_zeros():
    assert not Z.lazily_zeroed((Z.MIN_BYTES // 4 - 1,), torch.float32)
    assert Z.lazily_zeroed((Z.MIN_BYTES // 4,), torch.float32)
    assert not Z.lazily_zeroed((0, 1 << 30), torch.float32)
    assert not Z.lazily_zeroed((1 << 30,), torch.float32, "meta")
    assert Z.zeros((1 << 20,), torch.float32, "meta").device.type == "meta"
    assert Z.zeros((16,), torch.float32).untyped_storage().resizable()
    with pytest.raises(ValueError, match="negative dimension"):
        Z.zeros((2, -1), torch.float32)


def test_pages_are_faulted_in_on_first_write_only():
    nbytes = 64 * MB
    pages = nbytes // 4096
    before = minor_faults()
    x = Z.zeros((16, 1024, 1024), torch.float32)  # 64 MiB, lazily mapped
    assert minor_faults() - before < pages // 100, "the allocation itself must not touch its pages"
    assert float(x[::4, ::64, ::64].sum()) == 0.0  # reads of untouched pages: the zero page
    before = minor_faults()
    x[:, 0, :64] = 1.0  # one row of each of the 16 slabs: a page each
    assert minor_faults() - before < 200
    assert float(x.sum()) == 16 * 64


def test_memory_is_given_back_when_the_tensor_dies():
    x = Z.zeros((64 * MB // 4,), torch.float32)
    x.fill_(1.0)  # now resident
    resident = rss_bytes()
    del x
    assert resident - rss_bytes() > 48 * MB  # unmapped with the storage, not kept by an allocator


@given(
    B=st.integers(1, 3), H=st.integers(1, 3), S_max=st.sampled_from([1, 5, 17, 40]), D=st.sampled_from([1, 8, 24]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), dim=st.sampled_from([2, -2]),
    lazy=st.booleans(), data=st.data(),
)
def test_zeros_index_copy_matches_eager_and_the_fp64_truth(B, H, S_max, D, dtype, dim, lazy, data):
    S_new = data.draw(st.integers(1, S_max))
    index = torch.randperm(S_max)[:S_new]
    # HF's layout: [B, S, H, D] storage viewed as [B, H, S, D]
    source = torch.randn(B, S_new, H, D).to(dtype).transpose(1, 2)
    saved = Z.MIN_BYTES
    Z.MIN_BYTES = 1 if lazy else saved
    try:
        got = torch.ops.llmopt.zeros_index_copy(source, dim, index, [B, H, S_max, D])
    finally:
        Z.MIN_BYTES = saved
    eager = torch.zeros(B, H, S_max, D, dtype=dtype).index_copy_(dim, index, source)
    truth = torch.zeros(B, H, S_max, D, dtype=torch.float64).index_copy_(dim, index, source.double())
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, eager)
    assert torch.equal(got.double(), truth)  # a copy: exact


def test_zeros_index_copy_under_opcheck_and_compile(lazy_everything):
    source = torch.randn(2, 3, 4, 8)
    index = torch.tensor([5, 0, 9])
    torch.library.opcheck(torch.ops.llmopt.zeros_index_copy.default, (source.transpose(1, 2), 2, index, [2, 4, 12, 8]))

    def f(source, index):
        return torch.ops.llmopt.zeros_index_copy(source, 1, index, [2, 12, 4, 8]) * 2

    torch._dynamo.reset()
    got = torch.compile(f, backend="inductor", fullgraph=True)(source, index)
    assert torch.equal(got, torch.zeros(2, 12, 4, 8).index_copy_(1, index, source) * 2)


def test_zeros_index_copy_bad_input_says_what_is_wrong():
    source = torch.randn(1, 2, 3, 4)
    index = torch.arange(3)
    op = torch.ops.llmopt.zeros_index_copy
    with pytest.raises(ValueError, match="size .* has 3 dims, source has 4"):
        op(source, 2, index, [1, 2, 8])
    with pytest.raises(ValueError, match="dim 4 out of range"):
        op(source, 4, index, [1, 2, 8, 4])
    for bad in (index.float(), index.int(), index[None]):
        with pytest.raises(ValueError, match="index must be a 0-D or 1-D int64 tensor"):
            op(source, 2, bad, [1, 2, 8, 4])
    with pytest.raises((IndexError, RuntimeError)):
        op(source, 2, torch.tensor([0, 1, 8]), [1, 2, 8, 4])  # position 8 of 8 slots: index_copy_'s own check
