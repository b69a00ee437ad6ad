"""The Engine's scheduler: which requests run at each step, and their KV blocks.

Pure bookkeeping, no model: the :class:`Scheduler` holds the requests (waiting, running,
forking, finished), admits and preempts them under a seat limit (``max_num_seqs``), a token
budget per step and the block pool of a :class:`~.paged_cache.PagedKVCache` (it allocates,
shares and frees blocks; it never reads or writes the pools), and applies the finish rules
to the tokens it is given. It decides; :class:`~.model_runner.ModelRunner` runs the model;
:class:`~.engine.Engine` joins the two. So every rule below is testable without a model
(tests/runtime/test_scheduler.py).

Iteration-level scheduling (ORCA, Yu et al. 2022) over PagedAttention memory (vLLM, Kwon et
al. 2023). A request's state is its tokens (prompt, then generated) and ``num_computed``,
how many of them are in the cache. A step gives each scheduled request ``n`` of its
uncomputed tokens: a decode is ``n = 1`` (the last sampled token), a prefill is the prompt,
possibly in chunks of at most the step's token budget (``max_num_batched_tokens``: chunked
prefill). When a request's tokens are all computed, the logits of its last one give its
next token.

Policies (``policy``):

- ``"fcfs"`` (default): requests are served in arrival order, running or waiting. Waiting
  requests are admitted while seats, blocks and the token budget allow; a waiting request
  that does not fit stops admission (no later request jumps ahead).
- ``"decode_first"``: running requests are served first, then waiting ones in arrival
  order, and a waiting request is admitted only if the blocks it may need until it
  finishes, plus those every running request still needs to reach its maximum length,
  are free: running requests are then never preempted by growth (forks of running
  requests excepted), at the cost of admitting later. When nothing is running, the oldest
  waiting request is admitted as under FCFS (progress).

Preemption (by recompute). When a running request needs a block and none is free, the
newest running request not yet scheduled in this step (the request itself if it is the
newest) is preempted: its blocks are freed and it goes back to the waiting queue with its
tokens, to be prefilled again when re-admitted (vLLM's recompute preemption). The oldest
request always progresses (a request that could not fit alone in the pool is rejected when
added), so preemption cannot livelock.

Forks: :meth:`Scheduler.fork` makes a child that shares the parent's blocks from the
parent's next sampling point (copy-on-write for the partial last block). A parent and its
pending forks are admitted together, so a family never needs more than ``max_num_seqs``
seats.

Finish rules (:meth:`Scheduler.commit_token`): a stop token ends a request (``"stop"``),
``max_new_tokens`` or ``max_model_len`` tokens end it (``"length"``); a finished request's
blocks go back to the pool at once.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable

import torch

from .paged_cache import KVCacheExhaustedError, PagedKVCache
from .sampling import SamplingParams

__all__ = ["POLICIES", "EngineStats", "Request", "Scheduler", "StepBatch", "as_sampling_params"]

POLICIES = ("fcfs", "decode_first")
WAITING, RUNNING, FINISHED, FORKING = "waiting", "running", "finished", "forking"

StreamCallback = Callable[[int, int, bool], None]


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was created (``kv_utilization_*`` sample used/reserved KV
    after each step's allocation, see :meth:`PagedKVCache.utilization`)."""

    steps: int = 0
    decode_only_steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    finished_requests: int = 0
    kv_utilization_sum: float = 0.0
    kv_utilization_samples: int = 0
    peak_blocks_used: int = 0
    forward_seconds: float = 0.0

    @property
    def mean_kv_utilization(self) -> float:
        return self.kv_utilization_sum / self.kv_utilization_samples if self.kv_utilization_samples else 1.0


@dataclasses.dataclass(eq=False)
class Request:
    """One request: its tokens, limits, sampling state and place in the scheduler."""

    id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stops: frozenset
    callback: StreamCallback | None
    arrival: int
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    state: str = WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # a seeded request's own sampler
    seen: torch.Tensor | None = None  # tokens seen, for the repetition penalty
    children: list[Request] = dataclasses.field(default_factory=list)
    parent: Request | None = None
    error: Exception | None = None  # what its callback raised (finish_reason "error")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    def token_range(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.output[start - p:stop - p]
        return self.prompt[start:] + self.output[:stop - p]


