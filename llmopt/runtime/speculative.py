"""Speculative decoding for ``llmopt.generate``: propose k tokens cheaply, verify them in one forward.

Decoding one token per forward leaves a bandwidth-bound device idle; a *proposer* guesses the
next ``k`` tokens and the target model scores all of them in one forward over its KV cache
(a prefill of ``k + 1`` queries at an offset into the cache). Proposers:

- :class:`DraftModelProposer`: a smaller causal LM sharing the tokenizer, with its own
  :class:`~.static_cache.StaticKVCache` (eager or ``torch.compile``d, llmopt included);
- :class:`NgramProposer`: prompt lookup, the continuation of the latest earlier occurrence of
  the last ``n`` tokens (``n`` from ``ngram`` down to ``ngram_min``) in the prompt and output;
- layer-skip self-speculation: :func:`layer_skip_draft` makes the target's first ``L`` layers
  plus its final norm and head a draft model (weights shared, not copied).

Acceptance (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al. 2023,
https://arxiv.org/abs/2302.01318): proposal ``x`` drawn from the proposer's ``q`` is accepted
with probability ``min(1, p(x) / q(x))``; at the first rejection the token is drawn from
``norm(max(0, p - q))``; if all are accepted a bonus token is drawn from the target's ``p``
after the last one. The output then has exactly the target's distribution (``p`` and ``q``
are the temperature / top-k / top-p processed distributions). An n-gram proposal is a point
mass (``q(x) = 1``). Greedy: a proposal is accepted iff it is the target's argmax, so the
tokens are exactly those of non-speculative greedy decoding.

Static shapes, ragged rows. A ``StaticKVCache`` has one slot counter for the batch, while each
row accepts its own number of tokens. Per row, the tokens known but not yet in the target's
cache are *pending* (``1 <= L_b <= k + 1``: at least the last sampled one). A verify step
feeds ``[B, k + 1]`` tokens at slots ``[C, C + k + 1)``: each row's pending tokens, then its
first ``k + 1 - L_b`` proposals. Row ``b`` ends the step with ``r_b`` correct tokens in those
slots (pending + accepted) and one new token (correction or bonus); the batch commits
``n = min_b r_b`` slots, and the rollback of the rest is setting the counter to ``C + n`` (the
stale slots are overwritten by the next step and hidden by causality until then). A row
that accepted more than ``n`` keeps the surplus as pending tokens, re-fed (and re-verified
for free: they are already known) next step. Every step therefore has the same shapes: a
compiled target traces the verify forward once, whatever the acceptance.

The draft model does the same with its own counter ``D``: a catch-up forward of ``[B, k + 1]``
feeds each row's tokens not yet in its cache (``M_b <= k + 1``, padded at the end, the
padding masked out through the attention mask), its logits at each row's last real token
give the first proposal, and ``k - 1`` one-token forwards give the rest.

Capacity: the target writes up to ``prompt + max_new_tokens + k - 1`` slots, so
``generate`` reserves that (and sizes a cache it builds as ``prompt + max_new_tokens + k``).

One host synchronisation per verify step reads the accepted counts (the proposer and the
bookkeeping need them); the verify and draft forwards are not replayed from CUDA graphs yet.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .distributed import compiled_tensor_parallel
from .hf_model import floating_parameter, forward_parameter_names, text_config, unwrap_hf_model
from .sampling import SamplingParams, top_k_filter, top_p_filter

__all__ = [
    "DraftModelProposer",
    "NgramProposer",
    "Speculative",
    "SpeculativeStats",
    "layer_skip_draft",
    "processed_probs",
    "verify_proposals",
]


@dataclass
class SpeculativeStats:
    """Per-row counts of one speculative run (filled in by ``generate``).

    ``proposed[b]`` / ``accepted[b]``: proposals verified / accepted for row ``b``;
    ``steps[b]``: verify steps in which row ``b`` was still generating.
    """

    proposed: list[int]
    accepted: list[int]
    steps: list[int]

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed over all rows (0 when nothing was proposed)."""
        total = sum(self.proposed)
        return sum(self.accepted) / total if total else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        """Accepted proposals per row and verify step (each step also yields one more token)."""
        total = sum(self.steps)
        return sum(self.accepted) / total if total else 0.0


