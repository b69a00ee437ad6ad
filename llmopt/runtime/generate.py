"""``llmopt.generate``: prefill, then a decode loop that keeps every shape static.

The loop of gpt-fast (https://github.com/pytorch-labs/gpt-fast) applied to Hugging Face
causal LMs, eager or ``torch.compile``d (any backend):

1. The prompts ``[B, P]`` (left-padded, with their 0/1 ``attention_mask``) run in one forward
   into a :class:`~llmopt.runtime.static_cache.StaticKVCache` of ``max_seq_len`` slots.
   Position ids count real tokens only (``cumsum(mask) - 1``), as Hugging Face ``generate``.
2. Each decode step feeds one token per row. What the model sees never changes shape or
   identity: ``input_ids`` and ``position_ids`` are ``[B, 1]`` tensors, the attention mask is
   one ``[B, max_seq_len]`` tensor built once (the prompt's mask followed by ones: slots not
   yet written are excluded by causality, which the model computes from the cache's device
   counter), and the cache advances its own device counter. A compiled model is therefore
   traced once for the prefill and once for decode, whatever the number of tokens.
3. The next token is chosen on the device (:mod:`~llmopt.runtime.sampling`). A sequence
   that produced a stop token is *finished*: a device mask; later tokens of that row are the
   pad token, and the model keeps running on it (a batch advances together).

Host synchronisation. Nothing in a step waits for the device, except the stop check: reading
``finished.all()`` copies a flag to the host and waits for the step to end, which leaves the
GPU idle while Python prepares the next launch. It is read every ``stop_check_interval``
steps (default 1 on CPU where it is free, 8 on CUDA): the price is at most ``interval - 1``
steps computed after the last sequence finished; the returned tokens are the same (the
output is trimmed exactly, from the device-side step at which each row finished).

On CUDA the decode step is replayed from a CUDA graph per batch-size bucket
(:mod:`~llmopt.runtime.cuda_graphs`; the batch is padded to the bucket by repeating its last
row, and the padding is dropped from the output); the prefill runs without graphs.

Structure, as gpt-fast's: :func:`generate` resolves its arguments and hands over to
:func:`run_decode` (or to the speculative / beam-search loops); :func:`prefill` runs the
prompts, :func:`decode_step` feeds one token per row, :func:`decode_loop` alternates
:class:`TokenChooser` (sampling, stop tokens) and decode steps over one
:class:`DecodeState`; :class:`StaticCacheForward` is the model call they share.

Output, as Hugging Face ``generate``: ``[B, P + n]`` int64, the prompt (padding included)
followed by the new tokens, where ``n`` is ``max_new_tokens`` or fewer when every sequence
finished earlier; rows that finished earlier are filled with ``pad_token_id``.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch

from .cuda_graphs import DecodeGraphs, batch_bucket, pad_batch
from .hf_model import as_token_tuple, floating_parameter, forward_parameter_names, generation_attr, unwrap_hf_model
from .sampling import SamplingParams, make_generator, mark_seen, sample_next_token

__all__ = ["DecodeState", "StaticCacheForward", "TokenChooser", "decode_loop", "decode_step", "generate",
           "prefill", "run_decode"]

_FROM_MODEL = object()  # sentinel: "read stop tokens from the model's generation config"


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingParams | dict | None = None,
    *,
    stop_token_ids=_FROM_MODEL,
    pad_token_id: int | None = None,
    streamer: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
    max_seq_len: int | None = None,
    cache=None,
    cuda_graphs: bool | None = None,
    stop_check_interval: int | None = None,
    speculative=None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    **sampling_kwargs,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt row of ``input_ids``.

    ``model``: a Hugging Face causal LM or ``torch.compile`` of one; it is called as
    ``model(input_ids=, attention_mask=, position_ids=, past_key_values=, use_cache=True)``
    (plus ``logits_to_keep=1`` / ``cache_position=`` when its forward takes them) and
    ``.logits[:, -1]`` is read.
    ``input_ids``: ``[B, P]`` prompts, left-padded; ``attention_mask``: ``[B, P]``, 0 on padding.
    ``sampling``: a :class:`SamplingParams` (or a dict of its fields); keyword arguments
    (``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``) override it.
    Default: greedy.
    ``stop_token_ids``: ints ending a sequence; default the sampling params', else the model's
    ``eos_token_id``; ``()`` never stops early. ``pad_token_id`` fills finished rows
    (default: the model's pad token, else the first stop token, else 0).
    ``streamer(step, tokens)`` is called after each step with the new tokens ``[B]`` (a
    device tensor: reading it on the host synchronises). ``progress`` shows a progress bar
    (tqdm if installed, else a line on stderr).
    ``max_seq_len``: cache capacity (default ``P + max_new_tokens``); ``cache``: a
    :class:`StaticKVCache` to reuse (it is rewound, not reallocated; if built for a larger
    batch, the prompts are padded to its batch by repeating the last row).
    ``cuda_graphs``: ``None`` = on CUDA, ``False`` = never. ``stop_check_interval``: see the
    module doc.
    ``speculative``: a :class:`~llmopt.runtime.speculative.Speculative` (draft model, n-gram or
    layer-skip proposer and ``k``): same tokens under greedy, same distribution under sampling
    (docs/speculative.md). ``num_beams > 1``: beam search (with ``length_penalty`` and
    ``early_stopping`` as in Hugging Face; :mod:`~llmopt.runtime.beam_search`).
    """
    params = _resolve_sampling(sampling, sampling_kwargs)
    if max_new_tokens is None:
        max_new_tokens = params.max_new_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    input_ids, attention_mask = _check_prompts(input_ids, attention_mask)
    hf_model = unwrap_hf_model(model)
    from ..moe_prepare import prepare_moe_automatically  # lazy: importing llmopt loads no MoE kernels

    prepare_moe_automatically(hf_model)  # per-expert-loop MoE blocks become fusable (proven equal)
    device, dtype = _device_and_dtype(model, hf_model, input_ids, cache)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)

    stops = _resolve_stop_tokens(stop_token_ids, params, hf_model)
    pad_id = _resolve_pad_token(pad_token_id, hf_model, stops)
    if stop_check_interval is None:
        stop_check_interval = 8 if device.type == "cuda" else 1
    if isinstance(stop_check_interval, bool) or not isinstance(stop_check_interval, int) or stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be an int >= 1, got {stop_check_interval!r}")

    run = dict(stops=stops, pad_id=pad_id, max_seq_len=max_seq_len, dtype=dtype, streamer=streamer, progress=progress)
    if speculative is not None or num_beams != 1:
        return _run_speculative_or_beams(model, hf_model, input_ids, attention_mask, params, max_new_tokens, cache,
                                         speculative=speculative, num_beams=num_beams, length_penalty=length_penalty,
                                         early_stopping=early_stopping, **run)
    return run_decode(model, hf_model, input_ids, attention_mask, params, max_new_tokens, cache,
                      cuda_graphs=cuda_graphs, stop_check_interval=stop_check_interval, **run)


