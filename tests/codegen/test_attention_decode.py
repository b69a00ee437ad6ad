"""Specification of ``llmopt::attention_decode`` (split-KV FlashDecoding + FlashDecoding++).

Every kernel result is checked against an fp64 ground truth (the reference run on fp64
copies of the inputs) with the suite's tolerance table, and so is the reference itself;
outputs are NaN-poisoned first. The kernels run in Triton's interpreter on CPU.

Note on bf16: the interpreter converts fp32 -> bf16 by truncation (the GPU rounds to
nearest), so bf16 kernel errors measured here are about twice what a GPU gives; they
still fit the 1e-2 tolerance.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from codegen import attention_cases
from conftest import assert_close, poisoned, relative_error, tolerance
from llmopt.codegen.attention_decode import (
    UNIFIED_RANGE,
    attention_decode_cpu,
    attention_decode_ref,
    attention_decode_triton,
    decode_configs,
    decode_heuristic_config,
    decode_num_splits,
    prune_decode_configs,
)
from llmopt.codegen.attention_decode_ref import attention_decode_cpu_traced

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def make_inputs(B, Hkv, G, D, S, dtype, lens, strided=False, q_scale=1.0):
    """q [B, Hq, 1, D], caches [B, Hkv, S, D], kv_lens [B]; ``strided`` gives q a
    [B, 1, Hq, D+8] storage and the caches a [B, S+3, Hkv, D+8] (BSHD, spare capacity and
    padded head dim) storage, so no dimension but the last is contiguous."""
    Hq = Hkv * G
    if strided:
        q = torch.randn(B, 1, Hq, D + 8)[..., :D].transpose(1, 2)
        k = torch.randn(B, S + 3, Hkv, D + 8)[:, :S, :, :D].transpose(1, 2)
        v = torch.randn(B, S + 3, Hkv, D + 8)[:, :S, :, :D].transpose(1, 2)
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    q = (q * q_scale).to(dtype)
    return q, k.to(dtype), v.to(dtype), torch.tensor(lens, dtype=torch.int32)


def fp64(x):
    return x if x is None or x.dtype == torch.bool else x.to(torch.float64)


def ground_truth(q, k, v, lens, mask, scale, **kw):
    return attention_decode_ref(fp64(q), fp64(k), fp64(v), lens, fp64(mask), scale, **kw)


def check_against_truth(q, k, v, lens, mask, scale, num_splits=None, **kw):
    """Kernel (NaN-poisoned out) and reference, each vs the fp64 truth; returns the kernel output."""
    out = poisoned(q.shape, q.dtype)
    got = attention_decode_triton(q, k, v, lens, mask, scale, out=out, num_splits=num_splits, **kw)
    assert got is out
    truth = ground_truth(q, k, v, lens, mask, scale, **kw)
    assert_close(out, truth, dtype=q.dtype, what="kernel vs fp64")
    assert_close(attention_decode_ref(q, k, v, lens, mask, scale, **kw), truth, dtype=q.dtype, what="ref vs fp64")
    return out


def left_padding_mask(lens, pads, S, kind, dtype=torch.float32):
    """HF static-cache style [B, 1, 1, S] mask: sequence b starts at position pads[b]."""
    pos = torch.arange(S)
    keep = (pos[None, :] >= torch.tensor(pads)[:, None]) & (pos[None, :] < torch.tensor(lens)[:, None])
    keep = keep[:, None, None, :]
    if kind == "bool":
        return keep
    neg = float("-inf") if kind == "-inf" else torch.finfo(dtype).min
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, neg)


def draw_cpu_case(data, dtypes=DTYPES):
    """A hypothesis-drawn case for the CPU paths: ``(q, k, v, kv_lens, mask, window,
    softcap)`` — ragged or equal lengths, strided or not, masks (bool, -inf, dtype min),
    windows and soft-caps."""
    B = data.draw(st.integers(1, 3), label="B")
    Hkv = data.draw(st.integers(1, 3), label="Hkv")
    G = data.draw(st.sampled_from([1, 2, 4]), label="group")
    D = data.draw(st.sampled_from([16, 64, 80]), label="D")
    S = data.draw(st.sampled_from([1, 7, 17, 100]), label="S_max")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    same = data.draw(st.booleans(), label="equal lengths")
    length = st.integers(1, S)
    lens = [data.draw(length, label="len")] * B if same else data.draw(st.lists(length, min_size=B, max_size=B))
    strided = data.draw(st.booleans(), label="strided")
    window = data.draw(st.sampled_from([0, 0, 1, 5]), label="window")
    softcap = data.draw(st.sampled_from([0.0, 0.0, 30.0]), label="softcap")
    kind = data.draw(st.sampled_from([None, "bool", "-inf", "min"]), label="mask")
    q, k, v, kv_lens = make_inputs(B, Hkv, G, D, S, dtype, lens, strided)
    mask = None
    if kind is not None:
        pads = [data.draw(st.integers(0, n - 1), label="pad") for n in lens]
        mask = left_padding_mask(lens, pads, S, kind, dtype)
    return q, k, v, kv_lens, mask, window, softcap


# ---------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------


@given(data=st.data())
def test_kernel_matches_reference_and_fp64(data):
    B = data.draw(st.integers(1, 4), label="B")
    Hkv = data.draw(st.integers(1, 4), label="Hkv")
    G = data.draw(st.sampled_from([1, 2, 4, 8]), label="group")
    D = data.draw(st.sampled_from([64, 80, 128]), label="D")
    S = data.draw(st.sampled_from([1, 7, 17, 100]), label="S_max")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    length = st.one_of(st.just(1), st.just(S), st.integers(1, S))
    lens = data.draw(st.lists(length, min_size=B, max_size=B), label="kv_lens")
    strided = data.draw(st.booleans(), label="strided")
    num_splits = data.draw(st.sampled_from([None, 1, 3]), label="num_splits")
    q, k, v, kv_lens = make_inputs(B, Hkv, G, D, S, dtype, lens, strided)
    check_against_truth(q, k, v, kv_lens, None, 1 / math.sqrt(D), num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_int64_lens_and_non_contiguous_out(dtype, num_splits):
    q, k, v, lens = make_inputs(2, 2, 4, 64, 100, dtype, [100, 45], strided=True)
    out = poisoned((2, 8, 1, 72), dtype)[..., :64]
    attention_decode_triton(q, k, v, lens.long(), None, 0.125, out=out, num_splits=num_splits)
    assert_close(out, ground_truth(q, k, v, lens, None, 0.125), dtype=dtype)


@pytest.mark.parametrize("kind", ["bool", "additive", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_left_padding_mask(kind, dtype):
    lens, pads = [40, 33, 40], [0, 5, 31]
    q, k, v, kv_lens = make_inputs(3, 2, 2, 64, 40, dtype, lens)
    mask = left_padding_mask(lens, pads, 40, kind, dtype)
    check_against_truth(q, k, v, kv_lens, mask, 0.125)


def test_per_head_and_shared_masks():
    q, k, v, lens = make_inputs(2, 2, 4, 64, 50, torch.float32, [50, 21])
    per_head = torch.rand(2, 8, 1, 50) > 0.3
    per_head[..., 0] = True  # every row keeps a key
    check_against_truth(q, k, v, lens, per_head, 0.125)
    shared = torch.randn(1, 1, 1, 50)  # an additive bias broadcast over batch and heads
    check_against_truth(q, k, v, lens, shared, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(1, 0.0), (40, 5.0), (0, 5.0), (7, 30.0)])
def test_sliding_window_and_softcap(dtype, window, softcap):
    lens = [100, 37, 3]
    q, k, v, kv_lens = make_inputs(3, 2, 2, 64, 100, dtype, lens, q_scale=4.0)
    mask = left_padding_mask(lens, [0, 2, 0], 100, "bool")
    check_against_truth(q, k, v, kv_lens, mask, 0.125, window=window, softcap=softcap)
    check_against_truth(q, k, v, kv_lens, None, 0.125, num_splits=1, window=window, softcap=softcap)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_empty_and_fully_masked_rows_give_zero(num_splits):
    lens = [0, 9, 9, 9]
    q, k, v, kv_lens = make_inputs(4, 1, 2, 64, 9, torch.float32, lens)
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[2] = False  # sequence 2: every key masked
    out = check_against_truth(q, k, v, kv_lens, mask, 0.125, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0
    neg = torch.zeros(4, 1, 1, 9).masked_fill(~mask, float("-inf"))
    out = attention_decode_triton(q, k, v, kv_lens, neg, 0.125, num_splits=num_splits)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_only_the_valid_length(dtype):
    """NaN in the cache past kv_lens (and a window's excluded keys are never NaN-sensitive)."""
    lens = [3, 70, 1]
    q, k, v, kv_lens = make_inputs(3, 2, 2, 64, 4096, dtype, lens)
    clean_k, clean_v = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
        clean_k[b, :, n:] = 0
        clean_v[b, :, n:] = 0
    truth = ground_truth(q, clean_k, clean_v, kv_lens, None, 0.125)
    for num_splits in (None, 1, 8):
        out = attention_decode_triton(q, k, v, kv_lens, None, 0.125, out=poisoned(q.shape, dtype), num_splits=num_splits)
        assert_close(out, truth, dtype=dtype, what=f"kernel num_splits={num_splits}")
    assert_close(attention_decode_ref(q, k, v, kv_lens, None, 0.125), truth, dtype=dtype, what="ref")


def test_long_cache_8k():
    q, k, v, lens = make_inputs(1, 1, 2, 64, 8256, torch.float16, [8200])
    check_against_truth(q, k, v, lens, None, 0.125)


def test_reference_matches_sdpa_with_repeated_kv():
    """An independent oracle: per sequence, PyTorch SDPA on the valid slice with
    repeat_interleave'd K/V and an explicit bool mask."""
    lens, G, window = [30, 12], 4, 10
    q, k, v, kv_lens = make_inputs(2, 2, G, 64, 30, torch.float64, lens)
    mask = left_padding_mask(lens, [0, 3], 30, "bool")
    got = attention_decode_ref(q, k, v, kv_lens, mask, 0.2, window=window)
    for b, n in enumerate(lens):
        kb = k[b : b + 1, :, :n].repeat_interleave(G, dim=1)
        vb = v[b : b + 1, :, :n].repeat_interleave(G, dim=1)
        keep = mask[b : b + 1, ..., :n] & (torch.arange(n) > n - 1 - window)
        want = F.scaled_dot_product_attention(q[b : b + 1], kb, vb, attn_mask=keep, scale=0.2)
        torch.testing.assert_close(got[b : b + 1], want)


# ---------------------------------------------------------------------------------------
# FlashDecoding++ unified max
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unified_max", [0.0, 3.0])
def test_unified_max_matches_exact_kernel(dtype, unified_max):
    q, k, v, lens = make_inputs(2, 2, 4, 80, 100, dtype, [100, 29], strided=True)
    exact = check_against_truth(q, k, v, lens, None, 1 / math.sqrt(80))
    fdpp = check_against_truth(q, k, v, lens, None, 1 / math.sqrt(80), unified_max=unified_max)
    assert relative_error(fdpp, exact) <= tolerance(dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy reports the overflow the fallback then repairs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["overflow", "underflow", "one_hot_chunk"])
def test_unified_max_falls_back_to_exact(dtype, case):
    """Inputs built so exp(s - unified_max) overflows fp32 (scores >> phi), underflows to 0
    (scores << phi), or does so only in one chunk: the result still equals the exact
    kernel, and without the fallback it would not."""
    q, k, v, lens = make_inputs(2, 2, 2, 64, 100, dtype, [100, 61], q_scale=8.0)
    phi = 0.0
    if case == "overflow":
        k = (k.float() * 6.0).to(dtype)  # scores of several hundred: e^{s - 0} = inf in fp32
    elif case == "underflow":
        phi = 500.0  # e^{s - 500} == 0 for every key
    else:
        k = k.clone()
        k[:, :, 40:44] = (k[:, :, 40:44].float() * 30).to(dtype)  # only the chunk holding keys 40..43
    scale = 0.125
    exact = check_against_truth(q, k, v, lens, None, scale)
    fdpp = check_against_truth(q, k, v, lens, None, scale, unified_max=phi)
    assert relative_error(fdpp, exact) <= tolerance(dtype)
    unsafe = attention_decode_triton(q, k, v, lens, None, scale, unified_max=phi, exact_fallback=False)
    finite = bool(torch.isfinite(unsafe).all())
    assert not finite or relative_error(unsafe, exact) > 10 * tolerance(dtype), "the inputs did not need the fallback"


def test_unified_range_is_safe_for_fp32():
    low, high = UNIFIED_RANGE
    assert math.exp(high) * 2**20 * 65504 < torch.finfo(torch.float32).max  # 1M keys of |v| <= fp16 max
    assert math.exp(low) > torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------
# split choice and configs
# ---------------------------------------------------------------------------------------


def test_num_splits_from_shapes_only():
    # H100 (132 SMs): batch 1, 8 KV heads, 8k cache -> 32 splits (256 programs, ~2 per SM)
    assert decode_num_splits(1, 8, 8192, 132) == 32
    assert decode_num_splits(1, 1, 8192, 132) == 64
    assert decode_num_splits(1, 1, 1 << 20, 132) == 128  # capped
    assert decode_num_splits(64, 8, 4096, 132) == 1  # the batch alone fills the GPU
    assert decode_num_splits(1, 8, 100, 132) == 1  # a tiny cache is not split
    for args in [(2, 4, 3000, 108), (3, 8, 32768, 132), (1, 2, 5000, 78)]:
        n = decode_num_splits(*args)
        assert n & (n - 1) == 0 and n >= 1
    assert decode_num_splits(1, 1, 1, None) == 1 and decode_num_splits(4, 4, 100, None) == 4


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_heuristic_config_is_in_the_pruned_space(head_dim, dtype):
    cfg = decode_heuristic_config(head_dim, 4, dtype, torch.device("cuda"))
    assert cfg in prune_decode_configs(decode_configs(), head_dim, 4, dtype)


@pytest.mark.parametrize("config", [{"BLOCK_N": 32}, {"BLOCK_N": 64, "num_warps": 2}])
def test_config_override(config):
    q, k, v, lens = make_inputs(2, 1, 2, 64, 100, torch.float32, [100, 50])
    out = attention_decode_triton(q, k, v, lens, None, 0.125, config=config)
    assert_close(out, ground_truth(q, k, v, lens, None, 0.125))
    with pytest.raises(ValueError, match="unknown keys"):
        attention_decode_triton(q, k, v, lens, None, 0.125, config={"BLOCK_M": 16})


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------


def _small_args(dtype=torch.float32):
    q, k, v, lens = make_inputs(2, 2, 2, 64, 20, dtype, [20, 9], strided=True)
    return q, k, v, lens


@pytest.mark.parametrize(
    "extra",
    [
        dict(mask=None, kwargs={}),
        dict(mask="bool", kwargs={"window": 6, "softcap": 10.0}),
        dict(mask="additive", kwargs={"unified_max": 1.0}),
    ],
    ids=["plain", "bool-window-softcap", "additive-unified"],
)
def test_opcheck(triton_kernels, extra):
    q, k, v, lens = _small_args()
    mask = None if extra["mask"] is None else left_padding_mask([20, 9], [0, 2], 20, extra["mask"])
    torch.library.opcheck(torch.ops.llmopt.attention_decode.default, (q, k, v, lens, mask, 0.125), extra["kwargs"])


def test_torch_compile_fullgraph(triton_kernels):
    q, k, v, lens = _small_args(torch.float16)
    mask = left_padding_mask([20, 9], [0, 2], 20, "bool")

    def step(q, k, v, lens, mask):
        return torch.ops.llmopt.attention_decode(q, k, v, lens, mask, 0.125, window=8) * 2

    torch.compiler.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, lens, mask)
    assert_close(got, 2 * ground_truth(q, k, v, lens, mask, 0.125, window=8), dtype=torch.float16)


