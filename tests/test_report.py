"""CompileReport: table, stable JSON, DOT export, layer attribution, structured kernel
choices, the registry behind ``llmopt.last_report()``."""
import json

import networkx as nx
import pytest
import torch

import llmopt
from llmopt.codegen.tuning_table import M_BUCKETS, TuningEntry, TuningTable, parse_kernels, set_active_table
from llmopt.report import BucketKernel, CompileReport, KernelChoice, ReportRegistry
from models.tiny import tiny_model, tokens
from passes.final_graphs import TEST_GPU, capture_final_graphs


@pytest.fixture(scope="module")
def report():
    torch._dynamo.reset()
    llmopt.clear_reports()
    model = tiny_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"strict": True})(tokens(1, 5))
    return llmopt.last_report()


def test_table_lists_every_pass(report):
    text = str(report)
    for p in report.passes:
        assert p.name in text
    assert "nodes:" in text


def test_json_is_stable_and_complete(report):
    a, b = report.to_json(), report.to_json()
    assert a == b
    d = json.loads(a)
    assert d["schema_version"] == 1
    for key in ("nodes_before", "nodes_after", "passes", "rewrites", "near_misses", "fallbacks", "kernel_choices"):
        assert key in d
    assert d["nodes_after"] <= d["nodes_before"]


def test_dot_export(report):
    dot = report.to_dot("after")
    assert dot.startswith("digraph") and "->" in dot
    assert isinstance(report.graph_after, nx.DiGraph)
    with pytest.raises(ValueError):
        report.to_dot("sideways")


def test_rewrites_name_their_layer(report):
    layers = {r.layer for r in report.rewrites if r.layer}
    assert any("layers.0" in l for l in layers), layers


# -- kernel choices as fields ------------------------------------------------------------------
def test_cpu_kernel_choices_carry_the_weight_shape(report):
    linears = [k for k in report.kernel_choices if k.op == "linear"]
    assert linears and all(k.N and k.K and k.dtype == "float32" for k in linears)
    # every M bucket runs the CPU implementation (oneDNN in fp32), each with its reason
    assert all({b.kernel for b in k.buckets} == {"mm"} and all("CPU" in b.reason for b in k.buckets) for k in linears)
    # the text line still starts with the same shape
    assert all(k.reason.startswith(f"N={k.N} K={k.K} float32") for k in linears)
    d = json.loads(report.to_json())
    assert {(k["N"], k["K"]) for k in d["kernel_choices"] if k["op"] == "linear"} == {(k.N, k.K) for k in linears}


class _Wide(torch.nn.Module):
    """One linear big enough (N*K >= 2**18) for the heuristic to pick Triton kernels."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(512, 1024, bias=False)

    def forward(self, x):
        return self.lin(x)


def test_cuda_kernel_choice_lists_each_bucket_with_its_config(monkeypatch, tmp_path):
    # select_linear_kernel's CUDA branch run on CPU (tests/passes/final_graphs.py); bucket 1
    # comes from a table entry with a config, the others from the heuristic.
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    previous = set_active_table(None)
    try:
        table = TuningTable(tmp_path / "t.json", device_name=TEST_GPU)
        table.put(TEST_GPU, torch.float32, 1024, 512, "1", TuningEntry("gemv", {"BLOCK_N": 16}, 1.0, 2.0))
        table.save(tmp_path / "t.json")
        capture_final_graphs(monkeypatch, as_cuda=True)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(_Wide().eval(), backend="llmopt",
                          options={"strict": True, "tuning_table": str(tmp_path / "t.json")})(torch.randn(3, 512))
        torch._dynamo.reset()
    finally:
        set_active_table(previous)
    (choice,) = [k for k in llmopt.last_report().kernel_choices if k.buckets]
    assert (choice.N, choice.K, choice.dtype) == (1024, 512, "float32")
    assert [b.m_bucket for b in choice.buckets] == list(M_BUCKETS)
    assert {b.m_bucket: b.kernel for b in choice.buckets} == parse_kernels(choice.kernel)
    first = choice.buckets[0]
    assert first.config == {"BLOCK_N": 16} and first.reason.startswith("tuning table")
    assert all(b.config is None and b.reason.startswith("heuristic") for b in choice.buckets[1:])
    (data,) = [k for k in json.loads(llmopt.last_report().to_json())["kernel_choices"] if k["buckets"]]
    assert data["buckets"][0] == {"m_bucket": "1", "kernel": "gemv", "config": {"BLOCK_N": 16},
                                  "reason": first.reason}


def test_text_table_prints_the_reason_line():
    r = CompileReport()
    r.kernel_choices.append(KernelChoice("linear", "model.layers.0.mlp", "linear", "1:gemv,2:flat_gemm",
                                         "N=8 K=4 float16; M 1: gemv (why)", 8, 4, "float16",
                                         [BucketKernel("1", "gemv", None, "why")]))
    assert "N=8 K=4 float16; M 1: gemv (why)" in str(r)


# -- the registry --------------------------------------------------------------------------------
def test_registry_numbers_bounds_and_clears():
    registry = ReportRegistry(max_reports=2)
    first, second, third = CompileReport(), CompileReport(), CompileReport()
    for r in (first, second, third):
        registry.register(r)
    assert [r.graph_index for r in (first, second, third)] == [0, 1, 2]
    assert registry.all() == [second, third] and registry.last() is third
    registry.clear()
    assert registry.last() is None and registry.all() == []
    registry.register(first)
    assert first.graph_index == 0



def test_compile_time_is_broken_down_by_phase(report):
    # Every phase of the backend is timed; together they are the compile time.
    assert set(report.compile_phases) == {"capture", "report", "freeze", "passes", "executor"}
    assert all(s >= 0 for s in report.compile_phases.values())
    assert sum(report.compile_phases.values()) == pytest.approx(report.compile_seconds, rel=1e-6, abs=1e-6)
    assert "passes" in str(report) and json.loads(report.to_json())["compile_phases"].keys() == report.compile_phases.keys()
