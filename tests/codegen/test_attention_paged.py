"""Specification of the paged-attention ops: ``llmopt::paged_kv_append``,
``llmopt::paged_attention_decode`` and ``llmopt::paged_attention_prefill``.

The oracle is the dense attention on each request's gathered, contiguous KV: the ground
truth is the dense reference run in fp64 on ``gather_kv`` of the pools, and the dense
Triton kernels run on the same gathered KV must agree with the paged kernels. The pools are
built so that reading the wrong thing fails: every slot that holds no token is NaN, blocks
are handed out in a shuffled order, and block-table entries past a sequence's last block
point outside the pool. Outputs are NaN-poisoned before each kernel run. Kernels run in
Triton's interpreter on CPU.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from codegen import attention_cases
from conftest import assert_close, count_allocations, poisoned, relative_error
from llmopt.codegen.attention_decode import attention_decode_ref, attention_decode_triton
from llmopt.codegen import attention_paged
from llmopt.codegen.attention_paged import (
    check_decode_workspace,
    gather_kv,
    paged_attention_decode_ref,
    paged_attention_decode_triton,
    paged_attention_prefill_ref,
    paged_attention_prefill_triton,
    paged_kv_append_ref,
    paged_kv_append_triton,
    plan_paged_decode,
)
from llmopt.codegen.attention_prefill import attention_prefill_ref, attention_prefill_triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZES = (8, 16, 32)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def make_paged(lens, hkv, d, bs, dtype, spare_blocks=2, seed=0, strided=False):
    """Pools holding ``len(lens)`` sequences of ``lens`` tokens in shuffled blocks.

    Unwritten slots are NaN; table entries past each sequence's last block are -1 (out of
    the pool). ``strided`` gives the pools a padded head dim and a permuted storage, so no
    dimension but the last is contiguous. Returns (k_pool, v_pool, block_tables [int32]).
    """
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(blocks) + spare_blocks
    width = max(blocks + [1]) + 1
    if strided:
        k_store = torch.full((bs, num_blocks, hkv, d + 8), float("nan"), dtype=dtype)
        v_store = torch.full((bs, num_blocks, hkv, d + 8), float("nan"), dtype=dtype)
        k_pool = k_store.permute(1, 2, 0, 3)[..., :d]
        v_pool = v_store.permute(1, 2, 0, 3)[..., :d]
    else:
        k_pool = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dtype)
        v_pool = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(blocks[b]):
            blk = order.pop()
            table[b, j] = blk
            filled = min(bs, n - j * bs)
            k_pool[blk, :, :filled] = torch.randn(hkv, filled, d, generator=g)
            v_pool[blk, :, :filled] = torch.randn(hkv, filled, d, generator=g)
    return k_pool, v_pool, table


def fp64(x):
    return x.to(torch.float64)


def decode_truth(q, kp, vp, table, lens, scale, **kw):
    """Dense reference in fp64 on the gathered KV."""
    k, v = gather_kv(fp64(kp), table, lens), gather_kv(fp64(vp), table, lens)
    return attention_decode_ref(fp64(q), k, v, lens, None, scale, **kw)


def decode_plan(q, kp, table, num_splits=None):
    """The step's plan for this call, its workspace poisoned with NaN (each layer must write
    every slot the combine reads)."""
    plan = plan_paged_decode(q.shape[0], q.shape[1], kp.shape[1], q.shape[3], table.shape[1], kp.shape[2], q.dtype,
                             q.device, num_splits=num_splits)
    plan.workspace.fill_(float("nan"))
    return plan


def check_decode(q, kp, vp, table, lens, scale, num_splits=None, planned=False, **kw):
    out = poisoned(q.shape, q.dtype)
    if planned:
        plan = decode_plan(q, kp, table, num_splits)
        got = paged_attention_decode_triton(q, kp, vp, table, lens, scale, out=out, plan=plan, **kw)
    else:
        got = paged_attention_decode_triton(q, kp, vp, table, lens, scale, out=out, num_splits=num_splits, **kw)
    assert got is out
    truth = decode_truth(q, kp, vp, table, lens, scale, **kw)
    assert_close(out, truth, dtype=q.dtype, what="paged kernel vs dense fp64 truth")
    assert_close(paged_attention_decode_ref(q, kp, vp, table, lens, scale, **kw), truth, dtype=q.dtype,
                 what="paged ref vs dense fp64 truth")
    return out, truth


def packed_queries(q_lens, hq, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return q, qsl


def prefill_truth(q, kp, vp, table, lens, qsl, scale, **kw):
    return paged_attention_prefill_ref(fp64(q), fp64(kp), fp64(vp), table, lens, qsl, scale, **kw)


def check_prefill(q, kp, vp, table, lens, qsl, scale, **kw):
    out = poisoned(q.shape, q.dtype)
    got = paged_attention_prefill_triton(q, kp, vp, table, lens, qsl, scale, out=out, **kw)
    assert got is out
    truth = prefill_truth(q, kp, vp, table, lens, qsl, scale, **kw)
    assert_close(out, truth, dtype=q.dtype, what="paged prefill kernel vs fp64 truth")
    assert_close(paged_attention_prefill_ref(q, kp, vp, table, lens, qsl, scale, **kw), truth, dtype=q.dtype,
                 what="paged prefill ref vs fp64 truth")
    return out, truth


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------


def test_paged_ops_launch_the_dense_kernels_with_paged_addresses():
    """One prefill and one decode kernel serve both KV layouts (constexpr PAGED): the paged
    module's only kernel is its KV append, a write rather than attention."""
    from llmopt.codegen import attention_decode, attention_prefill

    def kernels(module):
        return sorted(n for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "fn"))

    assert kernels(attention_paged) == ["_paged_kv_append_kernel"]
    assert kernels(attention_prefill) == ["_attention_prefill_kernel"]
    assert kernels(attention_decode) == ["_decode_combine_kernel", "_decode_split_kernel"]