def test_op_runs_the_cpu_implementation_by_default(monkeypatch):
    monkeypatch.delenv("LLMOPT_KERNELS", raising=False)
    q, k, v, lens = _small_args()
    got = torch.ops.llmopt.attention_decode(q, k, v, lens, None, 0.125)
    torch.testing.assert_close(got, attention_decode_cpu(q, k, v, lens, None, 0.125), rtol=0, atol=0)
    assert_close(got, ground_truth(q, k, v, lens, None, 0.125), dtype=q.dtype)
    assert got.shape == q.shape


def test_reference_mode_runs_the_reference(reference_kernels, monkeypatch):
    import llmopt.codegen.attention_decode as ad

    def not_this(*args, **kwargs):
        raise AssertionError("LLMOPT_KERNELS=reference must not take the SDPA path")

    monkeypatch.setattr(ad, "attention_decode_cpu", not_this)
    q, k, v, lens = _small_args()
    got = torch.ops.llmopt.attention_decode(q, k, v, lens, None, 0.125)
    assert_close(got, ground_truth(q, k, v, lens, None, 0.125), dtype=q.dtype)
    # the CPU twin's traced path too
    import llmopt.codegen.attention_decode_ref as ref_module

    monkeypatch.setattr(ref_module, "attention_decode_cpu", not_this)
    monkeypatch.setattr(ref_module.F, "scaled_dot_product_attention", not_this)
    assert torch.equal(attention_decode_cpu_traced(q, k, v, lens, None, 0.125), got)


