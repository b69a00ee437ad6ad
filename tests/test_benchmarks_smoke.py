"""Smoke test of the benchmark scripts: each ``main()`` on its smallest grid.

``benchmarks/bench_fusions.py`` and ``benchmarks/bench_attention.py`` call the llmopt ops
by their registered names and signatures; this runs both end to end (tiny shapes, one
timed run, no Inductor, ``--no-write``) so that a change to an op they time breaks a test,
not the next benchmark run on a GPU machine. The timings themselves are not checked; the
outputs are (the scripts compare llmopt with eager / SDPA on every row).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = ["--inductor", "none", "--rep", "1", "--warmup", "0", "--copy-mib", "1", "--no-write"]


@pytest.fixture
def keep_num_threads():
    # The scripts set torch's thread count (1 on CPU); give the rest of the session its own back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_fusions_smallest_grid(keep_num_threads):
    import bench_fusions

    payload = bench_fusions.main(
        ["--tokens", "3", "--hidden", "32", "--intermediate", "48", "--heads", "2", "--kv-heads", "1",
         "--head-dim", "16", *TINY]
    )
    assert payload["benchmark"] == "fusions"
    ran = {row["op"] for row in payload["results"]}
    skipped = {entry["op"] for entry in payload["skipped"]}
    assert ran | skipped == set(bench_fusions.OPS), "every op is either timed or skipped with a reason"
    assert ran, "no fused op could be imported"
    for row in payload["results"]:
        assert "llmopt-failed" not in row["flags"], row
        assert row["us"]["eager"] > 0, row
        tol = 1e-4 if row["dtype"] == "float32" else 1e-2
        assert row["rel_err_vs_eager"] < tol, row


def test_bench_attention_smallest_grid(keep_num_threads):
    import bench_attention

    payload = bench_attention.main(
        ["--prefill-seq", "16", "--prefill-batch", "1", "--decode-context", "16", "--decode-batch", "1",
         "--heads", "2", "--kv-heads", "1", "--head-dim", "16", *TINY]
    )
    assert payload["benchmark"] == "attention"
    assert [row["phase"] for row in payload["results"]] == ["prefill", "decode"]
    for row in payload["results"]:
        assert "llmopt-failed" not in row["flags"], row
        tol = 1e-4 if row["dtype"] == "float32" else 1e-2
        assert row["rel_err_vs_sdpa"] < tol, row


def test_bench_serving_tiny_workload(keep_num_threads):
    import bench_serving

    payload = bench_serving.main(["--size", "tiny", "--requests", "6", "--batch", "4", "--no-write"])
    assert payload["benchmark"] == "serving"
    assert set(payload["modes"]) == {"continuous", "static", "one_at_a_time"}
    figures = {row["figure"]: row["value"] for row in payload["results"]}
    assert all(v > 0 for v in figures["output tokens/s"].values())
    assert 0 < figures["KV used/reserved"]["continuous"] <= 1


def test_bench_speculative_tiny(keep_num_threads):
    import bench_speculative

    payload = bench_speculative.main(["--tiny", "--ks", "2", "--no-write"])
    assert payload["benchmark"] == "speculative"
    assert {row["proposer"] for row in payload["results"]} == {"none", "draft", "ngram", "layer_skip"}
    assert all(row["tokens_per_s"]["llmopt.generate"] > 0 for row in payload["results"])


@pytest.mark.parametrize("loop", ["static", "hf", "llmopt"])
def test_bench_decode_reports_the_forward_step_and_the_bandwidth_spread(loop, keep_num_threads, monkeypatch):
    """bench_decode on the tiny preset, eager only (no compile): every loop reports the
    forward's decode calls apart from the loop's step (never longer than it), and the read
    bandwidth sampled once per round with its spread."""
    import bench_decode

    monkeypatch.setattr(bench_decode.ReadBandwidth, "BYTES", 2**20)
    rounds = 2
    payload = bench_decode.main(["--preset", "tiny", "--backends", "eager", "--loop", loop, "--prompt-len", "5",
                                 "--new-tokens", "4", "--rounds", str(rounds), "--threads", "1", "--no-write"])
    assert payload["read_bandwidth_samples"] == 1 + rounds  # one before the model, one per round
    lo, hi = payload["read_bandwidth_spread_GBps"]
    assert 0 < lo <= payload["read_bandwidth_GBps"] <= hi
    (row,) = payload["results"]
    assert 0 < row["forward_step_s"] <= row["decode_step_s"] * 1.5  # a step's median holds its forward
    assert row["forward_step_spread_s"][0] <= row["forward_step_s"] <= row["forward_step_spread_s"][1]
    assert row["forward_roofline_fraction"] >= row["roofline_fraction"] * 0.6
    # each round's step against the bandwidth sampled around that round, median over rounds
    assert len(row["round_read_bandwidth_GBps"]) == len(row["forward_step_rounds_s"]) == rounds
    paired = sorted(row["bytes_per_step"] / t / (b * 1e9)
                    for t, b in zip(row["forward_step_rounds_s"], row["round_read_bandwidth_GBps"]))
    assert row["forward_roofline_fraction"] == pytest.approx((paired[0] + paired[1]) / 2)
    assert row["forward_roofline_fraction_run_median"] > 0


def test_timed_forward_records_decode_calls_only():
    """Prefill calls (several tokens) are not decode steps; the wrapper keeps the signature."""
    import inspect

    import bench_decode

    def forward(input_ids=None, cache_position=None):
        return input_ids

    timed = bench_decode.TimedForward(forward, torch.device("cpu"))
    assert inspect.signature(timed) == inspect.signature(forward)
    timed(input_ids=torch.zeros(2, 5, dtype=torch.long))
    timed(torch.zeros(2, 1, dtype=torch.long))
    timed(input_ids=torch.zeros(2, 1, dtype=torch.long))
    assert len(timed.take()) == 2 and timed.take() == []


def test_bench_quant_compiled_variants_run(keep_num_threads, monkeypatch):
    """bench_quant's compiled section (eager vs llmopt through bench_decode's static loop)
    runs end to end on a one-layer model: it once imported a bench_decode helper that no
    longer existed, and only a run catches that."""
    import bench_quant

    monkeypatch.setattr(bench_quant, "compiled_variants",
                        lambda device: {"eager fp32": None, "llmopt int8": {"quantize": "int8"}})
    config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    results = bench_quant.bench_compiled("cpu", config, tokens=3, prompt_len=4)
    assert list(results) == ["eager fp32", "llmopt int8"]
    assert all(r["decode_tokens_per_s"] > 0 and r["speedup_vs_eager"] > 0 for r in results.values())


def test_compile_times_alternate_backends_and_report_the_spread(monkeypatch):
    """--compile-time: one cold process per backend (its own cache directory), then warm
    processes alternated round by round; the median, the samples and their spread."""
    import bench_decode

    calls = []
    times = {"inductor": iter([40.0, 7.0, 7.4, 6.9]), "llmopt": iter([42.0, 9.0, 9.9, 9.2])}

    def fake_process(backend, args, device, cache_len, batch, env=None):
        calls.append((backend, env["TORCHINDUCTOR_CACHE_DIR"]))
        return {"first_generation_s": next(times[backend])}

    monkeypatch.setattr(bench_decode, "_fresh_process", fake_process)
    out = bench_decode.compile_times(["inductor", "llmopt"], None, torch.device("cpu"), 72, 1)
    assert [b for b, _ in calls] == ["inductor", "llmopt"] * 4
    assert len({d for b, d in calls if b == "inductor"}) == 1 != len({d for _, d in calls})
    assert out["inductor"] == {"cold_s": 40.0, "warm_samples_s": [7.0, 7.4, 6.9], "warm_s": 7.0,
                               "warm_spread_s": [6.9, 7.4]}
    assert out["llmopt"]["warm_s"] == 9.2 and out["llmopt"]["warm_spread_s"] == [9.0, 9.9]