def run_decode(model, hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
               max_new_tokens: int, cache, *, stops: tuple[int, ...], pad_id: int, max_seq_len: int | None,
               dtype: torch.dtype, cuda_graphs: bool | None, stop_check_interval: int, streamer=None,
               progress: bool = False) -> torch.Tensor:
    """The plain loop behind :func:`generate` (arguments resolved there): prefill, then
    :func:`decode_loop` over a :class:`StaticKVCache`, the decode steps replayed from CUDA
    graphs on CUDA."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    use_graphs = device.type == "cuda" and cuda_graphs is not False
    if cache is not None and getattr(cache, "shape", (0,))[0] >= batch:
        cache_batch = cache.shape[0]  # a cache sized for a larger batch serves a smaller one
    else:
        cache_batch = batch_bucket(batch) if use_graphs else batch
    if cache_batch != batch:
        input_ids = pad_batch(input_ids, cache_batch)
        attention_mask = pad_batch(attention_mask, cache_batch)

    # Slots written: the prompt, then one per decode forward (the last token is never fed).
    cache = _prepare_cache(cache, model, hf_model, cache_batch, max_seq_len, prompt_len + max_new_tokens, dtype, device)
    cache.reserve(prompt_len + max_new_tokens - 1)
    forward = StaticCacheForward(model, hf_model, cache, attention_mask)
    choose = TokenChooser(params, stops, pad_id, cache_batch, max_new_tokens, device)
    state = DecodeState.start(input_ids, attention_mask, max_new_tokens, pad_id)
    bar = _Progress(max_new_tokens) if progress else None
    with torch.no_grad(), cache.uncounted_writes():
        try:
            logits = prefill(forward, input_ids, state)
            choose.start(input_ids, attention_mask, logits)
            decode_loop(DecodeGraphs(forward, enabled=use_graphs), logits, state, choose, max_new_tokens,
                        real_rows=batch, stop_check_interval=stop_check_interval, streamer=streamer, bar=bar)
        finally:
            if bar is not None:
                bar.close()
            cache.set_num_tokens(state.written)
    return choose.trimmed(state, batch)


def _run_speculative_or_beams(model, hf_model, input_ids, attention_mask, params, max_new_tokens, cache, *,
                              speculative, num_beams, length_penalty, early_stopping, stops, pad_id, max_seq_len,
                              dtype, streamer, progress) -> torch.Tensor:
    """Hand over to the speculative or the beam-search loop; both take the resolved
    arguments and own their caches' bookkeeping."""
    batch, prompt_len = input_ids.shape
    extra_loop = dict(stops=stops, pad_id=pad_id, forward_parameters=forward_parameter_names(hf_model))
    if speculative is not None:
        from .speculative import Speculative, run_speculative

        if not isinstance(speculative, Speculative):
            raise TypeError(f"speculative must be a llmopt.Speculative, got {type(speculative).__name__}")
        if num_beams != 1:
            raise ValueError("speculative decoding and beam search cannot be combined; pass one of them")
        k = speculative.k
        cache = _prepare_cache(cache, model, hf_model, batch, max_seq_len,
                               prompt_len + max_new_tokens + k, dtype, input_ids.device)
        bar = _Progress(max_new_tokens) if progress else None
        try:
            return run_speculative(model, hf_model, speculative, cache, input_ids, attention_mask, params,
                                   max_new_tokens, streamer=streamer, bar=bar, **extra_loop)
        finally:
            if bar is not None:
                bar.close()
    from .beam_search import run_beam_search

    if cache is not None:
        raise ValueError("beam search builds its own cache of batch * num_beams rows; do not pass cache=")
    return run_beam_search(model, hf_model, input_ids, attention_mask, params, max_new_tokens,
                           num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                           max_seq_len=max_seq_len, dtype=dtype, **extra_loop)


