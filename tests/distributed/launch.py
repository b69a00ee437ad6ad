"""Run a scenario of ``tp_worker.py`` in N gloo ranks spawned as subprocesses.

Each rank is ``python -m tests.distributed.tp_worker SCENARIO --rank R --world N --port P
--out DIR`` from the repository root, on a free localhost port, one thread each; every rank
writes its results as JSON to ``DIR/rank{R}.json``. A rank that exits non-zero or a run
past ``timeout`` (10 min: a launch takes 1-5 min on a loaded 2-core machine) fails the test
with the ranks' stderr, so a hang never hangs the suite.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, tmp_path: Path, world: int = 2, timeout: float = 600.0, expect_fail: tuple[int, ...] = ()) -> list[dict]:
    """Results of each rank (rank order); ranks in ``expect_fail`` may exit non-zero."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1",
               TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    # Output goes to files, not pipes: a rank blocked on a full pipe would stall the others
    # in their next collective.
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.distributed.tp_worker", scenario, "--rank", str(r), "--world", str(world),
                 "--port", str(port), "--out", str(tmp_path)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
    errors = []
    for r, p in enumerate(procs):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"scenario {scenario!r}: rank {r} did not finish within {timeout:.0f} s (hang):\n"
                                 + logs[r].read_text()[-4000:])
        if p.returncode != 0 and r not in expect_fail:
            errors.append(f"rank {r} exited {p.returncode}:\n{logs[r].read_text()[-4000:]}")
    if errors:
        raise AssertionError(f"scenario {scenario!r} failed:\n" + "\n".join(errors))
    out = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        out.append(json.loads(path.read_text()) if path.exists() else {})
    return out
