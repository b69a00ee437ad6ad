"""kernel_mode (llmopt/codegen/kernel_mode.py): which implementation an op runs.

Specification: ``LLMOPT_KERNELS`` (``auto`` by default, case and spaces ignored) picks the
Triton kernel on CUDA tensors, always (``triton``: CPU tensors only under the interpreter,
else a RuntimeError that says what to set) or never (``reference``); any other value is a
ValueError naming the valid ones. ``on_tensor_device`` keeps the launcher's name and
signature and runs it unchanged on CPU tensors.
"""
import inspect

import pytest
import torch

from llmopt.codegen import kernel_mode
from llmopt.codegen.kernel_mode import interpreting, on_tensor_device, use_triton

CPU = torch.zeros(2)


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("", "auto"), (" Triton ", "triton"),
                                         ("REFERENCE", "reference"), ("auto", "auto")])
def test_mode_from_the_environment(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("LLMOPT_KERNELS", raising=False)
    else:
        monkeypatch.setenv("LLMOPT_KERNELS", value)
    assert kernel_mode.kernel_mode() == mode


def test_bad_mode_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("LLMOPT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LLMOPT_KERNELS='cuda' is not valid; use one of auto, triton, reference"):
        use_triton(CPU)


def test_reference_never_and_auto_not_on_cpu(monkeypatch):
    monkeypatch.setenv("LLMOPT_KERNELS", "reference")
    assert not use_triton(CPU)
    monkeypatch.setenv("LLMOPT_KERNELS", "auto")
    assert not use_triton(CPU)  # CPU tensors: the reference, interpreter or not


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting() and use_triton(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        use_triton(CPU)


def test_triton_without_triton_installed_says_how_to_install(monkeypatch):
    monkeypatch.setenv("LLMOPT_KERNELS", "triton")
    monkeypatch.setattr(kernel_mode, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        use_triton(CPU)


def test_on_tensor_device_keeps_the_launcher():
    def launch(x, scale: float = 2.0, out=None):
        """doc"""
        return x * scale

    wrapped = on_tensor_device(launch)
    assert wrapped.__name__ == "launch" and wrapped.__doc__ == "doc"
    assert inspect.signature(wrapped) == inspect.signature(launch)
    assert torch.equal(wrapped(CPU + 1, scale=3.0), torch.full((2,), 3.0))