@dataclasses.dataclass
class StepBatch:
    """One step's tokens, packed for one forward: ``ids`` and ``positions`` of every new
    token, per sequence its id, token count and cache slots, ``rows``: the packed rows whose
    logits are sampled (``samplers``: their requests, in order)."""

    decode_only: bool
    requests: list[tuple[Request, int]] = dataclasses.field(default_factory=list)
    ids: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)
    seq_ids: list[int] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    slots: list[list[int]] = dataclasses.field(default_factory=list)
    rows: list[int] = dataclasses.field(default_factory=list)
    samplers: list[Request] = dataclasses.field(default_factory=list)

    @classmethod
    def pack(cls, scheduled: list[tuple[Request, int, list[int]]]) -> StepBatch:
        """The batch of :meth:`Scheduler.schedule`: each request's next ``n`` tokens; its
        last token's logits are sampled when that completes its known tokens."""
        batch = cls(decode_only=all(n == 1 for _, n, _ in scheduled))
        for req, n, slots in scheduled:
            start = req.num_computed
            batch.add(req, req.token_range(start, start + n), slots)
            if start + n == req.num_tokens:
                batch.rows.append(len(batch.ids) - 1)
                batch.samplers.append(req)
        return batch

    def add(self, req: Request, tokens: list[int], slots: list[int]) -> None:
        """Feed ``tokens`` to ``req`` at its next positions, into cache ``slots``."""
        start = req.num_computed
        self.requests.append((req, len(tokens)))
        self.ids.extend(tokens)
        self.positions.extend(range(start, start + len(tokens)))
        self.seq_ids.append(req.id)
        self.counts.append(len(tokens))
        self.slots.append(slots)

    @property
    def decode_tokens(self) -> int:
        """Tokens of the step that decode (one new token of a request that has output)."""
        return sum(1 for r, n in self.requests if n == 1 and r.output)


def as_sampling_params(params) -> SamplingParams:
    """``params`` (a :class:`SamplingParams`, a dict of its fields or None: the defaults)
    as a :class:`SamplingParams`."""
    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        return SamplingParams(**params)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, a dict or None, got {type(params).__name__}")
    return params


