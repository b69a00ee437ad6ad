"""The tuning table (llmopt/codegen/tuning_table.py): location, JSON round trip, atomic and
merging writes, and the timing helper's refusal on CPU.

Specification: a table saved and loaded again has the same entries and a header with the
llmopt and Triton versions and the device; it lives under $LLMOPT_CACHE_DIR, else
$XDG_CACHE_HOME/llmopt, else ~/.cache/llmopt; a write replaces the file atomically and keeps
entries already on disk (resume); an unusable file never raises (see
test_linear_dispatch.py for the fallback to the heuristic).
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llmopt.codegen.tuning_table as tt
from llmopt.codegen.tuning_table import (
    M_BUCKETS,
    TuningEntry,
    TuningTable,
    current_llmopt_version,
    current_triton_version,
    default_table_path,
    dtype_name,
    get_active_table,
    set_active_table,
    time_candidates,
    tune_shape,
)

H100 = "NVIDIA H100 80GB HBM3"


def test_default_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMOPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_table_path() == tmp_path / "home" / ".cache" / "llmopt" / "tuning.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_table_path() == tmp_path / "xdg" / "llmopt" / "tuning.json"
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_table_path() == tmp_path / "mine" / "tuning.json"


def test_versions_have_fallbacks():
    assert current_llmopt_version()  # "0+unknown" when llmopt is not pip-installed
    assert current_triton_version()


@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(["float16", "bfloat16", "float32"]),
            st.integers(1, 200_000),
            st.integers(1, 65_536),
            st.sampled_from(M_BUCKETS),
            st.sampled_from(["gemv", "flat_gemm", "mm"]),
            st.dictionaries(st.sampled_from(["BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps"]), st.integers(1, 512)),
            st.floats(0.1, 1e5),
            st.floats(0.1, 1e5),
        ),
        max_size=8,
    )
)
def test_round_trip(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("rt") / "tuning.json"
    table = TuningTable(path, device_name=H100)
    for dt, n, k, b, kernel, config, us, base in entries:
        table.put(H100, dt, n, k, b, TuningEntry(kernel, config, us, base))
    table.save()
    loaded = TuningTable.load(path, device_name=H100)
    assert loaded.items() == table.items()
    assert (loaded.llmopt_version, loaded.triton_version, loaded.device_name) == (
        current_llmopt_version(), current_triton_version(), H100)


def test_file_header_and_nan_times(tmp_path):
    table = TuningTable(tmp_path / "t.json", device_name=H100)
    table.put(H100, torch.bfloat16, 4096, 4096, "1", TuningEntry("gemv", {"BLOCK_N": 16}, 9.5, math.nan))
    table.save()
    data = json.loads((tmp_path / "t.json").read_text())  # strict JSON: no NaN
    assert data["format"] == "llmopt-tuning-table" and data["device_name"] == H100
    assert data["llmopt_version"] == current_llmopt_version()
    assert data["triton_version"] == current_triton_version()
    assert data["entries"][0]["baseline_us"] is None
    entry = TuningTable.load(tmp_path / "t.json").get(H100, "bfloat16", 4096, 4096, "1")
    assert entry.kernel == "gemv" and math.isnan(entry.baseline_us) and math.isnan(entry.speedup)


def test_missing_file_is_an_empty_table_without_warning(tmp_path, recwarn):
    assert len(TuningTable.load(tmp_path / "absent.json", device_name=H100)) == 0
    assert not recwarn.list


def test_save_merges_with_the_file_on_disk(tmp_path):
    path = tmp_path / "tuning.json"
    first = TuningTable(path, device_name=H100)
    first.put(H100, "bfloat16", 4096, 4096, "1", TuningEntry("gemv", {}, 10.0, 12.0))
    first.put(H100, "bfloat16", 4096, 4096, "2", TuningEntry("flat_gemm", {}, 11.0, 12.0))
    first.save()
    # a resumed run tunes one more bucket and re-tunes bucket 2: both kept, the new one wins
    resumed = TuningTable(path, device_name=H100)
    resumed.put(H100, "bfloat16", 4096, 4096, "2", TuningEntry("mm", {}, 12.0, 12.0))
    resumed.put(H100, "bfloat16", 4096, 4096, "4", TuningEntry("flat_gemm", {}, 11.5, 12.0))
    resumed.save()
    loaded = TuningTable.load(path, device_name=H100)
    assert len(loaded) == 3
    assert loaded.get(H100, "bfloat16", 4096, 4096, "2").kernel == "mm"
    assert ("NVIDIA H100 80GB HBM3", torch.bfloat16, 4096, 4096, "1") in loaded


def test_save_replaces_a_foreign_or_corrupt_file(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("{broken")
    table = TuningTable(path, device_name=H100)
    table.put(H100, "float16", 8, 8, "1", TuningEntry("mm", {}, 1.0, 1.0))
    table.save()
    assert len(TuningTable.load(path, device_name=H100)) == 1


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    table = TuningTable(path, device_name=H100)
    table.put(H100, "float16", 8, 8, "1", TuningEntry("mm", {}, 1.0, 1.0))
    table.save()
    before = path.read_bytes()

    def failing_dump(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted in the middle of writing

    monkeypatch.setattr(tt.json, "dump", failing_dump)
    table.put(H100, "float16", 8, 8, "2", TuningEntry("mm", {}, 1.0, 1.0))
    with pytest.raises(KeyboardInterrupt):
        table.save()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tuning.json"]  # no temporary file left behind


def test_save_creates_the_cache_directory(tmp_path):
    path = tmp_path / "a" / "b" / "tuning.json"
    assert TuningTable(path, device_name=H100).save() == path and path.exists()


def test_one_table_per_device_and_valid_entries(tmp_path):
    table = TuningTable(tmp_path / "t.json", device_name=H100)
    with pytest.raises(ValueError, match="separate table"):
        table.put("NVIDIA A100-SXM4-80GB", "float16", 8, 8, "1", TuningEntry("mm"))
    with pytest.raises(ValueError, match="kernel 'cublas'"):
        table.put(H100, "float16", 8, 8, "1", TuningEntry("cublas"))
    with pytest.raises(ValueError, match="M bucket '3'"):
        table.put(H100, "float16", 8, 8, "3", TuningEntry("mm"))


def test_merging_tables_in_memory(tmp_path):
    a, b = TuningTable(tmp_path / "a.json"), TuningTable(tmp_path / "b.json")
    a.put(H100, "float16", 8, 8, "1", TuningEntry("mm", {}, 2.0, 2.0))
    b.put(H100, "float16", 8, 8, "1", TuningEntry("gemv", {}, 1.0, 2.0))
    b.put(H100, "float16", 8, 8, "2", TuningEntry("gemv", {}, 1.0, 2.0))
    a.update(b)
    assert len(a) == 2 and a.get(H100, "float16", 8, 8, "1").kernel == "gemv"


def test_dtype_names():
    assert [dtype_name(d) for d in (torch.bfloat16, "bf16", "fp16", "torch.float32", "float32")] == [
        "bfloat16", "bfloat16", "float16", "float32", "float32"]


def test_active_table_is_explicit_global_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    previous = set_active_table(None)
    try:
        loaded = get_active_table()
        assert loaded.path == Path(tmp_path) / "tuning.json" and len(loaded) == 0
        assert get_active_table() is loaded  # loaded once
        mine = TuningTable(tmp_path / "other.json")
        assert set_active_table(mine) is loaded
        assert get_active_table() is mine
    finally:
        set_active_table(previous)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_timing_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*--dry-run"):
        time_candidates(4096, 4096, 1, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="--dry-run"):
        tune_shape(4096, 4096, 1, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timing_on_gpu_returns_every_candidate():
    times = time_candidates(1024, 1024, 4, torch.float16, "cuda", warmup=2, rep=5)
    assert set(times) == {"gemv", "flat_gemm", "mm"} and all(t > 0 for t in times.values())
    entry = tune_shape(1024, 1024, 4, torch.float16, "cuda", sweep=False, warmup=2, rep=5)
    assert entry.kernel in times and entry.time_us <= entry.baseline_us