@given(data=st.data())
def test_decode_kernel_matches_dense_truth(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bs = data.draw(st.sampled_from(BLOCK_SIZES), label="block_size")
    hkv = data.draw(st.sampled_from([1, 2]), label="hkv")
    g = data.draw(st.sampled_from([1, 2, 4]), label="group")
    d = data.draw(st.sampled_from([16, 24, 64]), label="head_dim")
    lens = data.draw(st.lists(st.sampled_from([0, 1, 7, 17, 33, 70]), min_size=1, max_size=3), label="lens")
    splits = data.draw(st.sampled_from([None, 1, 3]), label="num_splits")
    strided = data.draw(st.booleans(), label="strided")
    planned = data.draw(st.booleans(), label="planned")  # the step's plan given, or planned by the call
    kp, vp, table = make_paged(lens, hkv, d, bs, dtype, strided=strided)
    q = torch.randn(len(lens), 1, hkv * g, d + 4)[..., :d].transpose(1, 2).to(dtype)  # non-contiguous
    check_decode(q, kp, vp, table, torch.tensor(lens, dtype=torch.int32), d ** -0.5, num_splits=splits,
                 planned=planned)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_equals_dense_kernel_on_gathered_kv(dtype):
    lens = [1, 19, 40]
    kp, vp, table = make_paged(lens, 2, 32, 16, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 4, 1, 32).to(dtype)
    paged, truth = check_decode(q, kp, vp, table, lens_t, 0.2, num_splits=2)
    k, v = gather_kv(kp, table, lens_t), gather_kv(vp, table, lens_t)
    dense = attention_decode_triton(q, k, v, lens_t, None, 0.2, num_splits=2)
    assert_close(dense, truth, dtype=dtype, what="dense kernel on gathered KV")
    # both are within the tolerance of the truth, so within twice of each other
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(paged, dense) <= tol


@pytest.mark.parametrize("window,softcap", [(5, 0.0), (0, 3.0), (20, 2.0)])
def test_decode_sliding_window_and_softcap(window, softcap):
    lens = [3, 30, 45]
    kp, vp, table = make_paged(lens, 1, 16, 8, torch.float32)
    q = torch.randn(3, 2, 1, 16)
    check_decode(q, kp, vp, table, torch.tensor(lens), 0.5, num_splits=2, window=window, softcap=softcap)


def test_decode_empty_sequences_give_zero():
    kp, vp, table = make_paged([0, 5], 1, 16, 8, torch.float32)
    q = torch.randn(2, 2, 1, 16)
    for splits in (1, 2):
        out = paged_attention_decode_triton(q, kp, vp, table, torch.tensor([0, 5]), 0.25, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isfinite(out).all()


def test_decode_reads_only_valid_slots():
    """A table row that is all -1 past the used blocks and NaN slots inside the last block
    never reach the output; an int64 table and lengths work too."""
    kp, vp, table = make_paged([9], 2, 16, 8, torch.float16)
    q = torch.randn(1, 2, 1, 16).half()
    out, _ = check_decode(q, kp, vp, table.long(), torch.tensor([9], dtype=torch.int64), 0.25)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------


@given(data=st.data())
def test_prefill_kernel_matches_dense_truth(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bs = data.draw(st.sampled_from(BLOCK_SIZES), label="block_size")
    hkv = data.draw(st.sampled_from([1, 2]), label="hkv")
    g = data.draw(st.sampled_from([1, 2]), label="group")
    d = data.draw(st.sampled_from([16, 24]), label="head_dim")
    n = data.draw(st.integers(1, 3), label="num_seqs")
    q_lens = data.draw(st.lists(st.sampled_from([1, 7, 17, 20]), min_size=n, max_size=n), label="q_lens")
    prefix = data.draw(st.lists(st.sampled_from([0, 1, 9, 16]), min_size=n, max_size=n), label="prefix")
    window = data.draw(st.sampled_from([0, 6]), label="window")
    lens = [p + q for p, q in zip(prefix, q_lens)]
    kp, vp, table = make_paged(lens, hkv, d, bs, dtype, strided=data.draw(st.booleans(), label="strided"))
    q, qsl = packed_queries(q_lens, hkv * g, d, dtype)
    check_prefill(q, kp, vp, table, torch.tensor(lens, dtype=torch.int32), qsl, d ** -0.5, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_equals_dense_kernel_on_gathered_kv(dtype):
    """Each sequence's chunk against the dense prefill kernel (queries at an offset into its
    gathered cache, kv_lens), one sequence at a time."""
    q_lens, prefix = [5, 18], [11, 0]
    lens = [p + q for p, q in zip(prefix, q_lens)]
    kp, vp, table = make_paged(lens, 2, 32, 16, dtype)
    q, qsl = packed_queries(q_lens, 4, 32, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    paged, truth = check_prefill(q, kp, vp, table, lens_t, qsl, 0.2)
    for s in range(2):
        rows = slice(int(qsl[s]), int(qsl[s + 1]))
        k = gather_kv(kp, table[s:s + 1], lens_t[s:s + 1])
        v = gather_kv(vp, table[s:s + 1], lens_t[s:s + 1])
        qs = q[rows].transpose(0, 1)[None]
        dense = attention_prefill_triton(qs, k, v, None, lens_t[s:s + 1], torch.tensor([prefix[s]]), 0.2, True)
        assert_close(dense[0].transpose(0, 1), truth[rows], dtype=dtype, what="dense kernel on gathered KV")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert relative_error(paged[rows], dense[0].transpose(0, 1)) <= tol


@pytest.mark.parametrize("window,softcap", [(0, 4.0), (7, 1.5)])
def test_prefill_softcap_and_window(window, softcap):
    q_lens, lens = [9, 3], [25, 3]
    kp, vp, table = make_paged(lens, 1, 16, 8, torch.float32)
    q, qsl = packed_queries(q_lens, 2, 16, torch.float32)
    check_prefill(q, kp, vp, table, torch.tensor(lens), qsl, 0.3, window=window, softcap=softcap)


def test_mixed_step_decode_rows_equal_decode_kernel():
    """One-token chunks in a prefill launch (a mixed step) equal the decode kernel."""
    q_lens, lens = [1, 12, 1], [20, 12, 5]
    kp, vp, table = make_paged(lens, 2, 16, 8, torch.float32)
    q, qsl = packed_queries(q_lens, 4, 16, torch.float32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    mixed, _ = check_prefill(q, kp, vp, table, lens_t, qsl, 0.25)
    for s, row in ((0, 0), (2, 13)):
        dec = paged_attention_decode_triton(q[row:row + 1, :, None], kp, vp, table[s:s + 1], lens_t[s:s + 1], 0.25)
        assert relative_error(mixed[row], dec[0, :, 0]) <= 1e-5


def test_prefill_sequence_without_new_tokens():
    """A sequence with zero new rows owns no output row and must not disturb the others."""
    q_lens, lens = [4, 0, 6], [4, 8, 10]
    kp, vp, table = make_paged(lens, 1, 16, 16, torch.float16)
    q, qsl = packed_queries(q_lens, 1, 16, torch.float16)
    check_prefill(q, kp, vp, table, torch.tensor(lens), qsl, 0.25)


# ---------------------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------------------


@given(data=st.data())
def test_append_kernel_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bs = data.draw(st.sampled_from(BLOCK_SIZES), label="block_size")
    hkv = data.draw(st.sampled_from([1, 2, 3]), label="hkv")
    d = data.draw(st.sampled_from([8, 24, 64]), label="head_dim")
    num_blocks = data.draw(st.integers(1, 5), label="num_blocks")
    t = data.draw(st.integers(1, min(7, num_blocks * bs)), label="tokens")
    slots = data.draw(st.lists(st.integers(0, num_blocks * bs - 1), min_size=t, max_size=t, unique=True),
                      label="slots")
    skip = data.draw(st.lists(st.booleans(), min_size=t, max_size=t), label="skip")
    slots = torch.tensor([-1 if s else x for x, s in zip(slots, skip)], dtype=torch.int64)
    kp = torch.randn(num_blocks, hkv, bs, d).to(dtype)
    vp = torch.randn(num_blocks, hkv, bs, d).to(dtype)
    k = torch.randn(hkv, t, d + 2)[..., :d].transpose(0, 1).to(dtype)  # [T, H, D], strided
    v = torch.randn(t, hkv, d).to(dtype)
    kp_ref, vp_ref = kp.clone(), vp.clone()
    paged_kv_append_triton(kp, vp, slots.to(torch.int32), k, v)
    paged_kv_append_ref(kp_ref, vp_ref, slots, k, v)
    assert torch.equal(kp, kp_ref) and torch.equal(vp, vp_ref)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kp[s // bs, :, s % bs], k[i]) and torch.equal(vp[s // bs, :, s % bs], v[i])


def test_append_then_attend_equals_dense_attention(triton_kernels):
    """Write a prompt through the registered ops, then read it back: the paged ops agree
    with dense attention over the same tokens."""
    bs, hkv, d, n = 8, 2, 16, 13
    kp = torch.full((4, hkv, bs, d), float("nan"))
    vp = torch.full((4, hkv, bs, d), float("nan"))
    table = torch.tensor([[2, 0, -1]], dtype=torch.int32)
    slots = torch.tensor([table[0, p // bs].item() * bs + p % bs for p in range(n)])
    k, v, q = torch.randn(n, hkv, d), torch.randn(n, hkv, d), torch.randn(n, 2 * hkv, d)
    torch.ops.llmopt.paged_kv_append(kp, vp, slots, k, v)
    lens = torch.tensor([n], dtype=torch.int32)
    qsl = torch.tensor([0, n], dtype=torch.int32)
    out = torch.ops.llmopt.paged_attention_prefill(q, kp, vp, table, lens, qsl, 0.25)
    dense = attention_prefill_ref(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                  None, None, None, 0.25, True)
    assert_close(out, dense[0].transpose(0, 1), dtype=torch.float32)
    last = torch.ops.llmopt.paged_attention_decode(q[-1:, :, None], kp, vp, table, lens, 0.25)
    assert_close(last[0, :, 0], dense[0, :, -1], dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, CPU default
# ---------------------------------------------------------------------------------------


def _small():
    kp, vp, table = make_paged([5, 12], 2, 16, 8, torch.float32)
    kp, vp = torch.nan_to_num(kp), torch.nan_to_num(vp)
    return kp, vp, table, torch.tensor([5, 12], dtype=torch.int32)


@pytest.mark.parametrize("kernels", ["triton_kernels", "reference_kernels"])
@pytest.mark.parametrize("kwargs", [{}, {"window": 4, "softcap": 5.0}], ids=["plain", "window-softcap"])
def test_opcheck_attention(kernels, kwargs, request):
    """The registration (fake vs real shapes and strides, schema) for both implementations:
    the CPU reference is what a compiled model runs on CPU."""
    request.getfixturevalue(kernels)
    kp, vp, table, lens = _small()
    q = torch.randn(2, 4, 1, 16)
    torch.library.opcheck(torch.ops.llmopt.paged_attention_decode.default, (q, kp, vp, table, lens, 0.25), kwargs)
    workspace = decode_plan(q, kp, table, num_splits=2).workspace  # the step's plan (mutated: declared)
    torch.library.opcheck(torch.ops.llmopt.paged_attention_decode.default, (q, kp, vp, table, lens, 0.25),
                          {**kwargs, "workspace": workspace})
    qp, qsl = packed_queries([2, 3], 4, 16, torch.float32)
    torch.library.opcheck(torch.ops.llmopt.paged_attention_prefill.default,
                          (qp, kp, vp, table, lens, qsl, 0.25), kwargs)


def test_opcheck_append(triton_kernels):
    kp, vp, _, _ = _small()
    slots = torch.tensor([3, 17, -1], dtype=torch.int64)
    torch.library.opcheck(torch.ops.llmopt.paged_kv_append.default,
                          (kp, vp, slots, torch.randn(3, 2, 16), torch.randn(3, 2, 16)))


def test_torch_compile_fullgraph(triton_kernels):
    kp, vp, table, lens = _small()
    kp, vp = kp.half(), vp.half()
    slots = torch.tensor([int(table[0, 0]) * 8 + 4, int(table[1, 1]) * 8 + 3])  # the last token of each
    k, v = torch.randn(2, 2, 16).half(), torch.randn(2, 2, 16).half()
    q = torch.randn(2, 4, 1, 16).half()
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)

    def step(kp, vp, slots, k, v, q, table, lens, qsl):
        torch.ops.llmopt.paged_kv_append(kp, vp, slots, k, v)
        dec = torch.ops.llmopt.paged_attention_decode(q, kp, vp, table, lens, 0.25)
        pre = torch.ops.llmopt.paged_attention_prefill(q[:, :, 0], kp, vp, table, lens, qsl, 0.25)
        return dec[:, :, 0] + pre

    eager_kp, eager_vp = kp.clone(), vp.clone()
    expected = step(eager_kp, eager_vp, slots, k, v, q, table, lens, qsl)
    torch.compiler.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(kp, vp, slots, k, v, q, table, lens, qsl)
    assert torch.equal(kp, eager_kp) and torch.equal(vp, eager_vp), "the pools must be written in place"
    assert_close(got, expected.to(torch.float64), dtype=torch.float16)


def test_ops_run_the_reference_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("LLMOPT_KERNELS", raising=False)
    kp, vp, table, lens = _small()
    q = torch.randn(1, 4, 2, 16)[0].transpose(0, 1).unsqueeze(2)  # as the paged attention passes it
    got = torch.ops.llmopt.paged_attention_decode(q, kp, vp, table, lens, 0.25)
    assert torch.equal(got, paged_attention_decode_ref(q, kp, vp, table, lens, 0.25))
    # the fake implementation promises a contiguous output; a compiled graph views it so
    assert got.is_contiguous()


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def _decode_args(**change):
    kp, vp, table, lens = _small()
    args = dict(q=torch.randn(2, 4, 1, 16), k_pool=kp, v_pool=vp, block_tables=table, seq_lens=lens, scale=0.25)
    args.update(change)
    return args


DECODE_BAD = [
    *attention_cases.shared_decode_rows(2, 4, 16),
    (dict(q=torch.randn(2, 4, 1, 8)), ValueError, "head dim"),
    (dict(q=torch.randn(2, 4, 1, 16).half()), TypeError, "pools are torch.float32"),
    (dict(v_pool=torch.randn(3, 2, 8, 16)), ValueError, "num_blocks, num_kv_heads, block_size, head_dim"),
    (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), ValueError, "block_tables must have shape"),
    (dict(block_tables=torch.zeros(2, 3)), TypeError, "block_tables must be int32 or int64"),
    (dict(seq_lens=torch.tensor([5, 40])), ValueError, "seq_lens must lie in"),
    (dict(block_tables=torch.full((2, 3), 99, dtype=torch.int32)), ValueError, "outside the pool"),
]
test_decode_bad_inputs = attention_cases.bad_input_test(
    torch.ops.llmopt.paged_attention_decode, paged_attention_decode_triton, _decode_args, DECODE_BAD)


def test_prefill_bad_inputs():
    kp, vp, table, lens = _small()
    q, qsl = packed_queries([2, 3], 4, 16, torch.float32)
    for fn in (paged_attention_prefill_ref, paged_attention_prefill_triton):
        with pytest.raises(ValueError, match="packed"):
            fn(q[None], kp, vp, table, lens, qsl, 0.25)
        with pytest.raises(ValueError, match="query_start_loc must have shape"):
            fn(q, kp, vp, table, lens, qsl[:-1], 0.25)
        with pytest.raises(ValueError, match="number of query rows"):
            fn(q[:4], kp, vp, table, lens, qsl, 0.25)
        with pytest.raises(ValueError, match="more new tokens than seq_lens"):
            fn(q, kp, vp, table, torch.tensor([1, 12], dtype=torch.int32), qsl, 0.25)


def test_append_bad_inputs():
    kp, vp, _, _ = _small()
    k = torch.randn(3, 2, 16)
    for fn in (paged_kv_append_ref, paged_kv_append_triton):
        with pytest.raises(ValueError, match="num_tokens, num_kv_heads=2, head_dim=16"):
            fn(kp, vp, torch.tensor([0, 1, 2]), k[None], k[None])
        with pytest.raises(TypeError, match="build the cache with the model's dtype"):
            fn(kp, vp, torch.tensor([0, 1, 2]), k.half(), k.half())
        with pytest.raises(ValueError, match="slot_mapping must have shape"):
            fn(kp, vp, torch.tensor([0, 1]), k, k)
        with pytest.raises(ValueError, match="outside the pool"):
            fn(kp, vp, torch.tensor([0, 1, 10_000]), k, k)


def test_bad_out_buffers():
    kp, vp, table, lens = _small()
    with pytest.raises(ValueError, match="out must be"):
        paged_attention_decode_triton(torch.randn(2, 4, 1, 16), kp, vp, table, lens, 0.25,
                                      out=torch.empty(2, 4, 1, 16, dtype=torch.float16))
    q, qsl = packed_queries([2, 3], 4, 16, torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        paged_attention_prefill_triton(q, kp, vp, table, lens, qsl, 0.25, out=torch.empty(4, 4, 16))


# ---------------------------------------------------------------------------------------
# plan once per step, run per layer
# ---------------------------------------------------------------------------------------


def test_a_planned_step_allocates_no_workspace_per_layer(triton_kernels, monkeypatch):
    """One plan for the step; each of the L layers (own pools and queries, same shapes) runs
    on it and allocates nothing; every layer's output is right although they all overwrite
    the one NaN-poisoned workspace. Unplanned, each call allocates its own workspace
    (before plan/run: two tensors per layer per step)."""
    lens = torch.tensor([40, 70, 5], dtype=torch.int32)
    layers = [make_paged(lens.tolist(), 2, 16, 16, torch.float32, seed=layer) for layer in range(3)]
    queries = [torch.randn(3, 4, 1, 16) for _ in layers]
    plan = decode_plan(queries[0], layers[0][0], layers[0][2])
    assert plan.num_splits > 1, "the combine path, which reads the workspace"
    outs = [poisoned(q.shape, q.dtype) for q in queries]
    calls = count_allocations(monkeypatch, attention_paged.__name__)
    for (kp, vp, table), q, out in zip(layers, queries, outs):
        paged_attention_decode_triton(q, kp, vp, table, lens, 0.25, out=out, plan=plan)
    assert calls == [], "a planned layer allocates nothing"
    for (kp, vp, table), q, out in zip(layers, queries, outs):
        assert_close(out, decode_truth(q, kp, vp, table, lens, 0.25), dtype=q.dtype, what="planned layer")
    kp, vp, table = layers[0]
    paged_attention_decode_triton(queries[0], kp, vp, table, lens, 0.25, out=outs[0])
    assert calls == ["empty"], "an unplanned call allocates its workspace"


@pytest.mark.parametrize("kernels", ["triton_kernels", "reference_kernels"])
def test_op_with_the_step_workspace_equals_the_op_without(kernels, request):
    """The registered op given the plan's workspace (what every layer of an engine step
    passes) computes what it computes without one."""
    request.getfixturevalue(kernels)
    lens = torch.tensor([40, 70, 5], dtype=torch.int32)
    kp, vp, table = make_paged(lens.tolist(), 2, 16, 16, torch.float32)
    kp, vp = torch.nan_to_num(kp), torch.nan_to_num(vp)
    q = torch.randn(3, 4, 1, 16)
    workspace = decode_plan(q, kp, table).workspace
    for _ in range(2):  # two layers on one workspace
        got = torch.ops.llmopt.paged_attention_decode(q, kp, vp, table, lens, 0.25, 0, 0.0, workspace)
        assert torch.equal(got, torch.ops.llmopt.paged_attention_decode(q, kp, vp, table, lens, 0.25))


def test_a_plan_that_does_not_fit_raises():
    kp, vp, table, lens = _small()
    q = torch.randn(2, 4, 1, 16)
    plan = decode_plan(q, kp, table)
    for bad_q, bad_table in ((torch.randn(1, 4, 1, 16), table[:1]),  # fewer sequences
                             (torch.randn(2, 2, 1, 16), table),  # other query heads
                             (q, torch.zeros(2, table.shape[1] + 1, dtype=torch.int32))):  # wider table
        with pytest.raises(ValueError, match="the plan was made for"):
            paged_attention_decode_triton(bad_q, kp, vp, bad_table, lens[: bad_q.shape[0]], 0.25, plan=plan)
    with pytest.raises(ValueError, match="come from the plan"):
        paged_attention_decode_triton(q, kp, vp, table, lens, 0.25, plan=plan, num_splits=2)
    for workspace in (plan.workspace[:1], plan.workspace.double(), plan.workspace[..., :-1]):
        with pytest.raises(ValueError, match="workspace must be a"):
            torch.ops.llmopt.paged_attention_decode(q, kp, vp, table, lens, 0.25, 0, 0.0, workspace)
        with pytest.raises(ValueError, match="workspace must be a"):
            check_decode_workspace(q, workspace)


def test_torch_compile_fullgraph_layers_share_the_workspace(triton_kernels):
    """Two layers of a step on one workspace, traced whole by the llmopt backend: its
    reinplace_kv pass runs both on the workspace input itself (no clone, no copy_ back) and
    the result is eager's."""
    import llmopt

    kp, vp, table, lens = _small()
    q = torch.randn(2, 4, 1, 16)
    workspace = decode_plan(q, kp, table, num_splits=2).workspace

    def two_layers(q, kp, vp, table, lens, workspace):
        h = torch.ops.llmopt.paged_attention_decode(q, kp, vp, table, lens, 0.25, 0, 0.0, workspace)
        return torch.ops.llmopt.paged_attention_decode(h, kp, vp, table, lens, 0.25, 0, 0.0, workspace)

    expected = two_layers(q, kp, vp, table, lens, workspace)
    torch.compiler.reset()
    llmopt.clear_reports()
    compiled = torch.compile(two_layers, backend="llmopt", fullgraph=True, options={"strict": True})
    got = compiled(q, kp, vp, table, lens, workspace)
    torch.compiler.reset()
    assert_close(got, expected.double(), dtype=torch.float32, what="compiled two layers")
    report = llmopt.last_report()
    assert report.rewrites_by_pass()["reinplace_kv"] == 2
    assert report.ops_after.get("llmopt.paged_attention_decode.default") == 2
    assert not [op for op in report.ops_after if "auto_functionalized" in op or op == "aten.copy_.default"]
