"""Paged attention's contract checks and eager references (the CPU implementation and oracle).

The layout and the semantics of the three paged ops are in :mod:`.attention_paged` (its
docstring). The checks here run on metadata only (the ops' fake implementations call them),
except :func:`check_paged_values`, which reads block ids and lengths on the host and so runs
only where that costs no device sync (CPU tensors). The references gather each sequence's
blocks into a contiguous cache (:func:`gather_kv`) and run the dense references on it, so
paged attention is checked against the same request on its gathered, contiguous KV.
"""
import torch
from torch import Tensor

from .attention_decode_ref import attention_decode_ref, check_gqa, check_one_new_token, check_window_softcap
from .attention_prefill_ref import attention_prefill_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------


def _check_pools(op: str, k_pool, v_pool, dtypes) -> tuple[int, int, int, int]:
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"{op}: k_pool and v_pool must both be [num_blocks, num_kv_heads, block_size, head_dim], got "
            f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    if k_pool.dtype not in dtypes or v_pool.dtype != k_pool.dtype:
        raise TypeError(
            f"{op}: the pools must share one dtype of {', '.join(map(str, dtypes))}, got {k_pool.dtype} and "
            f"{v_pool.dtype}"
        )
    if v_pool.device != k_pool.device:
        raise ValueError(f"{op}: k_pool is on {k_pool.device} but v_pool on {v_pool.device}; use one device")
    return tuple(k_pool.shape)


