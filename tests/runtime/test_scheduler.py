"""The Engine's :class:`~llmopt.runtime.scheduler.Scheduler` on its own, without a model.

A step here is what the Engine does around the model: schedule, mark the scheduled tokens
computed, commit one token per sampling request (a made-up token: the scheduler never looks
at logits). So admission, preemption, block accounting and the finish rules are checked
directly against the cache's block tables, on pools of a few blocks of one-element K/V.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from llmopt.runtime.paged_cache import KVCacheExhaustedError, PagedCacheLayout, PagedKVCache
from llmopt.runtime.sampling import SamplingParams
from llmopt.runtime.scheduler import EngineStats, Scheduler, StepBatch, as_sampling_params

VOCAB = 50


def scheduler(num_blocks: int, *, block_size: int = 4, max_num_seqs: int = 4, max_model_len: int = 32,
              budget: int = 64, policy: str = "fcfs") -> Scheduler:
    layout = PagedCacheLayout(num_layers=1, num_blocks=num_blocks, num_kv_heads=1, head_dim=1, block_size=block_size)
    cache = PagedKVCache(layout, max_blocks_per_seq=-(-max_model_len // block_size))
    return Scheduler(cache, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                     max_num_batched_tokens=budget, policy=policy, eos_token_ids=(0,))


def params(max_new: int, stops=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, stop_token_ids=tuple(stops))


def token_for(req) -> int:
    """A made-up next token: 1..VOCAB-1, never 0 (the default stop token)."""
    return 1 + (7 * req.id + 3 * len(req.output)) % (VOCAB - 1)


def step(s: Scheduler) -> StepBatch | None:
    """One Engine step, the forward left out: schedule, compute, commit (forks materialize
    at their parent's sampling point)."""
    batch = s.schedule()
    if batch is None:
        return None
    for req, n in batch.requests:
        req.num_computed += n
    for req in batch.samplers:
        family = [req] + list(req.children)
        for child in req.children:
            s.materialize_fork(req, child)
        req.children = []
        for member in family:
            s.commit_token(member, token_for(member))
    s.materialized = []
    return batch


def drain(s: Scheduler, limit: int = 500) -> int:
    for steps in range(limit):
        if not s.has_unfinished():
            return steps
        step(s)
    raise AssertionError("the scheduler made no progress")


def assert_blocks_sound(s: Scheduler) -> None:
    cache, alloc = s.cache, s.cache.allocator
    assert set(cache.sequences) == {r.id for r in s.running}
    held = sorted({b for sid in cache.sequences for b in cache.block_table(sid)})
    assert held == alloc.used_blocks()
    assert alloc.num_free + alloc.num_used == alloc.num_blocks
    for req in s.running:
        assert cache.seq_len(req.id) == req.num_computed
    assert all(r.num_computed == 0 for r in s.waiting)
    assert s.seats_used() <= s.max_num_seqs


# ---------------------------------------------------------------------------------------
# admission
# ---------------------------------------------------------------------------------------


def test_admission_stops_at_the_first_request_that_does_not_fit():
    """FCFS: 5 blocks; a 12-token prompt takes 3, the next 12-token prompt does not fit, and
    the 4-token prompt behind it (which would) does not jump ahead."""
    s = scheduler(num_blocks=5)
    a = s.add_request(list(range(1, 13)), params(4))
    b = s.add_request(list(range(1, 13)), params(4))
    c = s.add_request([1, 2, 3, 4], params(4))
    batch = step(s)
    assert [r.id for r, _ in batch.requests] == [a.id]
    assert s.running == [a] and s.waiting == [b, c]
    assert s.cache.num_free_blocks == 5 - 3
    assert_blocks_sound(s)


def test_admission_respects_seats_and_the_token_budget():
    s = scheduler(num_blocks=64, max_num_seqs=2, budget=10)
    reqs = [s.add_request([1] * 6, params(3)) for _ in range(3)]
    batch = step(s)
    # the budget of 10 tokens: the first prompt whole, 4 tokens of the second (chunked prefill)
    assert [(r.id, n) for r, n in batch.requests] == [(reqs[0].id, 6), (reqs[1].id, 4)]
    assert batch.samplers == [reqs[0]] and not batch.decode_only
    assert s.running == reqs[:2] and s.waiting == reqs[2:], "two seats"
    batch = step(s)
    assert [(r.id, n) for r, n in batch.requests] == [(reqs[0].id, 1), (reqs[1].id, 2)]
    assert_blocks_sound(s)


def test_decode_first_reserves_the_running_requests_growth():
    """decode_first admits a request only if its whole future and the running requests'
    growth fit: with 6 blocks, a running request that will grow to 4 blocks leaves room
    for no second one (FCFS would admit it and preempt later)."""
    for policy, admitted in (("decode_first", 1), ("fcfs", 2)):
        s = scheduler(num_blocks=6, policy=policy)
        s.add_request([1] * 4, params(12))  # grows to 15 tokens: 4 blocks
        step(s)
        s.add_request([2] * 4, params(12))
        step(s)
        assert len(s.running) == admitted, policy
        drain(s)
        if policy == "decode_first":
            assert s.stats.preemptions == 0, "no running request is preempted by growth"
        assert s.cache.num_free_blocks == 6


def test_a_request_that_cannot_fit_alone_is_refused():
    s = scheduler(num_blocks=3, max_model_len=32)
    with pytest.raises(KVCacheExhaustedError):
        s.add_request([1] * 8, params(8))  # up to 15 cached tokens: 4 blocks > 3
    with pytest.raises(ValueError, match="leaves no room under max_model_len=32"):
        s.add_request([1] * 32, params(1))
    assert not s.requests and not s.has_unfinished()


# ---------------------------------------------------------------------------------------
# preemption
# ---------------------------------------------------------------------------------------


def test_the_newest_running_request_is_preempted_first():
    """4 blocks, three requests of 4-token prompts (one block each, admitted together): when
    the decodes need new blocks, the newest requests go back to waiting, with their tokens
    and nothing computed; the oldest always progresses."""
    s = scheduler(num_blocks=4)
    reqs = [s.add_request([i + 1] * 4, params(8)) for i in range(3)]
    step(s)
    assert s.running == reqs and s.cache.num_free_blocks == 1
    step(s)  # each decode needs a second block: one is free
    assert s.running == [reqs[0], reqs[1]] and s.waiting == [reqs[2]]
    assert s.stats.preemptions == 1
    assert reqs[2].num_computed == 0 and len(reqs[2].output) == 1, "preempted with its tokens"
    assert_blocks_sound(s)
    drain(s)
    assert all(len(r.output) == 8 and r.finish_reason == "length" for r in reqs)
    assert s.cache.num_free_blocks == 4


def test_a_failed_step_preempts_its_requests():
    s = scheduler(num_blocks=8)
    reqs = [s.add_request([1, 2, 3], params(4)) for _ in range(2)]
    batch = s.schedule()
    s.abandon_step([r for r, _ in batch.requests])
    assert s.running == [] and s.waiting == reqs and s.cache.num_free_blocks == 8
    assert s.stats.preemptions == 2
    drain(s)
    assert all(len(r.output) == 4 for r in reqs)


# ---------------------------------------------------------------------------------------
# finish rules
# ---------------------------------------------------------------------------------------


def test_finish_on_a_stop_token_frees_the_blocks_at_once():
    s = scheduler(num_blocks=8)
    req = s.add_request([1, 2, 3], params(10, stops=(42,)))
    step(s)
    assert s.commit_token(req, 5) is None
    assert s.commit_token(req, 42) == "stop"
    assert req.state == "finished" and req.output[-1] == 42
    assert s.cache.num_free_blocks == 8 and req.id not in s.cache


def test_default_stop_tokens_come_from_the_model():
    s = scheduler(num_blocks=8)
    req = s.add_request([1, 2, 3], SamplingParams(max_new_tokens=10))
    step(s)
    assert s.commit_token(req, 0) == "stop", "eos_token_ids=(0,)"


@pytest.mark.parametrize("prompt_len, max_new, expected", [(3, 5, 5), (28, 10, 4)])
def test_finish_on_max_new_tokens_or_max_model_len(prompt_len, max_new, expected):
    s = scheduler(num_blocks=8, max_model_len=32)
    req = s.add_request([1] * prompt_len, params(max_new))
    drain(s)
    assert len(req.output) == expected and req.finish_reason == "length"
    assert s.stats.generated_tokens == expected and s.stats.finished_requests == 1


def test_abort_finishes_a_request_and_its_pending_forks():
    s = scheduler(num_blocks=16)
    parent = s.add_request([1, 2, 3], params(4))
    child = s.fork(parent.id)
    s.abort(parent.id)
    assert parent.finish_reason == child.finish_reason == "abort"
    assert not s.has_unfinished() and s.cache.num_free_blocks == 16
    with pytest.raises(ValueError, match="is waiting; abort it first"):
        s.release(s.add_request([1], params(1)).id)


# ---------------------------------------------------------------------------------------
# block accounting, over random workloads
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(8, 16),
    max_num_seqs=st.integers(1, 4),
    budget=st.sampled_from([3, 8, 64]),
    policy=st.sampled_from(["fcfs", "decode_first"]),
    requests=st.lists(st.tuples(st.integers(1, 10), st.integers(1, 8), st.integers(0, 2), st.booleans()),
                      min_size=1, max_size=6),
)
def test_every_block_returns_to_the_pool(block_size, num_blocks, max_num_seqs, budget, policy, requests):
    """Random requests (some with forks, some aborted mid-way) on pools small enough to
    preempt: after every step the block tables account for every used block, and at the
    end every block is free and every request ran to its length."""
    s = scheduler(num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=16,
                  budget=budget, policy=policy)
    added, aborted = [], set()
    for i, (prompt_len, max_new, forks, abort) in enumerate(requests):
        try:
            req = s.add_request([1 + i] * prompt_len, params(max_new))
        except KVCacheExhaustedError:
            continue
        added.append(req)
        for _ in range(forks):
            try:
                added.append(s.fork(req.id))
            except ValueError:
                break  # a family larger than max_num_seqs
        if abort:
            aborted.add(req.id)
    for steps in range(500):
        if not s.has_unfinished():
            break
        step(s)
        assert_blocks_sound(s)
        if steps == 2:
            for rid in aborted:
                s.abort(rid)
    assert not s.has_unfinished()
    assert s.cache.sequences == [] and s.cache.num_free_blocks == num_blocks
    for req in added:
        if req.finish_reason != "abort":
            assert req.finish_reason == "length"
            assert len(req.output) == min(req.max_new_tokens, 16 - len(req.prompt))