# -- the loop: prefill, decode step, decode loop (gpt-fast's split) --------------------------
class StaticCacheForward:
    """One forward of a Hugging Face causal LM over a :class:`StaticKVCache`, returning the
    logits of each row's last position ``[B, V]``.

    The attention mask is one ``[B, max_seq_len]`` tensor for the whole run: the prompt's,
    then ones (causality hides the slots not written yet), so a decode step's inputs never
    change shape or identity and a compiled model (or a CUDA graph) sees the same tensors.
    """

    def __init__(self, model, hf_model, cache, attention_mask: torch.Tensor):
        self.model = model
        self.cache = cache
        batch, prompt_len = attention_mask.shape
        self.full_mask = torch.ones((batch, cache.max_seq_len), dtype=torch.int64, device=attention_mask.device)
        self.full_mask[:, :prompt_len] = attention_mask
        cache.set_left_padding(attention_mask)
        accepts = forward_parameter_names(hf_model)
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self.wants_cache_position = "cache_position" in accepts

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, *cache_position: torch.Tensor) -> torch.Tensor:
        kwargs = dict(self.extra)
        if cache_position:
            kwargs["cache_position"] = cache_position[0]
        out = self.model(
            input_ids=ids,
            attention_mask=self.full_mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]


@dataclasses.dataclass
class DecodeState:
    """What the loop carries from step to step: ``tokens`` ``[B, P + max_new_tokens]`` (the
    prompts, then the chosen tokens; pad where nothing was chosen yet or a row finished),
    ``position``: the prompts' positions ``[B, P]`` until the prefill, then the position
    ``[B, 1]`` of the last fed token, and ``cache_position`` ``[1]`` (both advanced in
    place: a CUDA graph replays the same tensors); ``steps`` tokens chosen, ``written``
    cache slots filled."""

    tokens: torch.Tensor
    position: torch.Tensor
    prompt_len: int
    cache_position: torch.Tensor | None = None
    steps: int = 0
    written: int = 0

    @classmethod
    def start(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, pad_id: int):
        batch, prompt_len = input_ids.shape
        tokens = torch.full((batch, prompt_len + max_new_tokens), pad_id, dtype=torch.int64, device=input_ids.device)
        tokens[:, :prompt_len] = input_ids
        # Position ids count real tokens only, as Hugging Face generate does.
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return cls(tokens=tokens, position=positions, prompt_len=prompt_len)


