"""The ahead-of-time GPU build check (llmopt/tools/gpu_build.py): every Triton kernel of
llmopt/codegen compiled for sm_80 and sm_90 on this CPU machine, each variant its
launchers produce at the presets' shapes; no compile error, shared memory within the
target, no spills in the decode path, 128-bit weight loads.

The build itself runs in a subprocess without ``TRITON_INTERPRET`` (the test session
sets it, which turns ``@triton.jit`` into the interpreter). Compiled kernels are cached by
source hash (``$LLMOPT_GPU_BUILD_CACHE``, default ``~/.cache/llmopt/gpu_build``): a rerun
compiles only the kernels that changed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmopt.tools import gpu_build

REPO = Path(__file__).resolve().parents[2]


def test_every_kernel_builds_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    out = tmp_path / "build.json"
    done = subprocess.run([sys.executable, "-m", "llmopt.tools.gpu_build", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    report = json.loads(out.read_text()) if out.exists() else {}
    assert done.returncode == 0 and report.get("ok"), (done.stdout + done.stderr)[-6000:]
    built = {(r["kernel"], r["target"]) for r in report["results"]}
    kernels = set(gpu_build.discover_kernels())
    missing = sorted((k, cc) for k in kernels for cc in (80, 90) if (k, cc) not in built)
    assert not missing, f"kernels not built: {missing}"
    for r in report["results"]:
        if r["kernel"].rsplit(".", 1)[1] in gpu_build.DECODE_PATH:
            assert r["spills"] == 0, r
        assert r["shared"] <= gpu_build.TARGETS[r["target"]].shared_limit, r


def test_every_kernel_is_launched_by_an_exercise_and_a_missing_one_is_reported(monkeypatch):
    """A kernel module without an exercise (a new ``moe*.py``) fails the check by name."""
    launched = lambda launches: {f"{launch.module}.{launch.name}" for launch in launches}  # noqa: E731
    launches, errors = gpu_build.collect_launches(gpu_build.TARGETS[90])
    assert not errors
    kernels = set(gpu_build.discover_kernels())
    assert len(kernels) >= 20 and kernels <= launched(launches)
    monkeypatch.setattr(gpu_build, "EXERCISES", {k: v for k, v in gpu_build.EXERCISES.items() if k != "rowwise"})
    launches, _ = gpu_build.collect_launches(gpu_build.TARGETS[90])
    assert "llmopt.codegen.residual_norm._rms_norm_kernel" in kernels - launched(launches)


def test_constexpr_variants_come_from_the_launchers():
    """The recorded constexprs are the launcher's own: its heuristics on the faked target
    (SM count) and its flags, not a list kept here."""
    import torch

    from llmopt.codegen import gemv

    for cc in (80, 90):
        with gpu_build.recording(gpu_build.TARGETS[cc]) as recorder:
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
    assert gpu_build.widest_global_load(ptx + "\n") == bits
