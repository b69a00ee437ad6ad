"""``llmopt::linear`` (llmopt/codegen/linear.py): the run-time choice of kernel by M bucket.

Specification: the op reads M, takes its bucket ``min(next_pow2(M), 64)`` (``"inf"`` above
64) and launches the kernel its ``kernels`` string names for that bucket, with the config
the string carries for it (else the kernel's heuristic config; the active table is read
only when the string is empty, never behind a compiled graph's back); one compiled graph
serves every M without recompiling; the choice per bucket comes from the tuning table
when it has an entry, else from the documented heuristic (also when the table file is
corrupt or foreign); on CPU without forced Triton the op is the PyTorch path.
"""
import json
import math

import pytest
import torch
from conftest import assert_close

import llmopt.codegen.linear as linear_module
from llmopt.codegen.linear import linear_ref, select_kernel
from llmopt.codegen.tuning_table import (
    M_BUCKETS,
    TuningEntry,
    TuningTable,
    choose_kernels,
    format_kernels,
    m_bucket_label,
    parse_kernels,
    set_active_table,
)

H100 = "NVIDIA H100 80GB HBM3"
PASS_STRING = "1:gemv,2:flat_gemm,4:flat_gemm,8:flat_gemm,16:flat_gemm,32:flat_gemm,64:flat_gemm,inf:mm"
HEURISTIC = "1:gemv,2:flat_gemm,4:flat_gemm,8:flat_gemm,16:flat_gemm,32:flat_gemm,64:mm,inf:mm"


@pytest.fixture
def table(tmp_path):
    """An empty active table (never the user's ~/.cache one)."""
    t = TuningTable(tmp_path / "tuning.json")
    previous = set_active_table(t)
    yield t
    set_active_table(previous)


@pytest.fixture
def launches(monkeypatch):
    """Record which implementation each call of the op ran, with its config."""
    calls = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("config")))
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(linear_module, "gemv_triton", spy("gemv", linear_module.gemv_triton))
    monkeypatch.setattr(linear_module, "flat_gemm_triton", spy("flat_gemm", linear_module.flat_gemm_triton))
    monkeypatch.setattr(linear_module, "gemv_ref", spy("mm", linear_module.gemv_ref))
    monkeypatch.setattr(linear_module, "linear_cpu", spy("cpu", linear_module.linear_cpu))
    return calls


def inputs(M, n_out=24, K=40, activation="", dtype=torch.float32, lead=()):
    g = torch.Generator().manual_seed(M)
    N = 2 * n_out if activation else n_out
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    weight = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    residual = torch.randn(*lead, M, n_out, generator=g).to(dtype)
    return x, weight, bias, residual


def truth(x, weight, bias, residual, activation):
    as64 = [t.double() if t is not None else None for t in (x, weight, bias, residual)]
    return linear_ref(*as64, activation)


# -- buckets and the kernels string --------------------------------------------------------


def test_m_bucket_label_is_next_power_of_two_capped_at_64_then_inf():
    got = {M: m_bucket_label(M) for M in (0, 1, 2, 3, 4, 5, 8, 9, 31, 33, 64, 65, 4096)}
    assert got == {0: "1", 1: "1", 2: "2", 3: "4", 4: "4", 5: "8", 8: "8", 9: "16", 31: "32", 33: "64",
                   64: "64", 65: "inf", 4096: "inf"}


def test_kernels_string_round_trip_and_defaults():
    assert format_kernels(parse_kernels(PASS_STRING)) == PASS_STRING
    assert parse_kernels("1:gemv") == {**dict.fromkeys(M_BUCKETS, "mm"), "1": "gemv"}
    for bad in ("1:cublas", "3:gemv", "gemv", "inf-mm"):
        with pytest.raises(ValueError, match="bad kernels entry"):
            parse_kernels(bad)


# -- the run-time choice -------------------------------------------------------------------


@pytest.mark.parametrize("M, expected", [(1, "gemv"), (2, "flat_gemm"), (7, "flat_gemm"), (33, "flat_gemm"),
                                         (64, "flat_gemm"), (65, "mm")])
def test_op_launches_the_kernel_of_its_bucket(triton_kernels, table, launches, M, expected):
    x, weight, bias, residual = inputs(M, activation="silu")
    out = torch.ops.llmopt.linear(x, weight, bias, residual, "silu", PASS_STRING)
    assert [name for name, _ in launches] == [expected]
    assert_close(out, truth(x, weight, bias, residual, "silu"), torch.float32)