@pytest.mark.parametrize("cpu_impl", [attention_decode_cpu, attention_decode_cpu_traced], ids=["checked", "traced"])
@given(data=st.data())
def test_cpu_implementation_matches_fp64(cpu_impl, data):
    """The CPU paths (fused SDPA over the valid prefix, the reference where SDPA cannot
    express the case; the traced one, which the CPU twin runs, with the contract checks
    left to the trace) against the fp64 truth, masks and windows included."""
    q, k, v, kv_lens, mask, window, softcap = draw_cpu_case(data)
    got = cpu_impl(q, k, v, kv_lens, mask, 0.125, window=window, softcap=softcap)
    assert got.shape == q.shape and got.dtype == q.dtype
    truth = ground_truth(q, k, v, kv_lens, mask, 0.125, window=window, softcap=softcap)
    assert_close(got, truth, dtype=q.dtype, what="cpu path vs fp64")


@pytest.mark.parametrize("cpu_impl", [attention_decode_cpu, attention_decode_cpu_traced], ids=["checked", "traced"])
def test_cpu_implementation_fully_masked_row_is_zero(cpu_impl):
    q, k, v, lens = make_inputs(2, 2, 2, 64, 9, torch.float32, [9, 9])
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    got = cpu_impl(q, k, v, lens, mask, 0.125)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.isfinite(got).all()


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_traced_cpu_path_takes_sdpa_for_the_decode_case(mask_kind, monkeypatch):
    """The usual decode call (equal lengths, a mask keeping every valid key) runs SDPA in
    the traced path without the checked implementation, with its result bit for bit;
    anything else (different lengths, a padding mask, a length past the cache) goes to
    the checked implementation, which raises the op's errors."""
    import llmopt.codegen.attention_decode_ref as ref_module

    q, k, v, lens = make_inputs(2, 2, 3, 64, 20, torch.float32, [13, 13])
    mask = {None: None, "bool": torch.ones(2, 1, 1, 20, dtype=torch.bool),
            "additive": torch.zeros(2, 1, 1, 20)}[mask_kind]
    want = attention_decode_cpu(q, k, v, lens, mask, 0.125)
    fallbacks = []
    checked = ref_module.attention_decode_cpu
    monkeypatch.setattr(ref_module, "attention_decode_cpu", lambda *a: fallbacks.append(a) or checked(*a))
    assert torch.equal(attention_decode_cpu_traced(q, k, v, lens, mask, 0.125), want)
    assert not fallbacks
    if mask is not None:
        padded = mask.clone()
        padded[1, ..., 0] = False if mask.dtype == torch.bool else float("-inf")
        attention_decode_cpu_traced(q, k, v, lens, padded, 0.125)
        assert len(fallbacks) == 1
    attention_decode_cpu_traced(q, k, v, torch.tensor([13, 7]), mask, 0.125)
    with pytest.raises(ValueError, match="kv_lens must lie in"):
        attention_decode_cpu_traced(q, k, v, torch.tensor([21, 21]), mask, 0.125)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def _bad(**change):
    q, k, v, lens = make_inputs(2, 2, 2, 64, 20, torch.float32, [20, 9])
    args = dict(q=q, k_cache=k, v_cache=v, kv_lens=lens, mask=None, scale=0.125)
    args.update(change)
    return args


