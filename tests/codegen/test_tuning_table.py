"""The tuning table (llmopt/codegen/tuning_table.py): location, JSON round trip, atomic,
locked and merging writes (llmopt/codegen/locked_file.py), entries checked at load, the
kernels string with its configs (llmopt/codegen/kernels_spec.py), and the timing helper's
refusal on CPU.

Specification: a table saved and loaded again has the same entries and a header with the
llmopt and Triton versions and the device; it lives under $LLMOPT_CACHE_DIR, else
$XDG_CACHE_HOME/llmopt, else ~/.cache/llmopt; a write replaces the file atomically and keeps
entries already on disk (resume); an unusable file never raises (see
test_linear_dispatch.py for the fallback to the heuristic).
"""
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llmopt.codegen.tuning_table as tt
from llmopt.codegen import locked_file
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
)
from llmopt.codegen.linear_tuning import time_candidates, tune_shape

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


def launch_configs(kernel: str):
    """Valid (possibly partial) launch configs of ``kernel``."""
    smallest = 4 if kernel == "flat_gemm" else 0  # tl.dot tiles are at least 16 wide
    values = {"SPLIT_K": st.integers(1, 16), "num_warps": st.sampled_from([1, 2, 4, 8, 16, 32]),
              "num_stages": st.integers(1, 6)}
    keys = tt.config_keys(kernel)
    return st.fixed_dictionaries({}, optional={
        k: values.get(k, st.integers(smallest, 8).map(lambda e: 1 << e)) for k in keys})


@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(["float16", "bfloat16", "float32"]),
            st.integers(1, 200_000),
            st.integers(1, 65_536),
            st.sampled_from(M_BUCKETS),
            st.sampled_from(["gemv", "flat_gemm", "mm"]).flatmap(lambda k: st.tuples(st.just(k), launch_configs(k))),
            st.floats(0.1, 1e5),
            st.floats(0.1, 1e5),
        ),
        max_size=8,
    )
)
def test_round_trip(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("rt") / "tuning.json"
    table = TuningTable(path, device_name=H100)
    for dt, n, k, b, (kernel, config), us, base in entries:
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
    # no temporary file left behind (the lock's sidecar stays, see TuningTable.save)
    assert sorted(os.listdir(tmp_path)) == ["tuning.json", "tuning.json.lock"]


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


# -- concurrent writers, entry validation ------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from llmopt.codegen.tuning_table import TuningEntry, TuningTable
path, rank, ready, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
while not go.exists():  # all writers start saving at once
    time.sleep(0.001)
for i in range(25):  # as `llmopt autotune` does: one new entry, then save (merge with the file)
    table = TuningTable(path, device_name="NVIDIA Test GPU")
    table.put("NVIDIA Test GPU", "float16", 1000 + rank, 64 + i, "1", TuningEntry("gemv", {"BLOCK_N": 16}, 1.0, 2.0))
    table.save()
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    """4 processes x 25 distinct entries, each saved as soon as it is made: all 100 survive."""
    import subprocess
    import sys
    import time

    path, go = tmp_path / "tuning.json", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tt.__file__).parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    ready = [tmp_path / f"ready{rank}" for rank in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(rank), str(ready[rank]), str(go)],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(4)]
    try:
        while not all(r.exists() for r in ready) and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0] * 4, errors
    loaded = TuningTable.load(path, device_name="NVIDIA Test GPU")
    expected = {("NVIDIA Test GPU", "float16", 1000 + rank, 64 + i, "1") for rank in range(4) for i in range(25)}
    assert {key for key, _ in loaded.items()} == expected
    assert all(e.kernel == "gemv" and e.config == {"BLOCK_N": 16} for _, e in loaded.items())


