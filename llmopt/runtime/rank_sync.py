"""What the Engine's ranks agree on under tensor parallelism: the schedule and the sampled tokens.

Under ``options={"tensor_parallel": ...}`` every rank runs its own :class:`~.engine.Engine`
(the same requests, added in the same order) and the sharded graph all-reduces activations
across ranks, so every rank must run the *same* step: the same sequences, token counts,
cache slots and token ids. The scheduler is deterministic host code, so equal inputs give
equal decisions; :class:`RankSync` checks it instead of trusting it, and removes the one
source of legitimate divergence, sampling:

- :meth:`RankSync.check_schedule`: an 8-byte digest of the step (``StepBatch``: sequence
  ids, counts, slots, positions, token ids, sampled rows) is all-gathered, one tiny
  collective per step, and a rank whose digest differs from rank 0's raises
  :class:`ScheduleDivergedError` on every rank (never a silent mix of two batches);
- :meth:`RankSync.broadcast_tokens`: rank 0's sampled tokens replace every rank's, so
  unseeded sampling (each rank's own generator) still gives one sequence on all ranks.
  A speculative step (``Engine(speculative=...)``) broadcasts rank 0's proposals before the
  forward and rank 0's verdicts (accepted count, next token) after it: each rank's draft
  runs replicated, but only rank 0's proposals are fed, so a sampling draft with unseeded
  generators cannot feed the ranks different windows.

The collectives are host-side ``torch.distributed`` calls on the compile's process group
(CPU tensors on gloo, the engine's device on NCCL), outside the compiled graph.
"""
from __future__ import annotations

import hashlib

import torch

from .distributed import collectives_guarded, process_group_of, resolve_tensor_parallel

__all__ = ["RankSync", "ScheduleDivergedError"]


class ScheduleDivergedError(RuntimeError):
    """The ranks of a tensor-parallel Engine scheduled different steps."""


class RankSync:
    """The host-side agreement of a tensor-parallel Engine's ranks (see module doc)."""

    def __init__(self, tensor_parallel, device: torch.device):
        import torch.distributed as dist

        self._dist = dist
        self.tp = resolve_tensor_parallel(tensor_parallel)
        self.group = process_group_of(tensor_parallel)
        self.device = device if self.tp.backend == "nccl" else torch.device("cpu")
        self.steps = 0

    @classmethod
    def for_option(cls, value, device: torch.device) -> RankSync | None:
        """The sync for the compile option ``tensor_parallel=value`` over several ranks, else None."""
        if value is None or resolve_tensor_parallel(value).world_size == 1:
            return None
        return cls(value, device)

    def check_schedule(self, batch) -> None:
        """All-gather the step's digest; raise :class:`ScheduleDivergedError` if ranks differ."""
        if batch is None:
            fields = ("idle",)
        else:
            fields = (batch.decode_only, batch.seq_ids, batch.counts, batch.slots, batch.positions, batch.ids,
                      batch.rows)
        self.check_fields(fields)

    def check_fields(self, fields: tuple) -> None:
        """:meth:`check_schedule` of a step described by ``fields`` (a speculative step checks
        its feed counts and slots before rank 0's proposals are broadcast: equal sizes)."""
        self.steps += 1
        digest = int.from_bytes(hashlib.blake2b(repr(fields).encode(), digest_size=8).digest(), "little", signed=True)
        mine = torch.tensor([digest], dtype=torch.int64, device=self.device)
        every = torch.empty(self.tp.world_size, dtype=torch.int64, device=self.device)
        with collectives_guarded(self.tp):  # a dead rank: CollectiveFailedError, not a transport error
            self._dist.all_gather_into_tensor(every, mine, group=self.group)
        every = every.tolist()
        differ = [r for r, d in enumerate(every) if d != every[0]]
        if differ:
            raise ScheduleDivergedError(
                f"llmopt tensor parallelism: at engine step {self.steps}, rank(s) {differ} scheduled a different "
                f"step than rank 0 (this is rank {self.tp.rank}): every rank must add the same requests with the "
                "same sampling params in the same order, and abort/fork them at the same steps"
            )

    def broadcast_tokens(self, tokens: list[int]) -> list[int]:
        """Rank 0's sampled tokens, on every rank."""
        if not tokens:
            return tokens
        t = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        with collectives_guarded(self.tp):
            self._dist.broadcast(t, src=self._dist.get_global_rank(self.group, 0), group=self.group)
        return t.tolist()
