"""Next-token selection for the decode loop: greedy, temperature, top-k, top-p, repetition penalty.

Everything here runs on the logits' device with tensor ops only: no ``.item()``, no boolean
indexing, no data-dependent shapes. The decode loop can therefore queue step after step
without waiting for the device (a host synchronisation per token costs the GPU's lead over
the Python loop, which is most of the decode time for small batches).

The pipeline, for logits ``[B, V]`` (fp32 math whatever the model dtype), in the order
Hugging Face ``generate`` applies its processors, so that the same parameters mean the same
distribution:

1. repetition penalty over every token already in the sequence (prompt and generated):
   positive logits are divided by ``penalty``, negative ones multiplied (CTRL, Keskar et al.
   2019, https://arxiv.org/abs/1909.05858; HF ``RepetitionPenaltyLogitsProcessor``);
2. ``temperature == 0``: greedy, ``argmax`` of the penalised logits (ties go to the lowest id);
3. otherwise logits / temperature, then top-k (keep the k largest; ties with the k-th are
   kept, as in HF ``TopKLogitsWarper``), then top-p / nucleus (Holtzman et al. 2019,
   https://arxiv.org/abs/1904.09751: drop the least likely tokens whose total probability
   is at most ``1 - top_p``, always keeping the most likely one; HF ``TopPLogitsWarper``);
4. a sample from ``softmax`` by the exponential race: ``argmax(p_i / E_i)`` with
   ``E_i ~ Exp(1)`` i.i.d. picks ``i`` with probability ``p_i`` (the Gumbel-max trick in
   another form; gpt-fast samples the same way). It needs no ``multinomial`` and no sync, and
   draws its noise from a ``torch.Generator`` seeded once per request, so the same seed gives
   the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "make_generator",
    "mark_seen",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    ``temperature == 0`` selects greedy decoding (``top_k`` / ``top_p`` / ``seed`` are then
    unused). ``top_k=None`` or ``0`` and ``top_p=1.0`` disable those filters,
    ``repetition_penalty=1.0`` disables the penalty. ``seed`` seeds a generator owned by one
    ``generate`` call; ``None`` draws from torch's global generator (``torch.manual_seed``).
    ``stop_token_ids`` ends a sequence when one of them is produced (``None``: the model's
    ``eos_token_id``; ``()``: never stop early). ``max_new_tokens`` is used when ``generate``
    is not given one.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value, need: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={value!r} is not valid: {need}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("temperature", t, "use a finite number >= 0 (0 means greedy)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise bad("top_k", k, "use None/0 (disabled) or a positive int")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise bad("top_p", p, "use a number in (0, 1] (1 disables nucleus filtering)")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise bad("repetition_penalty", r, "use a finite number > 0 (1 disables it)")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise bad("seed", s, "use None or an int >= 0")
        m = self.max_new_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise bad("max_new_tokens", m, "use None or an int >= 1")
        stops = self.stop_token_ids
        if stops is not None:
            if isinstance(stops, int):
                stops = (stops,)
            try:
                stops = tuple(stops)
            except TypeError:
                raise bad("stop_token_ids", self.stop_token_ids, "use None or a sequence of ints") from None
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stops):
                raise bad("stop_token_ids", self.stop_token_ids, "token ids are ints >= 0")
            object.__setattr__(self, "stop_token_ids", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters_top_k(self) -> bool:
        return bool(self.top_k)

    @property
    def filters_top_p(self) -> bool:
        return self.top_p < 1.0


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; ``None`` (torch's global one) if no seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Record ``tokens`` ([B] or [B, T]) in the presence mask ``seen`` ([B, V] bool), in place.

    ``valid`` ([B] or [B, T] bool) leaves out entries that are not part of a sequence (left
    padding): they are redirected to a scratch column so the update stays one ``scatter_``.
    """
    if tokens.dim() == 1:
        tokens = tokens[:, None]
        valid = None if valid is None else valid[:, None]
    vocab = seen.shape[-1]
    index = tokens.clamp(0, vocab - 1)
    src = torch.ones_like(index, dtype=torch.bool)
    if valid is not None:
        src = valid.to(torch.bool).expand_as(index)
        # Scattering False over a True would erase a real occurrence of the same token at
        # another position: scatter only True, and send invalid entries to a column they own.
        wide = torch.zeros((seen.shape[0], vocab + 1), dtype=torch.bool, device=seen.device)
        wide.scatter_(1, torch.where(src, index, torch.full_like(index, vocab)), True)
        seen |= wide[:, :vocab]
        return seen
    seen.scatter_(1, index, src)
    return seen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens present in the sequence: ``l / penalty`` if ``l > 0`` else ``l * penalty``."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set to ``-inf`` every logit below the k-th largest of its row (ties with it are kept)."""
    k = min(int(k), logits.shape[-1])
    if k <= 0 or k == logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is <= ``1 - p``.

    The most likely token always survives, so a row is never emptied.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - p)
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose one token per row of ``logits`` ([B, V]); returns int64 ``[B]`` on the same device.

    ``seen`` ([B, V] bool, see :func:`mark_seen`) is required when
    ``params.repetition_penalty != 1``. No host synchronisation happens here.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next_token expects logits [batch, vocab], got shape {tuple(logits.shape)}")
    scores = logits.float()
    if params.repetition_penalty != 1.0:
        if seen is None or seen.shape != scores.shape:
            got = None if seen is None else tuple(seen.shape)
            raise ValueError(
                f"repetition_penalty needs the presence mask `seen` of shape {tuple(scores.shape)} "
                f"(bool [batch, vocab]), got {got}; build it with mark_seen"
            )
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if params.greedy:
        return scores.argmax(dim=-1)
    scores = scores / params.temperature
    if params.filters_top_k:
        scores = top_k_filter(scores, params.top_k)
    if params.filters_top_p:
        scores = top_p_filter(scores, params.top_p)
    probs = scores.softmax(dim=-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A zero draw would turn a filtered token's 0/0 into NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
