"""``Engine(model, speculative=Speculative(ngram=n, k=k))``: speculative decode steps in the
continuous-batching engine (llmopt/runtime/engine.py, ``_speculative_step``, and engine_speculation.py).

Oracle: greedy tokens equal ``llmopt.generate`` on each request alone (requests arriving at
different steps, of different lengths, with stop tokens), each request accepting its own
number of proposals; the paged cache's rejected slots are rolled back (block-table
truncation) so every block is free at the end; per-request acceptance stats.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmopt.runtime import SamplingParams, generate  # noqa: E402
from llmopt.runtime.engine import Engine  # noqa: E402
from llmopt.runtime.paged_cache import PagedKVCache  # noqa: E402
from llmopt.runtime.speculative import Speculative  # noqa: E402
from runtime.tiny_lm import VOCAB  # noqa: E402
from runtime.tiny_lm import tiny_model as _tiny_model  # noqa: E402
from runtime.engine_workload import run_with_arrivals  # noqa: E402

LENGTHS = [5, 17, 9, 12]
NEW = [20, 9, 16, 24]
ARRIVE = [0, 0, 2, 5]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def prompts():
    g = torch.Generator().manual_seed(1)
    # half random, half a repeated motif: prompt lookup is right for some requests only
    out = []
    for i, n in enumerate(LENGTHS):
        if i % 2:
            motif = torch.randint(3, VOCAB, (3,), generator=g).tolist()
            out.append((motif * n)[:n])
        else:
            out.append(torch.randint(3, VOCAB, (n,), generator=g).tolist())
    return out


def perturbed_copy(model):
    import copy

    draft = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if "mlp" in name or ".h.1." in name:
                param.add_(torch.randn_like(param) * 0.02, alpha=1.0)
    return draft


def alone(model, prompt, max_new, stops=()):
    out = generate(model, torch.tensor([prompt]), max_new, stop_token_ids=stops)
    return out[0, len(prompt):].tolist()


def run(engine, arrivals, params):
    """The workload; returns (ids, request id -> its streamed tokens)."""
    ids, streamed = run_with_arrivals(engine, arrivals, params)
    return ids, {rid: [token for token, _ in tokens] for rid, tokens in streamed.items()}


@pytest.mark.parametrize("kind, k, proposer", [("llama", 3, "ngram"), ("gpt2", 5, "ngram"), ("llama", 4, "draft"),
                                               ("qwen2", 2, "draft")])
def test_speculative_engine_greedy_equals_each_request_alone(kind, k, proposer):
    model = _tiny_model(kind, 0, sliding_window=8)
    ps = prompts()
    expected = [alone(model, p, n) for p, n in zip(ps, NEW)]
    # The draft: a separate copy of the target with its last layer's MLP perturbed (it agrees often, not always).
    spec = Speculative(ngram=3, k=k) if proposer == "ngram" else Speculative(draft=perturbed_copy(model), k=k)
    engine = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64, speculative=spec)
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in NEW]
    ids, streamed = run(engine, list(zip(ARRIVE, ps)), params)
    for i, rid in ids.items():
        assert engine.output(rid) == expected[i], f"request {i}"
        assert streamed[rid] == expected[i]
    accepted = [engine.speculative_stats(rid).accepted[0] for rid in ids.values()]
    assert len(set(accepted)) > 1, accepted  # requests accept different numbers of tokens
    assert max(accepted) > 0
    assert engine.cache.num_free_blocks == engine.cache.allocator.num_blocks
    engine.close()


def test_speculative_engine_stops_like_generate():
    model = _tiny_model("llama", 0)
    ps = prompts()
    free = [alone(model, p, n) for p, n in zip(ps, NEW)]
    stops = (free[1][4], free[3][10])
    expected = [alone(model, p, n, stops) for p, n in zip(ps, NEW)]
    engine = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64, speculative=Speculative(ngram=2, k=4))
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=stops) for n in NEW]
    ids, _ = run(engine, list(zip(ARRIVE, ps)), params)
    for i, rid in ids.items():
        assert engine.output(rid) == expected[i], f"request {i}"
    assert any(engine.output(rid)[-1] in stops for rid in ids.values())
    engine.close()


def test_paged_truncate_frees_the_blocks_past_the_kept_tokens():
    model = _tiny_model("llama", 0)
    cache = PagedKVCache.from_config(model.config, num_blocks=8, block_size=4)
    cache.add_sequence("a")
    cache.append_slots("a", 6)
    cache.append_slots("a", 5)  # 11 tokens: 3 blocks
    assert cache.num_free_blocks == 5
    cache.truncate("a", 5)
    assert cache.seq_len("a") == 5 and len(cache.block_table("a")) == 2 and cache.num_free_blocks == 6
    assert cache.append_slots("a", 1)[0] == cache.block_table("a")[1] * 4 + 1  # next slot after the kept ones
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate("a", 7)


def test_engine_speculation_errors():
    model = _tiny_model("llama", 0)
    with pytest.raises(NotImplementedError, match="sharing the target's layers"):
        Engine(model, speculative=Speculative(draft=model, k=2))
    with pytest.raises(NotImplementedError, match="sharing the target's layers"):
        Engine(model, speculative=Speculative(layer_skip=1, k=2))
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocab_size is 200, the target's 160"):
        Engine(model, speculative=Speculative(draft=other, k=2))
    with pytest.raises(TypeError, match="llmopt.Speculative"):
        Engine(model, speculative=3)
    assert model.config._attn_implementation != "llmopt_paged"  # refused before switching the model


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_engine_sampling_is_seeded(proposer):
    model = _tiny_model("llama", 0)
    ps = prompts()
    draft = perturbed_copy(model)

    def run():
        spec = Speculative(ngram=2, k=3) if proposer == "ngram" else Speculative(draft=draft, k=3)
        engine = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64, speculative=spec)
        params = [SamplingParams(max_new_tokens=n, stop_token_ids=(), temperature=0.8, seed=i)
                  for i, n in enumerate(NEW)]
        ids, _ = run_engine(engine, params, ps)
        out = [engine.output(rid) for rid in ids.values()]
        engine.close()
        return out

    first, second = run(), run()
    assert first == second
    assert [len(o) for o in first] == NEW


def run_engine(engine, params, ps):
    return run(engine, list(zip(ARRIVE, ps)), params)


def test_speculative_engine_with_preemption_and_a_small_token_budget():
    model = _tiny_model("llama", 0)
    ps = prompts()
    expected = [alone(model, p, n) for p, n in zip(ps, NEW)]
    draft = perturbed_copy(model)
    # too few blocks: preemption; a small budget: normal (fallback) steps between speculative ones,
    # after which a draft's cache is behind by more than one catch-up and is rebuilt
    for num_blocks, budget, spec in ((14, None, Speculative(ngram=2, k=4)), (20, 8, Speculative(ngram=2, k=4)),
                                     (14, None, Speculative(draft=draft, k=3)), (20, 8, Speculative(draft=draft, k=3))):
        engine = Engine(model, max_num_seqs=4, block_size=4, num_blocks=num_blocks, max_model_len=64,
                        max_num_batched_tokens=budget, speculative=spec)
        params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in NEW]
        ids, _ = run(engine, list(zip(ARRIVE, ps)), params)
        assert [engine.output(ids[i]) for i in range(len(ps))] == expected
        assert engine.cache.num_free_blocks == num_blocks
        if budget is None:
            assert engine.stats.preemptions >= 1
        engine.close()


def test_a_raising_callback_in_a_speculative_step_ends_only_its_request():
    # Speculative steps commit every accepted token before any callback runs, like step().
    from llmopt.runtime.engine import EngineCallbackError

    model = _tiny_model("llama", 0)
    ps = prompts()[:2]
    expected = [alone(model, p, 12) for p in ps]
    engine = Engine(model, max_num_seqs=4, block_size=4, max_model_len=64, speculative=Speculative(ngram=2, k=3))
    seen: dict[int, list[int]] = {}

    def fine(request_id, token, finished):
        seen.setdefault(request_id, []).append(token)

    def boom(request_id, token, finished):
        raise RuntimeError("callback failed")

    good = engine.add_request(ps[0], SamplingParams(max_new_tokens=12), callback=fine)
    bad = engine.add_request(ps[1], SamplingParams(max_new_tokens=12), callback=boom)
    errors = 0
    while engine.has_unfinished():
        try:
            engine.step()
        except EngineCallbackError as exc:
            errors += 1
            assert exc.request_id == bad and isinstance(exc.__cause__, RuntimeError)
    assert errors == 1 and isinstance(engine.error(bad), RuntimeError)
    assert engine.output(good) == expected[0] and seen[good] == expected[0]
    assert engine.output(bad) == expected[1][: len(engine.output(bad))]
    assert engine.cache.num_free_blocks == engine.cache.allocator.num_blocks
    engine.close()
