"""Speculative decoding in ``llmopt.generate`` (llmopt/runtime/speculative.py).

- Greedy: the tokens are exactly those of plain greedy decoding, for every proposer (draft
  model, n-gram prompt lookup, layer-skip self-speculation) and every k, on ragged batches
  whose rows accept different numbers of tokens, with stop tokens, eager and compiled.
- Sampling: the Leviathan/Chen rejection rule keeps the target's distribution: a chi-square
  test of many seeded draws of a 6-token vocabulary against the exact distribution,
  at significance 0.001 (and the same test rejects the draft's own distribution).
- Bad input: clear errors (vocab mismatch, k <= 0, cache too small, two proposers).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import tolerance  # noqa: E402
from runtime.tiny_lm import ragged_prompts  # noqa: E402
from runtime.tiny_lm import tiny_model as _tiny_model  # noqa: E402
from llmopt.runtime import KVCacheFullError, SamplingParams, generate  # noqa: E402
from llmopt.runtime.speculative import (  # noqa: E402
    NgramProposer,
    Speculative,
    layer_skip_draft,
    verify_proposals,
)

SIGNIFICANCE = 1e-3  # chi-square: a correct sampler fails with this probability (seeded: never flaky)


def tiny_model(kind: str = "llama", seed: int = 0):
    return _tiny_model(kind, seed, max_positions=512)


def tiny_llama(vocab_size: int, seed: int):
    """A tiny Llama with another vocabulary (tiny_lm's share one of 160 tokens)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers: past_key_values renamed
        yield


def proposers(target):
    return {
        "ngram": lambda k: Speculative(ngram=3, k=k),
        "draft": lambda k: Speculative(draft=tiny_model(seed=7), k=k),
        "self-draft": lambda k: Speculative(draft=target, k=k),
        "layer_skip": lambda k: Speculative(layer_skip=1, k=k),
    }


TARGET = tiny_model()
IDS, MASK = ragged_prompts(4)
PLAIN = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=())


# -- greedy exactness -----------------------------------------------------------------------
@pytest.mark.parametrize("proposer", ["ngram", "draft", "self-draft", "layer_skip"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_tokens_equal_plain_greedy(proposer, k):
    spec = proposers(TARGET)[proposer](k)
    out = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=(), speculative=spec)
    assert torch.equal(out, PLAIN)
    stats = spec.stats
    assert all(0 <= a <= p for a, p in zip(stats.accepted, stats.proposed))
    if proposer == "self-draft":  # the target proposing for itself is always right
        assert stats.accepted == stats.proposed and stats.acceptance_rate == 1.0


@pytest.mark.parametrize("kind", ["gpt2", "mistral", "qwen2"])
def test_greedy_equals_plain_greedy_on_other_architectures(kind):
    # GPT-2: learned positions and `transformer.h` layers (layer skip); Mistral: a sliding
    # window shorter than the sequence (the draft's masked catch-up padding shifts its window,
    # which changes proposals, never the tokens).
    model = _tiny_model(kind, 0, max_positions=512)
    plain = generate(model, IDS, 20, attention_mask=MASK, stop_token_ids=())
    for spec in (Speculative(ngram=2, k=3), Speculative(draft=model, k=4), Speculative(layer_skip=1, k=2)):
        assert torch.equal(generate(model, IDS, 20, attention_mask=MASK, stop_token_ids=(), speculative=spec), plain)


@pytest.mark.parametrize("proposer", ["ngram", "self-draft", "layer_skip"])
def test_greedy_with_stop_tokens_equals_plain_greedy(proposer):
    # Stop tokens that rows produce at different steps: rows finish at different times.
    stops = (int(PLAIN[0, 8 + 5]), int(PLAIN[2, 8 + 11]))
    expected = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=stops, pad_token_id=0)
    spec = proposers(TARGET)[proposer](4)
    out = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=stops, pad_token_id=0, speculative=spec)
    assert torch.equal(out, expected)


def test_ragged_rows_accept_different_numbers_of_tokens():
    # Repetitive prompts make prompt lookup right often, and differently per row.
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
                        [0, 0, 20, 21, 20, 21, 20, 21, 20, 21]])
    mask = (torch.arange(10)[None, :] >= torch.tensor([[0], [0], [2]])).long()
    plain = generate(TARGET, ids, 30, attention_mask=mask, stop_token_ids=())
    spec = Speculative(ngram=2, k=4)
    out = generate(TARGET, ids, 30, attention_mask=mask, stop_token_ids=(), speculative=spec)
    assert torch.equal(out, plain)
    assert len(set(spec.stats.accepted)) > 1, spec.stats
    # each step yields one token plus the accepted ones: fewer target forwards than tokens
    assert min(spec.stats.steps) < 29


