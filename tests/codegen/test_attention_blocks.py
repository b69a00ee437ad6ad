"""attention_blocks (llmopt/codegen/attention_blocks.py): the shared ``@triton.jit`` pieces
of the attention kernels, each run on its own in the interpreter against torch math.

Specification: ``online_softmax_step`` over key tiles, then ``normalize``, gives
``softmax(s) @ v`` (natural or base-2 units), 0 and no NaN for a row with no key;
``partial_lse`` is ``log(l) + shift`` (-inf when empty) and ``combine_lse`` merges
normalized partials by their log-sum-exps into the whole softmax (0 when every split is
empty); ``kv_bases`` + ``kv_tile_offsets`` address key ``j`` of sequence ``b`` in a dense
cache and, through the block table, in a paged pool; ``split_bounds`` returns the clamped length, the window start and a chunk that
covers the attended keys in ``num_splits`` aligned pieces. Host side: ``block_dim`` and
``dot_flags``.
"""
import math

import pytest
import torch
from conftest import assert_close, poisoned

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from llmopt.codegen.attention_blocks import (  # noqa: E402
    block_dim, combine_lse, dot_flags, kv_bases, kv_tile_offsets, normalize, online_softmax_step, partial_lse,
    split_bounds,
)

M, N, D, BLOCK_N = 4, 37, 8, 16


