"""Every example in ``examples/`` runs, at a reduced size, and prints what it promises.

The examples run in this process (``runpy``, with ``sys.argv`` set), which saves starting
Python and importing torch for each. An example added to ``examples/`` must get its
reduced-size flags in ``SMALL`` below (``test_every_example_runs_in_ci`` fails until it
does); an example listed here but not written yet is skipped.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# example -> (reduced-size arguments ({tmp} is a scratch directory), lines its output must contain)
SMALL: dict[str, tuple[list[str], list[str]]] = {
    "quickstart.py": (["--layers", "1", "--hidden", "64", "--new-tokens", "4", "--prompt-len", "4", "--rounds", "3"],
                      ["tokens/s, median of 3 interleaved rounds", "llmopt / eager:", "(min ",
                       "generated tokens identical to eager: True"]),
    "hf_generate.py": (["--layers", "1", "--new-tokens", "3", "--prompt-len", "6", "--batch", "2", "--max-seq-len", "4096"],
                       ["StaticKVCache: 4096 slots, 2.0 MB reserved", "tokens equal (HF compiled vs eager): True",
                        "tokens equal (llmopt.generate vs eager): True"]),
    "inspect_model.py": (["--layers", "1", "--seq", "6", "--html", "{tmp}/report.html"],
                         ["graphs compiled: 1", "rewrites per pass:", "wrote {tmp}/report.html"]),
    "serve_batch.py": (["--layers", "1", "--hidden", "64", "--requests", "3", "--new-tokens", "3"],
                       ["tokens/s", "KV cache used/reserved", "tokens equal to llmopt.generate alone: True"]),
    "speculative.py": (["--layers", "2", "--hidden", "64", "--new-tokens", "8"],
                       ["tokens identical to plain greedy: True", "acceptance", "beam search (4 beams)"]),
    "moe_generate.py": (["--layers", "1", "--hidden", "64", "--intermediate", "96", "--new-tokens", "3"],
                        ["→ moe_route(softmax, top_k=2, renormalize=True) + fused_experts(silu, 8 experts, I=96)",
                         "tokens equal to eager: True"]),
    "tensor_parallel.py": (["--layers", "1", "--new-tokens", "4", "--prompt-len", "6"],
                           ["tokens equal (llmopt.generate, 2 ranks vs eager): True",
                            "tokens equal (HF generate + StaticKVCache, 2 ranks vs eager): True",
                            "tokens equal (llmopt.Engine, 2 ranks vs eager): True"]),
    # Written with other issues:
    "quantize_and_save.py": (["--small", "--scheme", "int8", "--out", "{tmp}/quantized"], []),
}


def test_every_example_runs_in_ci():
    present = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))  # _options.py: shared
    missing = [name for name in present if name not in SMALL]
    assert not missing, f"add reduced-size arguments for {missing} to SMALL in tests/test_examples.py"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_example_runs_small(name, tmp_path, monkeypatch, capsys):
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip(f"examples/{name} is not written yet")
    args, expected = SMALL[name]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/x.py` does (examples/_options.py)
    monkeypatch.chdir(tmp_path)  # whatever an example writes by default lands here
    torch._dynamo.reset()
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), f"examples/{name} exited with {exc.code}"
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    for line in expected:
        assert line.replace("{tmp}", str(tmp_path)) in out, f"examples/{name}: {line!r} not in its output:\n{out}"