def test_llmopt_compiled_target_and_draft_greedy_equal_plain_without_recompiling():
    from llmopt.backend import llmopt_backend

    graphs = []

    def counting_llmopt(gm, example_inputs):
        graphs.append(gm)
        return llmopt_backend(gm, example_inputs, options={"strict": True})

    torch.compiler.reset()
    target = torch.compile(TARGET, backend=counting_llmopt, dynamic=False)
    draft = torch.compile(layer_skip_draft(TARGET, 1), backend=counting_llmopt, dynamic=False)
    spec = Speculative(draft=draft, k=3)
    out = generate(target, IDS, 6, attention_mask=MASK, stop_token_ids=(), speculative=spec, max_seq_len=64)
    assert torch.equal(out, PLAIN[:, :14])
    after_short = len(graphs)
    # target: prefill [4, 8], verify [4, k + 1]; draft: prefill, catch-up [4, k + 1], step [4, 1]
    assert after_short == 5
    out = generate(target, IDS, 24, attention_mask=MASK, stop_token_ids=(), speculative=spec, max_seq_len=64)
    assert torch.equal(out, PLAIN)
    # Verify and draft shapes are fixed by k: more tokens and other acceptances, no new graph.
    assert len(graphs) == after_short


def test_cache_counter_is_rolled_back_to_the_committed_tokens():
    from llmopt.runtime import StaticKVCache

    cache = StaticKVCache(TARGET.config, batch_size=4, max_seq_len=8 + 24 + 4)
    spec = Speculative(draft=tiny_model(seed=7), k=4)  # a poor draft: many rejections
    out = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=(), speculative=spec, cache=cache)
    assert torch.equal(out, PLAIN)
    committed = int(cache.slots_written())
    assert committed == cache.num_tokens
    # Rejected proposals were written past the counter and rolled back: it stops short of
    # the last verify step's writes, and at most the prompt plus the tokens generated.
    assert 8 + 1 <= committed <= 8 + 24 - 1


# -- the acceptance rule ------------------------------------------------------------------
def test_greedy_verify_accepts_the_prefix_that_matches_the_argmax():
    vocab = 5
    # window: 1 pending token then 3 proposals; the target's argmax after each position:
    best = torch.tensor([[3, 4, 0, 2], [3, 4, 0, 2], [3, 4, 0, 2]])
    logits = torch.nn.functional.one_hot(best, vocab).float()
    window = torch.tensor([[1, 3, 4, 1], [1, 2, 4, 0], [1, 3, 4, 0]])
    pending = torch.tensor([1, 1, 2])  # row 2: two known tokens, two proposals
    correct, new = verify_proposals(window, pending, logits, SamplingParams())
    assert correct.tolist() == [3, 1, 4]
    assert new.tolist() == [0, 3, 2]


