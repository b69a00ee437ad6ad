"""Paged KV cache: a pool of fixed-size blocks, a block table per sequence, shared prefixes.

PagedAttention (Kwon et al. 2023, https://arxiv.org/abs/2309.06180): a sequence's keys and
values live in blocks of ``block_size`` tokens taken from one pool per layer as the
sequence grows, and go back to the pool when it finishes. Memory held is the real length
rounded up to a block, not a ``max_seq_len`` reservation per sequence, so many more
sequences fit in the same memory than with a static cache.

Layout, per decoder layer (what :mod:`llmopt.codegen.attention_paged` reads; the reason for
this order is in its docstring)::

    k_pools[layer], v_pools[layer]: [num_blocks, num_kv_heads, block_size, head_dim]

Host-side bookkeeping (Python, changes once per step, never inside the model):

- :class:`BlockAllocator`: which blocks are free, and a reference count per used block;
- per sequence: its block ids in order (the block table row) and its token count.

Sharing (copy-on-write). :meth:`PagedKVCache.fork` gives a new sequence the parent's block
table and increments every block's reference count: the shared prefix is stored once
(parallel sampling, a common system prompt). A full block is never written again, so it
can stay shared; the last, partial block is written by the next token of either
sequence, so the first writer gets a private copy (:meth:`PagedKVCache.append_slots`
copies it, in every layer, before handing out the slot). A block returns to the free list
when its last owner frees it.

Exhaustion. :meth:`PagedKVCache.append_slots` computes every block it needs (growth and
copy-on-write) before touching anything and raises :class:`KVCacheExhaustedError` when the
pool cannot supply them, leaving the cache exactly as it was: never a half-grown table or a
corrupted block. The engine (:mod:`.engine`) avoids the error by checking
:meth:`PagedKVCache.blocks_needed` first and preempting the newest request when needed.

Per-step metadata. :meth:`PagedKVCache.plan` turns one step's schedule into a
:class:`PagedAttentionMetadata` of device tensors (block tables, lengths, slot mapping,
query offsets), built once per step and read by every layer ("plan once, run per layer"),
and, for a decode-only step, the decode kernel's plan and split workspace
(:meth:`PagedAttentionMetadata.plan_decode`), shared by every layer likewise.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import torch

from .. import compat
from .rank_heads import rank_kv_heads
from ..codegen.attention_paged import (
    DEFAULT_BLOCK_SIZE,
    PagedDecodePlan,
    decode_workspace_pitch,
    plan_paged_decode,
)

__all__ = [
    "BlockAllocator",
    "KVCacheExhaustedError",
    "PagedAttentionMetadata",
    "PagedCacheLayout",
    "PagedKVCache",
]


class KVCacheExhaustedError(RuntimeError):
    """The block pool cannot supply the blocks a request needs."""

    def __init__(self, needed: int, free: int, total: int, what: str = ""):
        self.needed, self.free, self.total = needed, free, total
        super().__init__(
            f"KV cache exhausted: {needed} blocks needed{what}, {free} of {total} free; "
            "pass a larger num_blocks, a smaller max_num_seqs, or let the engine preempt requests"
        )


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` block ids.

    ``allocate()`` hands out a free block with reference count 1, ``share(b)`` adds an
    owner, ``free(b)`` removes one and returns the block to the free list when none is
    left. Freed blocks are reused last-in first-out (the most recently freed, likely still
    in cache, first). Freeing a block that is not allocated raises: a double free is a bug
    that would let two sequences write one block.
    """

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        # pop() from the end: block 0 is handed out first
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: list[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheExhaustedError(1, 0, self.num_blocks)
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        if self._refs[block] < 1:
            raise ValueError(f"block {block} is free; only an allocated block can be shared")
        self._refs[block] += 1

    def free(self, block: int) -> None:
        if not 0 <= block < self.num_blocks or self._refs[block] < 1:
            raise ValueError(f"block {block} is not allocated (double free?)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def used_blocks(self) -> list[int]:
        return [b for b, r in enumerate(self._refs) if r > 0]


@dataclasses.dataclass(frozen=True)
class PagedCacheLayout:
    """Shape of a paged cache: per layer, K and V pools
    ``[num_blocks, num_kv_heads, block_size, head_dim]`` of ``dtype`` on ``device``."""

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    head_dim: int
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    # Tensor parallelism: (start, end, all) of the K/V heads this rank's pools hold
    # (num_kv_heads == end - start); None: all heads. See runtime/rank_heads.py.
    rank_heads: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedCacheLayout.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"PagedCacheLayout.dtype must be a floating torch.dtype, got {self.dtype!r}")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def pool_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block over all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * elem

    @classmethod
    def from_config(cls, config, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                    dtype: torch.dtype = torch.float32, device="cpu", *, tensor_parallel=None) -> PagedCacheLayout:
        """The layout for a Hugging Face decoder config (layers, KV heads, head dim);
        ``tensor_parallel=`` (the compile option's value): pools of this rank's K/V heads only."""
        getter = getattr(config, "get_text_config", None)
        cfg = config
        if getter is not None:
            try:
                cfg = getter(decoder=True)
            except TypeError:
                cfg = getter()
        layers = getattr(cfg, "num_hidden_layers", None)
        heads = getattr(cfg, "num_attention_heads", None)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
        if not layers or not kv_heads or not head_dim:
            raise ValueError(
                f"cannot read num_hidden_layers / num_key_value_heads / head_dim from {type(cfg).__name__}; "
                "build PagedCacheLayout(...) explicitly"
            )
        rank_heads = rank_kv_heads(tensor_parallel, int(kv_heads), "the Engine's paged KV cache")
        if rank_heads is not None:
            kv_heads = rank_heads[1] - rank_heads[0]
        return cls(int(layers), num_blocks, int(kv_heads), int(head_dim), block_size, dtype, torch.device(device),
                   rank_heads)


@dataclasses.dataclass
class PagedAttentionMetadata:
    """One step's view of the paged cache, shared by every layer (device tensors).

    For the ``N`` sequences of the step, in schedule order, with ``T`` new tokens packed:

    - ``block_tables [N, max_blocks_per_seq]`` int32: block ids (entries past a sequence's
      last block are 0 and never read);
    - ``seq_lens [N]`` int32: tokens in the cache after this step (prefix + new);
    - ``query_start_loc [N + 1]`` int32: new tokens of sequence n are rows
      ``query_start_loc[n] .. query_start_loc[n+1] - 1`` of the packed batch;
    - ``slot_mapping [T]`` int64: the pool slot (``block * block_size + offset``) of each new
      token, -1 for padding rows;
    - ``decode_only``: every sequence has exactly one new token; attention then runs the
      split-KV decode kernel (q as ``[N, Hq, 1, D]``), otherwise the varlen prefill kernel;
    - ``k_pools``, ``v_pools``: the cache's per-layer pools (the same tensors every step),
      so that a layer needs nothing but this object to append and attend;
    - ``layers_seen``: when a list, each layer appends its index (the engine's one-time
      check that every layer reads the paged cache); ``None`` otherwise;
    - ``decode_plan``: for a decode-only step, the split-KV decode's
      :class:`~llmopt.codegen.attention_paged.PagedDecodePlan` (split count, kernel config,
      split workspace), made once by :meth:`plan_decode` — by the model runner before the
      forward, else by the first layer — and run by every layer: the layers share one
      workspace instead of allocating theirs at each call.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_mapping: torch.Tensor
    decode_only: bool
    k_pools: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)
    v_pools: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)
    layers_seen: list[int] | None = None
    decode_plan: PagedDecodePlan | None = None
    # the layout's rank_heads: the pools hold only these K/V heads (tensor parallelism)
    rank_heads: tuple[int, int, int] | None = None

    def plan_decode(self, num_q_heads: int, head_dim: int, dtype: torch.dtype | None = None) -> PagedDecodePlan:
        """The step's decode plan for ``num_q_heads`` query heads of ``head_dim``: the one
        already made if it fits, else a new one (kept for the next layers). ``dtype``: the
        query's (default: the pools')."""
        plan = self.decode_plan
        if plan is not None and plan.workspace.shape[1] == num_q_heads and plan.head_dim == head_dim:
            return plan
        if not self.k_pools:
            raise ValueError("PagedAttentionMetadata.plan_decode needs the cache's pools (k_pools) to plan a step")
        pool = self.k_pools[0]
        plan = plan_paged_decode(self.num_seqs, num_q_heads, pool.shape[1], head_dim, self.block_tables.shape[1],
                                 pool.shape[2], dtype or pool.dtype, pool.device)
        # a compiled model sees the workspace as a new graph input, static at first sight: its
        # sequence and split dims follow the batch, so say so, or the first decode graph pins
        # the batch size (the workspace's dim 0 equals the query's) and recompiles once more
        compat.maybe_mark_dynamic(plan.workspace, (0, 2))
        self.decode_plan = plan
        return plan

    def decode_workspace(self, q: torch.Tensor) -> torch.Tensor:
        """The split workspace of the step's decode plan for query ``q`` ``[N, Hq, 1, D]``
        (planned here on first use). Only tensor shapes are compared, so that a compiled
        model traces this without guarding on the plan's Python fields."""
        plan = self.decode_plan
        if plan is not None:
            ws = plan.workspace
            pitch = decode_workspace_pitch(q.shape[3])
            if ws.shape[0] == q.shape[0] and ws.shape[1] == q.shape[1] and ws.shape[3] == pitch:
                return ws
        return self.plan_decode(q.shape[1], q.shape[3], q.dtype).workspace

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


