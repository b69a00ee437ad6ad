"""Tensor parallelism over torch.distributed: 2 gloo ranks on CPU against one process.

Each launch spawns two ranks (``launch.run_ranks``, subprocesses on a free port) that run
one scenario of ``tp_worker.py``; the tests read what every rank recorded. The oracle is
the same seeded model run eagerly in one process: prefill logits within the fp32
tolerance and equal greedy tokens, for Llama with 2 KV heads (split over the ranks) and 1
KV head (replicated), Qwen2 (attention biases) and GPT-2 (Conv1D, fused ``c_attn``); int8
and int4 under TP against the same scheme on one device; a tiny Mixtral with its expert
stacks split along the intermediate dimension (float and int8); the vocab-parallel embedding; a
``StaticKVCache`` holding only the rank's KV heads; the Engine under TP against
``llmopt.generate``. Exact counts: per 2-layer model, 4 column- and 4 row-parallel linears,
4 all-reduces, a vocab-parallel LM head with its all-gather, and the rank's graph holding
exactly half of every sharded weight.
"""
from __future__ import annotations

import pytest
import torch

from conftest import relative_error, tolerance
from distributed.launch import run_ranks
from llmopt import Options
from llmopt.runtime.distributed import TensorParallelError

FAMILIES = ("llama", "llama_mqa", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return run_ranks("families", tmp_path_factory.mktemp("tp_families"))


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return run_ranks("memory", tmp_path_factory.mktemp("tp_memory"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return run_ranks("moe", tmp_path_factory.mktemp("tp_moe"))


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
        # generate's own cache holds this rank's K/V heads: 2 split over 2 ranks / the 1 replicated
        assert r["generate_cache_heads"] == [1]
        # one graph without cache, then the prefill and ONE decode graph for all decode steps
        assert r["graphs_first"] == 3


def test_rank_holds_half_of_each_sharded_weight(families):
    r = families[0]["llama"]
    # replicated: embedding 256x64, 5 RMSNorm weights, RoPE inv_freq (8); the rest is sharded
    replicated = (256 * 64 + 5 * 64 + 8) * 4
    assert r["weight_bytes"] == (r["single_weight_bytes"] - replicated) // 2 + replicated
    # the full weights were released (weight_release): the rank's parameters hold only the
    # replicated ones (inv_freq is a buffer), so all it holds is its graph's weights (half of
    # each sharded one), not the whole model once more
    assert r["param_bytes"] == replicated - 8 * 4, r["held"]


# every sharded linear, quantized per rank (int4 keeps the LM head in floating point, as on one device)
@pytest.mark.parametrize("scheme, quantized", [("int8", 9), ("int4-g32", 8)])
def test_quantized_under_tensor_parallel(runtime, scheme, quantized):
    for result in runtime:
        r = result["quantized"][scheme]
        assert r["quantized"] == quantized
        assert (r["column"], r["row"], r["vocab"]) == (4, 4, 1)
        assert r["tokens"] == r["ref_tokens"]


def test_moe_experts_sharded_along_intermediate(moe):
    for result in moe:
        assert result["logits_error"] <= tolerance(torch.float32)
        assert result["tokens"] == result["ref_tokens"]
        # per 2-layer Mixtral: 2 QKV columns, 2 o_proj rows, 2 expert blocks (4 stacks), the LM head
        assert (result["column"], result["row"], result["experts"], result["vocab"], result["rewrites"]) == (2, 2, 2, 1, 9)
        # one all-reduce per attention and per expert block, the LM head's all-gather
        assert (result["all_reduce"], result["all_gather"]) == (4, 1)
        # replicated: embedding 256x64, 5 norms, RoPE inv_freq (8), 2 routers 4x64; the rest halves
        replicated = (256 * 64 + 5 * 64 + 8 + 2 * 4 * 64) * 4
        assert result["weight_bytes"] == (result["single_weight_bytes"] - replicated) // 2 + replicated
        # int8 experts: each rank quantizes its shards (2 expert blocks + 5 linears), tokens as on one device
        assert result["int8_experts"] == 7
        assert result["int8_tokens"] == result["int8_ref_tokens"]


def test_moe_rank_holds_only_its_shards(moe):
    """The full expert stacks are released after sharding, and with int8 the float shards too
    (weight_release): after prefill and decode recompiles a rank holds its graph's constants
    and the replicated parameters, nothing else. Tiny Mixtral: H 64, I 96 -> 48 per rank,
    4 experts, 2 layers, 4 heads (2 per rank) and 2 KV heads (1) of 16, vocab 256 (128)."""
    h, i, e, layers, vocab, f32 = 64, 48, 4, 2, 128, 4
    replicated = (256 * 64 + 5 * 64 + 2 * 4 * 64) * f32  # embedding, 5 norms, 2 routers (parameters)
    # per layer: QKV rows 32 + 16 + 16 and o_proj's 32 input columns; gate/up 2I rows, down I columns
    linears = [(64, h), (h, 32)] * layers + [(vocab, h)]  # (output rows, input columns), + the LM head
    experts = [(e * 2 * i, h), (e * h, i)] * layers  # the stacks as (expert rows, columns)
    inv_freq = 8 * f32
    for result in moe:
        float_held = result["held_float"]
        assert float_held["param"] == replicated  # the full stacks and weights: released
        assert float_held["held"] == float_held["graph"]  # nothing held that the graph does not read
        assert float_held["graph"] == replicated + inv_freq + sum(n * k for n, k in linears + experts) * f32
        int8_held = result["held_int8"]
        assert int8_held["param"] == replicated
        assert int8_held["held"] == int8_held["graph"]  # no float shard left in the cache
        # int8: one byte per weight and one fp32 scale per output row (per expert row for the stacks)
        assert int8_held["graph"] == replicated + inv_freq + sum(n * k + n * f32 for n, k in linears + experts)


def test_vocab_parallel_embedding(memory):
    for result in memory:
        r = result["embedding"]
        assert r["logits_error"] <= tolerance(torch.float32)
        assert r["tokens"] == r["ref_tokens"]
        # the 9 linears and the embedding; one more all-reduce, after the lookup
        assert (r["embedding"], r["rewrites"], r["all_reduce"], r["all_gather"]) == (1, 10, 5, 1)
        assert r["table_shape"] == [[128, 64]]  # this rank's half of the 256 x 64 table


@pytest.mark.parametrize("name", ["llama", "llama_mqa"])
def test_static_cache_holds_only_the_ranks_heads(memory, name):
    for result in memory:
        r = result["rank_cache"][name]
        assert r["cache_heads"] == 1  # 2 KV heads split over 2 ranks / the 1 KV head replicated
        assert r["tokens"] == r["ref_tokens"] and r["again_equal"]
        # prefill and one decode graph; a second prompt length makes the prefill dynamic, once
        assert (r["graphs"], r["graphs_second"]) == (2, 3)
        assert min(r["sharded_per_graph"]) == 9  # attention sharded in every graph, over the rank's cache
        assert r["markers"] == 0
        if name == "llama":  # read by the unsharded eager model: a clear error, not a wrong answer
            assert r["eager_error"].startswith("RankLocalCacheError") and "compile the model" in r["eager_error"]
        else:  # a replicated single KV head: an ordinary cache, which the eager model reads too
            assert r["eager_error"] is None


@pytest.mark.parametrize("name", ["llama", "llama_mqa"])
def test_hf_generate_static_cache_sharded_in_prefill_and_decode(memory, name):
    for result in memory:
        r = result["hf_static"][name]
        assert r["tokens"] == r["ref_tokens"]
        # HF allocates its StaticCache inside the prefill graph: that graph's attention is sharded
        # too (9 = every linear), not only the decode graph's
        assert r["sharded_per_graph"] == [9, 9]


def test_engine_under_tensor_parallel(runtime):
    for result in runtime:
        r = result["engine"]
        assert r["outputs"] == r["refs"]  # greedy and seeded sampling: identical on every rank
        # every graph (prefill and decode steps) fully sharded: the paged attention included
        assert min(r["sharded_per_graph"]) == 9
        assert r["pool_heads"] == 1  # the paged pools hold this rank's K/V head only (of 2)
        # both layers' pool appends written in place (the pools are graph inputs, not slices)
        assert set(r["reinplaced_per_graph"]) == {2}
    assert runtime[0]["engine"]["outputs"] == runtime[1]["engine"]["outputs"]
    # unseeded sampling (each rank seeded differently): rank 0's tokens on every rank
    assert runtime[0]["engine"]["unseeded"] == runtime[1]["engine"]["unseeded"]


def test_engine_speculative_with_a_draft_model_under_tensor_parallel(runtime):
    for result in runtime:
        r = result["speculative"]
        assert r["outputs"] == r["refs"]  # greedy: the tokens of one process without speculation
        assert r["proposed"] > 0  # the draft did propose (verify steps ran)
        assert min(r["sharded_per_graph"]) == 9  # every target graph sharded (the draft stays eager)
    assert runtime[0]["speculative"]["outputs"] == runtime[1]["speculative"]["outputs"]


def test_engine_ranks_scheduling_differently_fail_loudly(runtime):
    for result in runtime:
        error = result["engine"]["diverged"]
        assert error is not None and error.startswith("ScheduleDivergedError"), error
        assert "rank(s) [1] scheduled a different step than rank 0" in error


def test_indivisible_heads_error_names_both_numbers(runtime):
    for result in runtime:
        error = result["heads"]["error"]
        assert "TensorParallelError" in error
        assert "3 query heads" in error and "world size 2" in error and "valid world sizes: [1, 3]" in error


def test_ranks_fed_different_tokens_fail_loudly(runtime):
    # rank 0's tokens are the reference: it passes the check, then its next collective fails
    # clearly when rank 1 stops (or never, depending on timing)
    first = runtime[0]["diverged"]["error"]
    assert first is None or first.startswith("CollectiveFailedError")
    error = runtime[1]["diverged"]["error"]
    assert error is not None and "rank 1 was given different token ids than rank 0" in error


def test_dead_rank_fails_the_others_clearly(tmp_path):
    results = run_ranks("dead_rank", tmp_path, expect_fail=(1,), timeout=120)
    error = results[0]["error"]
    assert error is not None and error.startswith("CollectiveFailedError")
    assert "another rank probably exited" in error


def test_rank_dying_mid_decode_fails_the_others_within_the_timeout(tmp_path):
    results = run_ranks("dead_mid_decode", tmp_path, expect_fail=(1,), timeout=300)
    r = results[0]
    assert r["error"] is not None and r["error"].startswith("CollectiveFailedError"), r
    assert "another rank probably exited" in r["error"]
    assert r["seconds"] < 60  # the process group's timeout is 30 s: a clear error, never a hang


def test_option_without_process_group_is_a_clear_error():
    with pytest.raises(TensorParallelError, match="no torch.distributed process group is initialized"):
        Options(tensor_parallel="auto")


@pytest.mark.parametrize("value", ["all", 2, [0, 1]])
def test_option_rejects_other_values(value):
    with pytest.raises(TensorParallelError, match="not valid"):
        Options(tensor_parallel=value)


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo group in this process, destroyed afterwards (other tests expect none)."""
    import torch.distributed as dist

    from distributed.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_functional_collectives_wrapper(one_rank_group):
    from llmopt import compat

    all_reduce, all_gather, wait = compat.functional_collectives()
    x = torch.arange(6.0).reshape(2, 3)
    name = one_rank_group.group_name
    assert torch.equal(wait(all_reduce(x, "sum", name)), x)
    assert torch.equal(wait(all_gather(x, 1, name)), x)


def test_process_group_and_mesh_values_resolve(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    from llmopt.runtime.distributed import resolve_tensor_parallel

    for value in ("auto", one_rank_group, init_device_mesh("cpu", (1,))):
        tp = resolve_tensor_parallel(value)
        assert (tp.rank, tp.world_size, tp.backend) == (0, 1, "gloo")
    with pytest.raises(TensorParallelError, match="2-D DeviceMesh"):
        resolve_tensor_parallel(init_device_mesh("cpu", (1, 1)))


def test_world_size_one_compiles_unsharded(one_rank_group):
    import llmopt
    from models.tiny import tiny_model, tokens

    model, ids = tiny_model("llama"), tokens(1, 5)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="llmopt", options={"tensor_parallel": "auto", "strict": True})(ids, use_cache=False).logits
    torch._dynamo.reset()
    assert relative_error(out, ref) <= tolerance(torch.float32)
    assert "shard_tensor_parallel: world size 1, nothing to shard" in llmopt.last_report().notes


def test_rank_sync_on_one_rank(one_rank_group):
    from llmopt.runtime.rank_sync import RankSync
    from llmopt.runtime.scheduler import StepBatch

    assert RankSync.for_option(None, torch.device("cpu")) is None
    assert RankSync.for_option("auto", torch.device("cpu")) is None  # one rank: nothing to agree on
    sync = RankSync("auto", torch.device("cpu"))
    batch = StepBatch(decode_only=True, ids=[5], positions=[3], seq_ids=[0], counts=[1], slots=[[3]], rows=[0])
    sync.check_schedule(batch)
    sync.check_schedule(None)
    assert sync.broadcast_tokens([7, 9]) == [7, 9] and sync.broadcast_tokens([]) == []


def test_caches_hold_all_heads_without_several_ranks(one_rank_group):
    from llmopt.runtime.paged_cache import PagedCacheLayout
    from llmopt.runtime.rank_heads import rank_kv_heads
    from models.tiny import tiny_model

    config = tiny_model("llama").config
    assert rank_kv_heads(None, 2, "cache") is None and rank_kv_heads("auto", 2, "cache") is None
    layout = PagedCacheLayout.from_config(config, 4, 8, tensor_parallel="auto")
    assert (layout.num_kv_heads, layout.rank_heads) == (2, None)