class Scheduler:
    """Requests, admission, preemption and block accounting (see the module docstring).

    ``cache``: the paged cache whose blocks it accounts (only its block tables are used).
    ``eos_token_ids``: the stop tokens of requests whose params set none.
    """

    def __init__(self, cache: PagedKVCache, *, max_num_seqs: int, max_model_len: int,
                 max_num_batched_tokens: int, policy: str = "fcfs", default_max_new_tokens: int = 16,
                 eos_token_ids: tuple[int, ...] = (), stats: EngineStats | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not valid; use one of {', '.join(POLICIES)}")
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.default_max_new_tokens = default_max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stats = stats if stats is not None else EngineStats()
        self.requests: dict[int, Request] = {}
        self.running: list[Request] = []  # by arrival
        self.waiting: list[Request] = []  # by arrival
        self.materialized: list[Request] = []  # forks materialized in the current step
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._preempted_now: set[int] = set()

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams,
                    callback: StreamCallback | None = None) -> Request:
        """Queue a request for ``prompt`` (checked token ids); refused when it could never
        fit (``ValueError``: the prompt alone; ``KVCacheExhaustedError``: the pool)."""
        max_new = params.max_new_tokens or self.default_max_new_tokens
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room under max_model_len={self.max_model_len}; "
                f"pass max_model_len > {len(prompt)} or shorten the prompt"
            )
        self.check_fits(len(prompt), max_new)
        req = Request(id=next(self._ids), prompt=prompt, params=params, max_new_tokens=max_new,
                      stops=frozenset(self._stop_tokens(params)), callback=callback, arrival=next(self._arrivals))
        self.requests[req.id] = req
        self._insert_waiting(req)
        return req

    def fork(self, request_id: int, params: SamplingParams | dict | None = None,
             callback: StreamCallback | None = None) -> Request:
        """A child of ``request_id`` (``params``: default the parent's), admitted with its
        parent or, for a running parent, materialized at its next sampling point."""
        parent = self.requests.get(request_id)
        if parent is None or parent.state in (FINISHED, FORKING):
            state = "unknown" if parent is None else parent.state
            raise ValueError(f"cannot fork request {request_id} ({state}); fork a waiting or running request")
        family = 2 + len(parent.children)  # parent, its pending forks, this one: admitted together
        if family > self.max_num_seqs:
            raise ValueError(
                f"cannot fork request {request_id}: with its forks it would need {family} sequences at once, "
                f"more than max_num_seqs={self.max_num_seqs}; pass a larger max_num_seqs"
            )
        if parent.state == RUNNING and self.seats_used() + 1 > self.max_num_seqs:
            # a running family was admitted with the seats it had then: a new fork needs a free one
            raise ValueError(
                f"cannot fork request {request_id} now: {self.seats_used()} sequences are running or forking, "
                f"max_num_seqs={self.max_num_seqs}; fork a request before it starts (a family is admitted "
                "together), after another request finishes, or pass a larger max_num_seqs"
            )
        params = as_sampling_params(params) if params is not None else parent.params
        max_new = params.max_new_tokens or self.default_max_new_tokens
        self.check_fits(len(parent.prompt), max_new)
        child = Request(id=next(self._ids), prompt=parent.prompt, params=params, max_new_tokens=max_new,
                        stops=frozenset(self._stop_tokens(params)), callback=callback, arrival=-1, state=FORKING,
                        parent=parent)
        self.requests[child.id] = child
        parent.children.append(child)
        return child

    def abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is None or req.state == FINISHED:
            return
        self.finish(req, "abort")

    def release(self, request_id: int) -> None:
        req = self.requests[request_id]
        if req.state != FINISHED:
            raise ValueError(f"request {request_id} is {req.state}; abort it first")
        del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def seats_used(self) -> int:
        """Sequences running, with the pending forks of running requests."""
        return len(self.running) + sum(len(r.children) for r in self.running)

    def finish(self, req: Request, reason: str) -> None:
        """End ``req`` (its blocks back to the pool, its pending forks aborted)."""
        if req.state == RUNNING:
            self.cache.free(req.id)
            self.running.remove(req)
        elif req.state == WAITING:
            self.waiting.remove(req)
        elif req.state == FORKING and req.parent is not None and req in req.parent.children:
            req.parent.children.remove(req)
        req.state = FINISHED
        req.finish_reason = reason
        req.seen = None
        self.stats.finished_requests += 1
        for child in list(req.children):
            self.finish(child, "abort")
        req.children = []

    def commit_token(self, req: Request, token: int) -> str | None:
        """Append one sampled token to ``req``; finish it on a stop token or its length
        limit. Returns the finish reason, or None."""
        req.output.append(token)
        self.stats.generated_tokens += 1
        reason = None
        if token in req.stops:
            reason = "stop"
        elif len(req.output) >= req.max_new_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.finish(req, reason)
        return reason

    def materialize_fork(self, parent: Request, child: Request) -> None:
        """Make a pending fork a running request sharing its parent's blocks, at the
        parent's sampling point (its output so far is the parent's)."""
        self.cache.fork(parent.id, child.id)
        child.output = list(parent.output)
        child.num_computed = parent.num_computed
        child.arrival = next(self._arrivals)
        child.state = RUNNING
        child.parent = None
        self.materialized.append(child)
        if parent.seen is not None and child.params.repetition_penalty != 1.0:
            child.seen = parent.seen.clone()
        bisect.insort(self.running, child, key=lambda r: r.arrival)

    def abandon_step(self, requests: list[Request]) -> None:
        """A step failed before committing: its running requests and the forks it
        materialized give their blocks back and are recomputed later, as when preempted."""
        for req in requests + self.materialized:
            if req.state == RUNNING:
                self.preempt(req)
        self.materialized = []

    def check_fits(self, prompt_len: int, max_new: int) -> None:
        """Refuse a request that could not fit in the whole pool even alone."""
        # the last sampled token is never written, hence - 1
        longest = min(prompt_len + max_new, self.max_model_len) - 1
        needed = self.cache.blocks_for(longest)
        total = self.cache.allocator.num_blocks
        if needed > total:
            raise KVCacheExhaustedError(
                needed, self.cache.num_free_blocks, total,
                f" for a request of up to {longest} cached tokens ({self.block_size} per block) even alone",
            )

    def sample_kv_stats(self) -> None:
        self.stats.kv_utilization_sum += self.cache.utilization()
        self.stats.kv_utilization_samples += 1
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, self.cache.allocator.num_used)

    # -- scheduling ---------------------------------------------------------------------
    def schedule(self) -> StepBatch | None:
        """Choose this step's requests and token counts, allocate their slots (preempting
        as needed); None when nothing can run."""
        self.materialized = []
        budget = self.max_num_batched_tokens
        if self.policy == "fcfs":
            order = sorted(self.running + self.waiting, key=lambda r: r.arrival)
        else:
            order = list(self.running) + list(self.waiting)
        scheduled: list[tuple[Request, int, list[int]]] = []
        done: set[int] = set()
        self._preempted_now = set()
        admitting = True
        for req in order:
            if budget <= 0:
                break
            if req.id in self._preempted_now:
                continue  # preempted by an older request in this step: not re-admitted before the next
            if req.state == RUNNING:
                n = min(req.num_pending, budget)
                if not self._make_room(req, n, done):
                    continue  # req itself was preempted
                scheduled.append((req, n, self.cache.append_slots(req.id, n)))
            elif req.state == WAITING and admitting:
                n = min(req.num_pending, budget)
                seats = 1 + len(req.children)
                needed = self.cache.blocks_for(n)
                if self.policy == "decode_first" and self.running:
                    # the request's whole future and the running requests' growth must fit
                    # (with nothing running, the oldest request is admitted as under FCFS, so a
                    # family of forks larger than the pool still progresses, by preempting its own)
                    needed = self._future_blocks(req) + self._decode_reserve()
                if self.seats_used() + seats > self.max_num_seqs or needed > self.cache.num_free_blocks:
                    admitting = False  # no later request jumps ahead of this one
                    continue
                self.waiting.remove(req)
                req.state = RUNNING
                bisect.insort(self.running, req, key=lambda r: r.arrival)
                self.cache.add_sequence(req.id)
                scheduled.append((req, n, self.cache.append_slots(req.id, n)))
            else:
                continue
            done.add(req.id)
            budget -= n
        return StepBatch.pack(scheduled) if scheduled else None

    def speculative_batch(self, k: int) -> list[tuple[Request, int]] | None:
        """For a speculative decode step: each running request and how many tokens it
        feeds (its last token plus up to ``k`` proposals, none past its limits), with their
        slots allocated; None when this step needs the normal path (requests to admit,
        prompt chunks, forks, a penalty, too little budget or too few free blocks)."""
        reqs = list(self.running)
        if self.waiting or not reqs or any(
                r.num_pending != 1 or not r.output or r.children or r.params.repetition_penalty != 1.0 for r in reqs):
            return None
        # Proposals past max_new_tokens / max_model_len would be dropped: do not feed them.
        counts = [1 + max(0, min(k, r.max_new_tokens - len(r.output) - 1, self.max_model_len - r.num_tokens))
                  for r in reqs]
        if sum(counts) > self.max_num_batched_tokens or sum(
                self.cache.blocks_needed(r.id, n) for r, n in zip(reqs, counts)) > self.cache.num_free_blocks:
            return None
        return list(zip(reqs, counts))

    def rollback(self, req: Request, num_computed: int) -> None:
        """Keep the first ``num_computed`` tokens of ``req`` in the cache (rejected
        speculative tokens are dropped)."""
        req.num_computed = num_computed
        self.cache.truncate(req.id, num_computed)

    def preempt(self, req: Request) -> None:
        self.cache.free(req.id)
        req.num_computed = 0
        req.state = WAITING
        self.running.remove(req)
        self._insert_waiting(req)
        self._preempted_now.add(req.id)
        self.stats.preemptions += 1

    def _make_room(self, req: Request, n: int, done: set[int]) -> bool:
        """Free blocks for ``n`` more tokens of running ``req`` by preempting the newest
        running requests not yet scheduled in this step; False if ``req`` itself went."""
        while self.cache.blocks_needed(req.id, n) > self.cache.num_free_blocks:
            victims = [r for r in self.running if r.id not in done]
            victim = max(victims, key=lambda r: r.arrival)  # req itself is among them
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def _final_len(self, req: Request) -> int:
        """Most tokens the request will hold in the cache (its last sampled token is never written)."""
        return min(len(req.prompt) + req.max_new_tokens, self.max_model_len) - 1

    def _future_blocks(self, req: Request) -> int:
        """Blocks a waiting request (and its pending forks) may take until it finishes."""
        own = self.cache.blocks_for(self._final_len(req))
        prompt = len(req.prompt)
        shared = prompt // self.block_size  # full prompt blocks its forks share
        # a fork that writes past the prompt copies the partial prompt block and grows on its own
        return own + sum(self.cache.blocks_for(self._final_len(c)) - shared
                         for c in req.children if self._final_len(c) > prompt)

    def _decode_reserve(self) -> int:
        """Blocks the running requests still need to reach their maximum length (plus a
        copy-on-write copy for a shared partial last block)."""
        total = 0
        for r in self.running:
            table = self.cache.block_table(r.id)
            total += max(0, self.cache.blocks_for(self._final_len(r)) - len(table))
            partial = self.cache.seq_len(r.id) % self.block_size
            total += int(bool(partial) and self.cache.allocator.ref_count(table[-1]) > 1)
        return total

    def _insert_waiting(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=lambda r: r.arrival)

    def _stop_tokens(self, params: SamplingParams) -> tuple[int, ...]:
        return params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids
