"""Beam search for ``llmopt.generate(..., num_beams=n)`` over a static KV cache.

Beam search (e.g. Graves 2012, https://arxiv.org/abs/1211.3711; the decoding strategy of
Hugging Face ``generate(num_beams=...)``) keeps, per prompt, the ``n`` most probable partial
sequences (sum of token log-probabilities). Each step scores every one-token continuation of
every live beam, keeps the best ``2n`` (``(1 + number of stop tokens) * n`` with several
stop tokens, so that ``n`` non-finished ones remain even if the best all end), moves the
ones that end (a stop token, or the length limit) among the *finished hypotheses* with the
score ``sum_logprob / generated_len ** length_penalty``, and continues the best ``n``
others. The rules, including when a prompt is done, are those of Hugging Face
transformers 5.x, so the tokens are the same:

- ``early_stopping=True``: a prompt is done once it has ``n`` finished hypotheses;
- ``False`` (default): once the best live beam, scored at the current length, cannot beat
  the worst finished hypothesis; ``"never"``: the same with the best possible length when
  ``length_penalty > 0`` (the canonical criterion).

The cache holds ``batch * n`` rows (prompt ``b``'s beams are rows ``b * n .. b * n + n - 1``).
After each step the surviving beams' K/V are gathered from their parents' rows *in place*:
the buffers keep their addresses (a compiled decode step is not re-traced, CUDA graphs can
replay it) and only the written slots move.

Greedy scoring only (``temperature=0``): beam *sampling* is not implemented.
"""
from __future__ import annotations

import torch

__all__ = ["run_beam_search"]

_NEG = -1.0e9  # Hugging Face's "impossible" score (kept identical so that ties break the same way)


def _check(num_beams, length_penalty, early_stopping, params) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not params.greedy or params.repetition_penalty != 1.0:
        raise ValueError(
            "beam search scores with the model's log-probabilities only: pass temperature=0 and "
            "repetition_penalty=1 (beam sampling is not implemented)"
        )


def reorder_cache_rows(cache, rows: torch.Tensor, written: int) -> None:
    """Row ``i`` of every layer's K/V becomes the old row ``rows[i]``, in place (slots < written)."""
    for layer in cache.layers:
        for buffer in (layer.keys, layer.values):
            view = buffer[:, :, :written]
            view.copy_(view.index_select(0, rows))


