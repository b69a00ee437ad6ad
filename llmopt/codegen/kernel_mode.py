"""Which implementation an llmopt op runs: the Triton kernel or the PyTorch reference.

Every op in ``codegen/`` has two implementations: a Triton kernel (the fast path on CUDA)
and ``<op>_ref``, the eager PyTorch reference that is also the CPU implementation. The
choice is made per call, from the tensors' device and one environment variable, so that
it needs no global mutable state:

``LLMOPT_KERNELS``
    ``auto`` (default): Triton on CUDA tensors when Triton imports, the reference elsewhere.
    ``triton``: always the Triton kernel. With ``TRITON_INTERPRET=1`` this runs the kernel
    in Triton's interpreter on CPU tensors: that is how the kernel tests run on CPU, through
    the registered op, inside ``opcheck`` and ``torch.compile``.
    ``reference``: always the PyTorch reference (debugging a suspected kernel bug), also
    instead of the faster CPU paths of a few ops (``attention_decode_cpu``, the generated
    CPU int8 GEMV).

Why an environment variable and not a Python flag: the interpreter itself is switched by
an environment variable read when ``@triton.jit`` runs, so both are set together, once,
by the test session (``tests/conftest.py``) or the user.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

_VALID = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (looked up once: it is on every
    op call's path, and installing Triton into a running process is not supported)."""
    return importlib.util.find_spec("triton") is not None


def kernel_mode() -> str:
    mode = os.environ.get("LLMOPT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _VALID:
        raise ValueError(f"LLMOPT_KERNELS={mode!r} is not valid; use one of {', '.join(_VALID)}")
    return mode


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on ``tensors`` should launch its Triton kernel."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("LLMOPT_KERNELS=triton but triton is not installed; pip install triton")
        if not interpreting() and not all(t.is_cuda for t in tensors):
            raise RuntimeError(
                "LLMOPT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
        return True
    return triton_available() and all(t.is_cuda for t in tensors)


def on_tensor_device(launcher):
    """Decorator of a Triton launcher: run it with its first tensor argument's CUDA device
    current. Triton launches on the *current* device, not on the tensors': without this a
    launch on ``cuda:1`` tensors runs on ``cuda:0`` with foreign pointers."""

    @functools.wraps(launcher)
    def launch_on_device(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                if value.is_cuda:
                    with torch.cuda.device(value.device):
                        return launcher(*args, **kwargs)
                break
        return launcher(*args, **kwargs)

    return launch_on_device
