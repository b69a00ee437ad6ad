"""Host-side sizing math shared by the kernel launchers: ``next_pow2`` and ``m_bucket``.

Why one module: every launcher rounds sizes up to a power of two (Triton block shapes must
be powers of two) and keys its autotuning on a bucketed row count, and copies of these
one-liners drifted (one returned a string, one used ``triton.next_power_of_2``, which
gives 0 for 0). Every codegen module takes them from here.

Autotune keys are bucketed, never the raw row count: a decode step grows the sequence by
one token, and a key that follows it would re-tune at every step (DESIGN.md, "A kernel").
"""
from __future__ import annotations

# Rows at and above this share the largest bucket: past it a kernel's best config no
# longer changes with M (and the linear dispatch switches to its "inf" bucket above it).
MAX_M_BUCKET = 64


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """The autotune key for a row count: ``min(next_pow2(m), 64)`` (1 for ``m <= 1``)."""
    return min(next_pow2(m), MAX_M_BUCKET)


__all__ = ["MAX_M_BUCKET", "m_bucket", "next_pow2"]
