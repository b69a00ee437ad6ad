"""``llmopt.Engine`` never ends up half-advanced: user code that raises in a streaming
callback, a forward that raises, and random sequences of operations leave the engine sound
and every other request producing exactly its tokens alone.

Oracle: a request's greedy tokens alone (``llmopt.generate``, static cache, dense attention)
on a second instance of the same seeded model, so that references can be computed while
the engine has switched its own model to the paged attention.

The property test is a hypothesis state machine: random ``add_request`` (prompt lengths,
``max_new_tokens``, stop tokens, callbacks raising at a random token), ``abort``, ``fork``,
``release``, ``step`` and steps whose forward raises, on pools small enough that requests
are preempted. After every operation it checks the engine's invariants (every block
accounted for, block tables reference only allocated blocks with the right reference
counts, cache lengths equal the requests' computed tokens); each request is checked
against its tokens alone when it finishes; at the end every block is free.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("the paged engine needs transformers >= 5", allow_module_level=True)

from llmopt.runtime import SamplingParams, generate  # noqa: E402
from llmopt.runtime.engine import Engine, EngineCallbackError, StepOutput  # noqa: E402
from llmopt.runtime.paged_cache import KVCacheExhaustedError  # noqa: E402
from runtime.tiny_lm import VOCAB, tiny_model  # noqa: E402

MAX_NEW = 10
MAX_MODEL_LEN = 24


@functools.cache
def oracle_model():
    return tiny_model("llama", seed=5)


def engine_model():
    """A fresh instance with the oracle's weights (same seed): the engine switches its
    attention, the oracle's stays dense."""
    return tiny_model("llama", seed=5)


@functools.cache
def greedy_alone(prompt: tuple[int, ...], max_new: int = MAX_NEW) -> tuple[int, ...]:
    """The request's greedy tokens alone, no stop token; a shorter request's are a prefix."""
    out = generate(oracle_model(), torch.tensor([prompt]), max_new, stop_token_ids=())
    return tuple(out[0, len(prompt):].tolist())


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, stop_token_ids=())


class CallbackFailure(Exception):
    """What the tests' callbacks raise."""


def drain(engine) -> dict[int, Exception]:
    """Step until nothing is left; returns the callback errors the steps raised."""
    errors = {}
    for _ in range(500):
        if not engine.has_unfinished():
            return errors
        try:
            engine.step()
        except EngineCallbackError as error:
            errors.update(error.errors)
    raise AssertionError("the engine made no progress")


# ---------------------------------------------------------------------------------------
# a callback that raises
# ---------------------------------------------------------------------------------------


def test_a_raising_callback_ends_only_its_request():
    """Request a's callback raises on its 2nd token, d's on its last (2nd) one, in the same
    step; b and c, scheduled after them, are committed anyway and go on to produce their
    tokens alone. (Before: b and c were left with their tokens computed but not sampled,
    and the next step failed inside transformers, "cannot reshape tensor of 0 elements".)"""
    prompts = [random_prompt(n, seed) for n, seed in ((5, 1), (9, 2), (3, 3), (7, 4))]
    base = [greedy_alone(tuple(p)) for p in prompts]
    streamed = collections.defaultdict(list)
    raised = {}

    def callback(fail_on):
        def fn(rid, token, finished):
            streamed[rid].append((token, finished))
            if len(streamed[rid]) == fail_on:
                raised[rid] = CallbackFailure(f"request {rid} fails on token {fail_on}")
                raise raised[rid]
        return fn

    engine = Engine(engine_model(), max_num_seqs=4, block_size=4, max_model_len=MAX_MODEL_LEN)
    a = engine.add_request(prompts[0], greedy(8), callback=callback(2))
    b = engine.add_request(prompts[1], greedy(8), callback=callback(None))
    c = engine.add_request(prompts[2], greedy(5))
    d = engine.add_request(prompts[3], greedy(2), callback=callback(2))
    engine.step()  # the prefill: every callback succeeds
    with pytest.raises(EngineCallbackError, match=f"callback of request {a} raised CallbackFailure") as info:
        engine.step()
    error = info.value
    assert error.errors == {a: raised[a], d: raised[d]} and error.request_id == a
    assert error.__cause__ is raised[a], "the callback's exception is the cause"
    by_id = {out.request_id: out for out in error.outputs}
    assert set(by_id) == {a, b, c, d}, "the step's outputs travel with the error"
    assert by_id[a] == StepOutput(a, [base[0][1]], True, "error", raised[a])
    assert by_id[d] == StepOutput(d, [base[3][1]], True, "error", raised[d])
    assert by_id[b] == StepOutput(b, [base[1][1]], False)
    assert engine.is_finished(a) and engine.error(a) is raised[a] and engine.output(a) == list(base[0][:2])
    assert engine.is_finished(d) and engine.error(d) is raised[d] and engine.output(d) == list(base[3][:2])
    assert engine.cache.sequences == [b, c], "the failed requests' blocks are freed at once"
    engine.abort(a)  # a no-op: a is finished already
    assert drain(engine) == {}
    assert engine.output(b) == list(base[1][:8]) and engine.output(c) == list(base[2][:5])
    assert [t for t, _ in streamed[b]] == engine.output(b) and streamed[b][-1] == (base[1][7], True)
    assert engine.error(b) is None and engine.error(c) is None
    assert engine.cache.num_free_blocks == engine.cache.allocator.num_blocks
    engine.close()


