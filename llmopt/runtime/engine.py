"""``llmopt.Engine``: continuous batching of many requests over a paged KV cache.

Iteration-level scheduling (ORCA, Yu et al. 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models") over PagedAttention memory (vLLM, Kwon et al. 2023):
at every step the engine picks which requests run, packs their new tokens into one forward
(prompt chunks and one-token decodes together), samples, and lets finished requests leave
at once, freeing their blocks for the next ones. Nobody waits for the slowest member of a
batch, and KV memory follows real lengths.

The Engine is a facade over two parts, each with one reason to change:

- :class:`~.scheduler.Scheduler` (pure bookkeeping, no model): requests, admission under
  seats / token budget / blocks, the ``"fcfs"`` and ``"decode_first"`` policies, preemption
  by recompute, forks sharing blocks, the finish rules. Its module docstring states the rules.
- :class:`~.model_runner.ModelRunner`: the step's metadata (planned once per step), padding
  to CUDA-graph buckets and replay, the forward, sampling.

A step: the scheduler chooses (:meth:`Scheduler.schedule`), the runner runs the forward
and samples, the scheduler commits the tokens (:meth:`Scheduler.commit_token`: append,
stop/length finish, blocks back to the pool), then the streaming callbacks run.

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

Speculative decoding (``speculative=``): :mod:`~.engine_speculation`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence

import torch

from .engine_speculation import EngineSpeculation, check_engine_speculative
from .hf_model import as_token_tuple, floating_parameter, generation_attr
from .model_runner import ModelRunner
from .paged_cache import PagedCacheLayout, PagedKVCache
from .paged_model import PagedModelRunner
from .distributed import compiled_tensor_parallel
from .rank_sync import RankSync
from .sampling import SamplingParams, make_generator
from .scheduler import (FINISHED, POLICIES, EngineStats, Request, Scheduler, StepBatch, StreamCallback,
                        as_sampling_params)

__all__ = ["Engine", "EngineCallbackError", "EngineStats", "StepOutput"]


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
        from ..moe_prepare import prepare_moe_automatically  # lazy: importing llmopt loads no MoE kernels

        prepare_moe_automatically(model)  # per-expert-loop MoE blocks become fusable (proven equal)
        self.speculative = speculative
        if speculative is not None:
            check_engine_speculative(speculative, model)  # before the model is switched to paged attention
        paged_model = PagedModelRunner(model)
        hf = paged_model.hf_model
        param = floating_parameter(hf)
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
        # tensor parallelism (the model compiled with options={"tensor_parallel": ...}): pools of
        # this rank's K/V heads, and the ranks' agreement on each step (.rank_sync)
        tensor_parallel = compiled_tensor_parallel(model)
        layout = PagedCacheLayout.from_config(hf.config, num_blocks, block_size, self.dtype, self.device,
                                              tensor_parallel=tensor_parallel)
        self.cache = PagedKVCache(layout, max_blocks_per_seq=blocks_per_seq)
        self.vocab_size = int(getattr(hf.config, "vocab_size", 0) or 0)
        self.eos_token_ids = as_token_tuple(generation_attr(hf, "eos_token_id"))
        self.stats = EngineStats()
        self.scheduler = Scheduler(
            self.cache, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            max_num_batched_tokens=self.max_num_batched_tokens, policy=policy,
            default_max_new_tokens=default_max_new_tokens, eos_token_ids=self.eos_token_ids, stats=self.stats,
        )
        self._speculation = (EngineSpeculation(speculative, max_model_len=max_model_len, device=self.device,
                                               dtype=self.dtype) if speculative is not None else None)
        self._in_callbacks = False
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.runner = ModelRunner(paged_model, self.cache, device=self.device, max_num_seqs=max_num_seqs,
                                  cuda_graphs=use_graphs)
        # tensor parallelism: ranks check they run the same step and take rank 0's tokens
        self._rank_sync = RankSync.for_option(tensor_parallel, self.device)

    # -- requests -----------------------------------------------------------------------
    def add_request(self, prompt_ids, sampling_params: SamplingParams | None = None, *,
                    callback: StreamCallback | None = None) -> int:
        """Queue a request; returns its id. ``prompt_ids``: token ids (list or 1-D tensor).
        ``callback(request_id, token_id, finished)`` is called for each generated token."""
        prompt = self._check_prompt(prompt_ids)
        req = self.scheduler.add_request(prompt, as_sampling_params(sampling_params), callback)
        req.generator = make_generator(req.params.seed, self.device)
        return req.id

    def fork(self, request_id: int, sampling_params: SamplingParams | None = None, *,
             callback: StreamCallback | None = None) -> int:
        """A new request that continues ``request_id`` from its next sampling point (for a
        request that has not started: from its prompt), sharing its KV blocks
        (copy-on-write) and sampling with ``sampling_params`` (default: the parent's).
        Its output starts with the parent's output at that point. Returns its id.

        A family (a request and its forks) never holds more than ``max_num_seqs`` seats, and
        forking a running request needs a free seat now (``ValueError`` otherwise)."""
        child = self.scheduler.fork(request_id, sampling_params, callback)
        child.generator = make_generator(child.params.seed, self.device)
        return child.id

    def abort(self, request_id: int) -> None:
        """Stop a request now and free its blocks (its pending forks are aborted too)."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def output(self, request_id: int) -> list[int]:
        """Tokens generated so far by a request."""
        return list(self.scheduler.requests[request_id].output)

    def is_finished(self, request_id: int) -> bool:
        return self.scheduler.requests[request_id].state == FINISHED

    def error(self, request_id: int) -> Exception | None:
        """The exception a request's streaming callback raised (its finish reason is then
        ``"error"``), or None."""
        return self.scheduler.requests[request_id].error

    def release(self, request_id: int) -> None:
        """Forget a finished request (its output is no longer kept)."""
        self.scheduler.release(request_id)

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
        if self._speculation is not None:
            outputs = self._speculative_step()
            if outputs is not None:
                return outputs
        batch = self.scheduler.schedule()
        if self._rank_sync is not None:
            self._rank_sync.check_schedule(batch)
        if batch is None:
            return []
        decode_tokens = batch.decode_tokens  # before the commit gives first tokens an output
        self.scheduler.sample_kv_stats()
        start_time = time.perf_counter()
        try:
            with torch.no_grad():
                logits = self.runner.forward(batch)
                for req, n in batch.requests:
                    req.num_computed += n
                outputs = self._sample_and_commit(batch.samplers, logits)
        except BaseException:
            # nothing of this step may survive half-done: its requests (and the forks that
            # materialized) give their blocks back and are recomputed later, as when preempted
            self.scheduler.abandon_step([r for r, _ in batch.requests])
            raise
        finally:
            self.scheduler.materialized = []
        self.stats.forward_seconds += time.perf_counter() - start_time
        self.stats.steps += 1
        self.stats.decode_only_steps += int(batch.decode_only)
        self.stats.decode_tokens += decode_tokens
        self.stats.prefill_tokens += sum(batch.counts) - decode_tokens
        self._run_callbacks(outputs)
        return outputs

    def generate(self, prompts: Iterable, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Add every prompt, step until they are all finished; returns each one's generated
        tokens (without the prompt), in order. Requests added earlier also progress."""
        prompts = list(prompts)
        params = self._params_per_prompt(prompts, sampling_params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while not all(self.is_finished(i) for i in ids):
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
                if rid in self.scheduler.requests:
                    self.abort(rid)  # a no-op for the finished ones
                    self.release(rid)

    def close(self) -> None:
        """Abort what is left and give the model back its previous attention implementation."""
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(req, "abort")
        self.runner.restore()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- a step's commit and callbacks ----------------------------------------------------
    def _sample_and_commit(self, samplers: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        """Sample the step's tokens and commit them: append, mark stop/length finishes (their
        blocks go back to the pool). Runs no user code: callbacks come after, in
        :meth:`_run_callbacks`."""
        # forks materialize at their parent's sampling point: same logits row, own sampler
        entries: list[tuple[Request, int]] = []
        for row, req in enumerate(samplers):
            entries.append((req, row))
            for child in req.children:
                self.scheduler.materialize_fork(req, child)
                entries.append((child, row))
            req.children = []
        tokens = self.runner.sample(entries, logits)
        if self._rank_sync is not None:
            tokens = self._rank_sync.broadcast_tokens(tokens)
        outputs = []
        for (req, _), token in zip(entries, tokens):
            reason = self._commit_token(req, token)
            outputs.append(StepOutput(req.id, [token], reason is not None, reason))
        return outputs

    def _commit_token(self, req: Request, token: int) -> str | None:
        """Append one sampled token to ``req``; finish it (blocks back to the pool) on a stop
        token or its length limit. Returns the finish reason, or None. Runs no user code."""
        self.runner.mark_seen(req, token)
        return self.scheduler.commit_token(req, token)

    def _run_callbacks(self, outputs: list[StepOutput]) -> None:
        """Call each output's streaming callback, after the step has committed. A callback
        that raises ends its own request (reason ``"error"``); every other callback still
        runs; then :class:`EngineCallbackError` is raised. ``KeyboardInterrupt`` and other
        non-``Exception`` errors propagate at once (the step is committed all the same)."""
        errors: dict[int, Exception] = {}
        self._in_callbacks = True
        try:
            for out in outputs:
                req = self.scheduler.requests.get(out.request_id)
                if req is None or req.callback is None:
                    continue  # released by an earlier callback of this step
                try:
                    last = len(out.token_ids) - 1  # a speculative step commits several tokens
                    for i, token in enumerate(out.token_ids):
                        req.callback(req.id, token, out.finished and i == last)
                except Exception as exc:  # user code: recorded on its request, re-raised below
                    errors[req.id] = exc
                    req.error = exc
                    if req.state == FINISHED:
                        req.finish_reason = "error"
                    else:
                        self.scheduler.finish(req, "error")
                    out.finished, out.finish_reason, out.error = True, "error", exc
        finally:
            self._in_callbacks = False
        if errors:
            raise EngineCallbackError(errors, outputs) from next(iter(errors.values()))

    # -- speculative decoding -------------------------------------------------------------
    def speculative_stats(self, request_id: int):
        """Acceptance of one request's proposals so far (a one-row
        :class:`~.speculative.SpeculativeStats`); zeros without ``speculative=``."""
        if self._speculation is None:
            from .speculative import SpeculativeStats

            return SpeculativeStats(proposed=[0], accepted=[0], steps=[0])
        return self._speculation.stats(request_id)

    def _speculative_step(self) -> list[StepOutput] | None:
        """A decode step where each running request also feeds ``k`` proposals and keeps the
        accepted ones (:mod:`~.engine_speculation`); ``None`` when this step needs the
        normal path (:meth:`Scheduler.speculative_batch`)."""
        spec = self._speculation
        feeds = self.scheduler.speculative_batch(spec.k)
        if feeds is None:
            return None
        self.stats.steps += 1
        spec.keep_only({r.id for r, _ in feeds})
        batch = StepBatch(decode_only=False)
        windows, draft_probs = [], []
        for req, n in feeds:
            guess, q = spec.propose(req, n - 1, self.vocab_size)
            windows.append([req.output[-1]] + guess)
            draft_probs.append(q)
        slots = [self.cache.append_slots(req.id, n) for req, n in feeds]
        if self._rank_sync is not None:  # same feeds on every rank, then rank 0's proposals (.rank_sync)
            self._rank_sync.check_fields(("speculative", [(r.id, n) for r, n in feeds], slots))
            flat = self._rank_sync.broadcast_tokens([t for w in windows for t in w])
            windows = [flat[sum(n for _, n in feeds[:i]):][:n] for i, (_, n) in enumerate(feeds)]
        for (req, _), window, req_slots in zip(feeds, windows, slots):
            batch.add(req, window, req_slots)
        batch.rows = list(range(len(batch.ids)))
        reqs = [r for r, _ in feeds]
        self.stats.decode_tokens += len(reqs)
        self.scheduler.sample_kv_stats()
        start_time = time.perf_counter()
        with torch.no_grad():
            logits = self.runner.forward(batch)
            verdicts = spec.verify(reqs, windows, draft_probs, logits)
        if self._rank_sync is not None:  # rank 0's acceptance on every rank
            flat = self._rank_sync.broadcast_tokens([v for pair in verdicts for v in pair])
            verdicts = list(zip(flat[0::2], flat[1::2]))
        self.stats.forward_seconds += time.perf_counter() - start_time
        outputs = []
        for req, window, (correct, new) in zip(reqs, windows, verdicts):
            spec.record(req, len(window), correct)
            # Rollback: the cache keeps the fed token and the accepted proposals only.
            self.scheduler.rollback(req, req.num_computed + correct)
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

    # -- checks ---------------------------------------------------------------------------
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

    def _params_per_prompt(self, prompts: list, sampling_params) -> list:
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return params

    def __repr__(self) -> str:
        return (
            f"Engine(policy={self.policy!r}, max_num_seqs={self.max_num_seqs}, running={len(self.scheduler.running)}, "
            f"waiting={len(self.scheduler.waiting)}, {self.cache!r})"
        )