def test_tuned_config_reaches_the_launcher(triton_kernels, table, launches):
    x, weight, bias, residual = inputs(3)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}
    kernels = format_kernels(parse_kernels(PASS_STRING), {"4": config})  # as the pass bakes a table entry
    out = torch.ops.llmopt.linear(x, weight, bias, None, "", kernels)
    assert launches == [("flat_gemm", config)]
    assert_close(out, truth(x, weight, bias, None, ""), torch.float32)
    # a bucket without a config runs its kernel's heuristic config; the active table is not read
    table.put("cpu", torch.float32, 24, 40, "1", TuningEntry("gemv", {"BLOCK_N": 8}, 5.0, 9.0))
    launches.clear()
    torch.ops.llmopt.linear(x[:1], weight, bias, None, "", kernels)
    assert launches == [("gemv", None)]


def test_auto_on_cpu_is_the_pytorch_path(triton_kernels, table, launches):
    x, weight, bias, residual = inputs(1)
    assert select_kernel(x, weight, "") == ("mm", None)
    torch.ops.llmopt.linear(x, weight, bias, residual, "", "")
    assert [name for name, _ in launches] == ["mm"]


def test_cpu_without_forced_triton_ignores_the_string(table, launches):
    x, weight, bias, residual = inputs(1)
    out = torch.ops.llmopt.linear(x, weight, bias, residual, "", PASS_STRING)
    assert launches == [("cpu", None)]  # linear_cpu (oneDNN in fp32), whatever the string says
    assert_close(out, truth(x, weight, bias, residual, ""), torch.float32)


def test_dtypes_without_kernels_take_the_pytorch_path(triton_kernels, table, launches):
    x, weight, bias, residual = inputs(1, dtype=torch.float64)
    out = torch.ops.llmopt.linear(x, weight, bias, residual, "", PASS_STRING)
    assert [name for name, _ in launches] == ["mm"]
    assert out.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_leading_dims_are_flattened(triton_kernels, table, dtype):
    x, weight, bias, residual = inputs(3, activation="gelu", dtype=dtype, lead=(2,))
    out = torch.ops.llmopt.linear(x, weight, bias, residual, "gelu", PASS_STRING)
    assert out.shape == (2, 3, 24) and out.dtype == dtype
    assert_close(out, truth(x, weight, bias, residual, "gelu"), dtype)


def test_zero_rows(triton_kernels, table):
    x, weight, bias, _ = inputs(1)
    out = torch.ops.llmopt.linear(x[:0], weight, bias, None, "", PASS_STRING)
    assert out.shape == (0, 24)


def test_opcheck_every_kernel(triton_kernels, table):
    x, weight, bias, residual = inputs(5, lead=(1,))
    for kernels in (PASS_STRING, "8:gemv", "8:mm", ""):
        torch.library.opcheck(torch.ops.llmopt.linear.default, (x, weight, bias, residual, "", kernels))


def test_one_graph_serves_decode_and_prefill_without_recompiling(triton_kernels, table, launches):
    _, weight, bias, _ = inputs(1)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm

    def fn(x):
        return torch.ops.llmopt.linear(x, weight, bias, None, "", PASS_STRING)

    compiled = torch.compile(fn, backend=counting_backend, dynamic=True, fullgraph=True)
    # (M = 0 and 1 are specialized by dynamo; every M >= 2 shares one graph)
    for M, expected in [(2, "flat_gemm"), (17, "flat_gemm"), (100, "mm"), (40, "flat_gemm")]:
        launches.clear()
        x = inputs(M)[0]
        out = compiled(x)
        assert [name for name, _ in launches] == [expected], M
        assert_close(out, truth(x, weight, bias, None, ""), torch.float32)
    assert len(compiles) == 1


def test_compiled_with_aot_eager_fullgraph(triton_kernels, table):
    x, weight, bias, residual = inputs(4, activation="silu")

    def fn(x, residual):
        return torch.ops.llmopt.linear(x, weight, bias, residual, "silu", PASS_STRING)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, residual), truth(x, weight, bias, residual, "silu"), torch.float32)


def test_bad_inputs_raise_clear_errors(triton_kernels, table):
    x, weight, bias, residual = inputs(2)
    with pytest.raises(ValueError, match="residual must have the output shape"):
        torch.ops.llmopt.linear(x, weight, bias, residual[:1], "", PASS_STRING)
    with pytest.raises(ValueError, match="bad kernels entry"):
        torch.ops.llmopt.linear(x, weight, bias, None, "", "2:cublas")
    with pytest.raises(ValueError, match="nn.Linear layout"):
        torch.ops.llmopt.linear(x, weight.t(), None, None, "", PASS_STRING)
    # caught at compile time by the fake (dynamo wraps the ValueError in a RuntimeError)
    with pytest.raises((ValueError, RuntimeError), match="bad kernels entry"):
        torch.compile(lambda x: torch.ops.llmopt.linear(x, weight, bias, None, "", "2:cublas"),
                      backend="aot_eager", fullgraph=True)(x)