def test_callbacks_may_abort_and_add_but_not_step():
    """Callbacks run on a committed engine: one may abort another request or add a new
    one; calling step() from a callback is refused (it would deliver the tokens of the
    next step before this step's remaining callbacks) and ends that request as an error."""
    prompts = [random_prompt(n, seed) for n, seed in ((6, 5), (4, 6), (8, 7))]
    base = [greedy_alone(tuple(p)) for p in prompts]
    engine = Engine(engine_model(), max_num_seqs=3, block_size=4, max_model_len=MAX_MODEL_LEN)
    added = []

    def aborts_and_adds(rid, token, finished):
        if len(engine.output(rid)) == 2:
            engine.abort(victim)
            added.append(engine.add_request(prompts[2], greedy(4)))

    def steps(rid, token, finished):
        engine.step()

    keeper = engine.add_request(prompts[0], greedy(6), callback=aborts_and_adds)
    victim = engine.add_request(prompts[1], greedy(6))
    stepper = engine.add_request(prompts[2], greedy(6), callback=steps)
    with pytest.raises(EngineCallbackError) as info:
        engine.step()
    assert set(info.value.errors) == {stepper}
    assert isinstance(engine.error(stepper), RuntimeError)
    assert "called from a streaming callback" in str(engine.error(stepper))
    assert drain(engine) == {}
    assert engine.output(keeper) == list(base[0][:6])
    assert engine.output(victim) == list(base[1][:2]), "aborted after its second token"
    assert engine.output(added[0]) == list(base[2][:4])
    assert engine.cache.num_free_blocks == engine.cache.allocator.num_blocks
    engine.close()


def test_an_interrupt_in_a_callback_propagates_after_the_commit():
    """KeyboardInterrupt is not recorded as a request error: it propagates at once, the
    step is committed all the same, and the engine goes on afterwards."""
    prompts = [random_prompt(n, seed) for n, seed in ((5, 8), (5, 9))]
    base = [greedy_alone(tuple(p)) for p in prompts]
    engine = Engine(engine_model(), max_num_seqs=2, block_size=4, max_model_len=MAX_MODEL_LEN)

    def interrupts(rid, token, finished):
        if len(engine.output(rid)) == 3:
            raise KeyboardInterrupt

    a = engine.add_request(prompts[0], greedy(5), callback=interrupts)
    b = engine.add_request(prompts[1], greedy(5))
    with pytest.raises(KeyboardInterrupt):
        drain(engine)
    assert engine.error(a) is None and not engine.is_finished(a)
    assert drain(engine) == {}
    assert engine.output(a) == list(base[0][:5]) and engine.output(b) == list(base[1][:5])
    engine.close()


