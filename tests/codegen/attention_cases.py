"""Shared by the dense and the paged decode attention tests: the bad inputs both ops refuse
through the checks they share, and the bad-input test bound to each op.

The dense (``attention_decode_ref.check_decode_args``) and paged
(``attention_paged_ref.check_decode_args``) contracts call the same
``check_one_new_token`` / ``check_gqa`` / ``check_window_softcap``; their rows are written
once here, each file adds the rows of its own checks (cache layout, block tables, ...).
"""
from __future__ import annotations

import pytest
import torch


def shared_decode_rows(batch: int, q_heads: int, head_dim: int) -> list[tuple]:
    """``(change, error, message)`` rows of the shared decode checks for a valid
    ``q: [batch, q_heads, 1, head_dim]`` over 2 KV heads."""
    return [
        (dict(q=torch.randn(batch, q_heads, 2, head_dim)), ValueError, "one new token"),
        (dict(q=torch.randn(batch, q_heads - 1, 1, head_dim)), ValueError, "multiple of 2 KV heads"),
        (dict(window=-1), ValueError, "window"),
        (dict(softcap=-1.0), ValueError, "softcap"),
    ]


def bad_input_test(op, launcher, make_args, rows):
    """A test: each ``(change, error, message)`` row, applied by ``make_args(**change)``,
    raises ``error`` matching ``message`` from the registered ``op`` and from its Triton
    ``launcher`` alike. A test file assigns it to a ``test_*`` name, which pytest collects."""

    @pytest.mark.parametrize("change,error,message", rows)
    @pytest.mark.parametrize("path", ["op", "triton"])
    def test(change, error, message, path):
        fn = op if path == "op" else launcher
        with pytest.raises(error, match=message):
            fn(**make_args(**change))

    return test
