"""The Engine's model runner: one forward per step over the paged cache, and its sampling.

:class:`ModelRunner` turns a step chosen by the :class:`~.scheduler.Scheduler` (a
:class:`~.scheduler.StepBatch`: packed token ids, positions, slots) into logits and tokens:

- per-step metadata: the step's :class:`~.paged_cache.PagedAttentionMetadata` (block
  tables, lengths, slot mapping and, for a decode-only step, the decode plan) is planned
  once per step (:meth:`PagedKVCache.plan`) and read by every layer;
- padding and CUDA graphs: on CUDA a decode-only step is padded to a batch-size bucket
  (:func:`~.cuda_graphs.batch_bucket`; padding rows have length 0 and slot -1) and replayed
  from a :class:`~.cuda_graphs.DecodeGraphs` graph per bucket; steps with prefills run
  eagerly. The block table has a fixed width (``max_model_len / block_size``) so a bucket's
  shapes never change;
- the forward itself, through :class:`~.paged_model.PagedModelRunner` (the model switched
  to the ``"llmopt_paged"`` attention);
- sampling (:meth:`ModelRunner.sample`): :func:`~.sampling.sample_next_token` per request
  (greedy, temperature, top-k/top-p, repetition penalty; a seeded request owns its
  generator, so its tokens are those of ``llmopt.generate`` with the same seed); requests
  with equal params and no state of their own are sampled together, and the step's tokens
  are read to the host once (the scheduler needs them: stop tokens decide who leaves).
"""
from __future__ import annotations

import torch

from .cuda_graphs import DEFAULT_BATCH_BUCKETS, DecodeGraphs, batch_bucket
from .paged_cache import PagedAttentionMetadata, PagedKVCache
from .paged_model import PagedModelRunner
from .sampling import SamplingParams, mark_seen, sample_next_token
from .scheduler import Request, StepBatch

__all__ = ["ModelRunner"]


class ModelRunner:
    """Runs the steps of one model over one paged cache (see the module docstring).

    ``model``: the :class:`PagedModelRunner` of the model (already switched to the paged
    attention). ``max_num_seqs`` sizes the CUDA-graph buckets; ``cuda_graphs=True`` on CPU
    runs the bucketed decode path without graphs (DecodeGraphs' fallback). On creation it
    checks that every layer of the model reads the paged cache.
    """

    def __init__(self, model: PagedModelRunner, cache: PagedKVCache, *, device: torch.device,
                 max_num_seqs: int, cuda_graphs: bool):
        self.model = model
        self.cache = cache
        self.device = device
        self.buckets = tuple(b for b in DEFAULT_BATCH_BUCKETS if b < max_num_seqs) + (
            batch_bucket(max_num_seqs) if max_num_seqs <= DEFAULT_BATCH_BUCKETS[-1] else max_num_seqs,
        )
        self.graphs = DecodeGraphs(self._decode_step, enabled=cuda_graphs)
        self._qsl_by_bucket: dict[int, torch.Tensor] = {}
        model.check(self._probe_metadata())

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits of the batch's ``rows`` (of every token for a decode-only step) ``[R, V]``."""
        dev = self.device
        ids, positions = batch.ids, batch.positions
        if batch.decode_only and self.graphs.enabled and len(batch.seq_ids) <= self.buckets[-1]:
            bucket = batch_bucket(len(batch.seq_ids), self.buckets)
            meta = self.cache.plan(batch.seq_ids, batch.counts, batch.slots, pad_to=bucket)
            pad = bucket - len(ids)
            ids_t = torch.tensor(ids + [0] * pad, dtype=torch.int64).to(dev, non_blocking=True)
            pos_t = torch.tensor(positions + [0] * pad, dtype=torch.int64).to(dev, non_blocking=True)
            logits = self.graphs(ids_t, pos_t, meta.block_tables, meta.seq_lens, meta.slot_mapping)
            # the graph's output buffer is overwritten by the next replay: sampled below, now
            return logits[: len(ids)]
        meta = self.cache.plan(batch.seq_ids, batch.counts, batch.slots)
        ids_t = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        rows_t = torch.tensor(batch.rows, dtype=torch.int64).to(dev, non_blocking=True)
        return self.model(ids_t, pos_t, meta, rows_t)

    def sample(self, entries: list[tuple[Request, int]], logits: torch.Tensor) -> list[int]:
        """One token per ``(request, logits row)``. Requests without their own generator or
        penalty state and with equal params are sampled together; one host read."""
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

    def mark_seen(self, req: Request, token: int) -> None:
        """Record a committed token in the request's repetition-penalty state."""
        if req.seen is not None:
            mark_seen(req.seen, torch.tensor([token], device=self.device))

    def restore(self) -> None:
        """Give the model back its previous attention implementation."""
        self.model.restore()

    def _decode_step(self, ids, positions, block_tables, seq_lens, slot_mapping) -> torch.Tensor:
        """The decode forward a CUDA graph records: every per-step value is one of the inputs."""
        bucket = ids.shape[0]
        qsl = self._qsl_by_bucket.get(bucket)
        if qsl is None:
            qsl = self._qsl_by_bucket[bucket] = torch.arange(bucket + 1, dtype=torch.int32, device=ids.device)
        meta = PagedAttentionMetadata(block_tables, seq_lens, qsl, slot_mapping, True,
                                      self.cache.k_pools, self.cache.v_pools,
                                      rank_heads=self.cache.layout.rank_heads)
        return self.model(ids, positions, meta, None)

    def _probe_metadata(self) -> PagedAttentionMetadata:
        dev = self.device
        k_pools, v_pools = self.cache.k_pools, self.cache.v_pools
        if self.cache.layout.rank_heads is not None:
            # the check runs the eager (unsharded) model, which computes all K/V heads: one
            # scratch block of all heads per layer (the padding token writes nothing)
            lay = self.cache.layout
            shape = (1, lay.rank_heads[2], lay.block_size, lay.head_dim)
            k_pools = [torch.zeros(shape, dtype=lay.dtype, device=dev) for _ in range(lay.num_layers)]
            v_pools = [torch.zeros(shape, dtype=lay.dtype, device=dev) for _ in range(lay.num_layers)]
        return PagedAttentionMetadata(
            block_tables=torch.zeros((1, self.cache.max_blocks_per_seq), dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(1, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=dev),
            decode_only=True, k_pools=k_pools, v_pools=v_pools,
        )
