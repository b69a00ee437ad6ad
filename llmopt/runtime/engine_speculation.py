"""Speculative decoding inside :class:`~.engine.Engine`: proposals per request, verification.

``Engine(model, speculative=Speculative(ngram=n, k=k))`` or ``Speculative(draft=model, k=k)``:
a decode-only step feeds each running request's last token plus up to ``k`` proposals and
keeps the accepted ones (same tokens under greedy, same distribution under sampling; the
acceptance rule is :func:`~.speculative.verify_proposals`, as in ``llmopt.generate``).

:class:`EngineSpeculation` owns what is per request: the proposer (an
:class:`~.speculative.NgramProposer`, or a draft model run per request over its own batch-1
:class:`~.static_cache.StaticKVCache`, not batched across requests) and the acceptance
counters. The Engine owns the step (the :class:`~.scheduler.Scheduler` chooses the feed
counts, the :class:`~.model_runner.ModelRunner` runs the forward).
"""
from __future__ import annotations

import torch

from .hf_model import floating_parameter, forward_parameter_names, unwrap_hf_model
from .scheduler import Request
from .speculative import DraftModelProposer, NgramProposer, Speculative, SpeculativeStats, verify_proposals

__all__ = ["EngineSpeculation", "check_engine_speculative"]


def check_engine_speculative(speculative, model) -> None:
    """Refuse, before the engine touches the model, what it cannot speculate with: not a
    ``Speculative``, a draft sharing the target's layers (``layer_skip``, the target itself:
    it would run the paged attention the engine installs), a draft vocabulary other than
    the target's."""
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
                 for m in (unwrap_hf_model(speculative.draft), unwrap_hf_model(model))]
        if None not in vocab and vocab[0] != vocab[1]:
            raise ValueError(
                f"the draft model's vocab_size is {vocab[0]}, the target's {vocab[1]}; a draft must "
                "share the target's tokenizer (same vocabulary)"
            )


class EngineSpeculation:
    """Proposals and acceptance counts of the requests of one engine (``speculative``
    checked by :func:`check_engine_speculative`)."""

    def __init__(self, speculative: Speculative, *, max_model_len: int, device: torch.device, dtype: torch.dtype):
        self.speculative = speculative
        self.k = speculative.k
        self.proposer = (NgramProposer(speculative.ngram, speculative.ngram_min, speculative.k)
                         if speculative.ngram is not None else speculative.draft)
        self.max_model_len = max_model_len
        self.device = device
        self.dtype = dtype
        self._counts: dict[int, list[int]] = {}  # request id -> [proposed, accepted, steps]
        self._draft_states: dict[int, DraftModelProposer] = {}  # request id -> its draft (draft model only)

    def stats(self, request_id: int) -> SpeculativeStats:
        proposed, accepted, steps = self._counts.get(request_id, (0, 0, 0))
        return SpeculativeStats(proposed=[proposed], accepted=[accepted], steps=[steps])

    def keep_only(self, request_ids: set[int]) -> None:
        """Drop the draft states of requests not decoding now (finished, aborted or
        preempted: rebuilt when they decode again)."""
        for rid in [rid for rid in self._draft_states if rid not in request_ids]:
            del self._draft_states[rid]

    def propose(self, req: Request, count: int, vocab_size: int) -> tuple[list[int], torch.Tensor | None]:
        """``count`` proposals for ``req`` and, for a sampling draft model, their draft
        distributions aligned with the window (``[1, 1 + count, V]``, row 0 unused)."""
        tokens = req.prompt + req.output
        if isinstance(self.proposer, NgramProposer):
            return self.proposer.propose_row(tokens)[:count], None
        state = self._draft_states.get(req.id)
        if state is None or len(tokens) - state.committed > self.k + 1:
            # A draft cache per request (batch 1), filled with all but the last token; rebuilt
            # when normal steps advanced the request further than one catch-up can feed.
            state = self._draft_states[req.id] = self._new_draft_state(tokens)
        guess, probs = state.propose([tokens], [True], req.params, req.generator, vocab_size)
        q = None
        if probs is not None:
            q = torch.cat([torch.zeros_like(probs[:, :1]), probs[:, :count]], 1)
        return guess[0, :count].tolist(), q

    def verify(self, reqs: list[Request], windows: list[list[int]], draft_probs: list, logits: torch.Tensor
               ) -> list[tuple[int, int]]:
        """Per request, ``(correct, new)``: how many fed tokens are right (the fed token and
        the accepted proposals) and the token drawn after them; one host read for the step."""
        verdicts, offset = [], 0
        one = torch.ones(1, dtype=torch.int64, device=logits.device)
        for req, window, q in zip(reqs, windows, draft_probs):
            n = len(window)
            window_t = torch.tensor([window], dtype=torch.int64, device=logits.device)
            verdicts.append(torch.cat(verify_proposals(
                window_t, one, logits[None, offset:offset + n], req.params, q, req.generator)))
            offset += n
        return [tuple(v) for v in torch.stack(verdicts).tolist()]

    def record(self, req: Request, fed: int, correct: int) -> None:
        """Count one verify step of ``req`` (``fed`` tokens, ``correct`` of them right)."""
        counts = self._counts.setdefault(req.id, [0, 0, 0])
        counts[0] += fed - 1
        counts[1] += correct - 1
        counts[2] += 1
        state = self._draft_states.get(req.id)
        if state is not None:
            state.commit(req.num_tokens)  # every known token is in the draft's cache now

    def _new_draft_state(self, tokens: list[int]) -> DraftModelProposer:
        from .static_cache import StaticKVCache  # needs transformers: imported on first use

        draft = self.proposer
        hf_draft = unwrap_hf_model(draft)
        config = getattr(hf_draft, "config", None) or getattr(draft, "config", None)
        weight = floating_parameter(hf_draft or draft)
        k = self.k
        cache = StaticKVCache(config, batch_size=1, max_seq_len=self.max_model_len + 2 * k + 2,
                              dtype=weight.dtype if weight is not None else self.dtype, device=self.device)
        known = torch.tensor([tokens[:-1]], dtype=torch.int64, device=self.device)
        state = DraftModelProposer(draft, cache, k, forward_parameter_names(hf_draft), torch.ones_like(known),
                                   torch.tensor([self.max_model_len - 1], device=self.device))
        with torch.no_grad():
            state.prefill(known, torch.arange(known.shape[1], device=self.device)[None])
        return state


def _shares_weights(draft, model) -> bool:
    """Whether ``draft`` holds any tensor of ``model`` (the same model, a layer-skip view)."""
    if not isinstance(draft, torch.nn.Module) or not isinstance(model, torch.nn.Module):
        return False
    target = {p.data_ptr() for p in model.parameters()}
    return any(p.data_ptr() in target for p in draft.parameters())