GOOD_GEMV = {"BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2}
# (field overrides of a good entry, what the warning must say is wrong)
BAD_ENTRIES = [
    ({"config": {"BLOCK_N": 0}}, "BLOCK_N=0"),
    ({"kernel": "flat_gemm", "config": {"BLOCK_K": -16}}, "BLOCK_K=-16"),
    ({"config": {"SPLIT_K": 0}}, "SPLIT_K=0"),
    ({"config": {"num_warps": 0}}, "num_warps=0"),
    ({"config": {"num_warps": 3}}, "num_warps=3"),
    ({"kernel": "flat_gemm", "config": {"num_stages": 0}}, "num_stages=0"),
    ({"config": {"BLOCK_N": 24}}, "power of two"),
    ({"config": {"BLOCK_N": 1 << 14, "BLOCK_K": 1 << 14}}, "elements"),
    ({"config": {"BLOCK_K": 1 << 21}}, "elements"),
    ({"kernel": "flat_gemm", "config": {"BLOCK_N": 8}}, "BLOCK_N=8"),
    ({"config": {"BLOCK_M": 16}}, "unknown"),
    ({"config": {"block_n": 16}}, "unknown"),
    ({"kernel": "mm", "config": {"BLOCK_N": 16}}, "unknown"),
    ({"config": {"BLOCK_N": 16.0}}, "integer"),
    ({"config": {"BLOCK_N": True}}, "integer"),
    ({"config": [16]}, "config"),
    ({"kernel": "cublas"}, "cublas"),
    ({"m_bucket": "3"}, "'3'"),
    ({"dtype": "float8x"}, "float8x"),
    ({"N": 0}, "N"),
    ({"N": "many"}, "many"),
    ({"device": "NVIDIA A100-SXM4-80GB"}, "A100"),
]


def test_impossible_entries_are_skipped_with_one_warning_each(tmp_path):
    """Each bad entry: one RuntimeWarning naming the file, the entry and what is wrong; the
    good entries are kept (before: loaded silently, then every llmopt.linear call raised)."""
    path = tmp_path / "tuning.json"
    table = TuningTable(path, device_name=H100)
    table.put(H100, "float16", 4096, 4096, "1", TuningEntry("gemv", dict(GOOD_GEMV), 1.0, 2.0))
    table.save()
    data = json.loads(path.read_text())
    good = data["entries"][0]
    data["entries"] += [{**good, "K": 100 + i, **bad} for i, (bad, _) in enumerate(BAD_ENTRIES)]
    data["entries"].append("not an object")
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning) as record:
        loaded = TuningTable.load(path, device_name=H100)
    messages = [str(w.message) for w in record]
    assert len(messages) == len(BAD_ENTRIES) + 1, "\n".join(messages)
    for i, (_, what) in enumerate([*BAD_ENTRIES, (None, "object")]):
        message = messages[i]
        assert str(path) in message and f"entry {i + 1} " in message and what in message, message
        assert "skipped" in message and "llmopt autotune" in message
    assert "N=4096 K=100 M bucket 1" in messages[0]  # the entry's key when it has one
    assert [key for key, _ in loaded.items()] == [(H100, "float16", 4096, 4096, "1")]
    assert loaded.get(H100, "float16", 4096, 4096, "1").config == GOOD_GEMV


def test_put_refuses_an_impossible_config(tmp_path):
    table = TuningTable(tmp_path / "t.json", device_name=H100)
    with pytest.raises(ValueError, match="SPLIT_K=0"):
        table.put(H100, "float16", 4096, 4096, "1", TuningEntry("gemv", {"SPLIT_K": 0}))
    with pytest.raises(ValueError, match="unknown"):
        table.put(H100, "float16", 4096, 4096, "1", TuningEntry("mm", {"BLOCK_N": 16}))
    assert len(table) == 0


