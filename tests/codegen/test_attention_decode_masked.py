"""Specification of decode attention over a small cache's whole capacity
(``codegen.attention_decode_masked``): what the Inductor executor generates for
``llmopt::attention_decode`` on CPU when the static cache has at most
``FULL_CAPACITY_MAX_SLOTS`` slots.

Against the fp64 truth (the reference on fp64 copies, which reads only the valid prefix)
over hypothesis-drawn shapes, lengths, masks, windows and soft-caps; with every slot past
a sequence's length poisoned with NaN in K and V (a real cache holds stale or garbage
values there: they must not leak, neither through the scores nor through ``0 * NaN`` in
the weighted sum); a row with nothing to attend to is 0; and compiled by Inductor
(``fullgraph=True``), the form the executor runs.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from codegen.test_attention_decode import DTYPES, draw_cpu_case, ground_truth, left_padding_mask, make_inputs
from conftest import assert_close
from llmopt.codegen.attention_decode_masked import (
    FULL_CAPACITY_MAX_SLOTS,
    attention_decode_full_capacity,
    full_capacity_applies,
)


def poison_past_lengths(cache: torch.Tensor, lens) -> torch.Tensor:
    """``cache`` [B, Hkv, S, D] with NaN in every slot at or past its row's length."""
    cache = cache.clone()
    for b, n in enumerate(lens):
        cache[b, :, n:] = float("nan")
    return cache


@given(data=st.data())
def test_matches_fp64_with_nan_past_the_lengths(data):
    q, k, v, kv_lens, mask, window, softcap = draw_cpu_case(data, DTYPES + (torch.float64,))
    lens = kv_lens.tolist()
    truth = ground_truth(q, k, v, kv_lens, mask, 0.125, window=window, softcap=softcap)
    k, v = poison_past_lengths(k, lens), poison_past_lengths(v, lens)
    got = attention_decode_full_capacity(q, k, v, kv_lens, mask, 0.125, window=window, softcap=softcap)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all(), "NaN past a sequence's length leaked into its output"
    assert_close(got, truth, dtype=q.dtype, what="full capacity vs fp64")


def test_rows_with_nothing_to_attend_to_are_zero():
    q, k, v, _ = make_inputs(3, 2, 2, 64, 9, torch.float32, [9, 9, 9])
    lens = torch.tensor([0, 4, 9])
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1] = False  # every valid slot masked
    got = attention_decode_full_capacity(q, poison_past_lengths(k, [0, 4, 9]), poison_past_lengths(v, [0, 4, 9]),
                                         lens, mask, 0.125)
    assert torch.equal(got[:2], torch.zeros_like(got[:2]))
    assert_close(got[2:], ground_truth(q, k, v, lens, mask, 0.125)[2:], dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiles_it_fullgraph(dtype):
    """The form the executor runs: Inductor-generated loops, NaN-poisoned slots included."""
    lens = [30, 11]
    q, k, v, kv_lens = make_inputs(2, 2, 3, 64, 40, dtype, lens)
    mask = left_padding_mask(lens, [0, 3], 40, "bool")
    truth = ground_truth(q, k, v, kv_lens, mask, 0.125)
    compiled = torch.compile(attention_decode_full_capacity, backend="inductor", fullgraph=True)
    got = compiled(q, poison_past_lengths(k, lens), poison_past_lengths(v, lens), kv_lens, mask, 0.125)
    assert torch.isfinite(got).all()
    assert_close(got, truth, dtype=dtype, what="Inductor-compiled full capacity vs fp64")


def test_applies_to_static_caches_up_to_the_bound():
    q = torch.empty(1, 4, 1, 64)
    assert full_capacity_applies(q, torch.empty(1, 2, FULL_CAPACITY_MAX_SLOTS, 64))
    assert not full_capacity_applies(q, torch.empty(1, 2, FULL_CAPACITY_MAX_SLOTS + 1, 64))
    assert not full_capacity_applies(q, torch.empty(1, 2, 0, 64))
