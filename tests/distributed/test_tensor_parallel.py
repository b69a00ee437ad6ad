"""Tensor parallelism over torch.distributed: 2 gloo ranks on CPU against one process.

Each launch spawns two ranks (``launch.run_ranks``, subprocesses on a free port) that run
one scenario of ``tp_worker.py``; the tests read what every rank recorded. The oracle is
the same seeded model run eagerly in one process: prefill logits within the fp32
tolerance and equal greedy tokens, for Llama with 2 KV heads (split over the ranks) and 1
KV head (replicated), Qwen2 (attention biases) and GPT-2 (Conv1D, fused ``c_attn``); int8
under TP against int8 on one device; the Engine under TP against ``llmopt.generate``.
Exact counts: per 2-layer model, 4 column- and 4 row-parallel linears, 4 all-reduces, a
vocab-parallel LM head with its all-gather, and the rank's graph holding exactly half of
every sharded weight.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tolerance
from distributed.launch import run_ranks
from llmopt import Options
from llmopt.distributed import TensorParallelError

FAMILIES = ("llama", "llama_mqa", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return run_ranks("families", tmp_path_factory.mktemp("tp_families"))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return run_ranks("runtime", tmp_path_factory.mktemp("tp_runtime"))


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_logits_equal_single_process(families, name):
    for rank, result in enumerate(families):
        assert result[name]["logits_error"] <= tolerance(torch.float32), (rank, result[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_sharding_counts(families, name):
    for result in families:
        r = result[name]
        assert r["status"] == "ok"
        assert (r["column"], r["row"], r["vocab"], r["rewrites"]) == (4, 4, 1, 9)
        assert (r["all_reduce"], r["all_gather"]) == (4, 1)


@pytest.mark.parametrize("name", ["llama", "llama_mqa"])
def test_greedy_generation_equal_and_no_decode_recompile(families, name):
    for result in families:
        r = result[name]
        assert r["tokens"] == r["ref_tokens"]
        assert r["again_equal"]
        # one graph without cache, then the prefill and ONE decode graph for all decode steps
        assert r["graphs_first"] == 3


def test_rank_holds_half_of_each_sharded_weight(families):
    r = families[0]["llama"]
    # replicated: embedding 256x64, 5 RMSNorm weights, RoPE inv_freq (8); the rest is sharded
    replicated = (256 * 64 + 5 * 64 + 8) * 4
    assert r["weight_bytes"] == (r["single_weight_bytes"] - replicated) // 2 + replicated


def test_int8_under_tensor_parallel(runtime):
    for result in runtime:
        r = result["int8"]
        assert r["quantized"] == 9  # every sharded linear, quantized per rank
        assert (r["column"], r["row"], r["vocab"]) == (4, 4, 1)
        assert r["tokens"] == r["ref_tokens"]


def test_engine_under_tensor_parallel(runtime):
    for result in runtime:
        r = result["engine"]
        assert r["outputs"] == r["refs"]  # greedy and seeded sampling: identical on every rank
        assert max(r["sharded_per_graph"]) >= 5  # at least the MLPs and the LM head are sharded
    assert runtime[0]["engine"]["outputs"] == runtime[1]["engine"]["outputs"]


def test_indivisible_heads_error_names_both_numbers(runtime):
    for result in runtime:
        error = result["heads"]["error"]
        assert "TensorParallelError" in error
        assert "3 query heads" in error and "world size 2" in error and "valid world sizes: [1, 3]" in error


def test_dead_rank_fails_the_others_clearly(tmp_path):
    results = run_ranks("dead_rank", tmp_path, expect_fail=(1,), timeout=120)
    error = results[0]["error"]
    assert error is not None and error.startswith("CollectiveFailedError")
    assert "another rank probably exited" in error


def test_option_without_process_group_is_a_clear_error():
    with pytest.raises(TensorParallelError, match="no torch.distributed process group is initialized"):
        Options(tensor_parallel="auto")


@pytest.mark.parametrize("value", ["all", 2, [0, 1]])
def test_option_rejects_other_values(value):
    with pytest.raises(TensorParallelError, match="not valid"):
        Options(tensor_parallel=value)