@dataclass
class Speculative:
    """How ``llmopt.generate`` speculates: one proposer and the number ``k`` of proposals.

    ``Speculative(draft=small_model, k=4)``, ``Speculative(ngram=3, k=4)`` or
    ``Speculative(layer_skip=2, k=4)`` (the target's first 2 layers as the draft). After a
    ``generate`` call, ``.stats`` holds that run's :class:`SpeculativeStats`.
    """

    k: int = 4
    draft: object = None
    ngram: int | None = None
    ngram_min: int = 1
    layer_skip: int | None = None
    stats: SpeculativeStats | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"Speculative.k={k!r} is not valid: the number of proposals per step is an int >= 1")
        chosen = [name for name in ("draft", "ngram", "layer_skip") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"Speculative needs exactly one proposer, got {chosen or 'none'}: pass draft=<model>, "
                "ngram=<n> or layer_skip=<num layers>"
            )
        for name in ("ngram", "layer_skip"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Speculative.{name}={value!r} is not valid: use an int >= 1")
        m = self.ngram_min
        if isinstance(m, bool) or not isinstance(m, int) or m < 1 or (self.ngram is not None and m > self.ngram):
            raise ValueError(f"Speculative.ngram_min={m!r} is not valid: use an int in [1, ngram]")


# -- distributions and the acceptance rule -------------------------------------------------
def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample_next_token`` draws from: softmax of the temperature / top-k /
    top-p processed logits (fp32, any leading shape). Not for greedy params."""
    shape = logits.shape
    scores = logits.float().reshape(-1, shape[-1]) / params.temperature
    if params.filters_top_k:
        scores = top_k_filter(scores, params.top_k)
    if params.filters_top_p:
        scores = top_p_filter(scores, params.top_p)
    return scores.softmax(-1).reshape(shape)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One sample per row of ``probs`` (``[..., V]``) by the exponential race (see sampling.py)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(-1)


def verify_proposals(
    window: torch.Tensor,
    pending: torch.Tensor,
    logits: torch.Tensor,
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the acceptance rule to one verify step; device tensors in, device tensors out.

    ``window [B, W]``: each row's ``pending[b]`` known tokens, then its proposals;
    ``logits [B, W, V]``: the target's logits at each window position (position ``j``
    predicts token ``j + 1``); ``draft_probs [B, W, V]``: the proposer's distribution of the
    token at each window position (only read at proposal positions; ``None``: point masses,
    as for n-gram proposals). Returns ``correct [B]``, the window tokens that are right
    (pending + accepted, ``>= pending``), and ``new [B]``, the token after them.
    """
    batch, width = window.shape
    cols = torch.arange(width, device=window.device)
    is_proposal = cols[None, 1:] >= pending[:, None]  # [B, W-1]: positions 1..W-1
    proposals = window[:, 1:]
    if params.greedy:
        best = logits.float().argmax(-1)  # [B, W]
        ok = proposals == best[:, :-1]
        ok = ok | ~is_proposal
        correct = 1 + ok.long().cumprod(-1).sum(-1)
        new = best.gather(1, (correct - 1)[:, None])[:, 0]
        return correct, new
    p = processed_probs(logits, params)  # [B, W, V]
    p_x = p[:, :-1].gather(-1, proposals[..., None])[..., 0]  # target prob of each proposal
    if draft_probs is None:
        q = torch.nn.functional.one_hot(proposals, p.shape[-1]).to(p.dtype)
    else:
        q = draft_probs[:, 1:].to(p.dtype)
    q_x = q.gather(-1, proposals[..., None])[..., 0]
    u = torch.rand(p_x.shape, generator=generator, device=p_x.device)
    # u < p/q written as u * q < p: no division by a zero q (a proposal q never draws has q=0).
    ok = (u * q_x < p_x) | ~is_proposal
    correct = 1 + ok.long().cumprod(-1).sum(-1)
    last = (correct - 1)[:, None, None].expand(batch, 1, p.shape[-1])
    p_at = p.gather(1, last)[:, 0]  # target distribution of the new token
    # q of the rejected proposal (a zero row past the last one: the all-accepted case; W = 1 works too)
    rejected_q = torch.cat([q, p.new_zeros(batch, 1, p.shape[-1])], 1).gather(1, last)[:, 0]
    residual = (p_at - rejected_q).clamp_min(0)
    # All accepted (bonus): draw from p. Rejected: from norm(max(0, p - q)); it sums to > 0
    # whenever a rejection can happen (p == q accepts surely), the fallback only guards rounding.
    all_accepted = (correct == width)[:, None]
    mass = residual.sum(-1, keepdim=True)
    target = torch.where(all_accepted | (mass <= 0), p_at, residual / mass.clamp_min(1e-30))
    return correct, _draw(target, generator)


# -- proposers -----------------------------------------------------------------------------
class NgramProposer:
    """Prompt lookup: the continuation of the latest earlier match of the last n tokens.

    Tries ``n = ngram`` down to ``ngram_min``; with no match (or a continuation shorter than
    ``k``) the last token is repeated, a guess like any other: verification keeps it exact.
    """

    def __init__(self, ngram: int, ngram_min: int, k: int):
        self.ngram, self.ngram_min, self.k = ngram, ngram_min, k

    def propose_row(self, tokens: list[int]) -> list[int]:
        k = self.k
        for n in range(min(self.ngram, len(tokens) - 1), self.ngram_min - 1, -1):
            tail = tokens[-n:]
            # Latest earlier start of the same n tokens (not the tail itself).
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + k]
                    return follow + [follow[-1]] * (k - len(follow))
        return [tokens[-1]] * k

    def propose(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([self.propose_row(r) for r in rows], dtype=torch.int64)


class DraftModelProposer:
    """A draft causal LM with its own static KV cache, run ``k`` times per step (see module doc)."""

    def __init__(self, draft, cache, k: int, forward_parameters: set[str], attention_mask: torch.Tensor,
                 last_position: torch.Tensor):
        self.draft, self.cache, self.k = draft, cache, k
        self.last_position = last_position  # [B]: positions past it only feed tokens nobody reads
        batch, prompt_len = attention_mask.shape
        device = attention_mask.device
        self.mask = torch.ones((batch, cache.max_seq_len), dtype=torch.int64, device=device)
        self.mask[:, :prompt_len] = attention_mask
        self.left_padding = (attention_mask.cumsum(-1) == 0).sum(-1)
        self.wants_cache_position = "cache_position" in forward_parameters
        self.committed = 0  # D: slots of the draft cache holding the right tokens for every row

    def _forward(self, ids: torch.Tensor, start: int, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.wants_cache_position:
            kwargs["cache_position"] = torch.arange(start, start + ids.shape[1], device=ids.device)
        # The host counter would count the rewound slots again; capacity is checked in propose().
        with self.cache.uncounted_writes():
            out = self.draft(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        self._forward(input_ids, 0, positions)
        self.committed = input_ids.shape[1]

    def propose(self, rows: list[list[int]], active: list[bool], params: SamplingParams, generator, vocab: int):
        """``rows[b]``: row b's padded tokens so far. Returns proposals ``[B, k]`` and their
        draft distributions ``[B, k, V]`` (``None`` under greedy)."""
        k, start = self.k, self.committed
        width = k + 1
        device = self.mask.device
        if start + width + k - 1 > self.cache.max_seq_len:  # pragma: no cover - sized by generate
            raise RuntimeError(f"draft cache too small: {self.cache.max_seq_len} slots, {start + width + k - 1} needed")
        ids, counts = [], []
        for row, live in zip(rows, active):
            new = row[start:start + width] if live else []
            counts.append(max(len(new), 1))
            ids.append((new or [row[-1]]) + [0] * (width - max(len(new), 1)))
        ids = torch.tensor(ids, dtype=torch.int64, device=device)
        counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
        cols = torch.arange(width, device=device)
        self.mask[:, start:] = 1
        self.mask[:, start:start + width] = (cols[None, :] < counts_t[:, None]).long()
        positions = (start + cols)[None, :] - self.left_padding[:, None]
        # Padding slots are masked out: give them the last real position (never out of range).
        positions = torch.minimum(positions, (start + counts_t - 1 - self.left_padding)[:, None])
        self.cache.layers[0].cumulative_length.fill_(start)
        logits = self._forward(ids, start, positions.clamp(0, None))
        if logits.shape[-1] != vocab:
            raise ValueError(
                f"the draft model's vocabulary has {logits.shape[-1]} tokens, the target's {vocab}; "
                "a draft must share the target's tokenizer"
            )
        logits = logits.gather(1, (counts_t - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        position = start + counts_t - 1 - self.left_padding
        tokens, probs = [], []
        for i in range(k):
            if params.greedy:
                token = logits.float().argmax(-1)
            else:
                q = processed_probs(logits, params)
                token = _draw(q, generator)
                probs.append(q)
            tokens.append(token)
            if i + 1 < k:
                position = torch.minimum(position + 1, self.last_position)
                logits = self._forward(token[:, None], start + width + i, position[:, None])[:, -1]
        return torch.stack(tokens, 1), (torch.stack(probs, 1) if probs else None)

    def commit(self, committed: int) -> None:
        self.committed = committed


def layer_skip_draft(model, num_layers: int):
    """The target's first ``num_layers`` decoder layers, final norm and head as a draft model.

    Self-speculation (Zhang et al. 2023, "Draft & Verify", https://arxiv.org/abs/2309.08168,
    and LayerSkip, Elhoushi et al. 2024): no second checkpoint. The returned module shares
    every weight with ``model`` (nothing is copied) and has its own config saying
    ``num_hidden_layers=num_layers``; compile it like any model.
    """
    hf = unwrap_hf_model(model)
    if hf is None:
        raise TypeError(f"layer_skip needs a Hugging Face causal LM, got {type(model).__name__}")
    base_name = getattr(hf, "base_model_prefix", "model")
    base = getattr(hf, base_name, None)
    attr = next((a for a in ("layers", "h") if isinstance(getattr(base, a, None), torch.nn.ModuleList)), None)
    if attr is None:
        raise NotImplementedError(
            f"layer_skip: cannot find the decoder layers of {type(hf).__name__} (looked for "
            f"{base_name}.layers and {base_name}.h); pass draft=<model> instead"
        )
    layers = getattr(base, attr)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < len(layers):
        raise ValueError(
            f"layer_skip={num_layers!r} must be an int in [1, {len(layers) - 1}] "
            f"(the target has {len(layers)} layers)"
        )
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]

    def shallow(module):
        twin = copy.copy(module)
        twin._modules = dict(module._modules)
        twin._parameters = dict(module._parameters)
        twin._buffers = dict(module._buffers)
        return twin

    draft, draft_base = shallow(hf), shallow(base)
    setattr(draft_base, attr, torch.nn.ModuleList(list(layers)[:num_layers]))
    draft_base.config = config
    draft._modules[base_name] = draft_base
    draft.config = config
    return draft


# -- the loop ------------------------------------------------------------------------------
@dataclass
class _RowState:
    tokens: list[int]  # padded prompt, then generated tokens
    generated: int = 0
    done: bool = False  # produced a stop token or max_new_tokens


def run_speculative(
    model,
    hf_model,
    speculative: Speculative,
    cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    max_new_tokens: int,
    stops: tuple[int, ...],
    pad_id: int,
    forward_parameters: set[str],
    streamer=None,
    bar=None,
) -> torch.Tensor:
    """The speculative loop behind ``generate(..., speculative=...)`` (arguments resolved there)."""
    from .sampling import make_generator, sample_next_token
    from .static_cache import KVCacheFullError, StaticKVCache

    if params.repetition_penalty != 1.0:
        raise ValueError(
            "repetition_penalty is not supported with speculative decoding (the penalty of each "
            "proposed position depends on the proposals before it); use plain decoding for it"
        )
    k = speculative.k
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    needed = prompt_len + max_new_tokens + k - 1
    if needed > cache.max_seq_len:
        raise KVCacheFullError(cache.max_seq_len, needed)
    target_vocab = _vocab_size(hf_model)

    proposer: NgramProposer | DraftModelProposer
    if speculative.ngram is not None:
        proposer = NgramProposer(speculative.ngram, speculative.ngram_min, k)
    else:
        draft = speculative.draft if speculative.draft is not None else layer_skip_draft(model, speculative.layer_skip)
        hf_draft = unwrap_hf_model(draft)
        draft_vocab = _vocab_size(hf_draft)
        if draft_vocab is not None and target_vocab is not None and draft_vocab != target_vocab:
            raise ValueError(
                f"the draft model's vocab_size is {draft_vocab}, the target's {target_vocab}; a draft "
                "must share the target's tokenizer (same vocabulary)"
            )
        config = getattr(hf_draft, "config", None) or getattr(draft, "config", None)
        if config is None:
            raise ValueError("the draft model has no Hugging Face config to size its KV cache from")
        weight = floating_parameter(hf_draft or draft)
        # The draft writes at most k + 1 slots past the target's reservation (module doc). Its
        # size follows the target cache's, not the request: a compiled draft is not re-traced.
        draft_cache = StaticKVCache(config, batch_size=batch, max_seq_len=cache.max_seq_len + k + 1,
                                    dtype=weight.dtype if weight is not None else cache.dtype, device=device,
                                    tensor_parallel=compiled_tensor_parallel(draft))
        proposer = DraftModelProposer(draft, draft_cache, k, forward_parameter_names(hf_draft), attention_mask,
                                      prompt_len - (attention_mask.cumsum(-1) == 0).sum(-1) + max_new_tokens - 2)

    full_mask = torch.ones((batch, cache.max_seq_len), dtype=torch.int64, device=device)
    full_mask[:, :prompt_len] = attention_mask
    left_padding = (attention_mask.cumsum(-1) == 0).sum(-1)
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    # The last position whose logits matter: the one predicting token max_new_tokens. Window
    # slots past it (proposals beyond the request) are clamped to it, so no position ever goes
    # past what plain decoding uses (learned position tables end at max_position_embeddings).
    last_position = prompt_len - left_padding + max_new_tokens - 2
    cache.set_left_padding(attention_mask)
    wants_cache_position = "cache_position" in forward_parameters
    generator = make_generator(params.seed, device)

    def forward(ids: torch.Tensor, start: int, pos: torch.Tensor, **extra) -> torch.Tensor:
        if wants_cache_position:
            extra["cache_position"] = torch.arange(start, start + ids.shape[1], device=device)
        out = model(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, **extra)
        return out.logits if hasattr(out, "logits") else out[0]

    rows = [_RowState(tokens=r) for r in input_ids.tolist()]
    pads = left_padding.tolist()
    stats = SpeculativeStats(proposed=[0] * batch, accepted=[0] * batch, steps=[0] * batch)
    speculative.stats = stats
    emitted = 0

    def append(row: _RowState, new_tokens: list[int]) -> None:
        for token in new_tokens:
            row.tokens.append(token)
            row.generated += 1
            if token in stops:
                row.done = True
                return
            if row.generated >= max_new_tokens:
                row.done = True
                return

    def stream() -> None:
        # Token j of every row is streamed once all rows have it (or have finished).
        nonlocal emitted
        ready = min((r.generated for r in rows if not r.done), default=max(r.generated for r in rows))
        while emitted < ready:
            column = [r.tokens[prompt_len + emitted] if emitted < r.generated else pad_id for r in rows]
            if streamer is not None:
                streamer(emitted, torch.tensor(column, dtype=torch.int64, device=device))
            if bar is not None:
                bar.update()
            emitted += 1

    committed = 0
    with torch.no_grad(), cache.uncounted_writes():
        try:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
            logits = forward(input_ids, 0, positions, **extra)[:, -1]
            committed = prompt_len
            if target_vocab is None:
                target_vocab = logits.shape[-1]
            first = sample_next_token(logits, params, generator).tolist()
            for row, token in zip(rows, first):
                append(row, [token])
            if isinstance(proposer, DraftModelProposer):
                proposer.prefill(input_ids, positions)
            stream()
            width = k + 1
            cols = torch.arange(width, device=device)
            while not all(r.done for r in rows):
                active = [not r.done for r in rows]
                draft_probs = None
                if isinstance(proposer, NgramProposer):
                    proposals = proposer.propose(
                        [r.tokens[lp:] for r, lp in zip(rows, pads)]).tolist()
                    draft_probs_rows = None
                else:
                    proposed, draft_probs_rows = proposer.propose(
                        [r.tokens for r in rows], active, params, generator, target_vocab)
                    proposals = proposed.tolist()
                window, pending = [], []
                for row, live, guess in zip(rows, active, proposals):
                    known = row.tokens[committed:] if live else [pad_id]
                    pending.append(len(known))
                    window.append((known + guess)[:width])
                window_t = torch.tensor(window, dtype=torch.int64, device=device)
                pending_t = torch.tensor(pending, dtype=torch.int64, device=device)
                if draft_probs_rows is not None:
                    # Align the draft distributions with the window: proposal i sits at pending + i.
                    index = (cols[None, :] - pending_t[:, None]).clamp(0, k - 1)
                    draft_probs = draft_probs_rows.gather(
                        1, index[..., None].expand(-1, -1, draft_probs_rows.shape[-1]))
                pos = torch.minimum((committed + cols)[None, :] - left_padding[:, None], last_position[:, None])
                cache.layers[0].cumulative_length.fill_(committed)
                logits = forward(window_t, committed, pos)
                correct, new = verify_proposals(window_t, pending_t, logits, params, draft_probs, generator)
                correct, new = correct.tolist(), new.tolist()
                pre_known = [committed + n for n in pending]
                for b, (row, live) in enumerate(zip(rows, active)):
                    if not live:
                        continue
                    accepted = correct[b] - pending[b]
                    stats.steps[b] += 1
                    stats.proposed[b] += width - pending[b]
                    stats.accepted[b] += accepted
                    append(row, window[b][pending[b]:correct[b]] + [new[b]])
                still = [b for b in range(batch) if not rows[b].done]
                if still:
                    committed += min(correct[b] for b in still)
                    if isinstance(proposer, DraftModelProposer):
                        proposer.commit(min(pre_known[b] for b in still))
                stream()
        finally:
            cache.layers[0].cumulative_length.fill_(committed)
            cache.set_num_tokens(committed)
    stream()
    generated = max(r.generated for r in rows)
    out = torch.full((batch, prompt_len + generated), pad_id, dtype=torch.int64)
    for b, row in enumerate(rows):
        out[b, : len(row.tokens)] = torch.tensor(row.tokens[: prompt_len + generated])
    return out.to(device)


def _vocab_size(hf_model) -> int | None:
    return getattr(text_config(hf_model), "vocab_size", None)