class PagedKVCache:
    """Per-layer K/V block pools, a :class:`BlockAllocator` and the block table of each sequence.

    ``PagedKVCache(layout, max_blocks_per_seq=...)`` or
    ``PagedKVCache.from_config(model.config, num_blocks=..., block_size=16, dtype=..., device=...)``.
    Sequence ids are any hashable (the engine uses request ids). The life of a sequence:
    ``add_sequence(id)``, then per step ``append_slots(id, n)`` (blocks for ``n`` new tokens,
    returns their slots), ``fork(id, new_id)`` to share its tokens, ``free(id)`` when it ends.
    """

    def __init__(self, layout: PagedCacheLayout, max_blocks_per_seq: int | None = None):
        self.layout = layout
        self.block_size = layout.block_size
        self.max_blocks_per_seq = max_blocks_per_seq or layout.num_blocks
        if self.max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.k_pools = [torch.zeros(layout.pool_shape, dtype=layout.dtype, device=layout.device)
                        for _ in range(layout.num_layers)]
        self.v_pools = [torch.zeros(layout.pool_shape, dtype=layout.dtype, device=layout.device)
                        for _ in range(layout.num_layers)]
        self.allocator = BlockAllocator(layout.num_blocks)
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}
        # tokens written into each block (a shared block's count is that of its owners' prefix)
        self._fill = [0] * layout.num_blocks

    @classmethod
    def from_config(cls, config, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                    dtype: torch.dtype = torch.float32, device="cpu",
                    max_blocks_per_seq: int | None = None) -> PagedKVCache:
        return cls(PagedCacheLayout.from_config(config, num_blocks, block_size, dtype, device), max_blocks_per_seq)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def max_seq_len(self) -> int:
        """Tokens one sequence can hold (its block table's width times the block size)."""
        return self.max_blocks_per_seq * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- sequences -----------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def add_sequence(self, seq_id: Hashable) -> None:
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        self._tables[seq_id] = []
        self._lens[seq_id] = 0

    def seq_len(self, seq_id: Hashable) -> int:
        return self._lens[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables[seq_id])

    def blocks_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
        """Blocks :meth:`append_slots` would take from the pool: new blocks for the growth,
        plus one if the partial last block is shared (copy-on-write)."""
        table, length = self._tables[seq_id], self._lens[seq_id]
        grow = self.blocks_for(length + num_new_tokens) - len(table)
        cow = int(num_new_tokens > 0 and length % self.block_size != 0
                  and self.allocator.ref_count(table[-1]) > 1)
        return max(grow, 0) + cow

    def append_slots(self, seq_id: Hashable, num_new_tokens: int) -> list[int]:
        """Make room for ``num_new_tokens`` tokens after the sequence's current ones and
        return their slots (``block * block_size + offset``); the model's forward writes them.

        All or nothing: raises :class:`KVCacheExhaustedError` (nothing changed) when the pool
        lacks blocks, ``ValueError`` past ``max_seq_len``.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        table, length = self._tables[seq_id], self._lens[seq_id]
        new_len = length + num_new_tokens
        if new_len > self.max_seq_len:
            raise ValueError(
                f"sequence {seq_id!r} would hold {new_len} tokens, more than max_seq_len={self.max_seq_len} "
                f"({self.max_blocks_per_seq} blocks x {self.block_size}); raise max_blocks_per_seq / max_model_len"
            )
        needed = self.blocks_needed(seq_id, num_new_tokens)
        if needed > self.allocator.num_free:
            raise KVCacheExhaustedError(needed, self.allocator.num_free, self.allocator.num_blocks,
                                        f" by sequence {seq_id!r}")
        if num_new_tokens == 0:
            return []
        bs = self.block_size
        if length % bs and self.allocator.ref_count(table[-1]) > 1:
            self._copy_on_write(table)
        while len(table) * bs < new_len:
            table.append(self.allocator.allocate())
        slots = []
        for pos in range(length, new_len):
            block = table[pos // bs]
            slots.append(block * bs + pos % bs)
            self._fill[block] = max(self._fill[block], pos % bs + 1)
        self._lens[seq_id] = new_len
        return slots

    def _copy_on_write(self, table: list[int]) -> None:
        """Give the sequence a private copy of its shared, partial last block (all layers)."""
        old = table[-1]
        new = self.allocator.allocate()
        src = torch.tensor([old], device=self.device)
        dst = torch.tensor([new], device=self.device)
        for pool in (*self.k_pools, *self.v_pools):
            pool.index_copy_(0, dst, pool.index_select(0, src))
        self._fill[new] = self._fill[old]
        self.allocator.free(old)
        table[-1] = new

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """``child_id`` starts as a copy of ``parent_id`` sharing all its blocks (no copy now;
        the partial last block is copied by whichever sequence writes it first)."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} is already in the cache")
        table = self._tables[parent_id]
        for block in table:
            self.allocator.share(block)
        self._tables[child_id] = list(table)
        self._lens[child_id] = self._lens[parent_id]

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the sequence's first ``num_tokens`` tokens and free the blocks past them (the
        rollback of rejected speculative tokens; their stale slots are overwritten later)."""
        table, length = self._tables[seq_id], self._lens[seq_id]
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 0 <= num_tokens <= length:
            raise ValueError(f"cannot truncate sequence {seq_id!r} of {length} tokens to {num_tokens!r}")
        keep = self.blocks_for(num_tokens)
        for block in table[keep:]:
            self.allocator.free(block)
            if self.allocator.ref_count(block) == 0:
                self._fill[block] = 0
        del table[keep:]
        if table and num_tokens % self.block_size and self.allocator.ref_count(table[-1]) == 1:
            self._fill[table[-1]] = num_tokens % self.block_size
        self._lens[seq_id] = num_tokens

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks (a shared block stays until its last owner frees it)."""
        for block in self._tables.pop(seq_id):
            self.allocator.free(block)
            if self.allocator.ref_count(block) == 0:
                self._fill[block] = 0
        del self._lens[seq_id]

    # -- statistics ----------------------------------------------------------------------
    def tokens_stored(self) -> int:
        """Token slots holding data, each shared block counted once."""
        return sum(self._fill[b] for b in self.allocator.used_blocks())

    def utilization(self) -> float:
        """Used / reserved KV memory: slots holding tokens over slots of allocated blocks
        (1.0 when nothing is allocated). The waste is only each sequence's partial last block."""
        used = self.allocator.num_used
        return 1.0 if used == 0 else self.tokens_stored() / (used * self.block_size)

    # -- per-step metadata ---------------------------------------------------------------
    def plan(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int],
             slots: Sequence[Sequence[int]] | None = None, *, pad_to: int | None = None) -> PagedAttentionMetadata:
        """The step's :class:`PagedAttentionMetadata` for sequences ``seq_ids`` that have just
        had ``num_new_tokens[i]`` slots appended (``slots[i]``, as returned by
        :meth:`append_slots`; recomputed from the tables when not given).

        ``pad_to``: pad a decode-only batch to that many sequences (CUDA-graph bucket): the
        padding rows have length 0, block table zeros and slot -1 (nothing read or written).
        """
        if len(seq_ids) != len(num_new_tokens):
            raise ValueError(f"{len(seq_ids)} sequences but {len(num_new_tokens)} token counts")
        bs = self.block_size
        width = self.max_blocks_per_seq
        rows, lens, starts, slot_list = [], [], [0], []
        for i, (sid, n) in enumerate(zip(seq_ids, num_new_tokens)):
            table, length = self._tables[sid], self._lens[sid]
            rows.append(table + [0] * (width - len(table)))
            lens.append(length)
            starts.append(starts[-1] + n)
            if slots is not None:
                slot_list.extend(slots[i])
            else:
                slot_list.extend(table[p // bs] * bs + p % bs for p in range(length - n, length))
        decode_only = all(n == 1 for n in num_new_tokens)
        if pad_to is not None and pad_to > len(seq_ids):
            if not decode_only:
                raise ValueError("only a decode-only step can be padded (one new token per sequence)")
            extra = pad_to - len(seq_ids)
            rows.extend([[0] * width] * extra)
            lens.extend([0] * extra)
            starts.extend(range(starts[-1] + 1, starts[-1] + extra + 1))
            slot_list.extend([-1] * extra)
        dev = self.device
        return PagedAttentionMetadata(
            block_tables=torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width).to(dev, non_blocking=True),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev, non_blocking=True),
            slot_mapping=torch.tensor(slot_list, dtype=torch.int64).to(dev, non_blocking=True),
            decode_only=decode_only,
            k_pools=self.k_pools,
            v_pools=self.v_pools,
            rank_heads=self.layout.rank_heads,
        )

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"PagedKVCache(layers={lay.num_layers}, blocks={lay.num_blocks} x {lay.block_size} tokens, "
            f"kv_heads={lay.num_kv_heads}, head_dim={lay.head_dim}, dtype={lay.dtype}, device={lay.device}, "
            f"sequences={len(self._tables)}, free_blocks={self.allocator.num_free})"
        )
