"""``llmopt bench`` engine: settings, measurements, JSON schema, plot, README tables.

One llmopt compile of the tiny Llama (eager + llmopt, with ``--quantize int8`` passed
through); Inductor once, marked slow. Results are checked for shape and sanity (positive
speeds, a first token before the last), never for speed: CI machines are shared.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llmopt.tools import bench
from llmopt.tools.bench import BenchSettings, bytes_per_decode_step, format_table, run_bench, validate
from llmopt.tools.peak_memory import PeakMemory
from llmopt.tools.model_spec import resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama():
    return resolve("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def results(llama):
    settings = BenchSettings(backends=("eager", "llmopt"), prompt_len=6, new_tokens=3, repeats=2, warmup=0,
                             quantize="int8")
    messages: list[str] = []
    data = run_bench(llama, settings, progress=messages.append)
    return data, messages


def test_results_follow_the_schema(results):
    data, _ = results
    assert validate(data) == []
    json.dumps(data)  # plain data
    assert data["schema"] == "llmopt.bench/1"
    assert data["settings"]["backends"] == ["eager", "llmopt"] and data["settings"]["dtype"] == "float32"
    assert data["model"]["name"] == "tiny-llama" and data["device"]["type"] == "cpu"
    assert data["copy_bandwidth_gbs"] is None  # measured on CUDA only


def test_every_backend_measured(results):
    data, _ = results
    eager, ours = data["results"]
    for r in (eager, ours):
        assert r["status"] == "ok", r["error"]
        assert r["method"].startswith("llmopt.generate")
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["ttft_ms"] > 0
        assert all(t > f for t, f in zip(r["samples"]["total_s"], r["samples"]["ttft_s"]))
        assert r["decode_step_ms"] > 0 and len(r["samples"]["ttft_s"]) == 2 == len(r["samples"]["decode_s"])
        assert r["peak_memory_mb"] > 0 and r["memory_method"]
        assert r["bytes_per_decode_step"] > 0 and r["achieved_gbs"] > 0 and r["roofline_fraction"] is None
    assert eager["compile_s"] == 0.0 and ours["compile_s"] > 0
    assert eager["vs_eager"] == {"prefill_vs_eager": 1.0, "decode_vs_eager": 1.0}
    assert set(ours["vs_eager"]) == {"prefill_vs_eager", "decode_vs_eager"}


def test_quantize_goes_to_the_llmopt_backend(results):
    data, _ = results
    ours = data["results"][1]
    assert ours["label"] == "llmopt (int8)" and data["settings"]["quantize"] == "int8"
    assert ours["llmopt"]["graphs"] >= 2  # prefill and decode
    quantized = ours["llmopt"]["quantized_linears"]
    # Until the quantize_linears pass lands, the result says the weights ran unquantized.
    assert quantized > 0 or any("unquantized" in n for n in ours["notes"])


def test_progress_is_reported(results):
    _, messages = results
    assert messages[0] == "[1/2] eager"
    assert any("first call (compiles)" in m for m in messages) and any("run 2/2" in m for m in messages)


def test_table_and_plot(results, tmp_path):
    data, _ = results
    text = format_table(data)
    assert "prefill tok/s" in text and "llmopt (int8)" in text and "peak memory:" in text
    png = tmp_path / "p.png"
    bench.plot(data, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    failed = copy.deepcopy(data)
    failed["results"][1].update(status="failed", error="RuntimeError: boom")
    assert "failed: RuntimeError: boom" in format_table(failed)
    bench.plot(failed, str(png))  # a failed backend is left out of the plot, not a crash


def test_forward_only_for_an_encoder():
    spec = resolve("tiny-bert", device="cpu")
    data = run_bench(spec, BenchSettings(backends=("eager",), prompt_len=5, new_tokens=2, repeats=1, warmup=0))
    (r,) = data["results"]
    assert r["status"] == "ok" and r["method"] == "forward"
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] is None and r["ttft_ms"] is None
    assert validate(data) == []


def test_a_failing_backend_does_not_lose_the_others(llama, monkeypatch):
    def broken(model, backend, settings):
        if backend == "llmopt":
            raise RuntimeError("compiler exploded")
        return model

    monkeypatch.setattr(bench, "_compile", broken)
    data = run_bench(llama, BenchSettings(backends=("eager", "llmopt"), prompt_len=4, new_tokens=2, repeats=1,
                                          warmup=0))
    assert [r["status"] for r in data["results"]] == ["ok", "failed"]
    assert "compiler exploded" in data["results"][1]["error"]
    assert validate(data) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(backends=("tvm",)), "tvm"),
    (dict(backends=()), "backend"),
    (dict(new_tokens=1), "new_tokens"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
])
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchSettings(**kwargs)


def test_validate_reports_problems():
    assert validate({"schema": "x"})  # missing everything
    problems = validate({"schema": "llmopt.bench/1", "created": "", "device": {}, "versions": {}, "model": {},
                         "settings": {}, "results": [{"backend": 1}]})
    assert any("results[0].backend" in p for p in problems)


def test_peak_memory_on_cpu_sees_an_allocation():
    import mmap

    with PeakMemory(torch.device("cpu")) as memory:
        # 64 MiB of fresh pages from the kernel, touched: a torch/malloc allocation could
        # reuse memory an earlier test left resident, and RSS would not grow
        block = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        block.close()
    peak, delta, method = memory.result()
    assert peak > 0 and method
    if "VmHWM" in method or "sampled" in method:
        assert delta >= 48  # MiB: the block was resident at its peak


def test_bytes_per_decode_step_counts_weights_and_cache(llama):
    settings = BenchSettings(prompt_len=8, new_tokens=4)
    fp32 = bytes_per_decode_step(llama, settings)
    embed = llama.model.get_input_embeddings().weight
    params = sum(p.numel() * 4 for p in llama.model.parameters()) - embed.numel() * 4
    assert fp32 > params  # weights (embedding table excepted) + the K/V cache
    if importlib.util.find_spec("llmopt.quant") is not None:
        assert bytes_per_decode_step(llama, settings, quantize="int8") < fp32


def test_device_slug():
    assert bench.device_slug({"type": "cpu"}) == "cpu"
    assert bench.device_slug({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"


@pytest.mark.slow
def test_inductor_backend(llama):
    data = run_bench(llama, BenchSettings(backends=("inductor",), prompt_len=4, new_tokens=2, repeats=1, warmup=0))
    (r,) = data["results"]
    assert r["status"] == "ok", r["error"]
    assert r["decode_tokens_per_s"] > 0 and r["compile_s"] > 0


# -- README tables ----------------------------------------------------------------------------
def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_tables_writes_between_markers(results, tmp_path):
    data, _ = results
    mt = _make_tables()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    res = tmp_path / "benchmarks" / "results"
    (res / "cpu-2025-01-01-bench.json").write_text(json.dumps(data))
    (res / "cpu-2025-01-01-bench.png").write_bytes(b"\x89PNG")
    (res / "cpu-2025-01-01-linear.json").write_text(json.dumps({"device": "cpu", "rows": []}))
    readme = f"# x\n\nintro\n\n{mt.START}\nold\n{mt.END}\n\ntail\n"
    (tmp_path / "benchmarks" / "README.md").write_text(readme)
    (tmp_path / "README.md").write_text(f"# top\n{mt.START}\n{mt.END}\n")
    argv = ["--root", str(tmp_path), "--results", str(res)]
    assert mt.main(argv + ["--check"]) == 1  # stale before the first run
    assert mt.main(argv) == 0
    assert mt.main(argv + ["--check"]) == 0  # and up to date after
    text = (tmp_path / "benchmarks" / "README.md").read_text()
    assert text.startswith("# x\n\nintro\n") and text.endswith("\ntail\n") and "old" not in text
    assert "| llmopt (int8) |" in text and "decode × eager" in text and "torch " + torch.__version__ in text
    assert "![tiny-llama" in text and "results/cpu-2025-01-01-bench.png" in text
    assert "cpu-2025-01-01-linear.json: neither an `llmopt bench` nor a benchmark-script result" in text
    top = (tmp_path / "README.md").read_text()
    assert "| eager |" in top and "benchmarks/results/cpu-2025-01-01-bench.png" in top


def test_committed_readme_tables_are_up_to_date():
    mt = _make_tables()
    assert mt.main(["--check"]) == 0, "run: python benchmarks/make_tables.py"


def test_script_table_renders_rows_of_plain_numbers():
    """bench_decode writes one row per backend with plain numeric fields: each is a column."""
    mt = _make_tables()
    data = {"benchmark": "decode", "results": [
        {"backend": "eager", "batch": 1, "decode_tokens_per_s": 26.4, "ttft_s": 0.134},
        {"backend": "llmopt-aten", "batch": 1, "decode_tokens_per_s": 29.4, "ttft_s": 0.254},
    ]}
    lines = mt.script_table(data)
    assert lines[0] == "| backend | batch | decode tokens per s | ttft s |"
    assert lines[3] == "| llmopt-aten | 1 | 29.4 | 0.254 |"


def test_decode_table_shows_the_forward_roofline_and_the_bandwidth_spread():
    """A bench_decode file with the forward step and sampled bandwidth shows both; an older
    file (neither field) renders as before."""
    mt = _make_tables()
    row = {"backend": "llmopt", "batch": 1, "cache_len": 88, "decode_tokens_per_s": 50.0, "decode_step_s": 0.02,
           "decode_step_spread_s": [0.019, 0.021], "roofline_fraction": 0.6, "ttft_s": 0.1, "rounds": 3}
    data = {"benchmark": "decode", "loop": "static", "preset": "llama-100m", "dtype": "fp32",
            "read_bandwidth_GBps": 30.0, "results": [dict(row)]}
    old = "\n".join(mt.decode_tables([(Path("cpu-x-decode.json"), data)]))
    assert "read bandwidth 30.0 GB/s;" in old and "| 60% |" in old
    data.update(read_bandwidth_spread_GBps=[28.0, 33.5], results=[dict(row, forward_roofline_fraction=0.75)])
    new = "\n".join(mt.decode_tables([(Path("cpu-x-decode.json"), data)]))
    assert "read bandwidth 30.0 (spread 28.0–33.5) GB/s;" in new and "| 60% (forward 75%) |" in new
