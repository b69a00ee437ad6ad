"""llmopt.generate: greedy parity with Hugging Face, stop tokens, sampling seeds, static shapes.

Oracle: eager Hugging Face ``model.generate(do_sample=False)`` on the same tiny random model
(fp32, 2 layers, hidden 64): the token sequences must be identical, for Llama, Mistral with
a sliding window shorter than the sequence, and GPT-2, at batch 1 and at batch 4 of
left-padded prompts of different lengths, eager and ``torch.compile``d.

Static shapes: with a counting ``torch.compile`` backend, generating 200 tokens compiles
exactly as many graphs as generating 5 (one for the prefill, one for decode).

CUDA graphs: the bucketing and padding logic and the CPU fallback run here; capture and
replay run only where CUDA is available.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


from conftest import needs_transformers  # noqa: E402
from runtime.tiny_lm import PAD, VOCAB, ragged_prompts  # noqa: E402,F401
from runtime.tiny_lm import tiny_model as _tiny_model  # noqa: E402
from llmopt.runtime import (  # noqa: E402
    DecodeGraphs,
    SamplingParams,
    StaticKVCache,
    batch_bucket,
    generate,
    pad_batch,
)

# GPT-2 of transformers 4.48 keeps a tuple cache: llmopt.generate refuses it there
# (test_static_cache.py::test_tuple_cache_models_are_refused_with_the_versions).
GPT2 = pytest.param("gpt2", marks=needs_transformers("4.57", "GPT-2 keeps a tuple cache and cannot take a StaticKVCache"))


def tiny_model(kind: str, seed: int = 0, **overrides):
    return _tiny_model(kind, seed, max_positions=512, **overrides)


def hf_greedy(model, ids, mask, new, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kwargs)


# -- greedy parity with Hugging Face -------------------------------------------------------
def test_prefill_and_decode_steps_compose_to_generate():
    """The loop's parts, driven by hand (gpt-fast's shape): a prefill, then one decode step
    per token, with the greedy choice in between, give generate's tokens."""
    from llmopt.runtime.generate import DecodeState, StaticCacheForward, TokenChooser, decode_step, prefill

    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    new = 6
    expected = generate(model, ids, new, attention_mask=mask, stop_token_ids=())
    cache = StaticKVCache(model.config, batch_size=2, max_seq_len=8 + new, dtype=torch.float32)
    forward = StaticCacheForward(model, model, cache, mask)
    choose = TokenChooser(SamplingParams(), (), PAD, 2, new, ids.device)
    state = DecodeState.start(ids, mask, new, PAD)
    with torch.no_grad(), cache.uncounted_writes():
        logits = prefill(forward, ids, state)
        for step in range(new):
            tokens = choose(logits, step)
            state.tokens[:, 8 + step] = tokens
            state.steps = step + 1
            if step + 1 < new:
                logits = decode_step(forward, tokens, state)
    assert state.written == 8 + new - 1, "the last token is never fed"
    assert torch.equal(choose.trimmed(state, 2), expected)


@pytest.mark.parametrize("kind", ["llama", "mistral", GPT2])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_tokens_equal_hf_eager_generate(kind, batch):
    model = tiny_model(kind)
    ids, mask = ragged_prompts(batch)
    new = 20  # prompt 8 + 20 > mistral's sliding window of 5
    # No stop token here: every step of every row is compared.
    expected = hf_greedy(model, ids, mask, new, eos_token_id=None)
    got = generate(model, ids, new, attention_mask=mask, stop_token_ids=())
    assert got.shape == (batch, 8 + new)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["llama", GPT2])
def test_stop_tokens_finish_rows_like_hf(kind):
    model = tiny_model(kind)
    ids, mask = ragged_prompts(4)
    free = generate(model, ids, 12, attention_mask=mask, stop_token_ids=())
    # Stop on tokens that rows 0 and 2 produce early; the others run to the end.
    stops = [int(free[0, 8 + 2]), int(free[2, 8 + 5])]
    expected = hf_greedy(model, ids, mask, 12, eos_token_id=stops, pad_token_id=PAD)
    got = generate(model, ids, 12, attention_mask=mask, stop_token_ids=stops, pad_token_id=PAD)
    assert torch.equal(got, expected)
    assert (got[0, 8 + 3:] == PAD).all()


def test_generation_ends_when_every_row_stopped():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    free = generate(model, ids, 10, attention_mask=mask, stop_token_ids=())
    stops = [int(free[0, 8 + 1]), int(free[1, 8 + 3])]
    expected = hf_greedy(model, ids, mask, 10, eos_token_id=stops, pad_token_id=PAD)
    for interval in (1, 3, 8):  # checking the finished mask less often returns the same tokens
        got = generate(model, ids, 10, attention_mask=mask, stop_token_ids=stops, pad_token_id=PAD,
                       stop_check_interval=interval)
        assert torch.equal(got, expected)
        assert got.shape[1] <= 8 + 4