# -- the choice per bucket: table, heuristic, unusable tables --------------------------------


HAND_WRITTEN = {"1": "flat_gemm", "2": "gemv", "4": "mm", "8": "gemv", "16": "mm", "32": "gemv", "64": "flat_gemm",
                "inf": "gemv"}


def hand_written_table(path) -> TuningTable:
    t = TuningTable(path, device_name=H100)
    for bucket, kernel in HAND_WRITTEN.items():
        t.put(H100, torch.bfloat16, 6144, 4096, bucket, TuningEntry(kernel, {}, 10.0, 12.5))
    return t


def test_the_table_decides_every_bucket(tmp_path):
    t = hand_written_table(tmp_path / "tuning.json")
    t.save()
    loaded = TuningTable.load(tmp_path / "tuning.json", device_name=H100)
    kernels, reasons = choose_kernels(loaded, H100, torch.bfloat16, 6144, 4096)
    assert parse_kernels(kernels) == HAND_WRITTEN
    assert all(r.startswith("tuning table:") and "1.25x" in r for r in reasons.values())
    # another shape in the same table: the heuristic
    kernels, reasons = choose_kernels(loaded, H100, torch.bfloat16, 4096, 4096)
    assert kernels == HEURISTIC
    assert all(r.startswith("heuristic:") for r in reasons.values())


def test_heuristic_documented_choices():
    assert choose_kernels(None, H100, torch.float16, 4096, 11008)[0] == HEURISTIC
    tiny, reasons = choose_kernels(None, H100, torch.float16, 256, 256)
    assert set(parse_kernels(tiny).values()) == {"mm"} and "tiny weight" in reasons["1"]
    cpu, reasons = choose_kernels(None, "cpu", torch.float32, 4096, 4096)
    assert set(parse_kernels(cpu).values()) == {"mm"} and "PyTorch" in reasons["1"]
    fp64, _ = choose_kernels(None, H100, torch.float64, 4096, 4096)
    assert set(parse_kernels(fp64).values()) == {"mm"}


def test_cpu_ignores_table_entries(tmp_path):
    t = TuningTable(tmp_path / "t.json")
    t.put("cpu", torch.float32, 4096, 4096, "1", TuningEntry("gemv", {}, 1.0, 2.0))
    assert parse_kernels(choose_kernels(t, "cpu", torch.float32, 4096, 4096)[0])["1"] == "mm"


@pytest.mark.parametrize(
    "corrupt",
    [
        b"{not json",
        b'{"format": "llmopt-tuning-table", "schema": 1, "entries": [{"kernel": "gemv"}]}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_corrupt_table_falls_back_to_heuristic_with_warning(tmp_path, corrupt):
    path = tmp_path / "tuning.json"
    path.write_bytes(corrupt)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning table.*llmopt autotune"):
        loaded = TuningTable.load(path, device_name=H100)
    assert len(loaded) == 0
    assert choose_kernels(loaded, H100, torch.bfloat16, 6144, 4096)[0] == HEURISTIC


@pytest.mark.parametrize("field, value, match", [
    ("llmopt_version", "0.0.1", "written by llmopt 0.0.1"),
    ("triton_version", "2.0.0", "triton 2.0.0"),
    ("device_name", "NVIDIA A100-SXM4-80GB", "tuned on 'NVIDIA A100"),
])
def test_foreign_table_falls_back_to_heuristic_with_warning(tmp_path, field, value, match):
    path = tmp_path / "tuning.json"
    hand_written_table(path).save()
    data = json.loads(path.read_text())
    data[field] = value
    if field == "device_name":
        for entry in data["entries"]:
            entry["device"] = value
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match=match):
        loaded = TuningTable.load(path, device_name=H100)
    assert choose_kernels(loaded, H100, torch.bfloat16, 6144, 4096)[0] == HEURISTIC


def test_active_table_is_loaded_from_the_cache_dir(tmp_path, monkeypatch, triton_kernels, launches):
    """``kernels=""``: the op chooses kernel and config from the active table itself."""
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(linear_module, "device_name", lambda device: H100)  # the table's key, as on that GPU
    t = TuningTable(tmp_path / "tuning.json")
    t.put(H100, torch.float32, 24, 40, "2", TuningEntry("gemv", {"BLOCK_N": 8, "SPLIT_K": 2}, 3.0, 4.0))
    t.save()
    previous = set_active_table(None)  # reload lazily from $LLMOPT_CACHE_DIR
    try:
        x, weight, bias, _ = inputs(2)
        out = torch.ops.llmopt.linear(x, weight, bias, None, "", "")
        assert launches == [("gemv", {"BLOCK_N": 8, "SPLIT_K": 2})]
        assert_close(out, truth(x, weight, bias, None, ""), torch.float32)
    finally:
        set_active_table(previous)
