"""Beam search in ``llmopt.generate`` (llmopt/runtime/beam_search.py).

The tokens equal Hugging Face ``generate(num_beams=...)`` on the same model, for several
beam counts, length penalties and early-stopping modes, on ragged left-padded batches, with
stop tokens that end hypotheses early; the static cache's beams are reordered in place.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime.tiny_lm import ragged_prompts  # noqa: E402
from runtime.tiny_lm import tiny_model as _tiny_model  # noqa: E402
from llmopt.runtime import StaticKVCache, generate  # noqa: E402
from llmopt.runtime.beam_search import reorder_cache_rows  # noqa: E402

NEW = 12


def tiny_model(kind: str, seed: int = 0):
    return _tiny_model(kind, seed, max_positions=512)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: past_key_values renamed; beam flags
        yield


def up_to_stop(tokens: torch.Tensor, prompt_len: int, stop: int) -> torch.Tensor:
    """Tokens after each row's first generated stop token set to -1 (HF fills them with the
    stop token when pad_token_id is 0, llmopt with the pad token)."""
    tokens = tokens.clone()
    for row in tokens:
        hits = (row[prompt_len:] == stop).nonzero()
        if len(hits):
            row[prompt_len + int(hits[0]) + 1:] = -1
    return tokens


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "num_beams, length_penalty, early_stopping",
    [(2, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (3, -1.0, False)],
)
def test_beam_search_tokens_equal_hf(kind, num_beams, length_penalty, early_stopping):
    model = tiny_model(kind)
    ids, mask = ragged_prompts(3)
    prompt_len = ids.shape[1]
    free = generate(model, ids, NEW, attention_mask=mask, num_beams=num_beams, stop_token_ids=())
    # A stop token that the beams produce a few steps in: hypotheses end at different lengths.
    stop = int(free[1, prompt_len + 3])
    beams = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=stop,
                              pad_token_id=0, **beams)
    ours = generate(model, ids, NEW, attention_mask=mask, stop_token_ids=(stop,), **beams)
    assert ours.shape == expected.shape
    assert torch.equal(up_to_stop(ours, prompt_len, stop), up_to_stop(expected, prompt_len, stop))


def test_beam_search_without_stop_tokens_equals_hf():
    model = tiny_model("qwen2")
    ids, mask = ragged_prompts(2)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=3,
                              eos_token_id=None)
    assert torch.equal(generate(model, ids, NEW, attention_mask=mask, num_beams=3, stop_token_ids=()), expected)


def test_one_beam_is_greedy():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    greedy = generate(model, ids, NEW, attention_mask=mask, stop_token_ids=())
    assert torch.equal(generate(model, ids, NEW, attention_mask=mask, stop_token_ids=(), num_beams=1), greedy)


def test_reorder_cache_rows_moves_written_slots_in_place():
    model = tiny_model("llama")
    cache = StaticKVCache(model.config, batch_size=3, max_seq_len=8)
    for layer in cache.layers:
        layer.keys.copy_(torch.randn_like(layer.keys))
        layer.values.copy_(torch.randn_like(layer.values))
    before = [(layer.keys.clone(), layer.values.clone(), layer.keys.data_ptr()) for layer in cache.layers]
    reorder_cache_rows(cache, torch.tensor([2, 2, 0]), written=5)
    for layer, (keys, values, address) in zip(cache.layers, before):
        assert layer.keys.data_ptr() == address  # same buffer: compiled steps and CUDA graphs keep it
        assert torch.equal(layer.keys[:, :, :5], keys[[2, 2, 0], :, :5])
        assert torch.equal(layer.values[:, :, :5], values[[2, 2, 0], :, :5])
        assert torch.equal(layer.keys[:, :, 5:], keys[:, :, 5:])  # unwritten slots are not moved


def test_bad_beam_arguments_raise_clear_errors():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        generate(model, ids, 4, attention_mask=mask, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        generate(model, ids, 4, attention_mask=mask, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="temperature=0"):
        generate(model, ids, 4, attention_mask=mask, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="cannot be combined"):
        from llmopt.runtime.speculative import Speculative

        generate(model, ids, 4, attention_mask=mask, num_beams=2, speculative=Speculative(ngram=2))


def test_compiled_model_beam_search_equals_hf_without_recompiling():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny_model("llama")
    ids, mask = ragged_prompts(2)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=3,
                              eos_token_id=None)
    torch.compiler.reset()
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    short = generate(compiled, ids, 4, attention_mask=mask, num_beams=3, stop_token_ids=(), max_seq_len=32)
    after_short = len(graphs)
    assert after_short == 2  # prefill and the one-token step over batch * beams rows
    out = generate(compiled, ids, NEW, attention_mask=mask, num_beams=3, stop_token_ids=(), max_seq_len=32)
    assert torch.equal(out, expected)
    assert len(graphs) == after_short  # the in-place reorder keeps the buffers: nothing re-traced
    assert short.shape == (2, ids.shape[1] + 4)
