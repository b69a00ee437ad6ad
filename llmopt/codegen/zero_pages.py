"""Zero-filled CPU tensors whose memory the operating system supplies page by page.

``torch.zeros`` on the CPU allocates and then writes every byte, so every page is faulted
in and zeroed twice (once by the kernel, once by the fill) before anything is stored. A
static KV cache is the extreme case: its capacity is reserved up front and mostly unused.
Hugging Face's ``StaticCache`` with 4096 slots is 200 MB of K and V for a ~100M-parameter
model at batch 4 in bf16, allocated in the first forward (inside the compiled prefill):
measured on the 2-core CI machine, ~50k page faults and 50-60 ms of a ~180 ms prefill,
for a prompt that writes 64 of the 4096 slots.

:func:`zeros` instead maps fresh anonymous memory (``mmap``): the kernel hands out zero
pages lazily, so the allocation costs a system call, a page is faulted in when it is
first written (a decode step writes one row per layer and head), and pages that are only
read map the shared zero page. The resident memory of such a cache grows with the
tokens it holds, not with its capacity. Below :data:`MIN_BYTES` (and off the CPU) it is
``torch.zeros``: a small allocation gains nothing, and device allocators do not hand out
lazily zeroed memory.

The tensor is an ordinary contiguous tensor over that mapping (``torch.frombuffer``,
which keeps the mapping alive as long as the tensor's storage; freeing the storage unmaps
it). The one difference a user can see: its storage cannot be resized in place
(``Tensor.resize_`` to a larger size raises), as with any tensor over foreign memory.

``llmopt::zeros_index_copy`` is the first write into such a cache as one op,
``zeros(size).index_copy_(dim, index, source)``: what ``passes/kv_cache.py`` makes of the
lazy ``StaticCache``'s functional ``index_copy(zeros(...), ...)`` in a CPU graph, where
Inductor would otherwise fuse the zero fill and the write into one loop over a freshly
allocated (and so fully faulted) buffer. No Triton kernel: it is an allocation and an ATen
``index_copy_``, on any device (the pass emits it only where the allocation is lazy).
"""
from __future__ import annotations

import math
import mmap
from typing import Sequence

import torch

# The smallest allocation :func:`zeros` maps lazily (1 MiB). glibc itself maps allocations
# above its mmap threshold (128 KiB to 32 MiB, adaptive), but ``torch.zeros`` then writes
# them all; below about a megabyte the fill costs microseconds.
MIN_BYTES = 1 << 20


def lazily_zeroed(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether :func:`zeros` maps this allocation lazily (CPU, at least :data:`MIN_BYTES`)."""
    if torch.device(device).type != "cpu":
        return False
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    return nbytes > 0 and nbytes >= MIN_BYTES


def zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``, contiguous; on the CPU from
    fresh anonymous pages when at least :data:`MIN_BYTES` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"zeros: negative dimension in shape {shape}")
    if not lazily_zeroed(shape, dtype, device):
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffer = mmap.mmap(-1, numel * dtype.itemsize)  # private, anonymous: zero pages
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)


def _check(source: torch.Tensor, dim: int, index: torch.Tensor, size: Sequence[int]) -> None:
    if len(size) != source.dim():
        raise ValueError(f"zeros_index_copy: size {list(size)} has {len(size)} dims, source has {source.dim()}")
    if not -source.dim() <= dim < max(source.dim(), 1):
        raise ValueError(f"zeros_index_copy: dim {dim} out of range for {source.dim()} dims")
    if index.dim() > 1 or index.dtype != torch.int64:
        raise ValueError(f"zeros_index_copy: index must be a 0-D or 1-D int64 tensor (as index_copy's), got "
                         f"{index.dim()}-D {index.dtype}")


@torch.library.custom_op("llmopt::zeros_index_copy", mutates_args=())
def zeros_index_copy(source: torch.Tensor, dim: int, index: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``zeros(size, like source).index_copy_(dim, index, source)``, the zeros lazily mapped
    on the CPU (:func:`zeros`). ``index_copy_`` checks the positions and shapes."""
    _check(source, dim, index, size)
    out = zeros(size, source.dtype, source.device)
    return out.index_copy_(dim, index, source)


@zeros_index_copy.register_fake
def _(source, dim, index, size):
    _check(source, dim, index, size)
    return source.new_empty(list(size))


__all__ = ["MIN_BYTES", "lazily_zeroed", "zeros", "zeros_index_copy"]