def test_ngram_proposer_continues_the_latest_match():
    proposer = NgramProposer(ngram=3, ngram_min=1, k=3)
    assert proposer.propose_row([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]) == [7, 8, 1]
    assert proposer.propose_row([4, 5, 6]) == [6, 6, 6]  # no match: repeat the last token
    assert proposer.propose_row([4, 5, 4]) == [5, 4, 4]  # 1-gram fallback, short continuation padded


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square; cells expected < 5 pooled into one."""
    total = int(counts.sum())
    expected = probs.double() * total
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _peaked(model, scale: float):
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _exact_joint(model, prompt: torch.Tensor, steps: int, params: SamplingParams) -> torch.Tensor:
    """Probability of every continuation of ``steps`` tokens, ``[V ** steps]`` (lexicographic)."""
    from llmopt.runtime.speculative import processed_probs

    vocab = model.config.vocab_size
    seqs = prompt[None, :]
    joint = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seqs).logits[:, -1]
            p = processed_probs(logits, params).double()
            joint = (joint[:, None] * p).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(seqs.shape[0])[:, None]], 1)
    return joint


@pytest.mark.parametrize("proposer", ["draft", "ngram", "layer_skip"])
def test_sampled_tokens_follow_the_target_distribution(proposer):
    vocab, steps, draws = 6, 3, 6000
    target = _peaked(tiny_llama(vocab, seed=3), 15.0)
    params = SamplingParams(temperature=1.0, top_k=5, seed=1234)
    spec = {
        "draft": Speculative(draft=_peaked(tiny_llama(vocab, seed=4), 15.0), k=2),
        "ngram": Speculative(ngram=2, k=2),
        "layer_skip": Speculative(layer_skip=1, k=2),
    }[proposer]
    prompt = torch.tensor([3, 4, 5, 3, 4])
    out = generate(target, prompt.repeat(draws, 1), steps, sampling=params, stop_token_ids=(), speculative=spec)
    generated = out[:, -steps:]
    index = (generated * torch.tensor([vocab ** (steps - 1 - i) for i in range(steps)])).sum(-1)
    counts = torch.bincount(index, minlength=vocab ** steps)
    exact = _exact_joint(target, prompt, steps, params)
    assert math.isclose(float(exact.sum()), 1.0, rel_tol=tolerance(torch.float32))  # fp32 softmax
    assert _chi_square_p_value(counts, exact) > SIGNIFICANCE
    # Both branches of the rule ran: some proposals accepted, some rejected.
    assert 0 < sum(spec.stats.accepted) < sum(spec.stats.proposed)
    if proposer == "draft":
        # The test has power: the same draws are far from the draft's own distribution.
        draft_joint = _exact_joint(spec.draft, prompt, steps, params)
        assert _chi_square_p_value(counts, draft_joint) < 1e-12


# -- bad input ----------------------------------------------------------------------------
def test_bad_speculative_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"k=0 .* int >= 1"):
        Speculative(ngram=3, k=0)
    with pytest.raises(ValueError, match=r"k=-2"):
        Speculative(draft=TARGET, k=-2)
    with pytest.raises(ValueError, match="exactly one proposer"):
        Speculative(k=4)
    with pytest.raises(ValueError, match="exactly one proposer"):
        Speculative(draft=TARGET, ngram=3)
    with pytest.raises(ValueError, match="vocab_size is 200, the target's 160"):
        generate(TARGET, IDS, 4, attention_mask=MASK, speculative=Speculative(draft=tiny_llama(200, seed=0)))
    with pytest.raises(ValueError, match=r"layer_skip=2 must be an int in \[1, 1\]"):
        generate(TARGET, IDS, 4, attention_mask=MASK, speculative=Speculative(layer_skip=2))
    with pytest.raises(ValueError, match="repetition_penalty is not supported"):
        generate(TARGET, IDS, 4, attention_mask=MASK, repetition_penalty=1.2, speculative=Speculative(ngram=2))
    with pytest.raises(TypeError, match="llmopt.Speculative"):
        generate(TARGET, IDS, 4, attention_mask=MASK, speculative={"k": 4})


def test_cache_too_small_for_prompt_plus_new_tokens_plus_k_says_what_is_needed():
    # prompt 8 + 10 new + k 4 - 1 = 21 slots written at most
    with pytest.raises(KVCacheFullError, match="20 tokens reserved, 21 needed; pass max_seq_len >= 21"):
        generate(TARGET, IDS, 10, attention_mask=MASK, max_seq_len=20, speculative=Speculative(ngram=3, k=4))
    out = generate(TARGET, IDS, 10, attention_mask=MASK, max_seq_len=21, stop_token_ids=(),
                   speculative=Speculative(ngram=3, k=4))
    assert torch.equal(out, PLAIN[:, :18])


def test_layer_skip_draft_shares_the_targets_weights():
    draft = layer_skip_draft(TARGET, 1)
    assert len(draft.model.layers) == 1 and len(TARGET.model.layers) == 2
    assert draft.config.num_hidden_layers == 1 and TARGET.config.num_hidden_layers == 2
    assert draft.model.layers[0].self_attn.q_proj.weight is TARGET.model.layers[0].self_attn.q_proj.weight
    assert draft.lm_head.weight is TARGET.lm_head.weight


def test_streamer_gets_every_token_column_in_order():
    columns = []
    spec = Speculative(ngram=3, k=4)
    out = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=(), speculative=spec,
                   streamer=lambda step, tokens: columns.append((step, tokens.tolist())))
    assert [s for s, _ in columns] == list(range(24))
    assert torch.equal(torch.tensor([t for _, t in columns]).T, out[:, 8:])


def test_sampling_is_reproducible_with_a_seed():
    def run(seed):
        return generate(TARGET, IDS, 16, attention_mask=MASK, stop_token_ids=(), temperature=0.9, top_p=0.9,
                        seed=seed, speculative=Speculative(layer_skip=1, k=3))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.parametrize("new", [1, 2, 3])
def test_fewer_new_tokens_than_k(new):
    for spec in (Speculative(ngram=2, k=8), Speculative(draft=TARGET, k=8)):
        out = generate(TARGET, IDS, new, attention_mask=MASK, stop_token_ids=(), speculative=spec)
        assert torch.equal(out, PLAIN[:, :8 + new])


def test_sampling_with_top_k_1_is_greedy():
    # Sampling path (acceptance rule, residual draws) with a point-mass target distribution.
    for spec in (Speculative(layer_skip=1, k=3), Speculative(ngram=3, k=2)):
        out = generate(TARGET, IDS, 24, attention_mask=MASK, stop_token_ids=(), temperature=1.0, top_k=1, seed=0,
                       speculative=spec)
        assert torch.equal(out, PLAIN)


def test_positions_never_pass_what_plain_decoding_uses():
    # GPT-2's learned position table ends at n_positions = prompt + new tokens: proposals past
    # the request (k = 8 near the end) must not index past it.
    model = _tiny_model("gpt2", 0, max_positions=8 + 20)
    plain = generate(model, IDS, 20, attention_mask=MASK, stop_token_ids=())
    for spec in (Speculative(ngram=2, k=8), Speculative(draft=model, k=8), Speculative(layer_skip=1, k=8)):
        assert torch.equal(generate(model, IDS, 20, attention_mask=MASK, stop_token_ids=(), speculative=spec), plain)
