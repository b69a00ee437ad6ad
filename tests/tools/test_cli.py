"""The ``llmopt`` command line and MODEL_OR_CONFIG resolution, on tiny models on CPU.

``llmopt inspect`` and ``llmopt bench`` run in-process through ``llmopt.tools.cli.main`` (one
compile each); the JSON they write must satisfy its schema (checked by the library's
validators and, independently, by the key/type tables here), the HTML must parse and hold
the graph and the tables, the PNG must be a PNG.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from llmopt.tools import bench, explain
from llmopt.tools.cli import main, parse_options
from llmopt.tools.model_spec import PRESETS, resolve

REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# -- inspect ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    code, out, err = run_cli("inspect", "tiny-llama", "--seq", "8", "--html", str(d / "r.html"),
                             "--json", str(d / "r.json"), "-o", "inner=aten")
    return code, out, err, d


def test_inspect_exits_zero_and_prints_a_table(inspected):
    code, out, err, _ = inspected
    assert code == 0, err
    assert "graphs compiled: 1" in out
    for column in ("pass", "rewrites", "near-misses", "ops before", "kernel"):
        assert column in out
    assert "normalize" in out


EXPLAIN_KEYS = {
    "schema": str, "model": dict, "options": dict, "versions": dict, "calls": list, "totals": dict,
    "graph_breaks": list, "recompiles": list, "graphs": list, "notes": list,
}
GRAPH_KEYS = {"call": str, "report": dict, "layers": list, "linears": list, "inputs": list}
REPORT_KEYS = {"nodes_before": int, "nodes_after": int, "passes": list, "rewrites": list, "near_misses": list,
               "fallbacks": list, "kernel_choices": list, "schema_version": int}


def check_types(obj: dict, spec: dict, where: str) -> None:
    for key, kind in spec.items():
        assert key in obj, f"{where}: missing {key!r}"
        assert isinstance(obj[key], kind), f"{where}.{key}: {type(obj[key]).__name__} is not {kind.__name__}"


def test_inspect_json_schema(inspected):
    *_, d = inspected
    data = json.loads((d / "r.json").read_text())
    assert explain.validate(data) == []
    check_types(data, EXPLAIN_KEYS, "explanation")
    assert data["schema"] == "llmopt.explain/1"
    assert data["model"]["name"] == "tiny-llama" and data["model"]["parameters"] > 0
    assert data["options"]["inner"] == "aten"
    assert data["totals"]["graphs"] == len(data["graphs"]) == 1
    graph = data["graphs"][0]
    check_types(graph, GRAPH_KEYS, "graphs[0]")
    check_types(graph["report"], REPORT_KEYS, "graphs[0].report")
    assert {p["name"] for p in graph["report"]["passes"]} >= {"normalize"}
    assert any(layer["layer"].startswith("model.layers.0") for layer in graph["layers"])
    assert graph["linears"] and all(lin["kernel"] for lin in graph["linears"])


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_inspect_html_parses_with_graph_and_tables(inspected):
    *_, d = inspected
    page = (d / "r.html").read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    text = " ".join(parser.text)
    assert parser.tags.count("svg") == 2  # before and after the passes
    assert parser.tags.count("table") >= 4
    for heading in ("Summary", "Rewrites per pass", "Passes", "Per layer", "Linear kernels", "Graph before / after"):
        assert heading in text
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_inspect_json_to_stdout(tmp_path, monkeypatch):
    (tmp_path / "stdout_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli("inspect", "stdout_factory:build", "--json", "-", "--no-graph-breaks")
    assert code == 0, err
    data = json.loads(out)  # nothing but the JSON on stdout
    assert explain.validate(data) == []
    assert data["model"]["class"] == "Mlp" and data["model"]["source"] == "factory"


def test_inspect_decode_compiles_prefill_and_decode_graphs(tmp_path):
    code, out, err = run_cli("inspect", "tiny-llama", "--layers", "1", "--seq", "5", "--decode", "--no-graph-breaks",
                             "--json", str(tmp_path / "d.json"))
    assert code == 0, err
    data = json.loads((tmp_path / "d.json").read_text())
    assert explain.validate(data) == []
    inputs = [g["inputs"] for g in data["graphs"]]
    assert len(inputs) >= 2 and any("(1, 5) int64" in i for i in inputs) and any("(1, 1) int64" in i for i in inputs)
    assert all(g["call"].startswith("prefill + decode") for g in data["graphs"])


def test_inspect_decode_needs_a_causal_lm():
    code, _, err = run_cli("inspect", "tiny-bert", "--decode")
    assert code == 1 and "causal" in err


# -- bench ------------------------------------------------------------------------------------
BENCH_RESULT_KEYS = {"backend": str, "label": str, "status": str, "method": str, "prefill_tokens_per_s": float,
                     "peak_memory_mb": float, "memory_method": str, "vs_eager": dict, "samples": dict, "notes": list}


def test_bench_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code, stdout, err = run_cli("bench", "tiny-llama", "--backends", "eager", "--prompt-len", "6",
                                "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--out", str(out),
                                "--plot", str(png))
    assert code == 0, err
    assert "[1/1] eager" in err  # progress is shown
    assert "decode tok/s" in stdout
    data = json.loads(out.read_text())
    assert bench.validate(data) == []
    assert data["settings"]["prompt_len"] == 6 and data["settings"]["new_tokens"] == 3
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"] == torch.__version__
    (result,) = data["results"]
    check_types(result, BENCH_RESULT_KEYS, "results[0]")
    assert result["status"] == "ok" and result["decode_tokens_per_s"] > 0 and result["ttft_ms"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bench_rejects_unknown_backend():
    code, _, err = run_cli("bench", "tiny-llama", "--backends", "eager,tvm")
    assert code == 1 and "tvm" in err and "inductor" in err


# -- a device this torch cannot use, output paths checked before the work ----------------------
@pytest.fixture
def never_build_the_model(monkeypatch):
    """Fail the test if the command gets as far as building (then compiling) the model."""
    import llmopt.tools.model_spec

    def resolve_called(*args, **kwargs):
        raise AssertionError("the command built the model before checking its arguments")

    monkeypatch.setattr(llmopt.tools.model_spec, "resolve", resolve_called)


@pytest.mark.parametrize("command", ["inspect", "bench"])
@pytest.mark.parametrize("build", ["cpu-only torch", "CUDA torch, no GPU visible"])
def test_cuda_device_without_cuda_is_a_usage_error(monkeypatch, never_build_the_model, command, build):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None if build == "cpu-only torch" else "12.8")
    code, out, err = run_cli(command, "tiny-llama", "--device", "cuda")
    assert code == 2, err
    assert "CUDA" in err and torch.__version__ in err and "--device cpu" in err
    assert ("without CUDA" in err) if build == "cpu-only torch" else ("no CUDA GPU is visible" in err)
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1


def test_unknown_device_is_a_usage_error(never_build_the_model):
    code, _, err = run_cli("inspect", "tiny-llama", "--device", "gpu0")
    assert code == 2 and "'gpu0'" in err and "cpu" in err


@pytest.mark.parametrize("flag", ["--json", "--html"])
def test_inspect_output_path_is_checked_before_the_compile(tmp_path, never_build_the_model, flag):
    missing = tmp_path / "no" / "such" / "dir" / "r.out"
    code, _, err = run_cli("inspect", "tiny-llama", flag, str(missing))
    assert code == 2 and flag in err and str(missing.parent) in err and "does not exist" in err
    assert "mkdir" in err
    code, _, err = run_cli("inspect", "tiny-llama", flag, str(tmp_path))
    assert code == 2 and "is a directory" in err
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli("inspect", "tiny-llama", flag, str(tmp_path / "file" / "r.out"))
    assert code == 2 and "not a directory" in err


def test_inspect_json_and_html_must_differ(tmp_path, never_build_the_model):
    same = str(tmp_path / "r.out")
    code, _, err = run_cli("inspect", "tiny-llama", "--json", same, "--html", same)
    assert code == 2 and "same file" in err


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_bench_output_path_is_checked_before_the_run(tmp_path, never_build_the_model, flag):
    code, _, err = run_cli("bench", "tiny-llama", "--backends", "eager", flag, str(tmp_path))
    assert code == 2 and flag in err and "is a directory" in err

# -- usage, stubs -----------------------------------------------------------------------------
def test_usage_errors_exit_2():
    assert run_cli()[0] == 2
    assert run_cli("inspect")[0] == 2
    assert run_cli("inspect", "tiny-llama", "--dtype", "fp8")[0] == 2


def test_bad_option_and_unknown_model_fail_clearly():
    code, _, err = run_cli("inspect", "tiny-llama", "-o", "inner=tvm")
    assert code == 1 and "inner" in err and "inductor" in err
    code, _, err = run_cli("inspect", "no-such-model-xyz")
    assert code == 1 and "tiny-llama" in err  # names the presets


def test_autotune_dry_run_lists_shapes_on_cpu():
    code, out, _ = run_cli("autotune", "tiny-llama", "--dry-run")
    assert code == 0 and "N=128 K=64" in out and "candidates" in out


def test_models_lists_presets():
    code, out, _ = run_cli("models")
    assert code == 0 and all(name in out for name in PRESETS)


def test_console_script_entry_point():
    # setup.py is the source of truth: an editable install made before the tools moved
    # still carries the old target in its metadata until `pip install -e .` reruns.
    from importlib.metadata import EntryPoint, entry_points

    declared = re.search(r'"console_scripts": \["llmopt = ([\w.:]+)"\]', (REPO / "setup.py").read_text())
    assert declared and declared.group(1) == "llmopt.tools.cli:main"
    assert EntryPoint("llmopt", declared.group(1), "console_scripts").load() is main
    installed = [e for e in entry_points(group="console_scripts") if e.name == "llmopt"]
    if installed and installed[0].value == declared.group(1):
        assert installed[0].load() is main
    code, out, _ = run_cli("--help")
    assert code == 0 and "inspect" in out and "bench" in out


def test_parse_options():
    assert parse_options(["inner=inductor", 'disable=["fuse_rope"]', "strict=true"], "int8") == {
        "inner": "inductor", "disable": ["fuse_rope"], "strict": True, "quantize": "int8"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["inner"])


# -- MODEL_OR_CONFIG --------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls,kind", [
    ("tiny-llama", "LlamaForCausalLM", "causal-lm"),
    ("tiny-bert", "BertModel", "encoder"),
    ("mistral", "MistralForCausalLM", "causal-lm"),  # a bare model_type: small default config
])
def test_resolve_names(name, cls, kind):
    spec = resolve(name, device="cpu", batch=2, seq=5)
    assert type(spec.model).__name__ == cls and spec.kind == kind
    assert spec.example_args[0].shape == (2, 5) and spec.example_args[0].dtype == torch.int64
    assert spec.num_parameters() < 1_000_000 and not spec.model.training


def test_resolve_presets_have_published_shapes():
    from llmopt.tools.model_spec import _hf_config

    c = _hf_config(PRESETS["llama-3-8b"].model_type, PRESETS["llama-3-8b"].config, None)
    assert (c.hidden_size, c.intermediate_size, c.num_key_value_heads, c.vocab_size) == (4096, 14336, 8, 128256)
    c = _hf_config(PRESETS["llama-2-7b"].model_type, PRESETS["llama-2-7b"].config, 2)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 11008, 2)


def test_resolve_dtype_layers_and_seed():
    a = resolve("tiny-llama", device="cpu", dtype="bf16", layers=1)
    b = resolve("tiny-llama", device="cpu", dtype="bf16", layers=1)
    assert next(a.model.parameters()).dtype == torch.bfloat16 and a.config.num_hidden_layers == 1
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_resolve_directory_loads_safetensors(tmp_path):
    src = resolve("tiny-llama", device="cpu", seed=3)
    src.model.save_pretrained(tmp_path)  # config.json + model.safetensors
    spec = resolve(str(tmp_path), device="cpu", seed=0)
    assert spec.source == "directory" and spec.weights.startswith("safetensors")
    for (name, p), q in zip(src.model.state_dict().items(), spec.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_resolve_directory_never_unpickles(tmp_path):
    resolve("tiny-llama", device="cpu").config.to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    spec = resolve(str(tmp_path), device="cpu")
    assert spec.weights.startswith("random") and any("pickle" in n for n in spec.notes)


FACTORY = '''
import torch

class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))

def build():
    return Mlp(), (torch.randn(2, 8),)

def broken():
    return 42
'''


def test_resolve_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = resolve("my_factory_mod:build", device="cpu", dtype="bf16")
    assert spec.kind == "custom" and spec.example_args[0].shape == (2, 8)
    assert spec.example_args[0].dtype == torch.bfloat16  # float inputs follow --dtype
    by_path = resolve(f"{tmp_path / 'my_factory_mod.py'}:build", device="cpu")
    assert type(by_path.model).__name__ == "Mlp"
    with pytest.raises(TypeError, match="nn.Module"):
        resolve("my_factory_mod:broken", device="cpu")
    with pytest.raises(ValueError, match="no attribute"):
        resolve("my_factory_mod:missing", device="cpu")


def test_inspect_a_factory_model(tmp_path, monkeypatch):
    (tmp_path / "my_factory_mod2.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli("inspect", "my_factory_mod2:build", "--no-graph-breaks")
    assert code == 0, err
    assert "graphs compiled: 1" in out


def test_inspect_replaces_a_named_file_atomically(tmp_path, monkeypatch):
    """The user named the file, so it is replaced; through a temporary file in the same
    directory, so a failed write leaves the old one whole."""
    from llmopt.tools import cli

    target = tmp_path / "r.json"
    target.write_text("old report")
    target.chmod(0o640)
    cli._write_atomically(str(target), "new report")
    assert target.read_text() == "new report" and (target.stat().st_mode & 0o777) == 0o640

    def failing_write(*args):
        raise OSError("disk full")

    monkeypatch.setattr(cli.os, "replace", failing_write)
    with pytest.raises(OSError, match="disk full"):
        cli._write_atomically(str(target), "newer report")
    assert target.read_text() == "new report" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