def prefill(forward: StaticCacheForward, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Run the prompts ``[B, P]`` into the cache in one forward; returns the logits of each
    row's last token and leaves ``state`` at the last prompt position."""
    prompt_len = input_ids.shape[1]
    positions = state.position
    if forward.wants_cache_position:
        cache_position = torch.arange(prompt_len, device=input_ids.device)
        logits = forward(input_ids, positions, cache_position)
        state.cache_position = cache_position[-1:].clone()
    else:
        logits = forward(input_ids, positions)
    state.written = prompt_len
    state.position = positions[:, -1:].clone()
    return logits


def decode_step(decode: Callable, next_tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Feed one token per row at the next position; returns the logits ``[B, V]`` after it.
    ``decode`` is the forward or its CUDA-graph replay (:class:`DecodeGraphs`)."""
    state.position.add_(1)
    if state.cache_position is not None:
        state.cache_position.add_(1)
        logits = decode(next_tokens[:, None], state.position, state.cache_position)
    else:
        logits = decode(next_tokens[:, None], state.position)
    state.written += 1
    return logits


class TokenChooser:
    """Chooses each step's tokens on the device (:func:`sample_next_token`), pads the rows
    that finished, and tracks where each row produced its stop token."""

    def __init__(self, params: SamplingParams, stops: tuple[int, ...], pad_id: int, batch: int,
                 max_new_tokens: int, device: torch.device):
        self.params = params
        self.pad_id = pad_id
        self.generator = make_generator(params.seed, device)
        self.stops = torch.tensor(stops, dtype=torch.int64, device=device) if stops else None
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.finished_at = torch.full((batch,), max_new_tokens, dtype=torch.int64, device=device)
        self.seen = None

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Record the prompts' tokens for the repetition penalty (when there is one)."""
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            mark_seen(self.seen, input_ids, valid=attention_mask.bool())

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The tokens ``[B]`` of decode step ``step`` (0-based); pad for finished rows."""
        next_tokens = sample_next_token(logits, self.params, self.generator, self.seen)
        next_tokens = torch.where(self.finished, self.pad_id, next_tokens)
        if self.seen is not None:
            mark_seen(self.seen, next_tokens)
        if self.stops is not None:
            # Broadcast compare, not torch.isin: isin may sort/unique (a sync on CUDA).
            newly = (next_tokens[:, None] == self.stops[None, :]).any(-1) & ~self.finished
            self.finished_at.masked_fill_(newly, step + 1)
            self.finished |= newly
        return next_tokens

    def all_finished(self, real_rows: int) -> bool:
        """Whether every real row has produced a stop token (reads a flag: a host sync)."""
        return self.stops is not None and bool(self.finished[:real_rows].all())

    def trimmed(self, state: DecodeState, real_rows: int) -> torch.Tensor:
        """The output: the real rows, up to where the last of them stopped, as Hugging Face."""
        generated = state.steps
        if self.stops is not None:
            per_row = torch.where(self.finished, self.finished_at, state.steps)[:real_rows]
            generated = int(per_row.max())
        return state.tokens[:real_rows, : state.prompt_len + generated]


def decode_loop(decode: Callable, logits: torch.Tensor, state: DecodeState, choose: TokenChooser,
                max_new_tokens: int, *, real_rows: int, stop_check_interval: int,
                streamer: Callable[[int, torch.Tensor], None] | None = None, bar=None) -> None:
    """Choose a token from ``logits``, feed it, repeat: up to ``max_new_tokens`` tokens,
    fewer when every real row stopped (checked every ``stop_check_interval`` steps: the
    check is the loop's only host sync)."""
    for step in range(max_new_tokens):
        next_tokens = choose(logits, step)
        state.tokens[:, state.prompt_len + step] = next_tokens
        state.steps = step + 1
        if streamer is not None:
            streamer(step, next_tokens[:real_rows])
        if bar is not None:
            bar.update()
        if state.steps == max_new_tokens:
            break
        if state.steps % stop_check_interval == 0 and choose.all_finished(real_rows):
            break
        logits = decode_step(decode, next_tokens, state)


# -- argument resolution ------------------------------------------------------------------
def _resolve_sampling(sampling, overrides: dict) -> SamplingParams:
    if sampling is None:
        sampling = SamplingParams()
    elif isinstance(sampling, dict):
        sampling = SamplingParams(**sampling)
    elif not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, a dict or None, got {type(sampling).__name__}")
    if overrides:
        valid = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(
                f"generate() got unknown keyword arguments {unknown}; sampling keywords are {sorted(valid)}"
            )
        sampling = dataclasses.replace(sampling, **overrides)
    return sampling


def _check_prompts(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
        torch.int64,
        torch.int32,
    ):
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an int64 tensor [batch, prompt_len], got {got}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.int64)
    # One host read per call: a right-padded prompt would decode from a padding position.
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "prompts must be left-padded: every row's last token must be real (attention_mask 1); "
            "tokenize with padding_side='left'"
        )
    return input_ids, attention_mask


def _device_and_dtype(model, hf_model, input_ids, cache):
    if cache is not None:
        return cache.device, cache.dtype
    weight = floating_parameter(hf_model if hf_model is not None else model)
    if weight is not None:
        return weight.device, weight.dtype
    return input_ids.device, torch.float32


def _resolve_stop_tokens(stop_token_ids, params: SamplingParams, hf_model) -> tuple[int, ...]:
    if stop_token_ids is not _FROM_MODEL:
        return SamplingParams(stop_token_ids=as_token_tuple(stop_token_ids)).stop_token_ids
    if params.stop_token_ids is not None:
        return params.stop_token_ids
    return as_token_tuple(generation_attr(hf_model, "eos_token_id")) if hf_model is not None else ()


def _resolve_pad_token(pad_token_id, hf_model, stops) -> int:
    if pad_token_id is None and hf_model is not None:
        pad_token_id = generation_attr(hf_model, "pad_token_id")
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    if isinstance(pad_token_id, (list, tuple)):
        pad_token_id = pad_token_id[0]
    return int(pad_token_id)


def _prepare_cache(cache, model, hf_model, batch, max_seq_len, default_len, dtype, device):
    # Imported here: it needs transformers, which `import llmopt` must not (see runtime/__init__).
    from .hf_cache_compat import check_model_takes_cache_objects
    from .distributed import compiled_tensor_parallel
    from .static_cache import StaticKVCache

    check_model_takes_cache_objects(hf_model)

    if cache is not None:
        if not isinstance(cache, StaticKVCache):
            raise TypeError(f"cache must be a StaticKVCache, got {type(cache).__name__}")
        if cache.shape[0] != batch:
            raise ValueError(
                f"the cache was built for batch_size={cache.shape[0]}, this call needs {batch} "
                "(the prompt batch, padded to its CUDA-graph bucket on CUDA); "
                f"build StaticKVCache(config, batch_size={batch}, ...)"
            )
        if max_seq_len is not None and max_seq_len != cache.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len} differs from the given cache's {cache.max_seq_len}; pass one of them"
            )
        cache.reset(zero_memory=False)
        return cache
    config = getattr(hf_model, "config", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError(
            "cannot size a KV cache: the model has no Hugging Face config; pass cache=StaticKVCache(...)"
        )
    if max_seq_len is None:
        max_seq_len = default_len
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
    # Under tensor parallelism (the model compiled with options={"tensor_parallel": ...}) the
    # cache holds only this rank's K/V heads, as StaticKVCache(..., tensor_parallel=) does.
    return StaticKVCache(config, batch_size=batch, max_seq_len=max_seq_len, dtype=dtype, device=device,
                         tensor_parallel=compiled_tensor_parallel(model))


class _Progress:
    """tqdm if installed, else a one-line counter on stderr."""

    def __init__(self, total: int):
        self.total = total
        self.count = 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc="llmopt.generate", unit="tok", leave=False)

    def update(self) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            sys.stderr.write(f"\rllmopt.generate: {self.count}/{self.total} tokens")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()