def run_beam_search(
    model,
    hf_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params,
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float,
    early_stopping,
    max_seq_len: int | None,
    dtype: torch.dtype,
    stops: tuple[int, ...],
    pad_id: int,
    forward_parameters: set[str],
) -> torch.Tensor:
    """The loop behind ``generate(..., num_beams=n)``: ``[B, P + generated]``, each prompt's best
    finished hypothesis followed by ``pad_id``."""
    from .distributed import compiled_tensor_parallel
    from .static_cache import KVCacheFullError, StaticKVCache

    _check(num_beams, length_penalty, early_stopping, params)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    n = num_beams
    total = prompt_len + max_new_tokens
    config = getattr(hf_model, "config", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError("beam search sizes its KV cache from the model's Hugging Face config; the model has none")
    seq_len = total if max_seq_len is None else max_seq_len
    if seq_len < total - 1:
        raise KVCacheFullError(seq_len, total - 1)
    cache = StaticKVCache(config, batch_size=batch * n, max_seq_len=seq_len, dtype=dtype, device=device,
                          tensor_parallel=compiled_tensor_parallel(model))  # this rank's K/V heads under TP

    flat_ids = input_ids.repeat_interleave(n, 0)
    flat_mask = attention_mask.repeat_interleave(n, 0)
    full_mask = torch.ones((batch * n, seq_len), dtype=torch.int64, device=device)
    full_mask[:, :prompt_len] = flat_mask
    positions = (flat_mask.cumsum(-1) - 1).clamp_min(0)
    cache.set_left_padding(flat_mask)
    wants_cache_position = "cache_position" in forward_parameters

    def forward(ids, pos, start):
        kwargs = {}
        if wants_cache_position:
            kwargs["cache_position"] = torch.arange(start, start + ids.shape[1], device=device)
        out = model(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :].float()

    keep = max(2, 1 + len(stops)) * n
    top_n = torch.arange(keep, device=device) < n
    stop_t = torch.tensor(stops, dtype=torch.int64, device=device) if stops else None
    offsets = torch.arange(batch, device=device)[:, None] * n

    live = torch.full((batch, n, total), pad_id, dtype=torch.int64, device=device)
    live[:, :, :prompt_len] = input_ids[:, None, :]
    live_scores = torch.zeros((batch, n), device=device)
    live_scores[:, 1:] = _NEG  # only the first beam's continuations count at the first step
    done = live.clone()
    done_scores = torch.full((batch, n), _NEG, device=device)
    done_lengths = torch.zeros((batch, n), dtype=torch.int64, device=device)
    done_flags = torch.zeros((batch, n), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)

    cur = prompt_len
    with torch.no_grad(), cache.uncounted_writes():
        logits = forward(flat_ids, positions, 0)
        position = positions[:, -1:].clone()
        while True:
            vocab = logits.shape[-1]
            scores = logits.log_softmax(-1).view(batch, n, vocab) + live_scores[:, :, None]
            cand_scores, cand = scores.view(batch, n * vocab).topk(keep)
            parent = cand // vocab
            token = cand % vocab
            cand_seqs = live.gather(1, parent[:, :, None].expand(-1, -1, total)).clone()
            cand_seqs[:, :, cur] = token
            ends = torch.full_like(token, cur + 1 >= total, dtype=torch.bool)
            if stop_t is not None:
                ends |= (token[..., None] == stop_t).any(-1)

            # The best n candidates that go on.
            go_on = cand_scores + ends.float() * _NEG
            chosen = go_on.topk(n).indices
            live = cand_seqs.gather(1, chosen[:, :, None].expand(-1, -1, total))
            live_scores = go_on.gather(1, chosen)
            rows = (parent.gather(1, chosen) + offsets).flatten()

            # Candidates among the top n that ended join the finished hypotheses if they rank.
            just_ended = ends & top_n[None, :]
            final = cand_scores / ((cur + 1 - prompt_len) ** length_penalty)
            full = done_flags.all(-1, keepdim=True) & (early_stopping is True)
            final = final + full.float() * _NEG
            final = final + (~improvable).float() * _NEG
            final = final + (~just_ended).float() * _NEG
            merged = torch.cat((done_scores, final), 1).topk(n).indices
            done = torch.cat((done, cand_seqs), 1).gather(1, merged[:, :, None].expand(-1, -1, total))
            done_scores = torch.cat((done_scores, final), 1).gather(1, merged)
            lengths = torch.full_like(final, cur + 1 - prompt_len, dtype=torch.int64)
            done_lengths = torch.cat((done_lengths, lengths), 1).gather(1, merged)
            done_flags = torch.cat((done_flags, just_ended), 1).gather(1, merged)

            reorder_cache_rows(cache, rows, cur)
            cur += 1
            # Can a live beam still beat the worst finished hypothesis?
            if early_stopping == "never" and length_penalty > 0.0:
                best_length = total - prompt_len
            else:
                best_length = cur - prompt_len
            best_live = live_scores[:, :1] / (best_length ** length_penalty)
            worst_done = torch.where(done_flags, done_scores.min(1, keepdim=True).values, _NEG)
            improvable = improvable & (best_live > worst_done).any(-1, keepdim=True)
            go = bool(improvable.any()) and not (bool(done_flags.all()) and early_stopping is True)
            go = go and not bool(ends.all())
            if not go:
                break
            position.add_(1)
            # contiguous: a strided view's strides change with the length, which a compiled step guards on
            logits = forward(live[:, :, cur - 1].reshape(-1, 1).contiguous(), position, cur - 1)
        cache.set_num_tokens(cur - 1)

    length = int(done_lengths[:, 0].max())
    return done[:, 0, : prompt_len + length]
