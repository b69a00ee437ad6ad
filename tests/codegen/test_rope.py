"""Specification of llmopt::rope: q and k rotated in one launch, both RoPE layouts, partial rotary.

Kernel (interpreter, NaN-poisoned outputs) vs eager reference vs fp64 truth over ragged
batch/positions/heads (GQA), head dims with partial rotary, the rotate_half and interleaved
layouts, and the memory layouts models produce: HF's ``view(B, S, H, D).transpose(1, 2)``,
slices of a merged QKV projection, cos/sin broadcast over the batch or expanded with stride
0. The reference itself is checked against Hugging Face's own ``apply_rotary_pos_emb``.
"""
import pytest
import torch
from conftest import assert_close, poisoned
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen import rope as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def rope_tables(batch, seq, rotary_dim, interleaved, dtype, offset=0, base=10000.0):
    """cos, sin: [batch, seq, rotary_dim] as the model computes them (per dim, duplicated
    halves for rotate_half, repeat-interleaved pairs for the interleaved layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    pos = offset + torch.arange(seq, dtype=torch.float64)[None, :] + 3 * torch.arange(batch)[:, None]
    freqs = pos[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_qk(batch, heads_q, heads_k, seq, head_dim, dtype, layout):
    """q [B, Hq, S, D], k [B, Hk, S, D] in the layout a model hands over."""
    if layout == "hf_transposed":  # proj(x).view(B, S, H, D).transpose(1, 2)
        q = torch.randn(batch, seq, heads_q, head_dim).transpose(1, 2)
        k = torch.randn(batch, seq, heads_k, head_dim).transpose(1, 2)
    elif layout == "merged_qkv":  # slices of one merged QKV matmul output
        qkv = torch.randn(batch, seq, (heads_q + 2 * heads_k) * head_dim)
        q = qkv[..., : heads_q * head_dim].view(batch, seq, heads_q, head_dim).transpose(1, 2)
        k = qkv[..., heads_q * head_dim : (heads_q + heads_k) * head_dim]
        k = k.view(batch, seq, heads_k, head_dim).transpose(1, 2)
    else:
        q = torch.randn(batch, heads_q, seq, head_dim)
        k = torch.randn(batch, heads_k, seq, head_dim)
    return q.to(dtype), k.to(dtype)


def arrange_tables(cos, sin, batch, cos_layout):
    if cos_layout == "batch1":  # one table for the whole batch: broadcast
        return cos[:1], sin[:1]
    if cos_layout == "expanded":  # [1, S, rd].expand(B, S, rd): batch stride 0
        return cos[:1].expand(batch, -1, -1), sin[:1].expand(batch, -1, -1)
    if cos_layout == "hf_4d":  # HF passes cos.unsqueeze(1): [B, 1, S, rd]
        return cos.unsqueeze(1), sin.unsqueeze(1)
    if cos_layout == "strided":  # a slice of a wider cache of tables
        wide_c = torch.cat((cos, cos), dim=-1)
        wide_s = torch.cat((sin, sin), dim=-1)
        return wide_c[..., : cos.shape[-1]], wide_s[..., : sin.shape[-1]]
    return cos, sin


@st.composite
def rope_shapes(draw):
    head_dim = draw(st.sampled_from([2, 8, 20, 64, 80, 96, 128]))
    # full, half (NeoX, GPT-J style) and 0.4 (Phi-2: 32 of 80) rotary fractions, kept even
    fractions = {head_dim, max(2, head_dim // 4 * 2), max(2, head_dim // 5 * 2)}
    rotary_dim = draw(st.sampled_from(sorted(fractions)))
    heads_q = draw(st.sampled_from([1, 2, 3, 8, 17]))
    heads_k = draw(st.sampled_from(sorted({1, max(1, heads_q // 2), heads_q})))
    return dict(
        # positions only multiply programs (no masking along S): keep them few in the interpreter
        batch=draw(st.sampled_from([1, 2, 3])), seq=draw(st.sampled_from([1, 2, 5])),
        heads_q=heads_q, heads_k=heads_k, head_dim=head_dim, rotary_dim=rotary_dim,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@given(
    shape=rope_shapes(),
    layout=st.sampled_from(["hf_transposed", "merged_qkv", "contiguous"]),
    cos_layout=st.sampled_from(["per_batch", "batch1", "expanded", "hf_4d", "strided"]),
    table_dtype=st.sampled_from(["same", "fp32"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_and_fp64(
    triton_kernels, dtype, interleaved, shape, layout, cos_layout, table_dtype, seed
):
    torch.manual_seed(seed)
    b, s, hq, hk, d, rd = (shape[k] for k in ("batch", "seq", "heads_q", "heads_k", "head_dim", "rotary_dim"))
    q, k = make_qk(b, hq, hk, s, d, dtype, layout)
    cos, sin = rope_tables(b, s, rd, interleaved, dtype if table_dtype == "same" else torch.float32, offset=5)
    cos, sin = arrange_tables(cos, sin, b, cos_layout)
    q_out, k_out = R.rope_triton(
        q, k, cos, sin, rd, interleaved, q_out=poisoned(q.shape, dtype), k_out=poisoned(k.shape, dtype)
    )
    q_true, k_true = R.rope_ref(q.double(), k.double(), cos.double(), sin.double(), rd, interleaved)
    q_ref, k_ref = R.rope_ref(q, k, cos, sin, rd, interleaved)
    for got, ref, truth, name in ((q_out, q_ref, q_true, "q"), (k_out, k_ref, k_true, "k")):
        assert_close(got, truth, dtype, what=f"kernel {name}")
        assert_close(ref, truth, dtype, what=f"reference {name}")
        # pass-through dims are copied bit for bit
        assert torch.equal(got[..., rd:], (q if name == "q" else k)[..., rd:])


def test_outputs_with_any_strides(triton_kernels):
    """A given output may be strided (e.g. written straight into a [B, S, H, D] buffer)."""
    q, k = make_qk(2, 4, 2, 5, 16, torch.bfloat16, "hf_transposed")
    cos, sin = rope_tables(2, 5, 16, False, torch.float32)
    q_buf = poisoned((2, 5, 4, 16), torch.bfloat16)
    k_buf = poisoned((2, 5, 2, 16), torch.bfloat16)
    R.rope_triton(q, k, cos, sin, 16, False, q_out=q_buf.transpose(1, 2), k_out=k_buf.transpose(1, 2))
    q_ref, k_ref = R.rope_ref(q, k, cos, sin, 16, False)
    assert torch.equal(q_buf.transpose(1, 2), q_ref) and torch.equal(k_buf.transpose(1, 2), k_ref)


# --------------------------------------------------------------------------- HF semantics
@pytest.fixture(scope="module")
def hf_rope():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    return llama.apply_rotary_pos_emb, gptj.apply_rotary_pos_emb


def test_reference_equals_hf_llama_rotate_half(hf_rope):
    llama_rope, _ = hf_rope
    q, k = make_qk(2, 4, 2, 6, 32, torch.float32, "hf_transposed")
    cos, sin = rope_tables(2, 6, 32, False, torch.float32)
    for got, want in zip(R.rope_ref(q, k, cos, sin, 32, False), llama_rope(q, k, cos, sin)):
        assert_close(got, want)


def test_reference_equals_hf_partial_rotary(hf_rope):
    """Phi / NeoX: rotate the first rotary_dim dims with rotate_half, pass the rest."""
    llama_rope, _ = hf_rope
    q, k = make_qk(1, 3, 3, 7, 80, torch.float32, "contiguous")
    cos, sin = rope_tables(1, 7, 32, False, torch.float32)
    q_rot, k_rot = llama_rope(q[..., :32], k[..., :32], cos, sin)
    q_want, k_want = torch.cat((q_rot, q[..., 32:]), -1), torch.cat((k_rot, k[..., 32:]), -1)
    for got, want in zip(R.rope_ref(q, k, cos, sin, 32, False), (q_want, k_want)):
        assert_close(got, want)


def test_reference_equals_hf_gptj_interleaved(hf_rope):
    """GPT-J: rotate_every_two on the first rotary_dim dims; HF passes sin/cos per pair and
    repeat-interleaves them, we take them per dim."""
    _, gptj_rope = hf_rope
    b, s, h, d, rd = 2, 5, 4, 24, 8
    x = torch.randn(b, s, h, d)  # GPT-J applies RoPE before the transpose to [B, H, S, D]
    cos, sin = rope_tables(b, s, rd, True, torch.float32)
    want = torch.cat((gptj_rope(x[..., :rd], sin[..., ::2], cos[..., ::2]), x[..., rd:]), -1).transpose(1, 2)
    got, _ = R.rope_ref(x.transpose(1, 2), x.transpose(1, 2), cos, sin, rd, True)
    assert_close(got, want)


# --------------------------------------------------------------------------- registered op
@pytest.mark.parametrize(
    "dtype, interleaved, rotary_dim, cos_layout",
    [(torch.bfloat16, False, 16, "batch1"), (torch.float32, True, 8, "per_batch"), (torch.float16, False, 8, "hf_4d")],
)
def test_opcheck(triton_kernels, dtype, interleaved, rotary_dim, cos_layout):
    q, k = make_qk(2, 4, 2, 3, 16, dtype, "merged_qkv")
    cos, sin = arrange_tables(*rope_tables(2, 3, rotary_dim, interleaved, dtype), 2, cos_layout)
    torch.library.opcheck(torch.ops.llmopt.rope.default, (q, k, cos, sin, rotary_dim, interleaved))


def test_op_paths_agree_and_return_fresh_contiguous(monkeypatch):
    q, k = make_qk(2, 4, 2, 3, 16, torch.bfloat16, "hf_transposed")
    cos, sin = rope_tables(2, 3, 16, False, torch.bfloat16)
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    kernel = torch.ops.llmopt.rope(q, k, cos, sin, 16, False)
    monkeypatch.setenv("LLMOPT_KERNELS", "reference")
    reference = torch.ops.llmopt.rope(q, k, cos, sin, 16, False)
    for got, want, x in zip(kernel, reference, (q, k)):
        assert got.is_contiguous() and got.shape == x.shape and got.dtype == x.dtype
        assert got.data_ptr() not in (q.data_ptr(), k.data_ptr())
        assert torch.equal(got, want)


def test_inside_torch_compile_fullgraph(triton_kernels):
    def attention_inputs(x, w_qkv, cos, sin):
        b, s, _ = x.shape
        q, k, _v = (x @ w_qkv.t()).split([4 * 8, 2 * 8, 2 * 8], dim=-1)
        q = q.view(b, s, 4, 8).transpose(1, 2)
        k = k.view(b, s, 2, 8).transpose(1, 2)
        return torch.ops.llmopt.rope(q, k, cos, sin, 8, False)

    x, w = torch.randn(2, 5, 16), torch.randn(64, 16) / 4
    cos, sin = rope_tables(1, 5, 8, False, torch.float32)
    got = torch.compile(attention_inputs, backend="aot_eager", fullgraph=True)(x, w, cos, sin)
    q, k, _ = (x @ w.t()).split([32, 16, 16], dim=-1)
    want = R.rope_ref(q.view(2, 5, 4, 8).transpose(1, 2), k.view(2, 5, 2, 8).transpose(1, 2), cos, sin, 8, False)
    for g, e in zip(got, want):
        assert_close(g, e)


def test_bad_inputs_raise_clear_errors(triton_kernels):
    q, k = make_qk(2, 4, 2, 3, 16, torch.float32, "contiguous")
    cos, sin = rope_tables(2, 3, 16, False, torch.float32)
    op = torch.ops.llmopt.rope
    with pytest.raises(ValueError, match=r"rotary_dim must be an even int in \[2, head_dim=16\]"):
        op(q, k, cos, sin, 15, False)
    with pytest.raises(ValueError, match="rotary_dim must be an even int"):
        op(q, k, cos, sin, 32, False)
    with pytest.raises(ValueError, match=r"cos must be \[B or 1, S, rotary_dim\] = \[2 or 1, 3, 8\]"):
        op(q, k, cos, sin, 8, False)
    with pytest.raises(ValueError, match="sin must be"):
        R.rope_triton(q, k, cos, sin[:, :2], 16, False)
    with pytest.raises(ValueError, match=r"must be \[B, H, S, D\]"):
        op(q[0], k[0], cos, sin, 16, False)
    with pytest.raises(ValueError, match="must agree on B, S and D"):
        op(q, k[..., :8], cos, sin, 8, False)
    with pytest.raises(ValueError, match="one dtype and device"):
        op(q, k.half(), cos, sin, 16, False)
    with pytest.raises(ValueError, match="q_out must be a torch.float32 tensor"):
        R.rope_triton(q, k, cos, sin, 16, False, q_out=torch.empty(2, 3, 4, 16))
    with pytest.raises(TypeError, match="Triton kernel supports"):
        R.rope_triton(q.double(), k.double(), cos, sin, 16, False)
