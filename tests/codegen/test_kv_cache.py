"""llmopt::kv_cache_append: Triton (interpreter) vs reference, in place, any strides."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen import kv_cache as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, H, S_max, S_new, D, dtype, strided):
    kc = torch.randn(B, H, S_max, D).to(dtype)
    vc = torch.randn(B, H, S_max, D).to(dtype)
    if strided:  # [B, S, H, D] storage seen as [B, H, S, D] (HF's transpose(1, 2))
        k = torch.randn(B, S_new, H, D).to(dtype).transpose(1, 2)
        v = torch.randn(B, S_new, H, D).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(B, H, S_new, D).to(dtype)
        v = torch.randn(B, H, S_new, D).to(dtype)
    return kc, vc, k, v


@given(
    B=st.integers(1, 3), H=st.integers(1, 3), S_max=st.sampled_from([1, 7, 17, 33]), D=st.sampled_from([8, 16, 80]),
    dtype=st.sampled_from(DTYPES), strided=st.booleans(), per_sequence=st.booleans(), data=st.data(),
)
def test_append_matches_reference(B, H, S_max, D, dtype, strided, per_sequence, data):
    S_new = data.draw(st.integers(1, S_max))
    kc, vc, k, v = make(B, H, S_max, S_new, D, dtype, strided)
    if per_sequence:
        pos = torch.stack([torch.randperm(S_max)[:S_new] for _ in range(B)])
    else:
        pos = torch.randperm(S_max)[:S_new]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    K.kv_cache_append_ref(kc_ref, vc_ref, pos, k, v)
    K.kv_cache_append_triton(kc, vc, pos, k, v)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_op_writes_in_place_through_triton(triton_kernels):
    kc, vc, k, v = make(2, 2, 9, 1, 16, torch.float16, True)
    ptr = kc.data_ptr()
    pos = torch.tensor([4])
    torch.ops.llmopt.kv_cache_append(kc, vc, pos, k, v)
    assert kc.data_ptr() == ptr
    assert torch.equal(kc[:, :, 4:5], k) and torch.equal(vc[:, :, 4:5], v)


def test_opcheck(triton_kernels):
    kc, vc, k, v = make(1, 2, 8, 2, 16, torch.float32, False)
    torch.library.opcheck(torch.ops.llmopt.kv_cache_append.default, (kc, vc, torch.tensor([3, 4]), k, v))


def test_inside_torch_compile(triton_kernels):
    kc, vc, k, v = make(1, 2, 8, 1, 16, torch.float32, False)

    def step(kc, vc, pos, k, v):
        torch.ops.llmopt.kv_cache_append(kc, vc, pos, k, v)
        return kc.sum()

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(kc, vc, torch.tensor([5]), k, v)
    assert torch.equal(kc[:, :, 5:6], k)
    torch.testing.assert_close(out, kc.sum())


def test_bad_inputs_are_explained():
    kc, vc, k, v = make(1, 2, 8, 2, 16, torch.float32, False)
    with pytest.raises(ValueError, match="positions shape"):
        torch.ops.llmopt.kv_cache_append(kc, vc, torch.tensor([1]), k, v)
    with pytest.raises(TypeError, match="int32 or int64"):
        torch.ops.llmopt.kv_cache_append(kc, vc, torch.tensor([1.0, 2.0]), k, v)
    with pytest.raises(ValueError, match="do not fit the cache"):
        torch.ops.llmopt.kv_cache_append(kc, vc, torch.tensor([1, 2]), k[:, :1], v[:, :1])


# ----------------------------------------------------------------------------- rope + append
from conftest import assert_close, poisoned  # noqa: E402


def rope_inputs(B, HQ, HK, S, D, rd, dtype, S_max=24):
    q = torch.randn(B, S, HQ, D).to(dtype).transpose(1, 2)
    k = torch.randn(B, S, HK, D).to(dtype).transpose(1, 2)
    v = torch.randn(B, S, HK, D).to(dtype).transpose(1, 2)
    angles = torch.randn(1, S, rd // 2)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    kc = torch.randn(B, HK, S_max, D).to(dtype)
    vc = torch.randn(B, HK, S_max, D).to(dtype)
    return q, k, v, cos, sin, kc, vc


@given(
    B=st.integers(1, 2), HQ=st.sampled_from([2, 4]), G=st.sampled_from([1, 2]), S=st.integers(1, 5),
    D=st.sampled_from([16, 32]), partial=st.booleans(), interleaved=st.booleans(), dtype=st.sampled_from(DTYPES),
)
def test_rope_append_matches_rope_then_append(B, HQ, G, S, D, partial, interleaved, dtype):
    rd = D // 2 if partial else D
    q, k, v, cos, sin, kc, vc = rope_inputs(B, HQ, HQ // G, S, D, rd, dtype)
    pos = torch.randperm(kc.shape[2])[:S]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = K.rope_kv_cache_append_ref(q, k, v, cos, sin, rd, interleaved, kc_ref, vc_ref, pos)
    out = poisoned(q.shape, dtype)
    K.rope_kv_cache_append_triton(q, k, v, cos, sin, rd, interleaved, kc, vc, pos, q_out=out)
    assert_close(out, q_ref, dtype)
    assert_close(kc, kc_ref, dtype)
    assert torch.equal(vc, vc_ref)


def test_rope_append_opcheck_and_compile(triton_kernels):
    q, k, v, cos, sin, kc, vc = rope_inputs(1, 4, 2, 1, 16, 16, torch.float32)
    pos = torch.tensor([7])
    torch.library.opcheck(torch.ops.llmopt.rope_kv_cache_append.default, (q, k, v, cos, sin, 16, False, kc, vc, pos))
    f = torch.compile(lambda *a: torch.ops.llmopt.rope_kv_cache_append(*a) * 2, backend="aot_eager", fullgraph=True)
    out = f(q, k, v, cos, sin, 16, False, kc, vc, pos)
    assert torch.isfinite(out).all()
