"""The post-pass graph of a seeded tiny Llama, kept as golden files.

A refactor that changes what llmopt generates (an op more or less per layer, a copy that
appears, a mask recomputed, an argument that changes) shows up in review as a diff of
``tests/passes/golden/tiny_llama_{prefill,decode}.txt``. When the change is intended,
regenerate them and commit the diff with it::

    LLMOPT_UPDATE_GOLDEN=1 python -m pytest tests/passes/test_golden_graph.py

The rendering is stable text: one line per node, in graph order; node names are replaced
by sequential ids (``%0``, ``%1``… for operations, ``in0``… for inputs, ``c0``… for
frozen constants), so names that FX numbers by a global counter (``mul_69``) or that a
pass makes unique (``_llmopt_merged_weight_3``) never cause a spurious diff. Each line
shows the op, its normalized arguments, the result's dtype and shape and the module it
belongs to. The graphs come from torch.compile + ``llmopt.generate`` (prefill of 6
tokens, then a decode step) on CPU in fp32 with ``strict=True`` and ``autotune="off"``
(the tuning table is machine-local state). The ATen graph depends on the torch and
transformers versions: the files record the versions they were made with and the
comparison is skipped, with a message, under other versions.
"""
from __future__ import annotations

import difflib
import operator
import os
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import transformers

import llmopt
from llmopt.graph import op_name
from llmopt.report import layer_of
from models.tiny import tiny_model, tokens
from passes.final_graphs import capture_final_graphs

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("LLMOPT_UPDATE_GOLDEN", "") not in ("", "0")
PROMPT_LEN, NEW_TOKENS = 6, 3
DTYPE_NAMES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool",
}


def versions() -> str:
    major_minor = lambda v: ".".join(v.split("+")[0].split(".")[:2])  # noqa: E731
    return f"torch {major_minor(torch.__version__)}, transformers {major_minor(transformers.__version__)}"


# --------------------------------------------------------------------------- rendering
def render(gm: fx.GraphModule, title: str) -> str:
    ids: dict[fx.Node, str] = {}
    counts = {"placeholder": 0, "get_attr": 0, "call_function": 0}
    prefix = {"placeholder": "in", "get_attr": "c", "call_function": "%"}
    lines = [
        f"# {title}",
        f"# {versions()}",
        "# regenerate: LLMOPT_UPDATE_GOLDEN=1 python -m pytest tests/passes/test_golden_graph.py",
    ]
    for node in gm.graph.nodes:
        if node.op == "output":
            lines.append(f"output {_arg(node.args[0], ids)}")
            continue
        if node.op not in counts:
            raise AssertionError(f"unexpected node kind {node.op} in the final graph")
        ids[node] = f"{prefix[node.op]}{counts[node.op]}"
        counts[node.op] += 1
        value = _value(node.meta.get("val"))
        if node.op == "placeholder":
            lines.append(f"input {ids[node]}: {value}")
        elif node.op == "get_attr":
            lines.append(f"const {ids[node]}: {value}")
        else:
            args = [_arg(a, ids) for a in node.args]
            args += [f"{k}={_arg(v, ids)}" for k, v in sorted(node.kwargs.items())]
            layer = layer_of(node)
            line = f"{ids[node]} = {op_name(node)}({', '.join(args)}) -> {value}"
            lines.append(line + (f"  # {layer}" if layer else ""))
    return "\n".join(lines) + "\n"


def _arg(a, ids) -> str:
    if isinstance(a, fx.Node):
        return ids[a]
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x, ids) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, str):
        return repr(a)
    if isinstance(a, torch.dtype):
        return DTYPE_NAMES.get(a, str(a))
    if isinstance(a, (bool, int, float, type(None), torch.device, torch.memory_format, torch.layout)):
        return repr(a) if isinstance(a, float) else str(a)
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(a)
    return f"<{type(a).__name__}>"


def _value(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{DTYPE_NAMES.get(v.dtype, str(v.dtype))}[{', '.join(str(s) for s in v.shape)}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_value(x) for x in v) + ")"
    return "-" if v is None else type(v).__name__


# --------------------------------------------------------------------------- the graphs
@pytest.fixture(scope="module")
def llama_graphs():
    """(prefill, decode) final graphs of the seeded tiny Llama, compiled once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        captured = capture_final_graphs(mp)
        torch._dynamo.reset()
        model = tiny_model("llama", torch.float32, seed=0)
        compiled = torch.compile(model, backend="llmopt", options={"strict": True, "autotune": "off"})
        with torch.no_grad():
            llmopt.generate(compiled, tokens(1, PROMPT_LEN), max_new_tokens=NEW_TOKENS)
        torch._dynamo.reset()
    assert len(captured) == 2, f"expected one prefill and one decode graph, got {len(captured)}"
    return {
        "prefill": render(captured[0], f"tiny llama (seed 0, fp32): prefill of {PROMPT_LEN} tokens, final graph"),
        "decode": render(captured[1], "tiny llama (seed 0, fp32): one decode step, final graph"),
    }


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_graph_matches_golden(phase, llama_graphs):
    path = GOLDEN / f"tiny_llama_{phase}.txt"
    actual = llama_graphs[phase]
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    assert path.exists(), f"{path} is missing; create it with LLMOPT_UPDATE_GOLDEN=1"
    expected = path.read_text()
    made_with = expected.splitlines()[1].lstrip("# ")
    if made_with != versions():
        pytest.skip(f"golden graph made with {made_with}, this is {versions()}; regenerate with LLMOPT_UPDATE_GOLDEN=1")
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=str(path), tofile="generated now", n=1))
        lines = diff.splitlines()
        shown = "\n".join(lines[:80]) + (f"\n... {len(lines) - 80} more diff lines" if len(lines) > 80 else "")
        pytest.fail(
            f"the {phase} graph of the tiny Llama changed. If intended, run "
            f"LLMOPT_UPDATE_GOLDEN=1 python -m pytest tests/passes/test_golden_graph.py and commit the diff:\n{shown}"
        )


def test_rendering_is_stable_text():
    """Ids are sequential and no raw FX name (or memory address) leaks into the text."""
    def fn(x, y):
        return torch.relu(x @ y) + 1.5

    gm = fx.symbolic_trace(fn)
    for node in gm.graph.nodes:
        node.meta["val"] = torch.empty(2, 2)
    text = render(gm, "toy")
    assert "0x" not in text and "matmul" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body[0] == "input in0: f32[2, 2]" and body[1] == "input in1: f32[2, 2]"
    assert body[2].startswith("%0 = ") and body[3].startswith("%1 = ") and body[-1] == "output %2"