def test_forks_share_the_parents_blocks():
    s = scheduler(num_blocks=16)
    parent = s.add_request([1] * 8, params(4))
    child = s.fork(parent.id)
    step(s)  # the prompt: the fork materializes at the parent's first sampling point
    assert s.running == [parent, child] and len(child.output) == len(parent.output) == 1
    assert s.cache.block_table(child.id) == s.cache.block_table(parent.id), "the prompt's blocks are shared"
    drain(s)
    assert s.cache.num_free_blocks == 16 and len(child.output) == 4


def test_speculative_batch_feeds_only_tokens_within_the_limits():
    s = scheduler(num_blocks=16)
    a = s.add_request([1, 2, 3], params(3))
    b = s.add_request([4, 5], params(8))
    step(s)
    feeds = s.speculative_batch(4)
    # a: 1 token out of 3, so at most 1 more proposal is useful; b: the full 4
    assert feeds == [(a, 2), (b, 5)]
    s.add_request([6], params(2))
    assert s.speculative_batch(4) is None, "a waiting request takes the normal path"


def test_sampling_params_are_checked():
    assert as_sampling_params(None) == SamplingParams()
    assert as_sampling_params({"max_new_tokens": 3}).max_new_tokens == 3
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        as_sampling_params(0.5)


def test_stats_count_the_scheduler_events():
    stats = EngineStats()
    assert stats.mean_kv_utilization == 1.0
    s = scheduler(num_blocks=4)
    s.stats = stats
    s.add_request([1] * 4, params(2))
    step(s)
    s.sample_kv_stats()
    assert stats.kv_utilization_samples == 1 and stats.peak_blocks_used == 1
