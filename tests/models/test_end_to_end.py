"""Real Hugging Face architectures, compiled with llmopt, against eager.

Logits within the tolerance table (fp32, bf16); greedy ``generate`` with the compiled
forward (dynamic cache and static cache) gives exactly the eager tokens.
"""
import pytest
import torch

import llmopt
from compiled import generate_eager_and_compiled
from conftest import assert_close
from models.tiny import CAUSAL, tiny_model, tokens

FAMILIES = ["llama", "gpt2", "bert", "mistral", "qwen2", "gemma", "phi"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family, dtype):
    model = tiny_model(family, dtype)
    x = tokens(2, 11)
    with torch.no_grad():
        expected = model(x)[0]
        compiled = torch.compile(model, backend="llmopt", options={"strict": True})
        actual = compiled(x)[0]
    assert_close(actual, expected, dtype, what=f"{family} logits")
    report = llmopt.last_report()
    assert report is not None and report.frozen_constants > 0
    assert all(p.status != "failed" for p in report.passes)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_generate_tokens_equal_eager(family, cache):
    model = tiny_model(family)
    x = tokens(1, 6)
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    expected, actual = generate_eager_and_compiled(model, x, max_new_tokens=12, **kwargs)
    assert torch.equal(actual, expected)


def test_generate_batch_of_ragged_prompts():
    model = tiny_model("llama")
    x = tokens(3, 7)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    expected, actual = generate_eager_and_compiled(model, x, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(actual, expected)


def test_all_causal_families_are_tested():
    assert set(CAUSAL) <= set(FAMILIES)
