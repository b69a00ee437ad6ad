"""Quantized-weight layouts: int4 packing, the CPU int4 layout's contract, the autotune
row bucket of the quantized kernels."""
from __future__ import annotations

import pytest
import torch

from codegen.quant_cases import int4_weight

from llmopt.codegen.buckets import m_bucket
from llmopt.codegen.quant_packing import pack_int4, pack_int4_for_cpu, unpack_int4


def test_pack_int4_round_trip_and_layout():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), q)


def test_bad_codes_and_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_int4(torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3))
    wp, s4, z4 = int4_weight(8, 64, 32)
    with pytest.raises(ValueError, match="N % 16"):
        pack_int4_for_cpu(wp, s4, z4, 32)


def test_m_bucket_is_bounded():
    assert [m_bucket(m) for m in (1, 2, 3, 17, 64, 65, 4096)] == [1, 2, 4, 32, 64, 64, 64]
