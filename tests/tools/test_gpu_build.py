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

from llmopt.tools import gpu_build, triton_aot

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
    kernels = set(triton_aot.discover_kernels())
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
    kernels = set(triton_aot.discover_kernels())
    assert len(kernels) >= 20 and kernels <= launched(launches)
    monkeypatch.setattr(gpu_build, "EXERCISES", {k: v for k, v in gpu_build.EXERCISES.items() if k != "rowwise"})
    launches, _ = gpu_build.collect_launches(gpu_build.TARGETS[90])
    assert "llmopt.codegen.residual_norm._rms_norm_kernel" in kernels - launched(launches)
