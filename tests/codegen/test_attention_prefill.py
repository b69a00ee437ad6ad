"""Prefill attention (``llmopt::attention_prefill``): kernel vs reference vs fp64 truth.

Four implementations are compared: the Triton kernel (in the interpreter on CPU, writing
into a NaN-poisoned output), ``attention_prefill_ref`` in the input dtype, the compiled CPU
graph's path ``attention_prefill_cpu_traced`` (SDPA in the input dtype), and the fp64
ground truth, which is the reference run on fp64 inputs. The reference itself is checked
against ``naive_attention`` below, written straight from the op's definition (repeat the KV
heads, build the allowed mask position by position, softmax, fully masked rows -> 0), so a
misunderstanding of the semantics cannot hide in both the kernel and its reference.
"""
import math

import pytest
import torch
from conftest import assert_close, poisoned
from hypothesis import given
from hypothesis import strategies as st

from llmopt.codegen.attention_prefill import (
    MAX_HEAD_DIM,
    attention_prefill,
    attention_prefill_ref,
    attention_prefill_triton,
)
from llmopt.codegen.attention_prefill_ref import attention_prefill_cpu_traced

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- helpers
def make_qkv(b, hq, hkv, sq, skv, d, dtype, contiguous=True):
    """q, k, v in HF layout; non-contiguous ones are [B, S, H, D] projections transposed."""
    if contiguous:
        return (torch.randn(b, hq, sq, d, dtype=dtype), torch.randn(b, hkv, skv, d, dtype=dtype),
                torch.randn(b, hkv, skv, d, dtype=dtype))
    return (torch.randn(b, sq, hq, d, dtype=dtype).transpose(1, 2),
            torch.randn(b, skv, hkv, d, dtype=dtype).transpose(1, 2),
            torch.randn(b, skv, hkv, d, dtype=dtype).transpose(1, 2))


def naive_attention(q, k, v, mask, kv_lens, q_offsets, scale, causal, window=0, softcap=0.0):
    """The op's definition, in fp64, one query row at a time."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, sq, _ = q.shape
    skv = k.shape[2]
    k = k.repeat_interleave(hq // k.shape[1], dim=1)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(b, hq, sq, skv, dtype=torch.bool)
    keys = torch.arange(skv)
    for bi in range(b):
        offset = 0 if q_offsets is None else int(q_offsets[bi])
        length = skv if kv_lens is None else int(kv_lens[bi])
        for i in range(sq):
            pos = offset + i
            ok = keys < length
            if causal:
                ok &= keys <= pos
            if window > 0:
                ok &= pos - keys < window
            allowed[bi, :, i] = ok
    if mask is not None:
        m = mask.expand(b, hq, sq, skv)
        if m.dtype == torch.bool:
            allowed &= m
        else:
            s = s + m.double()
            allowed &= m != float("-inf")
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(p, nan=0.0) @ v


def check(q, k, v, mask=None, kv_lens=None, q_offsets=None, scale=None, causal=True, window=0, softcap=0.0,
          naive=True):
    """Kernel (poisoned out) and reference vs fp64 truth; the truth vs the naive definition."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (mask, kv_lens, q_offsets, scale, causal, window, softcap)
    out = poisoned(q.shape, q.dtype)
    got = attention_prefill_triton(q, k, v, *args, out=out)
    assert got is out
    truth = attention_prefill_ref(q.double(), k.double(), v.double(), *args)
    assert_close(got, truth, dtype=q.dtype, what="kernel")
    assert_close(attention_prefill_ref(q, k, v, *args), truth, dtype=q.dtype, what="reference")
    assert_close(attention_prefill_cpu_traced(q, k, v, *args), truth, dtype=q.dtype, what="compiled CPU path")
    if naive:
        assert_close(truth, naive_attention(q, k, v, *args), dtype=torch.float64, what="fp64 reference")
    return got, truth