def test_a_raising_forward_preempts_the_step_and_the_engine_goes_on():
    """The forward writes the step's K/V into the pools and then raises (as an
    out-of-memory error in the last layer would): nothing of the step is committed, its
    requests are recomputed later, and every request still gets its tokens alone."""
    prompts = [random_prompt(n, seed) for n, seed in ((7, 10), (3, 11), (12, 12))]
    base = [greedy_alone(tuple(p)) for p in prompts]
    engine = Engine(engine_model(), max_num_seqs=3, block_size=4, max_model_len=MAX_MODEL_LEN)
    forward = engine.runner.forward
    calls = []

    def fails_on_steps_2_and_5(*args):
        logits = forward(*args)
        calls.append(len(calls))
        if len(calls) in (2, 5):
            raise RuntimeError("simulated failure after the K/V append")
        return logits

    engine.runner.forward = fails_on_steps_2_and_5
    ids = [engine.add_request(p, greedy(6)) for p in prompts]
    failures = 0
    while engine.has_unfinished():
        try:
            engine.step()
        except RuntimeError as error:
            assert "simulated failure" in str(error)
            failures += 1
            assert engine.cache.num_free_blocks == engine.cache.allocator.num_blocks, "the step's blocks are freed"
    assert failures == 2 and engine.stats.preemptions == 2 * len(prompts)
    assert [engine.output(i) for i in ids] == [list(b[:6]) for b in base]
    engine.close()


# ---------------------------------------------------------------------------------------
# random operation sequences (hypothesis stateful)
# ---------------------------------------------------------------------------------------


def check_invariants(engine) -> None:
    """The engine's bookkeeping, after any operation."""
    cache, alloc = engine.cache, engine.cache.allocator
    running, waiting = engine.scheduler.running, engine.scheduler.waiting
    # every block accounted for: free or held, never both, nothing else
    free = alloc._free
    assert len(set(free)) == len(free), "a block is twice in the free list"
    assert alloc.num_free + alloc.num_used == alloc.num_blocks
    assert all(alloc.ref_count(b) == 0 for b in free), "a free block has owners"
    holders = collections.Counter(b for sid in cache.sequences for b in cache.block_table(sid))
    assert sorted(holders) == alloc.used_blocks(), "a leaked block, or a table referencing a freed block"
    assert all(alloc.ref_count(b) == n for b, n in holders.items()), "reference count != number of tables"
    # the cache holds exactly the running requests, at the length they computed
    assert set(cache.sequences) == {r.id for r in running}
    assert not {r.id for r in running} & {r.id for r in waiting}
    for req in running:
        assert req.state == "running" and req.parent is None
        assert cache.seq_len(req.id) == req.num_computed <= req.num_tokens
        assert len(cache.block_table(req.id)) == cache.blocks_for(req.num_computed)
    for req in waiting:
        assert req.state == "waiting" and req.num_computed == 0 and req.parent is None
    assert [r.arrival for r in running] == sorted(r.arrival for r in running)
    assert [r.arrival for r in waiting] == sorted(r.arrival for r in waiting)
    for req in running + waiting:
        assert all(c.state == "forking" and c.parent is req for c in req.children)
    seats = len(running) + sum(len(r.children) for r in running)
    assert seats <= engine.max_num_seqs, f"{seats} sequences running or forking, max_num_seqs={engine.max_num_seqs}"
    for req in engine.scheduler.requests.values():
        if req.state == "finished":
            assert req not in running and req not in waiting and not req.children and req.id not in cache


@dataclasses.dataclass
class Expected:
    """What the state machine knows of one request: ``base``, the tokens it produces alone
    (after its stop token, ``max_new_tokens`` and ``max_model_len``); ``fail_on``: its
    callback raises when the request's output holds that many tokens."""

    base: tuple[int, ...]
    fail_on: int | None
    streamed: list[tuple[int, bool]] = dataclasses.field(default_factory=list)
    raised: Exception | None = None
    checked: bool = False


REQUEST = st.tuples(
    st.integers(1, 14),  # prompt length
    st.integers(0, 3),  # prompt seed
    st.integers(1, MAX_NEW),  # max_new_tokens
    st.one_of(st.none(), st.integers(0, MAX_NEW - 1)),  # stop on the token at this position
    st.one_of(st.none(), st.integers(1, MAX_NEW)),  # the callback raises on this token
    st.sampled_from([0, 0, 1, 2]),  # forks made at once (admitted with it)
)


