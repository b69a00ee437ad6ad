"""Next-token selection: parameters, filters vs Hugging Face's processors, sampling law, seeds.

The filters are checked against the Hugging Face logits processors they mirror (same
parameters must mean the same distribution as ``model.generate``), the sampler against the
softmax law it should draw from, and the whole pipeline under ``torch.compile(fullgraph=True)``:
a host synchronisation (``.item()``, boolean indexing) would break the graph and fail there.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmopt.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    mark_seen,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

logits_process = pytest.importorskip("transformers.generation.logits_process")


def random_logits(batch, vocab, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    if ties:
        # Coarse values make ties with the k-th largest and within the nucleus common.
        logits = logits.round()
    return logits


# -- SamplingParams ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("seed", -3),
        ("seed", 1.0),
        ("max_new_tokens", 0),
        ("stop_token_ids", (1, -2)),
        ("stop_token_ids", ("a",)),
    ],
)
def test_sampling_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_are_greedy_and_normalise_stop_tokens():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(stop_token_ids=[3, 5]).stop_token_ids == (3, 5)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert not SamplingParams(top_k=0).filters_top_k and not SamplingParams().filters_top_p


# -- filters against Hugging Face -----------------------------------------------------------
# the logits both filters are checked on: ragged batch and vocabulary sizes, with and without ties
LOGITS = dict(batch=st.sampled_from([1, 3, 7]), vocab=st.sampled_from([2, 17, 100]),
              seed=st.integers(0, 2**16), ties=st.booleans())


@given(k=st.integers(1, 120), **LOGITS)
def test_top_k_filter_matches_hf_top_k_warper(batch, vocab, k, seed, ties):
    logits = random_logits(batch, vocab, seed, ties)
    expected = logits_process.TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), expected)


@given(p=st.floats(0.01, 0.99), **LOGITS)
def test_top_p_filter_matches_hf_top_p_warper(batch, vocab, p, seed, ties):
    logits = random_logits(batch, vocab, seed, ties)
    expected = logits_process.TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(top_p_filter(logits, p), expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    # Never empties a row, even for a tiny p.
    assert torch.isfinite(top_p_filter(probs.log(), 1e-6)).sum() == 1


@given(
    batch=st.sampled_from([1, 4]),
    vocab=st.sampled_from([5, 50]),
    length=st.integers(1, 12),
    penalty=st.sampled_from([0.5, 1.3, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_repetition_penalty_matches_hf_processor(batch, vocab, length, penalty, seed):
    logits = random_logits(batch, vocab, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    seen = mark_seen(torch.zeros(batch, vocab, dtype=torch.bool), ids)
    expected = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), expected)


def test_mark_seen_skips_padding_without_erasing_real_occurrences():
    # Row 0: token 4 is padding at position 0 but real at position 2; token 9 only padding.
    ids = torch.tensor([[4, 9, 4, 1], [2, 2, 3, 3]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    seen = mark_seen(torch.zeros(2, 10, dtype=torch.bool), ids, valid)
    assert seen[0].nonzero().flatten().tolist() == [1, 4]
    assert seen[1].nonzero().flatten().tolist() == [2, 3]
    mark_seen(seen, torch.tensor([7, 0]))
    assert seen[0, 7] and seen[1, 0]


# -- the sampler --------------------------------------------------------------------------
def test_greedy_is_argmax_of_penalised_logits():
    logits = random_logits(6, 40, seed=3)
    assert torch.equal(sample_next_token(logits, SamplingParams()), logits.argmax(-1))
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[torch.arange(6), logits.argmax(-1)] = True
    penalised = sample_next_token(logits, SamplingParams(repetition_penalty=100.0), seen=seen)
    assert not torch.equal(penalised, logits.argmax(-1))
    assert torch.equal(penalised, apply_repetition_penalty(logits, seen, 100.0).argmax(-1))


def test_samples_follow_the_softmax_law():
    # 40k independent rows of the same distribution: empirical frequencies within 4 sigma.
    rows = 40_000
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().expand(rows, -1)
    tokens = sample_next_token(logits, SamplingParams(temperature=1.0), make_generator(0, "cpu"))
    freq = torch.bincount(tokens, minlength=5).double() / rows
    sigma = (probs.double() * (1 - probs.double()) / rows).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * sigma).all(), freq


def test_temperature_sharpens_and_flattens():
    rows = 20_000
    logits = torch.tensor([2.0, 1.0, 0.0]).expand(rows, -1)
    gen = make_generator(1, "cpu")
    cold = sample_next_token(logits, SamplingParams(temperature=0.2), gen)
    hot = sample_next_token(logits, SamplingParams(temperature=5.0), gen)
    assert (cold == 0).double().mean() > 0.99
    assert (hot == 2).double().mean() > 0.2


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.6)]
)
def test_sampled_tokens_stay_inside_the_filtered_set(params):
    logits = random_logits(5, 30, seed=7).repeat_interleave(400, dim=0)
    tokens = sample_next_token(logits, params, make_generator(2, "cpu"))
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits, params.top_k or 30), params.top_p))
    assert allowed.gather(1, tokens[:, None]).all()
    # and the filtered set is really explored (more than the argmax alone)
    assert len(set(tokens.tolist())) > 5


def test_top_k_one_is_greedy():
    logits = random_logits(8, 64, seed=11)
    tokens = sample_next_token(logits, SamplingParams(temperature=0.8, top_k=1), make_generator(0, "cpu"))
    assert torch.equal(tokens, logits.argmax(-1))


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = random_logits(64, 100, seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = sample_next_token(logits, params, make_generator(1234, "cpu"))
    b = sample_next_token(logits, params, make_generator(1234, "cpu"))
    c = sample_next_token(logits, params, make_generator(4321, "cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert make_generator(None, "cpu") is None


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"logits \[batch, vocab\]"):
        sample_next_token(torch.zeros(2, 3, 4), SamplingParams())
    with pytest.raises(ValueError, match="presence mask `seen`"):
        sample_next_token(torch.zeros(2, 4), SamplingParams(repetition_penalty=1.2))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3),
    ],
)
def test_pipeline_traces_whole_without_host_sync(params):
    # fullgraph=True fails on any graph break, which is what a host read (.item(), nonzero) causes.
    def step(logits, seen):
        return sample_next_token(logits, params, None, seen)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    logits = random_logits(3, 50, seed=0)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, :5] = True
    tokens = compiled(logits, seen)
    assert tokens.shape == (3,) and tokens.dtype == torch.int64
    if params.greedy:
        assert torch.equal(tokens, sample_next_token(logits, params, None, seen))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect device synchronisation")
def test_sampling_never_synchronises_on_cuda():
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    logits = torch.randn(4, 1000, device="cuda")
    seen = torch.zeros(4, 1000, dtype=torch.bool, device="cuda")
    gen = make_generator(0, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_next_token(logits, params, gen, seen)
        mark_seen(seen, tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (4,)
