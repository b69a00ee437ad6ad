"""The mechanism of the ahead-of-time build check (llmopt/tools/triton_aot.py): launches
recorded from the real launchers on a faked GPU target, and the PTX reading behind the
128-bit-load rule. The full build runs in tests/tools/test_gpu_build.py."""
from __future__ import annotations

import pytest

from llmopt.tools import gpu_build, triton_aot


def test_constexpr_variants_come_from_the_launchers():
    """The recorded constexprs are the launcher's own: its heuristics on the faked target
    (SM count) and its flags, not a list kept here."""
    import torch

    from llmopt.codegen import gemv

    for cc in (80, 90):
        with triton_aot.recording(gpu_build.TARGETS[cc]) as recorder:
            x = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
            w = torch.empty(1024, 4096, dtype=torch.bfloat16, device="cuda")
            gemv.gemv_triton(x, w, activation="silu")
            expected = gemv.gemv_heuristic_config(1024, 4096, 1, True, x.device)  # on the faked target
        main = next(launch for launch in recorder.launches if launch.name == "_gemv_kernel")
        assert main.kwargs["ACTIVATION"] == "silu" and main.kwargs["HAS_BIAS"] is False
        assert {k: main.kwargs[k] for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K")} == {
            k: expected[k] for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K")}
        if expected["SPLIT_K"] > 1:
            assert any(launch.name == "_split_k_reduce_kernel" for launch in recorder.launches)


@pytest.mark.parametrize("ptx,bits", [
    ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];", 128),
    ("ld.global.v2.b64 { %rd1, %rd2 }, [ %rd3 + 0 ];", 128),
    ("ld.global.b16 %rs1, [ %rd1 + 0 ];", 16),
    ("cp.async.cg.shared.global [ %r23 + 0 ], [ %rd14 + 0 ], 0x10, %r25;", 128),
    ("cp.async.ca.shared.global [ %r23 + 0 ], [ %rd14 + 0 ], 8;", 64),
])
def test_widest_global_load_reads_ptx(ptx, bits):
    assert triton_aot.widest_global_load(ptx + "\n") == bits