def test_default_stop_token_is_the_models_eos():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(4)
    free = generate(model, ids, 12, attention_mask=mask, stop_token_ids=())
    eos = int(free[1, 8 + 4])
    model.generation_config.eos_token_id = eos
    assert torch.equal(generate(model, ids, 12, attention_mask=mask), hf_greedy(model, ids, mask, 12))


def test_repetition_penalty_greedy_equals_hf():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = hf_greedy(model, ids, None, 16, repetition_penalty=1.5, eos_token_id=None)
    got = generate(model, ids, 16, repetition_penalty=1.5, stop_token_ids=())
    assert torch.equal(got, expected)
    assert not torch.equal(got, generate(model, ids, 16, stop_token_ids=()))


def test_compiled_model_greedy_equals_eager_hf():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(4)
    expected = hf_greedy(model, ids, mask, 12, eos_token_id=None)
    torch.compiler.reset()
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(generate(compiled, ids, 12, attention_mask=mask, stop_token_ids=()), expected)


# -- no recompilation during decode ---------------------------------------------------------
@pytest.mark.parametrize("dynamic", [None, False])
def test_compile_count_does_not_grow_with_generated_tokens(dynamic):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # Compiled code is cached per code object across tests: start from an empty cache.
    torch.compiler.reset()
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=counting_backend, dynamic=dynamic)
    ids, mask = ragged_prompts(2)
    short = generate(compiled, ids, 5, attention_mask=mask, max_seq_len=256, stop_token_ids=())
    after_short = len(graphs)
    long = generate(compiled, ids, 200, attention_mask=mask, max_seq_len=256, stop_token_ids=())
    # One graph for the prefill, one for the decode step, whatever the number of tokens.
    assert after_short == 2
    assert len(graphs) == after_short
    assert torch.equal(long[:, : short.shape[1]], short)
    # and the replayed decode graph really advances (nothing per-step was baked in as a constant)
    assert torch.equal(long, generate(model, ids, 200, attention_mask=mask, max_seq_len=256, stop_token_ids=()))


# -- sampling through generate ------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(4)
    kwargs = dict(attention_mask=mask, temperature=1.0, top_p=0.9, stop_token_ids=())
    a = generate(model, ids, 16, seed=7, **kwargs)
    b = generate(model, ids, 16, seed=7, **kwargs)
    c = generate(model, ids, 16, seed=8, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, ids, 16, attention_mask=mask, stop_token_ids=()))


def test_sampling_params_object_and_keyword_overrides():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    params = SamplingParams(temperature=0.8, top_k=1, seed=3, max_new_tokens=6, stop_token_ids=())
    greedy = generate(model, ids, 6, attention_mask=mask, stop_token_ids=())
    assert torch.equal(generate(model, ids, attention_mask=mask, sampling=params), greedy)  # top_k=1 is greedy
    assert torch.equal(generate(model, ids, attention_mask=mask, sampling=params, top_k=None, temperature=0.0), greedy)
    with pytest.raises(TypeError, match="unknown keyword arguments \\['topk'\\]"):
        generate(model, ids, 6, attention_mask=mask, topk=3)
    with pytest.raises(ValueError, match=r"SamplingParams\.top_p="):
        generate(model, ids, 6, attention_mask=mask, top_p=0.0)


# -- streaming, progress, cache reuse, errors ------------------------------------------------
def test_streamer_receives_every_step_and_progress_is_shown(capsys):
    model = tiny_model("llama")
    ids, mask = ragged_prompts(3)
    seen = []
    out = generate(model, ids, 7, attention_mask=mask, stop_token_ids=(),
                   streamer=lambda step, tokens: seen.append((step, tokens.clone())), progress=True)
    assert [step for step, _ in seen] == list(range(7))
    assert torch.equal(torch.stack([t for _, t in seen], dim=1), out[:, 8:])
    assert "llmopt.generate" in capsys.readouterr().err


