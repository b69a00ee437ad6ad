"""Peak memory over a block of code: what ``llmopt bench`` reports per backend.

On CUDA ``torch.cuda.max_memory_allocated()`` (reset on entry; weights included). On CPU
the peak resident set size of the process, from Linux's ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; where that is not possible, a 5 ms sampling thread
reading ``VmRSS``; off Linux, the process-lifetime peak from ``resource.getrusage`` (not
reset per block). :meth:`PeakMemory.result` says which method measured the figure, and
the delta against the memory in use on entry.
"""
from __future__ import annotations

import threading

import torch


class PeakMemory:
    """Peak memory over a ``with`` block; ``result() -> (peak_mb, delta_mb, method)`` (module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak_rss = 0
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._base = _proc_status_kb("VmRSS")
        if self._base is not None and _reset_peak_rss():
            self.method = "peak RSS (Linux VmHWM, reset via /proc/self/clear_refs)"
        elif self._base is not None:
            self.method = "peak RSS (VmRSS sampled every 5 ms)"
            self._peak_rss = self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        else:
            import resource

            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "process lifetime peak RSS (getrusage; not reset per backend)"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = _proc_status_kb("VmRSS") or 0
            self._peak_rss = max(self._peak_rss, rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
            return
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._peak = self._peak_rss * 1024
            self._base *= 1024
        elif self.method.startswith("peak RSS (Linux"):
            self._peak = (_proc_status_kb("VmHWM") or 0) * 1024
            self._base *= 1024
        else:
            import resource

            self._peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._base *= 1024

    def result(self) -> tuple[float, float, str]:
        return self._peak / 2**20, (self._peak - self._base) / 2**20, self.method


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


__all__ = ["PeakMemory"]