def left_padded_masks(lengths, s, dtype):
    """HF's masks for a left-padded batch: causal and key not padding, as bool / -inf / finfo.min."""
    b = len(lengths)
    pad = torch.tensor([s - n for n in lengths])
    keys = torch.arange(s)
    allowed = (keys[None, :] <= keys[:, None])[None] & (keys[None, None, :] >= pad[:, None, None])
    allowed = allowed[:, None]  # [B, 1, S, S]
    neg_inf = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    finfo_min = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    assert allowed.shape == (b, 1, s, s)
    return {"bool": allowed, "neg_inf": neg_inf, "finfo_min": finfo_min}


# --------------------------------------------------------------------------- numerics
@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.sampled_from([64, 80, 96, 128]))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2), (4, 1)]))  # GQA 1, 2, 4; MQA
    b = draw(st.integers(1, 2))
    sq = draw(st.sampled_from([1, 7, 17, 33]))
    skv = draw(st.sampled_from([1, 7, 17, 33]))
    contiguous = draw(st.booleans())
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, dtype, contiguous)
    mask_kind = draw(st.sampled_from(["none", "bool", "additive"]))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, skv) > 0.3
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, sq, skv).masked_fill(torch.rand(b, 1, sq, skv) < 0.3, float("-inf"))
    kv_lens = q_offsets = None
    if draw(st.booleans()):
        kv_lens = torch.tensor([draw(st.integers(0, skv)) for _ in range(b)], dtype=torch.int32)
        q_offsets = torch.tensor([draw(st.integers(0, skv)) for _ in range(b)], dtype=torch.int64)
    return dict(q=q, k=k, v=v, mask=mask, kv_lens=kv_lens, q_offsets=q_offsets, causal=draw(st.booleans()),
                window=draw(st.sampled_from([0, 5])), softcap=draw(st.sampled_from([0.0, 30.0])))


@given(problems())
def test_kernel_matches_reference_and_truth(problem):
    check(**problem)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_head_dims(dtype, d):
    # 80 and 96 are padded to 128 with masked loads; 256 is the largest supported.
    check(*make_qkv(1, 2, 1, 17, 33, d, dtype), causal=True)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])