def test_valid_configs_come_from_the_kernels_config_spaces(monkeypatch):
    """Every config the autotuner can sweep or store (the spaces and the heuristic configs,
    CUDA's and the interpreter's) is valid; the valid keys are the kernels' own."""
    from llmopt.codegen import flat_gemm, gemv
    from llmopt.codegen.flat_gemm import FLAT_GEMM_CONFIG_KEYS, flat_gemm_configs, flat_gemm_heuristic_config
    from llmopt.codegen.gemv import GEMV_CONFIG_KEYS, gemv_configs, gemv_heuristic_config

    for module in (gemv, flat_gemm):
        monkeypatch.setattr(module, "sm_count", lambda device: 132)  # the CUDA heuristics without a GPU

    assert tt.config_keys("gemv") == GEMV_CONFIG_KEYS and tt.config_keys("flat_gemm") == FLAT_GEMM_CONFIG_KEYS
    assert tt.config_keys("mm") == ()
    sweep = [("gemv", c) for c in gemv_configs()] + [("flat_gemm", c) for M in (1, 16, 64)
                                                     for c in flat_gemm_configs(M)]
    for kernel, config in sweep:
        assert tt.config_problem(kernel, config) is None, (kernel, config)
    for device in (torch.device("cpu"), torch.device("cuda")):
        for N, K, M in ((4096, 4096, 1), (28672, 4096, 4), (64, 40, 17), (24, 8, 64)):
            for gated in (False, True):
                assert tt.config_problem("gemv", gemv_heuristic_config(N, K, M, gated, device)) is None
                for dtype in (torch.float16, torch.float32):
                    config = flat_gemm_heuristic_config(N, K, M, gated, dtype, device)
                    assert tt.config_problem("flat_gemm", config) is None, config


def test_kernels_string_carries_the_tuned_configs():
    """The pass bakes each bucket's tuned config into the string, so a compiled graph needs
    no table at run time; a bucket without one runs its kernel's heuristic config."""
    spec = tt.format_kernels({"1": "gemv", "2": "flat_gemm"}, {"1": dict(reversed(GOOD_GEMV.items()))})
    assert spec == ("1:gemv[BLOCK_N=16,BLOCK_K=512,SPLIT_K=2,num_warps=4,num_stages=2],"
                    "2:flat_gemm,4:mm,8:mm,16:mm,32:mm,64:mm,inf:mm")
    assert tt.parse_kernels(spec) == {**dict.fromkeys(M_BUCKETS, "mm"), "1": "gemv", "2": "flat_gemm"}
    assert tt.parse_kernel_configs(spec) == {**dict.fromkeys(M_BUCKETS), "1": GOOD_GEMV}
    assert tt.format_kernels(tt.parse_kernels(spec), tt.parse_kernel_configs(spec)) == spec
    for bad, what in (("1:gemv[SPLIT_K=0]", "SPLIT_K=0"), ("1:gemv[BLOCK_N]", "NAME=integer"),
                      ("1:mm[BLOCK_N=16]", "unknown"), ("1:gemv[BLOCK_N=16", "bad kernels entry")):
        with pytest.raises(ValueError, match=re.escape(what)):
            tt.parse_kernels(bad)


def _entry_table(path, bucket="1"):
    table = TuningTable(path, device_name=H100)
    table.put(H100, "float16", 4096, 4096, bucket, TuningEntry("gemv", {}, 1.0, 2.0))
    return table


@pytest.mark.skipif(locked_file.fcntl is None, reason="fcntl.flock: POSIX only (the fallback is tested below)")
def test_save_waits_for_the_lock_then_fails_clearly(tmp_path):
    import fcntl

    path = tmp_path / "tuning.json"
    with open(tmp_path / "tuning.json.lock", "w") as held:  # another writer holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(tt.TuningTableLocked, match=r"could not lock .*tuning.json.lock.*another process"):
            _entry_table(path).save(lock_timeout=0.05)
        assert not path.exists()
    assert _entry_table(path).save() == path  # released: the next save goes through


def test_lock_file_fallback_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setattr(locked_file, "fcntl", None)
    path, lock = tmp_path / "tuning.json", tmp_path / "tuning.json.lock"
    _entry_table(path, "1").save()
    _entry_table(path, "2").save()
    assert len(TuningTable.load(path, device_name=H100)) == 2  # merged under the lock
    assert not lock.exists()  # the O_EXCL lock file is removed after each save
    lock.write_text("12345\n")  # left by a crashed writer
    with pytest.raises(tt.TuningTableLocked, match=r"delete .*tuning.json.lock"):
        _entry_table(path, "4").save(lock_timeout=0.05)
    assert len(TuningTable.load(path, device_name=H100)) == 2
