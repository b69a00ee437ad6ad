"""CUDA-graph replay of the decode step, one graph per batch-size bucket.

Why: a decode step of a small model launches hundreds of kernels that each run for a few
microseconds; launching them from Python (and dynamo's guards) costs more than running them.
A CUDA graph records the step's kernels once and replays them with one launch
(``torch.cuda.CUDAGraph``, https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).

A graph replays fixed kernels on fixed addresses, hence the contract of a step function
``fn(*inputs) -> Tensor`` given to :class:`DecodeGraphs`:

- every per-step input is one of ``inputs`` (tensors); they are copied into static buffers
  that the graph reads, so their shapes must not change between calls of one bucket;
- everything else the step touches (weights, KV-cache buffers, the cache's device-side
  length counters, a fixed-size attention mask) lives at a fixed address and is updated on
  the device by the step itself; the Python code of the step must take the same path at
  every call (no per-step Python ints, no host synchronisation);
- the returned tensor is a static buffer, overwritten by the next replay: consume it first.

Batch-size buckets (1, 2, 4, 8, ...): a graph is specialised to its shapes, so a caller pads
its batch up to the next bucket (:func:`batch_bucket`, :func:`pad_batch`) and one graph serves
every batch size of that bucket. The graphs of all buckets share one memory pool.

Warm-up (recommended by the PyTorch docs before capture, and needed by ``torch.compile``d
steps so that compilation and autotuning never happen inside a capture): the first
``warmup_steps`` calls of a bucket run eagerly on a side stream. They are real steps, which
matters because a decode step mutates the cache: capturing records without executing, so
the call that captures then replays the graph once to perform its own step.

On CPU, or when ``enabled=False``, or when a capture fails (the step synchronised with the
host, or the model captures graphs itself), calls run ``fn`` directly, with a warning for a
failed capture. Correct results never depend on graphs being used.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["DEFAULT_BATCH_BUCKETS", "DecodeGraphs", "batch_bucket", "pad_batch"]

DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(batch_size: int, buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS) -> int:
    """The smallest bucket >= ``batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    ordered = sorted(set(buckets))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"buckets must be positive ints, got {tuple(buckets)!r}")
    for bucket in ordered:
        if bucket >= batch_size:
            return bucket
    raise ValueError(
        f"batch size {batch_size} is larger than the largest CUDA-graph bucket {ordered[-1]}; "
        f"pass buckets that include a size >= {batch_size}"
    )


def pad_batch(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``x`` with its first dim grown to ``batch_size`` by repeating its last row.

    Repeating a real row (rather than zeros) keeps the padded rows' arithmetic ordinary: a
    row of padding tokens under an all-zero attention mask would attend to nothing.
    """
    rows = x.shape[0]
    if rows == batch_size:
        return x
    if rows > batch_size or rows == 0:
        raise ValueError(f"cannot pad a batch of {rows} rows to {batch_size}")
    filler = x[-1:].expand(batch_size - rows, *x.shape[1:])
    return torch.cat([x, filler], dim=0)


class _Captured:
    """One bucket's graph, its static inputs and its static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.output = output

    def replay(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.output


class DecodeGraphs:
    """Run ``fn(*inputs)``: eagerly for warm-up, then from a CUDA graph per input-shape bucket.

    ``enabled=None`` enables graphs when CUDA is available (a CPU step always runs eagerly).
    The bucket is keyed by the inputs' shapes (callers pad the batch with
    :func:`pad_batch` to a :func:`batch_bucket` size first).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, enabled: bool | None = None, warmup_steps: int = 2):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (capture needs a warmed-up step), got {warmup_steps}")
        self.fn = fn
        self.enabled = torch.cuda.is_available() if enabled is None else bool(enabled)
        self.warmup_steps = warmup_steps
        self._calls: dict[tuple, int] = {}
        self._graphs: dict[tuple, _Captured] = {}
        self._failed: set[tuple] = set()
        self._pool = None
        self._side_stream = None

    @property
    def captured_buckets(self) -> list[tuple]:
        return list(self._graphs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not inputs or not all(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
            return self.fn(*inputs)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        captured = self._graphs.get(key)
        if captured is not None:
            return captured.replay(inputs)
        if key in self._failed:
            return self.fn(*inputs)
        calls = self._calls.get(key, 0)
        self._calls[key] = calls + 1
        if calls < self.warmup_steps:
            return self._warmup(inputs)
        return self._capture_and_replay(key, inputs)

    def _warmup(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            output = self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        if isinstance(output, torch.Tensor):
            # Allocated on the side stream, consumed on the current one.
            output.record_stream(torch.cuda.current_stream())
        return output

    def _capture_and_replay(self, key: tuple, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        static_inputs = [x.clone() for x in inputs]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # Capturing records the kernels without running them: the state the step mutates
            # (the cache) is untouched until the replay below performs this call's step.
            with torch.cuda.graph(graph, pool=self._pool):
                output = self.fn(*static_inputs)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
            self._failed.add(key)
            warnings.warn(
                f"CUDA-graph capture of the decode step failed ({type(error).__name__}: {error}); "
                "running it without graphs",
                RuntimeWarning,
                stacklevel=3,
            )
            torch.cuda.synchronize()
            return self.fn(*inputs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"a captured decode step must return one tensor, got {type(output).__name__}")
        captured = _Captured(graph, static_inputs, output)
        self._graphs[key] = captured
        return captured.replay(inputs)
