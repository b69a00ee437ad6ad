"""Shared test configuration: tolerances, references, hypothesis profile, kernel mode.

Tolerances (DESIGN.md): relative Frobenius error against an fp64 ground truth,
one table for the whole suite, never loosened per test.
"""
from __future__ import annotations

import os

# The interpreter is chosen when @triton.jit decorates a kernel, so it must be set before
# any llmopt.codegen module is imported. CI sets it too (.ci/run).
os.environ.setdefault("TRITON_INTERPRET", "1")
# inner="auto" on CPU is Inductor for users; the suite runs the aten executor, because
# Inductor's C++ compile of every test model would take it past its time budget.
# tests/test_cpu_executor.py runs the shipped default (the variable unset) on real models.
os.environ.setdefault("LLMOPT_CPU_EXECUTOR", "aten")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    "tf32": 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tolerance(dtype) -> float:
    """The suite's tolerance for results computed in ``dtype`` (or ``"tf32"``)."""
    return TOLERANCE[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F, computed in fp64 (0/0 counts as 0)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if den == 0.0:
        return num
    return num / den


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within the table's tolerance for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. NaN or inf anywhere in ``actual`` fails, so an
    output poisoned with NaN and left unwritten is caught.
    """
    dtype = actual.dtype if dtype is None else dtype
    finite = torch.isfinite(actual.detach().to(torch.float64))
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:5].tolist()
        raise AssertionError(f"{what} non-finite output at {bad} (unwritten or overflowed)")
    err = relative_error(actual, expected)
    tol = tolerance(dtype)
    assert err <= tol, f"{what} relative error {err:.3e} > tolerance {tol:.0e} for {dtype}"


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An output buffer full of NaN: an element the kernel forgets to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def needs_transformers(minimum: str, why: str):
    """Skip marker for a test of a feature that cannot work on transformers older than
    ``minimum``; ``why`` says what is missing there. The one place tests gate on the
    transformers version (llmopt itself raises naming both versions)."""
    from packaging.version import Version

    try:
        import transformers
    except ImportError:
        return pytest.mark.skip(reason="transformers is not installed")
    installed = transformers.__version__
    return pytest.mark.skipif(
        Version(installed) < Version(minimum),
        reason=f"needs transformers >= {minimum}, {installed} is installed: {why}",
    )


def count_allocations(monkeypatch, module: str) -> list:
    """Record each tensor that code of ``module`` (a module's ``__name__``) allocates through
    ``torch.empty`` / ``zeros`` / ``full`` / ``*_like`` / ``empty_strided``: a per-call
    allocation test counts what a launcher allocates, not what the kernels compute."""
    import sys

    calls = []
    for name in ("empty", "zeros", "full", "empty_like", "zeros_like", "empty_strided"):
        real = getattr(torch, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == module:
                calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    return calls


@pytest.fixture
def triton_kernels(monkeypatch):
    """Run llmopt ops through their Triton kernels (in the interpreter on CPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    yield


@pytest.fixture
def isolated_tuning_tables(monkeypatch, tmp_path):
    """No test reads or writes the user's tuning table: ``$LLMOPT_CACHE_DIR`` is a temporary
    directory, the default table reloads from it, and the previous one is restored after."""
    from llmopt.codegen.tuning_table import set_active_table

    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    previous = set_active_table(None)
    yield
    set_active_table(previous)


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setenv("LLMOPT_KERNELS", "reference")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