def _check_index(op: str, name: str, t, shape: tuple, device) -> None:
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{op}: {name} must have shape [{want}], got {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the pools on {device}; move it to {device}")


def _check_query_heads(op: str, q, k_pool, hq: int, dq: int) -> None:
    """q against the pools: head dim, GQA grouping, dtype, device."""
    _, hkv, _, d = k_pool.shape
    if dq != d:
        raise ValueError(f"{op}: q head dim {dq} differs from the pools' {d}")
    check_gqa(op, hq, hkv)
    if q.dtype != k_pool.dtype or q.device != k_pool.device:
        raise TypeError(f"{op}: q is {q.dtype} on {q.device} but the pools are {k_pool.dtype} on {k_pool.device}")


def check_append_args(k_pool, v_pool, slot_mapping, k, v, dtypes=KERNEL_DTYPES + (torch.float64,)) -> None:
    op = "paged_kv_append"
    _, hkv, _, d = _check_pools(op, k_pool, v_pool, dtypes)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != (hkv, d):
            raise ValueError(
                f"{op}: {name} must be [num_tokens, num_kv_heads={hkv}, head_dim={d}] (one row per new token), "
                f"got {tuple(t.shape)}; from Hugging Face [1, H, T, D] states pass states[0].transpose(0, 1)"
            )
        if t.dtype != k_pool.dtype or t.device != k_pool.device:
            raise TypeError(
                f"{op}: {name} is {t.dtype} on {t.device} but the pools are {k_pool.dtype} on {k_pool.device}; "
                "build the cache with the model's dtype and device"
            )
    if v.shape != k.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    _check_index(op, "slot_mapping", slot_mapping, (k.shape[0],), k_pool.device)


def check_decode_args(q, k_pool, v_pool, block_tables, seq_lens, window, softcap,
                      dtypes=KERNEL_DTYPES + (torch.float64,)) -> tuple:
    """Return (B, Hq, Hkv, block_size, D)."""
    op = "paged_attention_decode"
    _, hkv, bs, d = _check_pools(op, k_pool, v_pool, dtypes)
    check_one_new_token(op, q, "paged_attention_prefill")
    b, hq, _, dq = q.shape
    _check_query_heads(op, q, k_pool, hq, dq)
    _check_index(op, "block_tables", block_tables, (b, None), q.device)
    _check_index(op, "seq_lens", seq_lens, (b,), q.device)
    check_window_softcap(op, window, softcap)
    return b, hq, hkv, bs, d


def check_prefill_args(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, window, softcap,
                       dtypes=KERNEL_DTYPES + (torch.float64,)) -> tuple:
    """Return (T, N, Hq, Hkv, block_size, D)."""
    op = "paged_attention_prefill"
    _, hkv, bs, d = _check_pools(op, k_pool, v_pool, dtypes)
    if q.dim() != 3:
        raise ValueError(
            f"{op}: q must be [num_tokens, Hq, D] (the new tokens of all sequences, packed), got "
            f"{tuple(q.shape)}; from Hugging Face [1, Hq, T, D] pass q[0].transpose(0, 1)"
        )
    t, hq, dq = q.shape
    _check_query_heads(op, q, k_pool, hq, dq)
    _check_index(op, "seq_lens", seq_lens, (None,), q.device)
    n = seq_lens.shape[0]
    _check_index(op, "block_tables", block_tables, (n, None), q.device)
    _check_index(op, "query_start_loc", query_start_loc, (n + 1,), q.device)
    check_window_softcap(op, window, softcap)
    return t, n, hq, hkv, bs, d


def check_paged_values(op, block_tables, seq_lens, num_blocks, block_size, q_lens=None) -> None:
    """Value checks, on the host: only where that costs no device sync (CPU tensors)."""
    if seq_lens.numel() == 0:
        return
    lens = seq_lens.to(torch.int64)
    capacity = block_tables.shape[1] * block_size
    if int(lens.min()) < 0 or int(lens.max()) > capacity:
        raise ValueError(
            f"{op}: seq_lens must lie in [0, {capacity}] (block table width {block_tables.shape[1]} x block size "
            f"{block_size}), got values in [{int(lens.min())}, {int(lens.max())}]"
        )
    used = (torch.arange(block_tables.shape[1])[None, :] * block_size) < lens[:, None]
    ids = block_tables.to(torch.int64)[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(
            f"{op}: a block table points outside the pool of {num_blocks} blocks (ids in "
            f"[{int(ids.min())}, {int(ids.max())}] for blocks holding tokens)"
        )
    if q_lens is not None:
        if int(q_lens.min()) < 0:
            raise ValueError(f"{op}: query_start_loc must be non-decreasing")
        if bool((q_lens > lens).any()):
            raise ValueError(
                f"{op}: a sequence has more new tokens than seq_lens (q_len {q_lens.tolist()} vs seq_lens "
                f"{lens.tolist()}); seq_lens counts the cached prefix plus the new tokens"
            )


# ---------------------------------------------------------------------------------------
# References (CPU implementation and oracle)
# ---------------------------------------------------------------------------------------


def gather_kv(pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The contiguous ``[B, Hkv, S, D]`` cache of each sequence (``S`` = the longest length
    rounded up to blocks), read through the block table. Slots past a sequence's length
    hold whatever their block holds; table entries past its last block are not read."""
    bs = pool.shape[2]
    lens = seq_lens.to(torch.int64)
    nb = -(-int(lens.max()) // bs) if lens.numel() else 0
    table = block_tables[:, :nb].to(torch.int64)
    used = (torch.arange(nb, device=table.device)[None, :] * bs) < lens[:, None]
    table = torch.where(used, table, 0)
    b, h, d = table.shape[0], pool.shape[1], pool.shape[3]
    # whole blocks in table order (a copy of contiguous [H, bs, D] tiles), then per head
    blocks = pool.index_select(0, table.reshape(-1)).view(b, nb, h, bs, d)
    return blocks.transpose(1, 2).reshape(b, h, nb * bs, d)


def paged_kv_append_ref(k_pool, v_pool, slot_mapping, k, v) -> None:
    """``pool[slot // bs, :, slot % bs] = row`` for every row with a slot >= 0, in place."""
    check_append_args(k_pool, v_pool, slot_mapping, k, v)
    nb, _, bs, _ = k_pool.shape
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if slots.numel() == 0:
        return
    if int(slots.max()) >= nb * bs:
        raise ValueError(
            f"paged_kv_append: slot {int(slots.max())} is outside the pool of {nb} blocks x {bs} slots"
        )
    k_pool[slots // bs, :, slots % bs] = k
    v_pool[slots // bs, :, slots % bs] = v


def _decode_gathered(q, k, v, lens, scale, window, softcap):
    """Decode attention of q ``[B, Hq, 1, D]`` over gathered ``[B, Hkv, S, D]`` K/V.

    Without softcap: one batched ``scaled_dot_product_attention`` (GQA through
    ``enable_gqa``) under a key mask ``lens - window <= j < lens``. Slots outside it may hold
    stale data or NaN (a block's unwritten tail): their K/V are zeroed first, because a
    masked-out key still enters ``p @ v`` as ``0 * v``. Empty sequences give 0. With softcap:
    the dense decode reference. (One call for the batch, not one per sequence: on CPU this
    is the engine's decode attention, and a per-sequence loop would cost O(B) launches per layer.)
    """
    if softcap > 0:
        return attention_decode_ref(q, k, v, lens, None, scale, window, softcap)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    gqa = q.shape[1] != k.shape[1]
    pos = torch.arange(k.shape[2], device=k.device)
    n = lens.to(device=k.device, dtype=torch.int64).clamp(max=k.shape[2])[:, None]
    valid = pos[None, :] < n  # [B, S]
    if window > 0:
        valid &= pos[None, :] >= n - window
    keep = valid[:, None, :, None]
    k = torch.where(keep, k.to(compute), 0.0)
    v = torch.where(keep, v.to(compute), 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(compute), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=gqa)
    # a row with no key: SDPA's softmax over nothing is NaN; the op's contract says 0.
    # Contiguous, as the fake implementation promises (SDPA may return another layout).
    return torch.where((n > 0)[:, :, None, None], out, 0.0).to(q.dtype).contiguous()


def paged_attention_decode_ref(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor,
                               scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Dense decode attention on each sequence's gathered, contiguous KV (fp32 math; fp64 stays
    fp64 for the tests' ground truth)."""
    b, hq, hkv, bs, d = check_decode_args(q, k_pool, v_pool, block_tables, seq_lens, window, softcap)
    if b == 0 or d == 0 or int(seq_lens.max()) == 0:
        return q.new_zeros(q.shape)
    check_paged_values("paged_attention_decode", block_tables.cpu(), seq_lens.cpu(), k_pool.shape[0], bs)
    k = gather_kv(k_pool, block_tables, seq_lens)
    v = gather_kv(v_pool, block_tables, seq_lens)
    return _decode_gathered(q, k, v, seq_lens, scale, window, softcap)


def paged_attention_prefill_ref(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor,
                                query_start_loc: Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Dense causal attention of each sequence's new rows over its gathered, contiguous KV.

    Sequences with one new row (decodes riding along in a mixed step) go through the decode
    path together; each longer chunk runs the dense prefill reference on its own (SDPA's
    causal path for a prompt with no cached prefix, an explicit offset mask otherwise).
    """
    t, n, hq, hkv, bs, d = check_prefill_args(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc,
                                              window, softcap)
    qsl = query_start_loc.to(torch.int64).cpu()
    q_lens = qsl[1:] - qsl[:-1]
    if n and int(qsl[-1]) != t:
        raise ValueError(
            f"paged_attention_prefill: query_start_loc[-1]={int(qsl[-1])} must equal the number of query "
            f"rows {t}; every row belongs to one sequence"
        )
    if t == 0 or d == 0:
        return q.new_zeros(q.shape)
    lens_cpu = seq_lens.to(torch.int64).cpu()
    check_paged_values("paged_attention_prefill", block_tables.cpu(), lens_cpu, k_pool.shape[0], bs, q_lens)
    out = q.new_empty(q.shape)
    single = (q_lens == 1).nonzero().flatten()
    if single.numel():
        seqs = single.to(q.device)
        rows = qsl[:-1][single].to(q.device)
        sub_tables, sub_lens = block_tables.index_select(0, seqs), seq_lens.index_select(0, seqs)
        k = gather_kv(k_pool, sub_tables, sub_lens)
        v = gather_kv(v_pool, sub_tables, sub_lens)
        dec = _decode_gathered(q.index_select(0, rows)[:, :, None], k, v, sub_lens, scale, window, softcap)
        out.index_copy_(0, rows, dec[:, :, 0])
    for s in (q_lens > 1).nonzero().flatten().tolist():
        start, length, total = int(qsl[s]), int(q_lens[s]), int(lens_cpu[s])
        k = gather_kv(k_pool, block_tables[s:s + 1], seq_lens[s:s + 1])[:, :, :total]
        v = gather_kv(v_pool, block_tables[s:s + 1], seq_lens[s:s + 1])[:, :, :total]
        ctx = total - length
        offsets = None if ctx == 0 else torch.tensor([ctx], device=q.device)
        qs = q[start:start + length].transpose(0, 1)[None]
        o = attention_prefill_ref(qs, k, v, None, None, offsets, scale, True, window, softcap)
        out[start:start + length] = o[0].transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------


__all__ = [
    "INDEX_DTYPES",
    "KERNEL_DTYPES",
    "check_append_args",
    "check_decode_args",
    "check_paged_values",
    "check_prefill_args",
    "gather_kv",
    "paged_attention_decode_ref",
    "paged_attention_prefill_ref",
    "paged_kv_append_ref",
]