BAD_INPUTS = [
    *attention_cases.shared_decode_rows(2, 4, 64),
    (dict(q=torch.randn(2, 4, 1, 32)), ValueError, "head dim"),
    (dict(v_cache=torch.randn(2, 2, 19, 64)), ValueError, "StaticCache layout"),
    (dict(k_cache=torch.randn(2, 2, 20, 64, dtype=torch.float16), v_cache=torch.randn(2, 2, 20, 64).half()),
     TypeError, "cast them to one dtype"),
    (dict(q=torch.ones(2, 4, 1, 64, dtype=torch.int32)), TypeError, "not supported"),
    (dict(kv_lens=torch.tensor([20.0, 9.0])), ValueError, "kv_lens must be a"),
    (dict(kv_lens=torch.tensor([20, 9, 1])), ValueError, "kv_lens must be a"),
    (dict(kv_lens=torch.tensor([21, 9])), ValueError, "kv_lens must lie in"),
    (dict(kv_lens=torch.tensor([-1, 9])), ValueError, "kv_lens must lie in"),
    (dict(mask=torch.ones(2, 1, 1, 19, dtype=torch.bool)), ValueError, "does not broadcast"),
    (dict(mask=torch.ones(3, 1, 1, 20, dtype=torch.bool)), ValueError, "does not broadcast"),
    (dict(mask=torch.ones(2, 1, 1, 20, dtype=torch.int64)), TypeError, "bool"),
    (dict(unified_max=float("inf")), ValueError, "finite"),
]


test_bad_inputs_raise_clear_errors = attention_cases.bad_input_test(
    torch.ops.llmopt.attention_decode, attention_decode_triton, _bad, BAD_INPUTS)


def test_bad_out_buffer():
    args = _bad()
    with pytest.raises(ValueError, match="out must be"):
        attention_decode_triton(**args, out=torch.empty(2, 4, 1, 64, dtype=torch.float16))