def test_reused_cache_gives_the_same_tokens():
    model = tiny_model("mistral")
    ids, mask = ragged_prompts(4)
    cache = StaticKVCache(model.config, batch_size=4, max_seq_len=40)
    first = generate(model, ids, 14, attention_mask=mask, cache=cache, stop_token_ids=())
    assert cache.num_tokens == 8 + 14 - 1
    second = generate(model, ids, 14, attention_mask=mask, cache=cache, stop_token_ids=())
    assert torch.equal(first, second)
    assert torch.equal(first, hf_greedy(model, ids, mask, 14, eos_token_id=None))
    # A cache built for a larger batch serves a smaller one; a smaller cache is refused.
    assert torch.equal(generate(model, ids[:3], 14, attention_mask=mask[:3], cache=cache, stop_token_ids=()),
                       first[:3])
    with pytest.raises(ValueError, match=r"built for batch_size=2, this call needs 4"):
        generate(model, ids, 4, attention_mask=mask, cache=StaticKVCache(model.config, 2, 40))
    with pytest.raises(ValueError, match="max_seq_len=50 differs from the given cache's 40"):
        generate(model, ids, 4, attention_mask=mask, cache=cache, max_seq_len=50)


def test_bad_arguments_raise_clear_errors():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        generate(model, ids)
    with pytest.raises(ValueError, match=r"input_ids must be an int64 tensor \[batch, prompt_len\]"):
        generate(model, ids[0], 4)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, ids, 4, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        generate(model, ids, 4, attention_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="stop_check_interval must be an int >= 1"):
        generate(model, ids, 4, stop_check_interval=0)


# -- CUDA graphs: bucketing on CPU, capture on CUDA ----------------------------------------
@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (200, 256)])
def test_batch_bucket_is_the_next_bucket(batch, bucket):
    assert batch_bucket(batch) == bucket


def test_batch_bucket_and_padding_errors():
    assert batch_bucket(3, buckets=(6, 2)) == 6
    with pytest.raises(ValueError, match="larger than the largest CUDA-graph bucket 256"):
        batch_bucket(257)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        batch_bucket(0)
    x = torch.arange(6).view(3, 2)
    padded = pad_batch(x, 4)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
    assert pad_batch(x, 3) is x
    with pytest.raises(ValueError, match="cannot pad a batch of 3 rows to 2"):
        pad_batch(x, 2)


def test_decode_graphs_run_eagerly_on_cpu():
    calls = []

    def step(x):
        calls.append(x.shape)
        return x * 2

    graphs = DecodeGraphs(step, enabled=True)  # asked for, but the inputs live on the CPU
    for _ in range(4):
        assert torch.equal(graphs(torch.ones(2, 1)), torch.full((2, 1), 2.0))
    assert len(calls) == 4 and graphs.captured_buckets == []
    assert not DecodeGraphs(step).enabled or torch.cuda.is_available()
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        DecodeGraphs(step, warmup_steps=0)


def test_padded_batch_gives_the_same_tokens_for_real_rows():
    # What generate does on CUDA (batch 3 -> bucket 4) must not change the real rows' tokens.
    model = tiny_model("llama")
    ids, mask = ragged_prompts(3)
    plain = generate(model, ids, 10, attention_mask=mask, stop_token_ids=())
    padded = generate(model, pad_batch(ids, 4), 10, attention_mask=pad_batch(mask, 4), stop_token_ids=())
    assert torch.equal(padded[:3], plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_decode_equals_eager_decode_on_cuda():
    model = tiny_model("llama").cuda()
    ids, mask = ragged_prompts(3)
    ids, mask = ids.cuda(), mask.cuda()
    eager = generate(model, ids, 24, attention_mask=mask, cuda_graphs=False, stop_token_ids=())
    graphed = generate(model, ids, 24, attention_mask=mask, stop_token_ids=())
    assert torch.equal(graphed, eager)
    assert torch.equal(eager, hf_greedy(model, ids, mask, 24, eos_token_id=None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_decode_graphs_capture_once_per_bucket_on_cuda():
    state = torch.zeros(1, device="cuda")

    def step(x):
        state.add_(1)  # a step mutates state, as a cache update does
        return x * 2 + state

    graphs = DecodeGraphs(step, warmup_steps=2)
    outs = [graphs(torch.full((4, 1), float(i), device="cuda")).clone() for i in range(6)]
    assert len(graphs.captured_buckets) == 1
    assert [o[0, 0].item() for o in outs] == [2 * i + (i + 1) for i in range(6)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect device synchronisation")
def test_decode_loop_never_synchronises_on_cuda():
    # From the first decode step on, any host sync (.item(), nonzero, isin's unique) raises.
    model = tiny_model("llama").cuda()
    ids, mask = ragged_prompts(4)

    def arm(step, tokens):
        if step == 0:
            torch.cuda.set_sync_debug_mode("error")

    try:
        out = generate(model, ids.cuda(), 12, attention_mask=mask.cuda(), temperature=0.9, top_p=0.9,
                       repetition_penalty=1.2, seed=0, stop_token_ids=(), streamer=arm, cuda_graphs=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (4, 20)