class EngineOperations(RuleBasedStateMachine):
    """Random Engine operations; see the module docstring."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        pool_tokens=st.integers(10, MAX_MODEL_LEN),
        max_num_seqs=st.integers(1, 4),
        budget=st.sampled_from([None, 3, 8]),
        policy=st.sampled_from(["fcfs", "decode_first"]),
        padded_decode=st.booleans(),  # cuda_graphs=True: CUDA's padded decode batches, without graphs on CPU
    )
    def start(self, block_size, pool_tokens, max_num_seqs, budget, policy, padded_decode):
        # pools from about two short requests to one of the longest: the longest requests are
        # rejected by the smaller pools, and preemption is common
        num_blocks = -(-pool_tokens // block_size)
        self.engine = Engine(_ENGINE_MODEL(), max_num_seqs=max_num_seqs, block_size=block_size,
                             num_blocks=num_blocks, max_model_len=MAX_MODEL_LEN,
                             max_num_batched_tokens=budget, policy=policy, cuda_graphs=padded_decode)
        self.expected: dict[int, Expected] = {}
        self.raised_now: dict[int, Exception] = {}

    def teardown(self):
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        try:
            # a bound no live engine reaches: every request alone, each preempted a few times
            for _ in range(4 * MAX_MODEL_LEN * (len(self.unfinished()) + 1)):
                if not engine.has_unfinished():
                    break
                self.step_once()
            assert not engine.has_unfinished(), "the engine made no progress"
            assert all(e.checked for rid, e in self.expected.items()), "a request never finished"
            assert engine.cache.sequences == [] and engine.cache.num_free_blocks == engine.cache.allocator.num_blocks
        finally:
            engine.close()

    # -- helpers --------------------------------------------------------------------------
    def callback(self, expected: Expected):
        def fn(rid, token, finished):
            expected.streamed.append((token, finished))
            if expected.fail_on == len(self.engine.output(rid)):
                expected.raised = self.raised_now[rid] = CallbackFailure(f"request {rid}")
                raise expected.raised
        return fn

    def step_once(self):
        self.raised_now = {}
        try:
            outputs = self.engine.step()
        except EngineCallbackError as error:
            assert error.errors == self.raised_now and self.raised_now, "exactly the callbacks that raised"
            assert error.__cause__ is next(iter(self.raised_now.values()))
            outputs = error.outputs
        else:
            assert not self.raised_now, "a callback raised and step() said nothing"
        for out in outputs:
            assert out.token_ids == self.engine.output(out.request_id)[-1:]
            assert out.finished == self.engine.is_finished(out.request_id)
        self.check_finished()

    def check_finished(self):
        """Each request, once finished: its tokens alone (a prefix of them when aborted or
        ended by its callback), streamed in order."""
        engine = self.engine
        for rid, exp in self.expected.items():
            if exp.checked or not engine.is_finished(rid):
                continue
            exp.checked = True
            out = engine.output(rid)
            reason = engine.scheduler.requests[rid].finish_reason
            assert tuple(out) == exp.base[:len(out)], f"request {rid} ({reason}) differs from its tokens alone"
            streamed = [t for t, _ in exp.streamed]
            assert streamed == out[len(out) - len(streamed):], f"request {rid} streamed other tokens"
            if reason == "error":
                assert engine.error(rid) is exp.raised is not None and len(out) == exp.fail_on
            else:
                assert engine.error(rid) is None
            if reason in ("stop", "length"):
                assert tuple(out) == exp.base and exp.streamed[-1][1], f"request {rid} ended early"
                assert not any(f for _, f in exp.streamed[:-1])

    def unfinished(self) -> list[int]:
        return sorted(rid for rid in self.expected if not self.engine.is_finished(rid))

    def pick_unfinished(self, index: int) -> int:
        ids = self.unfinished()
        return ids[index % len(ids)]

    # -- rules ----------------------------------------------------------------------------
    @rule(requests=st.lists(REQUEST, min_size=1, max_size=3))
    def add_requests(self, requests):
        for request in requests:
            self.add_request(*request)

    def add_request(self, length, seed, max_new, stop_at, fail_on, forks):
        prompt = random_prompt(length, seed)
        run = greedy_alone(tuple(prompt))[:min(max_new, MAX_MODEL_LEN - length)]
        stops = (run[stop_at],) if stop_at is not None and stop_at < len(run) else ()
        base = run[:run.index(stops[0]) + 1] if stops else run
        exp = Expected(base, fail_on)
        try:
            rid = self.engine.add_request(prompt, SamplingParams(max_new_tokens=max_new, stop_token_ids=stops),
                                          callback=self.callback(exp))
        except KVCacheExhaustedError:
            cache = self.engine.cache
            assert cache.blocks_for(min(length + max_new, MAX_MODEL_LEN) - 1) > cache.allocator.num_blocks
            return
        self.expected[rid] = exp
        for _ in range(forks):
            self.fork_of(rid, fail_on=None)

    @precondition(lambda self: self.unfinished())
    @rule(index=st.integers(0, 50), fail_on=st.one_of(st.none(), st.integers(1, MAX_NEW)))
    def fork(self, index, fail_on):
        self.fork_of(self.pick_unfinished(index), fail_on)

    def fork_of(self, parent: int, fail_on: int | None) -> None:
        exp = Expected(self.expected[parent].base, fail_on)
        try:
            child = self.engine.fork(parent, callback=self.callback(exp))
        except ValueError as error:
            req, engine = self.engine.scheduler.requests[parent], self.engine
            family = 2 + len(req.children)
            no_seat = req.state == "running" and engine.scheduler.seats_used() == engine.max_num_seqs
            assert req.state in ("finished", "forking") or family > engine.max_num_seqs or no_seat, str(error)
            return
        self.expected[child] = exp

    @precondition(lambda self: self.unfinished())
    @rule(index=st.integers(0, 50))
    def abort(self, index):
        self.engine.abort(self.pick_unfinished(index))
        self.check_finished()

    @precondition(lambda self: any(e.checked for e in self.expected.values()))
    @rule(index=st.integers(0, 50))
    def release(self, index):
        done = sorted(rid for rid, e in self.expected.items() if e.checked)
        rid = done[index % len(done)]
        self.engine.release(rid)
        del self.expected[rid]

    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            self.step_once()
            check_invariants(self.engine)

    @rule()
    def step_whose_forward_raises(self):
        engine = self.engine
        forward = engine.runner.forward

        def fails(*args):
            forward(*args)  # the K/V of the step are written, then:
            raise RuntimeError("simulated forward failure")

        engine.runner.forward = fails
        try:
            engine.step()
        except RuntimeError as error:
            assert "simulated forward failure" in str(error)
        finally:
            del engine.runner.forward

    @invariant()
    def bookkeeping(self):
        if hasattr(self, "engine"):
            check_invariants(self.engine)


_ENGINE_MODEL = functools.cache(engine_model)  # one engine model for all examples (each engine restores it)

EngineOperations.TestCase.settings = settings(stateful_step_count=20, deadline=None)
TestEngineOperations = EngineOperations.TestCase


def test_a_fork_of_a_running_request_needs_a_free_seat():
    """max_num_seqs is never exceeded: with every seat taken, forking a running request is
    refused (before: the fork materialized as one more running sequence); once a request
    has finished, the fork is accepted and continues like its parent."""
    prompts = [random_prompt(n, seed) for n, seed in ((3, 13), (4, 14))]
    base = [greedy_alone(tuple(p)) for p in prompts]
    engine = Engine(engine_model(), max_num_seqs=2, block_size=4, max_model_len=MAX_MODEL_LEN)
    a = engine.add_request(prompts[0], greedy(6))
    b = engine.add_request(prompts[1], greedy(2))
    engine.step()
    with pytest.raises(ValueError, match="cannot fork request .* now: 2 sequences are running or forking"):
        engine.fork(a)
    engine.step()  # b finishes
    child = engine.fork(a)
    assert drain(engine) == {}
    assert engine.output(a) == engine.output(child) == list(base[0][:6])
    assert engine.output(b) == list(base[1][:2])
    engine.close()