@triton.jit
def _softmax_pv_kernel(s_ptr, v_ptr, o_ptr, n, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       EXP2: tl.constexpr):
    rows = tl.arange(0, M)
    dims = tl.arange(0, D)
    acc = tl.zeros([M, D], dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = tl.load(s_ptr + rows[:, None] * n + cols[None, :], mask=cols[None, :] < n, other=float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s, EXP2)
        v = tl.load(v_ptr + cols[:, None] * D + dims[None, :], mask=cols[:, None] < n, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
    tl.store(o_ptr + rows[:, None] * D + dims[None, :], normalize(acc, l_i))


@pytest.mark.parametrize("exp2", [False, True], ids=["exp", "exp2"])
def test_online_softmax_over_tiles_then_normalize(exp2):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(M, N, generator=g) * 4
    s[1, 20:] = float("-inf")  # a row whose last tiles are fully masked
    s[2] = float("-inf")  # a row with no key at all
    v = torch.randn(N, D, generator=g)
    out = poisoned((M, D), torch.float32)
    _softmax_pv_kernel[(1,)](s * math.log2(math.e) if exp2 else s, v, out, N, M=M, D=D, BLOCK_N=BLOCK_N, EXP2=exp2)
    expected = torch.softmax(s.double(), -1).nan_to_num(0.0) @ v.double()
    assert torch.equal(out[2], torch.zeros(D)), "a row with no key is 0, not NaN"
    assert_close(out, expected, torch.float32)


@triton.jit
def _lse_kernel(l_ptr, shift_ptr, lse_ptr, S: tl.constexpr):
    i = tl.arange(0, S)
    tl.store(lse_ptr + i, partial_lse(tl.load(l_ptr + i), tl.load(shift_ptr + i)))


@triton.jit
def _combine_kernel(lse_ptr, o_ptr, out_ptr, S: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, S)
    dims = tl.arange(0, D)
    lse = tl.load(lse_ptr + row * S + i)
    o = tl.load(o_ptr + row * S * D + i[:, None] * D + dims[None, :])
    tl.store(out_ptr + row * D + dims, combine_lse(lse, o))


def test_partial_lse_is_log_l_plus_shift_and_minus_inf_when_empty():
    l = torch.tensor([1.0, 3.5, 0.0, 0.25])
    shift = torch.tensor([0.0, -2.0, 5.0, 7.0])
    lse = poisoned((4,), torch.float32)
    _lse_kernel[(1,)](l, shift, lse, S=4)
    assert lse[2] == float("-inf")
    keep = torch.tensor([0, 1, 3])
    assert_close(lse[keep], (l.double().log() + shift.double())[keep], torch.float32)


def test_combine_of_split_partials_is_the_whole_softmax():
    """Split the keys of each row in 4, normalize each split and take its log-sum-exp
    (torch), merge with combine_lse: the softmax over all keys; an empty split (lse -inf,
    o 0) counts for nothing, and a row whose splits are all empty gives 0."""
    g = torch.Generator().manual_seed(1)
    splits, rows = 4, 3
    s = torch.randn(rows, splits, 8, generator=g).double() * 3
    s[0, 2] = float("-inf")
    s[2] = float("-inf")
    v = torch.randn(rows, splits, 8, D, generator=g).double()
    lse = torch.logsumexp(s, -1)  # [rows, splits]
    o = (torch.softmax(s, -1).nan_to_num(0.0)[..., None] * v).sum(-2)  # normalized partials
    out = poisoned((rows, D), torch.float32)
    _combine_kernel[(rows,)](lse.float().contiguous(), o.float().contiguous(), out, S=splits, D=D)
    whole = torch.softmax(s.reshape(rows, -1), -1).nan_to_num(0.0)[..., None] * v.reshape(rows, -1, D)
    assert torch.equal(out[2], torch.zeros(D))
    assert_close(out, whole.sum(1), torch.float32)


@triton.jit
def _split_bounds_kernel(lens_ptr, out_ptr, s_max, window, num_splits, SPLIT_ALIGN: tl.constexpr,
                         HAS_WINDOW: tl.constexpr):
    b = tl.program_id(0)
    kv_len, lo, chunk = split_bounds(lens_ptr, b, s_max, window, num_splits, SPLIT_ALIGN, HAS_WINDOW)
    tl.store(out_ptr + b * 3, kv_len)
    tl.store(out_ptr + b * 3 + 1, lo)
    tl.store(out_ptr + b * 3 + 2, chunk)


@pytest.mark.parametrize("window", [0, 5])
def test_split_bounds_cover_the_attended_keys(window):
    s_max, num_splits, align = 40, 3, 4
    lens = torch.tensor([0, 1, 17, 40, 55, -3], dtype=torch.int32)  # out-of-range lengths clamp
    out = torch.full((len(lens), 3), -7, dtype=torch.int32)
    _split_bounds_kernel[(len(lens),)](lens, out, s_max, window, num_splits, SPLIT_ALIGN=align,
                                       HAS_WINDOW=window > 0)
    for n, (kv_len, lo, chunk) in zip(lens.tolist(), out.tolist()):
        clamped = min(max(n, 0), s_max)
        assert kv_len == clamped
        assert lo == (max(clamped - window, 0) if window else 0)
        assert chunk % align == 0 and chunk >= align
        assert lo + num_splits * chunk >= kv_len, "the splits cover [lo, kv_len)"
        assert chunk - align < max(-(-(kv_len - lo) // num_splits), 1), "the chunk is the smallest aligned one"


@triton.jit
def _gather_keys_kernel(k_ptr, bt_ptr, out_ptr, n, stride_kb, stride_kh, stride_kn, stride_kd, stride_tb, stride_tn,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    valid = offs_n < n
    k_base, _, bt_row = kv_bases(k_ptr, k_ptr, bt_ptr, b, h, stride_kb, stride_kh, stride_kb, stride_kh,
                                 stride_tb, PAGED)
    k_off, _ = kv_tile_offsets(offs_n, valid, bt_row, stride_tn, stride_kb, stride_kn, stride_kb, stride_kn,
                               PAGED, BLOCK_SIZE)
    keys = tl.load(k_base + k_off[:, None] + dims[None, :] * stride_kd, mask=valid[:, None], other=0.0)
    tl.store(out_ptr + ((b * tl.num_programs(1) + h) * BLOCK_N + offs_n[:, None]) * D + dims[None, :], keys,
             mask=valid[:, None])


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_key_addresses_dense_and_through_the_block_table(paged):
    g = torch.Generator().manual_seed(2)
    batch, heads, n, bs = 2, 2, 11, 4
    dense = torch.randn(batch, heads, 12, D, generator=g)
    table = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32)
    if paged:  # the same keys, stored in blocks [num_blocks, H, bs, D] in table order
        cache = torch.zeros(6, heads, bs, D)
        for b in range(batch):
            for j in range(3):
                cache[table[b, j]] = dense[b, :, j * bs:(j + 1) * bs]
        strides = (cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3))
    else:
        cache = dense.transpose(2, 3).contiguous().transpose(2, 3)  # any strides
        strides = cache.stride()
    out = poisoned((batch, heads, 16, D), torch.float32)
    _gather_keys_kernel[(batch, heads)](cache, table, out, n, *strides, table.stride(0), table.stride(1), D=D,
                                        BLOCK_N=16, PAGED=paged, BLOCK_SIZE=bs)
    assert torch.equal(out[:, :, :n], dense[:, :, :n])


def test_host_helpers():
    assert [block_dim(n) for n in (0, 1, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert dot_flags(torch.float32)[0] == "ieee" and dot_flags(torch.float16) == ("tf32", False)
