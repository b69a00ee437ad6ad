"""``llmopt.Engine``: continuous batching of many requests over a paged KV cache.

Iteration-level scheduling (ORCA, Yu et al. 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models") over PagedAttention memory (vLLM, Kwon et al. 2023):
at every step the engine picks which requests run, packs their new tokens into one forward
(prompt chunks and one-token decodes together), samples, and lets finished requests leave
at once, freeing their blocks for the next ones. Nobody waits for the slowest member of a
batch, and KV memory follows real lengths.

A request's state is its tokens (prompt, then generated) and ``num_computed``, how many
of them are in the cache. A step gives each scheduled request ``n`` of its uncomputed
tokens: a decode is ``n = 1`` (the last sampled token), a prefill is the prompt, possibly
in chunks of at most the step's token budget (``max_num_batched_tokens``: chunked prefill).
When a request's tokens are all computed, the logits of its last one give its next token.

Scheduling, per step (``policy``):

- ``"fcfs"`` (default): requests are served in arrival order, running or waiting. Waiting
  requests are admitted while seats (``max_num_seqs``), blocks and the token budget allow;
  a waiting request that does not fit stops admission (no later request jumps ahead).
- ``"decode_first"``: running requests are served first, then waiting ones in arrival
  order, and a waiting request is admitted only if the blocks it may need until it
  finishes, plus those every running request still needs to reach its maximum length,
  are free: running requests are then never preempted by growth (forks of running
  requests excepted), at the cost of admitting later (a lower memory utilisation). When
  nothing is running, the oldest waiting request is admitted as under FCFS (progress).

Preemption (by recompute). When a running request needs a block and none is free, the
newest running request not yet scheduled in this step (the request itself if it is the
newest) is preempted: its blocks are freed and it goes back to the waiting queue with its
tokens; when re-admitted, its prompt and generated tokens are prefilled again and decoding
continues (vLLM's recompute preemption: cheaper than swapping for short sequences, no
host memory). The oldest request always progresses (a request is rejected at
``add_request`` if it could not fit alone in the pool), so preemption cannot livelock;
the cache is never corrupted (``PagedKVCache.append_slots`` is all-or-nothing).

Parallel sampling / shared prefixes: :meth:`Engine.fork` makes a child that shares the
parent's KV blocks from the parent's next sampling point (the prompt, for a request not
started yet), copy-on-write for the partial last block, and samples its own tokens. A
parent and its pending forks are admitted together, so a family never needs more than
``max_num_seqs`` seats (``fork`` refuses one more).

Streaming: ``add_request(..., callback=fn)`` calls ``fn(request_id, token, finished)`` for
each token as soon as its step ends; :meth:`Engine.stream` yields ``(prompt_index,
StepOutput)`` the same way for a list of prompts; :meth:`Engine.step` returns the step's
:class:`StepOutput` list to a caller that runs its own loop.

A step commits, then calls back. Every change a step makes (tokens appended, cache lengths,
block tables, finished requests and their freed blocks) is done before the first callback
runs, so a callback sees a consistent engine and user code can never leave it half-advanced.
A callback that raises ends only its own request (finish reason ``"error"``, the exception
kept: :meth:`Engine.error`); the other callbacks of the step still run, the other requests
go on unchanged, and ``step()`` then raises :class:`EngineCallbackError` (the step's outputs
attached, the callback's exception as ``__cause__``): an error in user code is never
swallowed. A forward that raises (out of memory, an interrupt) commits nothing: the step's
requests are preempted (recompute) and the exception propagates, so the next step is sound.

Sampling uses :func:`~.sampling.sample_next_token` (greedy, temperature, top-k/top-p,
repetition penalty; a seeded request owns its generator, so its tokens are those of
``llmopt.generate`` with the same seed). The sampled tokens of a step are read to the host
once (the scheduler needs them: stop tokens decide who leaves).

CUDA graphs: on CUDA a decode-only step is padded to a batch-size bucket
(:func:`~.cuda_graphs.batch_bucket`; padding rows have length 0 and slot -1) and replayed
from a :class:`~.cuda_graphs.DecodeGraphs` graph per bucket; steps with prefills run
eagerly. The block table has a fixed width (``max_model_len / block_size``) so a bucket's
shapes never change.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .cuda_graphs import DEFAULT_BATCH_BUCKETS, DecodeGraphs, batch_bucket
from .generate import _as_token_tuple, _generation_attr, _hf_model
from .paged_cache import KVCacheExhaustedError, PagedAttentionMetadata, PagedCacheLayout, PagedKVCache
from .paged_model import PagedModelRunner
from .sampling import SamplingParams, make_generator, mark_seen, sample_next_token

__all__ = ["Engine", "EngineCallbackError", "EngineStats", "StepOutput"]

POLICIES = ("fcfs", "decode_first")
_WAITING, _RUNNING, _FINISHED, _FORKING = "waiting", "running", "finished", "forking"

StreamCallback = Callable[[int, int, bool], None]


@dataclasses.dataclass
class StepOutput:
    """What one step produced for one request: its new tokens (usually one; none for a
    prompt chunk that did not complete the prompt is not reported) and whether it ended
    (``finish_reason``: ``"stop"`` = a stop token, ``"length"`` = ``max_new_tokens`` or
    ``max_model_len`` reached, ``"abort"``, ``"error"`` = its streaming callback raised
    ``error`` on this token)."""

    request_id: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: Exception | None = None


class EngineCallbackError(RuntimeError):
    """Streaming callbacks raised during :meth:`Engine.step`.

    Raised after the step is complete: its state is committed, every callback of the step
    has run, and each request whose callback raised is finished with reason ``"error"``
    (its exception: :meth:`Engine.error`); the other requests go on at the next step.
    ``errors``: request id -> the exception its callback raised (``request_id`` and
    ``__cause__``: the first of them); ``outputs``: the step's :class:`StepOutput` list,
    which ``step()`` would have returned.
    """

    def __init__(self, errors: dict[int, Exception], outputs: list[StepOutput]):
        self.errors = dict(errors)
        self.outputs = outputs
        self.request_id, first = next(iter(self.errors.items()))
        others = [rid for rid in self.errors if rid != self.request_id]
        also = f" (the callbacks of requests {others} raised too)" if others else ""
        super().__init__(
            f"the streaming callback of request {self.request_id} raised {type(first).__name__}: {first}{also}; "
            "the request was ended with finish_reason='error' (engine.error(request_id) holds the exception) "
            "and the other requests go on: fix the callback, or catch EngineCallbackError around step() "
            "(its .outputs are this step's outputs)"
        )


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
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stops: frozenset
    callback: StreamCallback | None
    arrival: int
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    state: str = _WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    children: list[_Request] = dataclasses.field(default_factory=list)
    parent: _Request | None = None
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


class Engine:
    """Continuous-batching generation over a paged KV cache (see the module docstring).

    ``model``: a Hugging Face causal LM whose attention goes through transformers'
    ``AttentionInterface`` (Llama, Mistral, Qwen2, GPT-2, Gemma, ...), eager or
    ``torch.compile``d (e.g. ``backend="llmopt"``). The engine switches it to the
    ``"llmopt_paged"`` attention; :meth:`close` switches it back.

    ``max_num_seqs``: requests running at once. ``block_size``: tokens per KV block.
    ``max_model_len``: prompt + generated tokens of one request (default: the model's
    ``max_position_embeddings``, at most 4096). ``num_blocks``: blocks in the pool (default:
    enough for ``max_num_seqs`` requests of ``max_model_len`` tokens, which never preempts;
    pass fewer to share memory). ``max_num_batched_tokens``: token budget of one step
    (default ``max(2048, max_num_seqs)``); longer prompts are prefilled in chunks.
    ``policy``: ``"fcfs"`` or ``"decode_first"``. ``cuda_graphs``: ``None`` = on CUDA.
    ``default_max_new_tokens``: for requests whose sampling params set none.
    ``speculative``: ``llmopt.Speculative(ngram=n, k=k)`` or ``Speculative(draft=model, k=k)`` (a
    separate model): decode-only steps feed each request's last token plus ``k`` proposals and
    keep the accepted ones (same tokens under greedy, same distribution under sampling;
    :meth:`speculative_stats` per request). A draft runs per request over its own batch-1
    ``StaticKVCache`` (not batched across requests).

    Callbacks (``add_request(..., callback=fn)``) run after the step has committed. One that
    raises an ``Exception`` ends its own request (finish reason ``"error"``, the exception
    in :meth:`error`), the step's other callbacks still run, and :meth:`step` then raises
    :class:`EngineCallbackError` carrying the step's outputs, with the exception as
    ``__cause__``. Catch it to keep serving: the engine is sound and the other requests go
    on exactly as if the failing one had been aborted. A callback may add, abort or fork
    requests, but not call :meth:`step`.
    """

    def __init__(
        self,
        model,
        *,
        max_num_seqs: int = 16,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        policy: str = "fcfs",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cuda_graphs: bool | None = None,
        default_max_new_tokens: int = 16,
        speculative=None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not valid; use one of {', '.join(POLICIES)}")
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                            ("default_max_new_tokens", default_max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.speculative = speculative  # checked before the model is switched to paged attention
        self._proposer = None
        self._spec_counts: dict[int, list[int]] = {}  # request id -> [proposed, accepted, steps]
        if speculative is not None:
            from .speculative import NgramProposer, Speculative

            if not isinstance(speculative, Speculative):
                raise TypeError(f"speculative must be a llmopt.Speculative, got {type(speculative).__name__}")
            if speculative.layer_skip is not None or _shares_weights(speculative.draft, model):
                raise NotImplementedError(
                    "Engine speculation takes Speculative(ngram=n, k=k) or a separate draft model; a draft "
                    "sharing the target's layers (layer_skip, the target itself) would run the paged attention "
                    "the engine installs in them: use llmopt.generate for it"
                )
            if speculative.draft is not None:
                vocab = [getattr(getattr(m, "config", None), "vocab_size", None)
                         for m in (_hf_model(speculative.draft), _hf_model(model))]
                if None not in vocab and vocab[0] != vocab[1]:
                    raise ValueError(
                        f"the draft model's vocab_size is {vocab[0]}, the target's {vocab[1]}; a draft must "
                        "share the target's tokenizer (same vocabulary)"
                    )
            self._proposer = (NgramProposer(speculative.ngram, speculative.ngram_min, speculative.k)
                              if speculative.ngram is not None else speculative.draft)
        self._draft_states: dict = {}  # request id -> its DraftModelProposer (draft model only)
        self.runner = PagedModelRunner(model)
        hf = self.runner.hf_model
        param = next((p for p in hf.parameters() if p.is_floating_point()), None)
        self.device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
        self.dtype = dtype or (param.dtype if param is not None else torch.float32)
        if max_model_len is None:
            positions = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
            max_model_len = min(int(positions), 4096) if positions else 2048
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.policy = policy
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens or max(2048, max_num_seqs)
        self.default_max_new_tokens = default_max_new_tokens
        blocks_per_seq = -(-max_model_len // block_size)
        if num_blocks is None:
            num_blocks = max_num_seqs * blocks_per_seq
        layout = PagedCacheLayout.from_config(hf.config, num_blocks, block_size, self.dtype, self.device)
        self.cache = PagedKVCache(layout, max_blocks_per_seq=blocks_per_seq)
        self.vocab_size = int(getattr(hf.config, "vocab_size", 0) or 0)
        self.eos_token_ids = _as_token_tuple(_generation_attr(hf, "eos_token_id"))
        self.stats = EngineStats()

        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._running: list[_Request] = []  # by arrival
        self._waiting: list[_Request] = []  # by arrival
        # cuda_graphs=True on CPU runs the bucketed decode path without graphs (DecodeGraphs' fallback)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._buckets = tuple(b for b in DEFAULT_BATCH_BUCKETS if b < max_num_seqs) + (
            batch_bucket(max_num_seqs) if max_num_seqs <= DEFAULT_BATCH_BUCKETS[-1] else max_num_seqs,
        )
        self._graphs = DecodeGraphs(self._decode_step, enabled=use_graphs)
        self._preempted_now: set[int] = set()
        self._materialized: list[_Request] = []  # forks materialized in the current step
        self._in_callbacks = False
        self._qsl_by_bucket: dict[int, torch.Tensor] = {}
        self.runner.check(self._probe_metadata())

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt_ids, sampling_params: SamplingParams | None = None, *,
                    callback: StreamCallback | None = None) -> int:
        """Queue a request; returns its id. ``prompt_ids``: token ids (list or 1-D tensor).
        ``callback(request_id, token_id, finished)`` is called for each generated token."""
        prompt = self._check_prompt(prompt_ids)
        params = self._check_params(sampling_params)
        max_new = params.max_new_tokens or self.default_max_new_tokens
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room under max_model_len={self.max_model_len}; "
                f"pass max_model_len > {len(prompt)} or shorten the prompt"
            )
        self._check_fits(len(prompt), max_new)
        req = _Request(
            id=next(self._ids), prompt=prompt, params=params, max_new_tokens=max_new,
            stops=frozenset(self._stop_tokens(params)), callback=callback, arrival=next(self._arrivals),
            generator=make_generator(params.seed, self.device),
        )
        self._requests[req.id] = req
        self._insert_waiting(req)
        return req.id

    def fork(self, request_id: int, sampling_params: SamplingParams | None = None, *,
             callback: StreamCallback | None = None) -> int:
        """A new request that continues ``request_id`` from its next sampling point (for a
        request that has not started: from its prompt), sharing its KV blocks
        (copy-on-write) and sampling with ``sampling_params`` (default: the parent's).
        Its output starts with the parent's output at that point. Returns its id.

        A family (a request and its forks) never holds more than ``max_num_seqs`` seats, and
        forking a running request needs a free seat now (``ValueError`` otherwise)."""
        parent = self._requests.get(request_id)
        if parent is None or parent.state in (_FINISHED, _FORKING):
            state = "unknown" if parent is None else parent.state
            raise ValueError(f"cannot fork request {request_id} ({state}); fork a waiting or running request")
        family = 2 + len(parent.children)  # parent, its pending forks, this one: admitted together
        if family > self.max_num_seqs:
            raise ValueError(
                f"cannot fork request {request_id}: with its forks it would need {family} sequences at once, "
                f"more than max_num_seqs={self.max_num_seqs}; pass a larger max_num_seqs"
            )
        if parent.state == _RUNNING and self._seats_used() + 1 > self.max_num_seqs:
            # a running family was admitted with the seats it had then: a new fork needs a free one
            raise ValueError(
                f"cannot fork request {request_id} now: {self._seats_used()} sequences are running or forking, "
                f"max_num_seqs={self.max_num_seqs}; fork a request before it starts (a family is admitted "
                "together), after another request finishes, or pass a larger max_num_seqs"
            )
        params = self._check_params(sampling_params) if sampling_params is not None else parent.params
        max_new = params.max_new_tokens or self.default_max_new_tokens
        self._check_fits(len(parent.prompt), max_new)
        child = _Request(
            id=next(self._ids), prompt=parent.prompt, params=params, max_new_tokens=max_new,
            stops=frozenset(self._stop_tokens(params)), callback=callback, arrival=-1, state=_FORKING,
            generator=make_generator(params.seed, self.device), parent=parent,
        )
        self._requests[child.id] = child
        parent.children.append(child)
        return child.id

    def abort(self, request_id: int) -> None:
        """Stop a request now and free its blocks (its pending forks are aborted too)."""
        req = self._requests.get(request_id)
        if req is None or req.state == _FINISHED:
            return
        self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    def output(self, request_id: int) -> list[int]:
        """Tokens generated so far by a request."""
        return list(self._requests[request_id].output)

    def is_finished(self, request_id: int) -> bool:
        return self._requests[request_id].state == _FINISHED

    def error(self, request_id: int) -> Exception | None:
        """The exception a request's streaming callback raised (its finish reason is then
        ``"error"``), or None."""
        return self._requests[request_id].error

    def release(self, request_id: int) -> None:
        """Forget a finished request (its output is no longer kept)."""
        req = self._requests[request_id]
        if req.state != _FINISHED:
            raise ValueError(f"request {request_id} is {req.state}; abort it first")
        del self._requests[request_id]

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One iteration: schedule, run one forward over every scheduled token, sample,
        retire finished requests, then call the streaming callbacks. Returns what each
        request produced in this step.

        Raises :class:`EngineCallbackError` after a complete step when callbacks raised (see
        the class docstring). If the forward itself raises, the step's requests are preempted
        (recomputed at a later step) and the exception propagates; the engine stays usable.
        """
        if self._in_callbacks:
            raise RuntimeError(
                "Engine.step() was called from a streaming callback; callbacks run inside step(), "
                "so step from your own loop instead (a callback may add, abort or fork requests)"
            )
        if self._proposer is not None:
            outputs = self._speculative_step()
            if outputs is not None:
                return outputs
        scheduled = self._schedule()
        if not scheduled:
            return []
        ids, positions, rows, samplers = [], [], [], []
        seq_ids, counts, slots = [], [], []
        for req, n, req_slots in scheduled:
            start = req.num_computed
            ids.extend(req.token_range(start, start + n))
            positions.extend(range(start, start + n))
            seq_ids.append(req.id)
            counts.append(n)
            slots.append(req_slots)
            if start + n == req.num_tokens:
                rows.append(len(ids) - 1)
                samplers.append(req)
        decode_only = all(n == 1 for n in counts)
        decode_tokens = sum(1 for r, n, _ in scheduled if n == 1 and r.output)
        self._sample_kv_stats()

        start_time = time.perf_counter()
        try:
            with torch.no_grad():
                logits = self._forward(ids, positions, seq_ids, counts, slots, rows, decode_only)
                for req, n, _ in scheduled:
                    req.num_computed += n
                outputs = self._sample_and_commit(samplers, logits)
        except BaseException:
            # nothing of this step may survive half-done: its requests (and the forks that
            # materialized) give their blocks back and are recomputed later, as when preempted
            for req in [r for r, _, _ in scheduled] + self._materialized:
                if req.state == _RUNNING:
                    self._preempt(req)
            raise
        finally:
            self._materialized = []
        self.stats.forward_seconds += time.perf_counter() - start_time
        self.stats.steps += 1
        self.stats.decode_only_steps += int(decode_only)
        self.stats.decode_tokens += decode_tokens
        self.stats.prefill_tokens += sum(counts) - decode_tokens
        self._run_callbacks(outputs)
        return outputs

    def generate(self, prompts: Iterable, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Add every prompt, step until they are all finished; returns each one's generated
        tokens (without the prompt), in order. Requests added earlier also progress."""
        prompts = list(prompts)
        params = self._params_per_prompt(prompts, sampling_params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while any(self._requests[i].state != _FINISHED for i in ids):
            self.step()
        outputs = [self.output(i) for i in ids]
        for i in ids:
            self.release(i)
        return outputs

    def stream(self, prompts: Iterable, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[tuple[int, StepOutput]]:
        """Add every prompt and yield ``(prompt_index, StepOutput)`` for each token as soon as
        the step that produced it ends, until all are finished (tokens of one request arrive
        in order; requests interleave). Leaving the loop early aborts the requests not
        finished yet; finished ones are released as ``generate`` does."""
        prompts = list(prompts)
        params = self._params_per_prompt(prompts, sampling_params)
        index = {self.add_request(p, sp): i for i, (p, sp) in enumerate(zip(prompts, params))}
        pending = set(index)
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            for rid in index:
                if rid in self._requests:
                    self.abort(rid)  # a no-op for the finished ones
                    self.release(rid)

    def _params_per_prompt(self, prompts: list, sampling_params) -> list:
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return params

    def close(self) -> None:
        """Abort what is left and give the model back its previous attention implementation."""
        for req in list(self._running) + list(self._waiting):
            self._finish(req, "abort")
        self.runner.restore()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling ---------------------------------------------------------------------
    def _seats_used(self) -> int:
        return len(self._running) + sum(len(r.children) for r in self._running)

    def _schedule(self) -> list[tuple[_Request, int, list[int]]]:
        budget = self.max_num_batched_tokens
        if self.policy == "fcfs":
            order = sorted(self._running + self._waiting, key=lambda r: r.arrival)
        else:
            order = list(self._running) + list(self._waiting)
        scheduled: list[tuple[_Request, int, list[int]]] = []
        done: set[int] = set()
        self._preempted_now = set()
        admitting = True
        for req in order:
            if budget <= 0:
                break
            if req.id in self._preempted_now:
                continue  # preempted by an older request in this step: not re-admitted before the next
            if req.state == _RUNNING:
                n = min(req.num_pending, budget)
                if not self._make_room(req, n, done):
                    continue  # req itself was preempted
                scheduled.append((req, n, self.cache.append_slots(req.id, n)))
            elif req.state == _WAITING and admitting:
                n = min(req.num_pending, budget)
                seats = 1 + len(req.children)
                needed = self.cache.blocks_for(n)
                if self.policy == "decode_first" and self._running:
                    # the request's whole future and the running requests' growth must fit
                    # (with nothing running, the oldest request is admitted as under FCFS, so a
                    # family of forks larger than the pool still progresses, by preempting its own)
                    needed = self._future_blocks(req) + self._decode_reserve()
                if self._seats_used() + seats > self.max_num_seqs or needed > self.cache.num_free_blocks:
                    admitting = False  # no later request jumps ahead of this one
                    continue
                self._waiting.remove(req)
                req.state = _RUNNING
                bisect.insort(self._running, req, key=lambda r: r.arrival)
                self.cache.add_sequence(req.id)
                scheduled.append((req, n, self.cache.append_slots(req.id, n)))
            else:
                continue
            done.add(req.id)
            budget -= n
        return scheduled

    def _make_room(self, req: _Request, n: int, done: set[int]) -> bool:
        """Free blocks for ``n`` more tokens of running ``req`` by preempting the newest
        running requests not yet scheduled in this step; False if ``req`` itself went."""
        while self.cache.blocks_needed(req.id, n) > self.cache.num_free_blocks:
            victims = [r for r in self._running if r.id not in done]
            victim = max(victims, key=lambda r: r.arrival)  # req itself is among them
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _final_len(self, req: _Request) -> int:
        """Most tokens the request will hold in the cache (its last sampled token is never written)."""
        return min(len(req.prompt) + req.max_new_tokens, self.max_model_len) - 1

    def _future_blocks(self, req: _Request) -> int:
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
        for r in self._running:
            table = self.cache.block_table(r.id)
            total += max(0, self.cache.blocks_for(self._final_len(r)) - len(table))
            partial = self.cache.seq_len(r.id) % self.block_size
            total += int(bool(partial) and self.cache.allocator.ref_count(table[-1]) > 1)
        return total

    def _preempt(self, req: _Request) -> None:
        self.cache.free(req.id)
        req.num_computed = 0
        req.state = _WAITING
        self._running.remove(req)
        self._insert_waiting(req)
        self._preempted_now.add(req.id)
        self.stats.preemptions += 1

    def _insert_waiting(self, req: _Request) -> None:
        bisect.insort(self._waiting, req, key=lambda r: r.arrival)

    # -- forward ------------------------------------------------------------------------
    def _forward(self, ids, positions, seq_ids, counts, slots, rows, decode_only) -> torch.Tensor:
        dev = self.device
        if decode_only and self._graphs.enabled and len(seq_ids) <= self._buckets[-1]:
            bucket = batch_bucket(len(seq_ids), self._buckets)
            meta = self.cache.plan(seq_ids, counts, slots, pad_to=bucket)
            pad = bucket - len(ids)
            ids_t = torch.tensor(ids + [0] * pad, dtype=torch.int64).to(dev, non_blocking=True)
            pos_t = torch.tensor(positions + [0] * pad, dtype=torch.int64).to(dev, non_blocking=True)
            logits = self._graphs(ids_t, pos_t, meta.block_tables, meta.seq_lens, meta.slot_mapping)
            # the graph's output buffer is overwritten by the next replay: sampled below, now
            return logits[: len(ids)]
        meta = self.cache.plan(seq_ids, counts, slots)
        ids_t = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        rows_t = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
        return self.runner(ids_t, pos_t, meta, rows_t)

    def _decode_step(self, ids, positions, block_tables, seq_lens, slot_mapping) -> torch.Tensor:
        """The decode forward a CUDA graph records: every per-step value is one of the inputs."""
        bucket = ids.shape[0]
        qsl = self._qsl_by_bucket.get(bucket)
        if qsl is None:
            qsl = self._qsl_by_bucket[bucket] = torch.arange(bucket + 1, dtype=torch.int32, device=ids.device)
        meta = PagedAttentionMetadata(block_tables, seq_lens, qsl, slot_mapping, True,
                                      self.cache.k_pools, self.cache.v_pools)
        return self.runner(ids, positions, meta, None)

    def _probe_metadata(self) -> PagedAttentionMetadata:
        dev = self.device
        return PagedAttentionMetadata(
            block_tables=torch.zeros((1, self.cache.max_blocks_per_seq), dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(1, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=dev),
            decode_only=True, k_pools=self.cache.k_pools, v_pools=self.cache.v_pools,
        )

    # -- sampling -----------------------------------------------------------------------
    def _sample_and_commit(self, samplers: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        """Sample the step's tokens and commit them: append, mark stop/length finishes (their
        blocks go back to the pool). Runs no user code: callbacks come after, in
        :meth:`_run_callbacks`."""
        # forks materialize at their parent's sampling point: same logits row, own sampler
        entries: list[tuple[_Request, int]] = []
        for row, req in enumerate(samplers):
            entries.append((req, row))
            for child in req.children:
                self._materialize_fork(req, child)
                entries.append((child, row))
            req.children = []
        tokens = self._sample(entries, logits)
        outputs = []
        for (req, _), token in zip(entries, tokens):
            reason = self._commit_token(req, token)
            outputs.append(StepOutput(req.id, [token], reason is not None, reason))
        return outputs

    def _commit_token(self, req: _Request, token: int) -> str | None:
        """Append one sampled token to ``req``; finish it (blocks back to the pool) on a stop
        token or its length limit. Returns the finish reason, or None. Runs no user code."""
        req.output.append(token)
        if req.seen is not None:
            mark_seen(req.seen, torch.tensor([token], device=self.device))
        self.stats.generated_tokens += 1
        reason = None
        if token in req.stops:
            reason = "stop"
        elif len(req.output) >= req.max_new_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
        return reason

    def _run_callbacks(self, outputs: list[StepOutput]) -> None:
        """Call each output's streaming callback, after the step has committed. A callback
        that raises ends its own request (reason ``"error"``); every other callback still
        runs; then :class:`EngineCallbackError` is raised. ``KeyboardInterrupt`` and other
        non-``Exception`` errors propagate at once (the step is committed all the same)."""
        errors: dict[int, Exception] = {}
        self._in_callbacks = True
        try:
            for out in outputs:
                req = self._requests.get(out.request_id)
                if req is None or req.callback is None:
                    continue  # released by an earlier callback of this step
                try:
                    last = len(out.token_ids) - 1  # a speculative step commits several tokens
                    for i, token in enumerate(out.token_ids):
                        req.callback(req.id, token, out.finished and i == last)
                except Exception as exc:  # user code: recorded on its request, re-raised below
                    errors[req.id] = exc
                    req.error = exc
                    if req.state == _FINISHED:
                        req.finish_reason = "error"
                    else:
                        self._finish(req, "error")
                    out.finished, out.finish_reason, out.error = True, "error", exc
        finally:
            self._in_callbacks = False
        if errors:
            raise EngineCallbackError(errors, outputs) from next(iter(errors.values()))

    def _materialize_fork(self, parent: _Request, child: _Request) -> None:
        self.cache.fork(parent.id, child.id)
        child.output = list(parent.output)
        child.num_computed = parent.num_computed
        child.arrival = next(self._arrivals)
        child.state = _RUNNING
        child.parent = None
        self._materialized.append(child)
        if parent.seen is not None and child.params.repetition_penalty != 1.0:
            child.seen = parent.seen.clone()
        bisect.insort(self._running, child, key=lambda r: r.arrival)

    def _sample(self, entries: list[tuple[_Request, int]], logits: torch.Tensor) -> list[int]:
        """One token per entry. Requests without their own generator or penalty state and
        with equal params are sampled together; the result is read to the host once."""
        picked: list[torch.Tensor | None] = [None] * len(entries)
        groups: dict[SamplingParams, list[int]] = {}
        for i, (req, row) in enumerate(entries):
            if req.params.repetition_penalty != 1.0 and req.seen is None:
                req.seen = torch.zeros((1, logits.shape[-1]), dtype=torch.bool, device=logits.device)
                mark_seen(req.seen, torch.tensor([req.prompt + req.output], device=logits.device))
            if req.generator is None and req.seen is None:
                groups.setdefault(req.params, []).append(i)
            else:
                picked[i] = sample_next_token(logits[row:row + 1], req.params, req.generator, req.seen)
        for params, members in groups.items():
            rows = torch.tensor([entries[i][1] for i in members], device=logits.device)
            tokens = sample_next_token(logits.index_select(0, rows), params)
            for j, i in enumerate(members):
                picked[i] = tokens[j:j + 1]
        if not picked:
            return []
        return torch.cat(picked).tolist()

    # -- speculative decoding -------------------------------------------------------------
    def speculative_stats(self, request_id: int):
        """Acceptance of one request's proposals so far (a one-row
        :class:`~.speculative.SpeculativeStats`); zeros without ``speculative=``."""
        from .speculative import SpeculativeStats

        proposed, accepted, steps = self._spec_counts.get(request_id, (0, 0, 0))
        return SpeculativeStats(proposed=[proposed], accepted=[accepted], steps=[steps])

    def _speculative_step(self) -> list[StepOutput] | None:
        """A decode step where each running request also feeds ``k`` proposals and keeps the
        accepted ones (llmopt/runtime/speculative.py); ``None`` when this step needs the normal
        path (requests to admit, prompt chunks, forks, a penalty, too few free blocks)."""
        from .speculative import verify_proposals

        reqs = list(self._running)
        if self._waiting or not reqs or any(
                r.num_pending != 1 or not r.output or r.children or r.params.repetition_penalty != 1.0 for r in reqs):
            return None
        # Proposals past max_new_tokens / max_model_len would be dropped: do not feed them.
        counts = [1 + max(0, min(self.speculative.k, r.max_new_tokens - len(r.output) - 1,
                                 self.max_model_len - r.num_tokens)) for r in reqs]
        if sum(counts) > self.max_num_batched_tokens or sum(
                self.cache.blocks_needed(r.id, n) for r, n in zip(reqs, counts)) > self.cache.num_free_blocks:
            return None
        self.stats.steps += 1
        for rid in [rid for rid in self._draft_states if rid not in {r.id for r in reqs}]:
            del self._draft_states[rid]  # finished, aborted or preempted: rebuilt when it decodes again
        ids, positions, seq_ids, slots, windows, draft_probs = [], [], [], [], [], []
        for req, n in zip(reqs, counts):
            start = req.num_computed
            guess, q = self._propose(req, n - 1)
            window = [req.output[-1]] + guess
            windows.append(window)
            draft_probs.append(q)
            ids.extend(window)
            positions.extend(range(start, start + n))
            seq_ids.append(req.id)
            slots.append(self.cache.append_slots(req.id, n))
        self.stats.decode_tokens += len(reqs)
        self._sample_kv_stats()
        start_time = time.perf_counter()
        with torch.no_grad():
            logits = self._forward(ids, positions, seq_ids, counts, slots, list(range(len(ids))), False)
            verdicts, offset = [], 0
            one = torch.ones(1, dtype=torch.int64, device=logits.device)
            for req, window, q in zip(reqs, windows, draft_probs):
                n = len(window)
                window_t = torch.tensor([window], dtype=torch.int64, device=logits.device)
                verdicts.append(torch.cat(verify_proposals(
                    window_t, one, logits[None, offset:offset + n], req.params, q, req.generator)))
                offset += n
            verdicts = torch.stack(verdicts).tolist()  # one host read for the step
        self.stats.forward_seconds += time.perf_counter() - start_time
        outputs = []
        for req, window, (correct, new) in zip(reqs, windows, verdicts):
            counts_r = self._spec_counts.setdefault(req.id, [0, 0, 0])
            counts_r[0] += len(window) - 1
            counts_r[1] += correct - 1
            counts_r[2] += 1
            state = self._draft_states.get(req.id)
            if state is not None:
                state.commit(req.num_tokens)  # every known token is in the draft's cache now
            # Rollback: the cache keeps the fed token and the accepted proposals only.
            req.num_computed += correct
            self.cache.truncate(req.id, req.num_computed)
            tokens, reason = [], None
            for token in window[1:correct] + [new]:
                tokens.append(token)
                reason = self._commit_token(req, token)
                if reason is not None:
                    break
            outputs.append(StepOutput(req.id, tokens, reason is not None, reason))
        # as in step(): the step is committed before any user code runs
        self._run_callbacks(outputs)
        return outputs

    def _propose(self, req: _Request, count: int) -> tuple[list[int], torch.Tensor | None]:
        """``count`` proposals for ``req`` and, for a sampling draft model, their draft
        distributions aligned with the window (``[1, 1 + count, V]``, row 0 unused)."""
        from .speculative import NgramProposer

        tokens = req.prompt + req.output
        if isinstance(self._proposer, NgramProposer):
            return self._proposer.propose_row(tokens)[:count], None
        k = self.speculative.k
        state = self._draft_states.get(req.id)
        if state is None or len(tokens) - state.committed > k + 1:
            # A draft cache per request (batch 1), filled with all but the last token; rebuilt
            # when normal steps advanced the request further than one catch-up can feed.
            state = self._draft_states[req.id] = self._new_draft_state(tokens)
        guess, probs = state.propose([tokens], [True], req.params, req.generator, self.vocab_size)
        q = None
        if probs is not None:
            q = torch.cat([torch.zeros_like(probs[:, :1]), probs[:, :count]], 1)
        return guess[0, :count].tolist(), q

    def _new_draft_state(self, tokens: list[int]):
        from .generate import _forward_parameters
        from .speculative import DraftModelProposer
        from .static_cache import StaticKVCache

        draft = self._proposer
        hf_draft = _hf_model(draft)
        config = getattr(hf_draft, "config", None) or getattr(draft, "config", None)
        weight = next((p for p in (hf_draft or draft).parameters() if p.is_floating_point()), None)
        k = self.speculative.k
        cache = StaticKVCache(config, batch_size=1, max_seq_len=self.max_model_len + 2 * k + 2,
                              dtype=weight.dtype if weight is not None else self.dtype, device=self.device)
        known = torch.tensor([tokens[:-1]], dtype=torch.int64, device=self.device)
        state = DraftModelProposer(draft, cache, k, _forward_parameters(hf_draft), torch.ones_like(known),
                                   torch.tensor([self.max_model_len - 1], device=self.device))
        with torch.no_grad():
            state.prefill(known, torch.arange(known.shape[1], device=self.device)[None])
        return state

    # -- bookkeeping --------------------------------------------------------------------
    def _finish(self, req: _Request, reason: str) -> None:
        if req.state == _RUNNING:
            self.cache.free(req.id)
            self._running.remove(req)
        elif req.state == _WAITING:
            self._waiting.remove(req)
        elif req.state == _FORKING and req.parent is not None and req in req.parent.children:
            req.parent.children.remove(req)
        req.state = _FINISHED
        req.finish_reason = reason
        req.seen = None
        self.stats.finished_requests += 1
        for child in list(req.children):
            self._finish(child, "abort")
        req.children = []

    def _sample_kv_stats(self) -> None:
        self.stats.kv_utilization_sum += self.cache.utilization()
        self.stats.kv_utilization_samples += 1
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, self.cache.allocator.num_used)

    def _stop_tokens(self, params: SamplingParams) -> tuple[int, ...]:
        return params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            if prompt_ids.dim() != 1 or prompt_ids.is_floating_point():
                raise ValueError(f"prompt_ids must be a 1-D integer tensor or a list of ints, got {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token")
        if self.vocab_size and (min(prompt) < 0 or max(prompt) >= self.vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size}), got [{min(prompt)}, {max(prompt)}]")
        return prompt

    def _check_params(self, params) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if isinstance(params, dict):
            return SamplingParams(**params)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, a dict or None, got {type(params).__name__}")
        return params

    def _check_fits(self, prompt_len: int, max_new: int) -> None:
        # the last sampled token is never written, hence - 1
        longest = min(prompt_len + max_new, self.max_model_len) - 1
        needed = self.cache.blocks_for(longest)
        total = self.cache.allocator.num_blocks
        if needed > total:
            raise KVCacheExhaustedError(
                needed, self.cache.num_free_blocks, total,
                f" for a request of up to {longest} cached tokens ({self.block_size} per block) even alone",
            )

    def __repr__(self) -> str:
        return (
            f"Engine(policy={self.policy!r}, max_num_seqs={self.max_num_seqs}, running={len(self._running)}, "
            f"waiting={len(self._waiting)}, {self.cache!r})"
        )


def _shares_weights(draft, model) -> bool:
    """Whether ``draft`` holds any tensor of ``model`` (the same model, a layer-skip view)."""
    if not isinstance(draft, torch.nn.Module) or not isinstance(model, torch.nn.Module):
        return False
    target = {p.data_ptr() for p in model.parameters()}
    return any(p.data_ptr() in target for p in draft.parameters())