def test_gqa_reads_shared_kv_head(hq, hkv):
    q, k, v = make_qkv(1, hq, hkv, 7, 17, 64, torch.float32)
    got, _ = check(q, k, v, causal=False)
    # Query head h attends with KV head h // (hq // hkv), as repeat_interleave(k) would give.
    rep = hq // hkv
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    assert_close(got, expected, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_sdpa_is_causal(dtype):
    # q_offsets=None is top-left aligned, like SDPA's is_causal, also for Sq < Skv.
    q, k, v = make_qkv(2, 2, 2, 17, 33, 64, dtype)
    got, _ = check(q, k, v, causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(got, expected, dtype=dtype)


@pytest.mark.parametrize("kind", ["bool", "neg_inf", "finfo_min"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_left_padded_batch(kind, dtype):
    # HF passes the mask of a left-padded batch as [B, 1, S, S]; padded query rows allow no
    # key: 0 with bool / -inf masks, eager's uniform softmax with finfo.min (a finite value).
    lengths, s = [17, 10, 3], 17
    q, k, v = make_qkv(3, 2, 1, s, s, 64, dtype)
    mask = left_padded_masks(lengths, s, dtype)[kind]
    got, _ = check(q, k, v, mask, causal=False)
    if kind != "finfo_min":
        assert bool((got[1, :, : s - 10] == 0).all()) and bool((got[2, :, : s - 3] == 0).all())
    else:
        expected_uniform = v.double().mean(dim=2, keepdim=True).expand(3, 2, s, 64)
        assert_close(got[2, :, : s - 3], expected_uniform[2, :, : s - 3], dtype=dtype)


@pytest.mark.parametrize("window", [1, 4, 16, 40])
def test_sliding_window(window):
    q, k, v = make_qkv(1, 2, 1, 33, 33, 64, torch.float16)
    check(q, k, v, causal=True, window=window)
    # Chunk at an offset into the cache: the window counts absolute positions.
    q2, k2, v2 = make_qkv(1, 2, 1, 7, 40, 64, torch.float16)
    check(q2, k2, v2, q_offsets=torch.tensor([33]), kv_lens=torch.tensor([40]), causal=True, window=window)


@pytest.mark.parametrize("softcap", [1.0, 30.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(softcap, dtype):
    q, k, v = make_qkv(1, 2, 2, 17, 17, 64, dtype)
    check(q * 4, k * 4, v, causal=True, softcap=softcap)  # large logits, so the cap matters


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_equals_full_prefill(dtype):
    # Prefill of 33 tokens in chunks of 17 and 16 into a cache of capacity 48 whose unused
    # tail is NaN: every chunk equals its rows of one causal prefill over the whole prompt.
    s, capacity = 33, 48
    q, k, v = make_qkv(2, 4, 2, s, s, 64, dtype)
    cache_k = torch.full((2, 2, capacity, 64), float("nan"), dtype=dtype)
    cache_v = torch.full((2, 2, capacity, 64), float("nan"), dtype=dtype)
    full = attention_prefill_ref(q.double(), k.double(), v.double(), None, None, None, 0.125, True)
    for start, stop in [(0, 17), (17, 33)]:
        cache_k[:, :, start:stop] = k[:, :, start:stop]
        cache_v[:, :, start:stop] = v[:, :, start:stop]
        offsets = torch.full((2,), start, dtype=torch.int32)
        lens = torch.full((2,), stop, dtype=torch.int32)
        got, _ = check(q[:, :, start:stop], cache_k, cache_v, None, lens, offsets, 0.125, True, naive=False)
        assert_close(got, full[:, :, start:stop], dtype=dtype, what=f"chunk [{start}, {stop})")


def test_variable_lengths_in_batch():
    # Three sequences sharing one cache tensor, each with its own valid length and offset.
    q, k, v = make_qkv(3, 2, 1, 7, 40, 64, torch.float32)
    lens = torch.tensor([40, 12, 7])
    offsets = lens - 7
    got, _ = check(q, k, v, None, lens, offsets, 0.125, True)
    for b in range(3):
        n = int(lens[b])
        alone = attention_prefill_ref(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                      None, None, offsets[b:b + 1], 0.125, True)
        assert_close(got[b:b + 1], alone, dtype=torch.float32, what=f"sequence {b}")


def test_never_reads_beyond_kv_lens():
    q, k, v = make_qkv(2, 2, 2, 17, 64, 64, torch.float32)
    lens = torch.tensor([20, 37])
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("inf")
    check(q, k, v, None, lens, None, 0.125, False, naive=False)


def test_fully_masked_rows_are_zero():
    q, k, v = make_qkv(4, 2, 1, 17, 17, 64, torch.float32)
    mask = torch.ones(4, 1, 17, 17, dtype=torch.bool)
    mask[0, :, 3] = False  # one row masked by the bool mask
    additive = torch.zeros(4, 1, 17, 17).masked_fill(~mask, float("-inf"))
    lens = torch.tensor([17, 0, 17, 5])  # sequence 1 has no key at all
    offsets = torch.tensor([0, 0, 0, 30])  # sequence 3: queries beyond the window of its keys
    for m in (mask, additive):
        got, truth = check(q, k, v, m, lens, offsets, 0.125, True, window=8)
        for b, rows in [(0, [3]), (1, list(range(17))), (3, list(range(17)))]:
            assert bool((got[b, :, rows] == 0).all()), f"sequence {b} rows {rows} should be exactly 0"
        assert bool((got[2] != 0).any(dim=-1).all())
    # Non-causal, no position limit, mask only: the masked row is still 0.
    got, _ = check(q, k, v, mask, None, None, 0.125, False)
    assert bool((got[0, :, 3] == 0).all())


def test_mask_broadcasts_without_copy():
    # [Sq, Skv], [B, 1, 1, Skv] (padding of keys only) and per-head [B, Hq, Sq, Skv] masks.
    q, k, v = make_qkv(2, 2, 1, 17, 17, 64, torch.float16, contiguous=False)
    check(q, k, v, torch.rand(17, 17) > 0.2, causal=False)
    check(q, k, v, torch.rand(2, 1, 1, 17) > 0.2, causal=True)
    check(q, k, v, torch.randn(2, 2, 17, 17, dtype=torch.float16), causal=True)
    # A mask expanded from a row: stride 0 along queries.
    check(q, k, v, torch.randn(2, 1, 1, 17).expand(2, 1, 17, 17), causal=False)


def test_strided_views_of_a_cache():
    # K/V as views of a larger [B, S, H, D] buffer, queries from a fused QKV projection.
    qkv = torch.randn(1, 17, 3 * 4 * 64)
    q = qkv[..., :256].view(1, 17, 4, 64).transpose(1, 2)
    buffer = torch.randn(1, 48, 2, 2, 64)  # [B, capacity, {k, v}, H, D]
    k = buffer[:, :33, 0].transpose(1, 2)
    v = buffer[:, :33, 1].transpose(1, 2)
    check(q, k, v, causal=True, q_offsets=torch.tensor([16]))


def test_long_sequence_8k_keys():
    # A 16-query chunk at the end of an 8192-token context.
    q, k, v = make_qkv(1, 1, 1, 16, 8192, 64, torch.float16)
    check(q, k, v, None, None, torch.tensor([8192 - 16]), 0.125, True, naive=False)


def test_empty_inputs():
    q, k, v = make_qkv(1, 2, 1, 0, 7, 64, torch.float32)
    assert attention_prefill_triton(q, k, v, None, None, None, 0.125, True).shape == (1, 2, 0, 64)
    q, k, v = make_qkv(1, 2, 1, 5, 0, 64, torch.float32)
    assert bool((attention_prefill_triton(q, k, v, None, None, None, 0.125, False) == 0).all())
    assert bool((attention_prefill_ref(q, k, v, None, None, None, 0.125, False) == 0).all())


# --------------------------------------------------------------------------- registered op
def _op_args():
    q, k, v = make_qkv(2, 4, 2, 7, 17, 64, torch.float32, contiguous=False)
    mask = torch.rand(2, 1, 7, 17) > 0.2
    return (q, k, v, mask, torch.tensor([17, 12]), torch.tensor([10, 5]), 0.125, True, 8, 20.0)


def test_op_runs_kernel_and_returns_fresh_tensor(triton_kernels):
    args = _op_args()
    got = torch.ops.llmopt.attention_prefill(*args)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert got.data_ptr() not in {a.data_ptr() for a in args[:3]}
    assert_close(got, attention_prefill_ref(*[a.double() if i < 3 else a for i, a in enumerate(args)]))


def test_op_reference_path(reference_kernels):
    args = _op_args()
    torch.testing.assert_close(attention_prefill(*args), attention_prefill_ref(*args), rtol=0, atol=0)
    # fp64 (the ground truth dtype) always takes the reference, even with Triton forced.
    q64 = [a.double() for a in args[:3]]
    assert attention_prefill(*q64, *args[3:]).dtype == torch.float64


def test_opcheck(triton_kernels):
    torch.library.opcheck(torch.ops.llmopt.attention_prefill.default, _op_args())
    q, k, v = make_qkv(1, 2, 2, 7, 7, 80, torch.bfloat16)
    torch.library.opcheck(torch.ops.llmopt.attention_prefill.default,
                          (q, k, v, None, None, None, 0.1, False, 0, 0.0))


def test_torch_compile_fullgraph(triton_kernels):
    q, k, v, mask, lens, offsets, scale, causal, window, softcap = _op_args()

    def layer(q, k, v, mask, lens, offsets):
        out = torch.ops.llmopt.attention_prefill(q, k, v, mask, lens, offsets, scale, causal, window, softcap)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_close(compiled(q, k, v, mask, lens, offsets), layer(q, k, v, mask, lens, offsets))


# --------------------------------------------------------------------------- bad input
def _bad(**changes):
    q, k, v = make_qkv(2, 4, 2, 7, 17, 64, torch.float32)
    args = dict(q=q, k=k, v=v, mask=None, kv_lens=None, q_offsets=None, scale=0.125, causal=True, window=0,
                softcap=0.0)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, message", [
    (dict(q=torch.randn(2, 7, 256)), ValueError, "must be 4-D"),
    (dict(k=torch.randn(2, 2, 17, 64, dtype=torch.float16)), TypeError, "share one floating dtype"),
    (dict(q=torch.randn(2, 3, 7, 64)), ValueError, "multiple of KV heads"),
    (dict(v=torch.randn(2, 2, 16, 64)), ValueError, "k and v must be"),
    (dict(k=torch.randn(2, 2, 17, 32), v=torch.randn(2, 2, 17, 32)), ValueError, "head_dim=64"),
    (dict(mask=torch.ones(2, 1, 7, 16, dtype=torch.bool)), ValueError, "does not broadcast"),
    (dict(mask=torch.ones(2, 1, 7, 17, dtype=torch.int32)), TypeError, "bool .* or floating"),
    (dict(kv_lens=torch.tensor([17])), ValueError, r"kv_lens must be an int32/int64 tensor of shape \[2\]"),
    (dict(q_offsets=torch.tensor([0.0, 1.0])), ValueError, "q_offsets must be"),
    (dict(window=-1), ValueError, "window must be >= 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
])
def test_bad_input(changes, error, message):
    args = _bad(**changes)
    with pytest.raises(error, match=message):
        attention_prefill_triton(**args)
    with pytest.raises(error, match=message):
        attention_prefill_ref(**args)


def test_bad_kernel_input():
    big = MAX_HEAD_DIM + 8
    q, k, v = make_qkv(1, 1, 1, 4, 4, big, torch.float32)
    with pytest.raises(ValueError, match="head_dim 1..256"):
        attention_prefill_triton(q, k, v, None, None, None, 0.1, True)
    q, k, v = make_qkv(1, 1, 1, 4, 4, 64, torch.float64)
    with pytest.raises(TypeError, match="supports"):
        attention_prefill_triton(q, k, v, None, None, None, 0.1, True)
    q, k, v = make_qkv(1, 1, 1, 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        attention_prefill_triton(q, k, v, None, None, None, 0.1, True, out=torch.empty(1, 1, 4, 32))


def test_large_head_dim_falls_back_to_reference(triton_kernels):
    # Head dims beyond the kernel's limit still run (through the reference), correctly.
    q, k, v = make_qkv(1, 1, 1, 4, 4, MAX_HEAD_DIM + 8, torch.float32)
    got = torch.ops.llmopt.attention_prefill(q, k, v, None, None, None, 0.1, True, 0, 0.0)
    assert_close(got, naive_attention(q, k, v, None, None, None, 0.1, True), dtype=torch.float32)
    assert math.isfinite(float(got.abs().max()))


# --------------------------------------------------------------------------- compiled CPU path
def static_cache_prefill(b, s, cache_len, offset, dtype):
    """A Hugging Face static-cache prefill of ``s`` tokens at ``offset``, as llmopt's pass
    calls the op: q [B, 12, S, 64] (a projection transposed), the [B, 4, cache_len, 64] cache,
    the bool mask over the whole cache, kv_lens = offset + S, q_offsets = offset, causal False."""
    q = torch.randn(b, s, 12, 64, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(b, 4, cache_len, 64, dtype=dtype) for _ in range(2))
    positions = offset + torch.arange(s)
    mask = (torch.arange(cache_len)[None, :] <= positions[:, None])[None, None].expand(b, 1, s, cache_len)
    lens = torch.full((b,), offset + s, dtype=torch.int32)
    return q, k, v, mask, lens, torch.full((b,), offset, dtype=torch.int32)


def ops_run(fn, *args):
    """(result, the ATen ops ``fn(*args)`` dispatched)."""
    with torch.profiler.profile() as prof:
        out = fn(*args)
    return out, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, s, cache_len, offset", [(1, 64, 88, 0), (4, 17, 4096, 0), (2, 7, 40, 9)])
def test_compiled_cpu_path_runs_sdpa_in_the_input_dtype(dtype, b, s, cache_len, offset):
    """The prefill of a static cache: one SDPA on the valid keys in q's dtype, with SDPA's
    causal path and no mask (no copy of q, k, v) from position 0, a bool mask after it
    (chunked prefill); close to the truth."""
    q, k, v, mask, lens, offsets = static_cache_prefill(b, s, cache_len, offset, dtype)
    args = (mask, lens, offsets, 0.125, False)
    got, ran = ops_run(attention_prefill_cpu_traced, q, k, v, *args)
    truth = attention_prefill_ref(q.double(), k.double(), v.double(), *args)
    assert_close(got, truth, dtype=dtype, what="compiled CPU path")
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    assert "aten::scaled_dot_product_attention" in ran
    if offset == 0:  # the causality check, then no mask and no copy at all
        assert "aten::tril_" in ran and "aten::_to_copy" not in ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_path_causal_only_for_an_exact_lower_triangle(dtype):
    """A mask broadcast over the keys, or causal but for one key, is not mistaken for
    causality (SDPA's is_causal would give another answer)."""
    q, k, v = make_qkv(2, 4, 2, 9, 9, 64, dtype)
    every_key = torch.ones(2, 1, 9, 1, dtype=torch.bool)
    almost = torch.ones(9, 9, dtype=torch.bool).tril()
    almost[5, 2] = False
    for mask in (every_key, almost[None, None], None):
        args = (mask, None, None, 0.125, False)
        truth = attention_prefill_ref(q.double(), k.double(), v.double(), *args)
        assert_close(attention_prefill_cpu_traced(q, k, v, *args), truth, dtype=dtype, what=f"mask {mask}")
        assert_close(naive_attention(q, k, v, *args), truth, dtype=torch.float64, what="definition")


def test_compiled_cpu_path_hands_the_rare_cases_to_the_reference():
    """Ragged lengths, a row with no key, soft-capping, an additive mask of another dtype
    and fp64 run the reference, which zeroes keys past a sequence's length and rows with no
    key."""
    q, k, v = make_qkv(2, 4, 2, 5, 12, 64, torch.float32)
    ragged = torch.tensor([12, 6], dtype=torch.int32)
    no_key = torch.ones(2, 1, 5, 12, dtype=torch.bool)
    no_key[1, 0, 3] = False
    for args in ((None, ragged, None, 0.125, True), (no_key, None, None, 0.125, False),
                 (None, None, None, 0.125, True, 0, 30.0)):
        want = attention_prefill_ref(q, k, v, *args)
        assert torch.equal(attention_prefill_cpu_traced(q, k, v, *args), want)
    qh, kh, vh = (t.half() for t in (q, k, v))  # an fp32 finfo.min mask would overflow fp16
    wide = torch.zeros(2, 1, 5, 12).masked_fill(~no_key, torch.finfo(torch.float32).min)
    assert torch.equal(attention_prefill_cpu_traced(qh, kh, vh, wide, None, None, 0.125, False),
                       attention_prefill_ref(qh, kh, vh, wide, None, None, 0.125, False))
    k[1, :, 6:] = float("nan")  # past kv_lens: never read
    assert bool(attention_prefill_cpu_traced(q, k, v, None, ragged, None, 0.125, True).isfinite().all())
    qd, kd, vd = (t.double() for t in (q, k, v))
    assert torch.equal(attention_prefill_cpu_traced(qd, kd, vd, None, None, None, 0.125, True),
                       attention_prefill_ref(qd, kd, vd, None, None, None, 0.125, True))
