"""After a compile the backend hands the C heap's free pages back to the OS (llmopt/heap_trim.py).

- ``trim_free_heap`` releases the free pages in the middle of glibc's heap, which ``free``
  alone keeps (checked on RSS in a fresh process, with a heap fragmented on purpose);
- the backend calls it once per compiled graph, after the capture returns: before Dynamo
  builds its guards, the next peak of the process (docs/memory.md).
"""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import llmopt.backend
from llmopt import heap_trim
from models.tiny import tiny_model, tokens

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# 128 MiB in 64 KiB blocks: under glibc's mmap threshold (128 KiB), so they live in the heap;
# every 64th stays alive (the last one too), so the freed blocks are holes that ``free``
# cannot give back from the top of the heap.
_FRAGMENTED_HEAP = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from llmopt.heap_trim import trim_free_heap

    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    blocks = [bytearray(64 * 1024) for _ in range(2048)]
    kept = blocks[63::64]
    del blocks
    before = rss_kb()
    released = trim_free_heap()
    print(json.dumps({"before_kb": before, "after_kb": rss_kb(), "released": released, "kept": len(kept)}))
    """
)


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_returns_the_free_middle_of_the_heap_to_the_os():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP, root], check=True, capture_output=True,
                         text=True, timeout=120)
    m = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert m["released"] is True
    # 126 of the 128 MiB were freed; at least 100 MiB of them must leave the resident set.
    assert m["before_kb"] - m["after_kb"] >= 100 * 1024, m


@pytest.mark.skipif(GLIBC, reason="checks the fallback where there is no glibc")
def test_trim_is_a_no_op_without_glibc():
    assert heap_trim.trim_free_heap() is False


def test_backend_trims_once_per_compiled_graph(monkeypatch):
    calls = []
    monkeypatch.setattr(llmopt.backend.heap_trim, "trim_free_heap", lambda: calls.append(1) or True)
    torch._dynamo.reset()
    model = tiny_model("llama")
    with torch.no_grad():
        compiled = torch.compile(model, backend="llmopt", options={"strict": True})
        compiled(tokens(1, 6))
        assert len(calls) == 1
        compiled(tokens(1, 6))  # no recompile, no trim
        assert len(calls) == 1
    torch._dynamo.reset()
