"""llmopt.codegen.timing: the one GPU timer (triton.testing.do_bench) and the one CPU timer
(interleaved rounds, median and spread) that autotuning, ``llmopt bench`` and benchmarks/ use."""
import itertools

import pytest
import torch

from llmopt.codegen import timing


def test_rounds_interleave_the_candidates_in_a_rotating_order():
    order = []
    candidates = {name: (lambda i, name=name: order.append((name, i))) for name in "abc"}
    timing.time_rounds(candidates, rounds=3, warmup=0)
    # each round runs every candidate once, starting one further along: load falls on all alike
    assert [n for n, _ in order] == list("abc" "bca" "cab")
    # each candidate's call index counts its own calls (for rotating input copies)
    assert [i for n, i in order if n == "b"] == [0, 1, 2]


def test_median_and_spread_over_the_rounds():
    ticks = itertools.count()
    durations = iter([1.0, 3.0, 2.0])  # seconds per timed round, from a fake clock
    now = [0.0]

    def clock():
        next(ticks)
        return now[0]

    def fn(i):
        now[0] += next(durations)

    result = timing.time_cpu(fn, rounds=3, warmup=0, clock=clock)
    assert result.median == 2.0 and result.samples == (1.0, 3.0, 2.0)
    assert result.spread == pytest.approx((3.0 - 1.0) / 2.0)


def test_warmup_rounds_and_calls_per_round():
    calls = []
    result = timing.time_cpu(calls.append, rounds=2, warmup=1, calls=3)
    assert calls == list(range(9)) and len(result.samples) == 2 and result.median >= 0


@pytest.mark.parametrize("kwargs", [dict(rounds=0), dict(rounds=1, calls=0), dict(rounds=1, warmup=-1)])
def test_bad_round_counts_are_refused(kwargs):
    with pytest.raises(ValueError, match="rounds and calls must be >= 1"):
        timing.time_cpu(lambda i: None, **kwargs)


def test_gpu_timer_is_do_bench_median_with_a_call_index(monkeypatch):
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        for _ in range(3):
            fn()
        return 0.5  # ms

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    indices = []
    assert timing.cuda_time_us(indices.append, warmup=10, rep=50) == 500.0
    assert seen == {"warmup": 10, "rep": 50, "return_mode": "median"} and indices == [0, 1, 2]


def test_copy_bandwidth_on_cpu_is_positive():
    assert timing.copy_bandwidth_gbs("cpu", nbytes=1 << 20, rounds=2) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_timer_times_a_copy():
    src = torch.empty(1 << 24, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    assert 0 < timing.cuda_time_us(lambda i: dst.copy_(src), warmup=1, rep=5) < 1e6
