"""Specification of llmopt.codegen.buckets: the one ``next_pow2`` and ``m_bucket`` of every
kernel launcher (and the linear's bucket label built on it)."""
from hypothesis import given, strategies as st

from llmopt.codegen.buckets import MAX_M_BUCKET, m_bucket, next_pow2
from llmopt.codegen.kernels_spec import M_BUCKETS, m_bucket_label


@given(st.integers(min_value=-3, max_value=1 << 40))
def test_next_pow2_is_the_smallest_power_of_two_at_least_n(n):
    p = next_pow2(n)
    assert p >= 1 and p & (p - 1) == 0
    assert p >= n and (p == 1 or p // 2 < n)


def test_m_bucket_is_an_int_capped_at_64():
    got = [m_bucket(m) for m in (0, 1, 2, 3, 17, 64, 65, 4096)]
    assert got == [1, 1, 2, 4, 32, 64, 64, 64]
    assert all(type(b) is int for b in got) and MAX_M_BUCKET == 64


@given(st.integers(min_value=0, max_value=1 << 20))
def test_the_linear_label_is_the_bucket_as_text_or_inf(m):
    label = m_bucket_label(m)
    assert label in M_BUCKETS
    assert label == ("inf" if m > 64 else str(m_bucket(m)))
