"""The shipped CPU default: ``inner="auto"`` is Inductor, with llmopt's ops inlined as ATen.

The rest of the suite runs the aten executor (``LLMOPT_CPU_EXECUTOR=aten`` in conftest:
Inductor's C++ compile of every test model would take the suite past its time budget);
this module unsets it and checks, on real Hugging Face architectures, what a user gets:
the executor chosen, the decomposition applied (no ``llmopt`` row-wise op or linear left
as an extern call in the code Inductor generated), and numerics — logits against eager
and an fp64 truth within the tolerance table, greedy tokens equal over a static cache.
"""
from __future__ import annotations

import pytest
import torch

import llmopt
from conftest import assert_close
from llmopt.backend import CPU_EXECUTOR_ENV, default_executor
from llmopt.codegen.cpu_decompositions import cpu_decompositions
from models.tiny import tiny_model, tokens

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture
def shipped_default(monkeypatch):
    monkeypatch.delenv(CPU_EXECUTOR_ENV, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_auto_is_inductor_on_cpu_and_the_variable_overrides_it(monkeypatch):
    monkeypatch.delenv(CPU_EXECUTOR_ENV, raising=False)
    assert default_executor("cpu") == "inductor"
    monkeypatch.setenv(CPU_EXECUTOR_ENV, "aten")
    assert default_executor("cpu") == "aten"
    monkeypatch.setenv(CPU_EXECUTOR_ENV, "fast")
    with pytest.raises(ValueError, match="LLMOPT_CPU_EXECUTOR='fast' is not an executor; use 'aten' or 'inductor'"):
        default_executor("cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_executor_matches_eager_and_fp64(family, shipped_default):
    model = tiny_model(family)
    x = tokens(2, 9)
    with torch.no_grad():
        expected = model(x).logits
        truth = tiny_model(family).double()(x).logits  # same seed: same weights
        got = torch.compile(model, backend="llmopt", options={"strict": True})(x).logits
    report = llmopt.last_report()
    assert report.executor == "inductor", report.fallbacks
    assert_close(got, truth, torch.float32, what=f"{family} vs fp64")
    assert_close(got, expected.double(), torch.float32, what=f"{family} vs eager")


def test_decode_over_a_static_cache_gives_eager_tokens(shipped_default):
    from transformers import StaticCache

    model = tiny_model("llama")
    prompt = tokens(1, 7)

    def greedy(forward, steps=6):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            out = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(7), use_cache=True)
            tok, seq = out.logits[:, -1:].argmax(-1), []
            for pos in range(7, 7 + steps):
                seq.append(int(tok))
                out = forward(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([pos]), use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
        return seq

    expected = greedy(model.forward)
    assert greedy(torch.compile(model.forward, backend="llmopt", options={"strict": True})) == expected
    report = llmopt.last_report()
    assert report.executor == "inductor"
    # The decode graph still calls llmopt's attention and cache ops (run-time lengths), and
    # nothing the CPU table inlines.
    inlined = {f"llmopt.{op.name().split('::')[1]}.default" for op in cpu_decompositions()}
    assert "llmopt.attention_decode.default" in report.ops_after or "llmopt.attention_prefill.default" in report.ops_after
    assert inlined & set(report.ops_after), "the report lists the ops before Inductor inlines them"


def test_decompositions_compute_what_the_ops_compute():
    """Each table entry against its op on random inputs (the op's own CPU path)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(16, generator=g)
    r = torch.randn(3, 5, 16, generator=g)
    W = torch.randn(24, 16, generator=g)
    b = torch.randn(24, generator=g)
    ops, table = torch.ops.llmopt, cpu_decompositions()
    cases = [
        (ops.rms_norm.default, (x, w, 1e-6, 0.0)),
        (ops.add_rms_norm.default, (x, r, w, 1e-6, 1.0)),
        (ops.layer_norm.default, (x, w, w, 1e-5)),
        (ops.add_layer_norm.default, (x, r, w, None, 1e-5)),
        (ops.gated_activation.default, (x, r, "silu")),
        (ops.linear.default, (x, W, b, None, "gelu_tanh", "")),
        (ops.linear.default, (x, W[:16], None, r, "", "1:mm,inf:mm")),
    ]
    for op, args in cases:
        want, got = op(*args), table[op](*args)
        for a, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert_close(a, e, torch.float32, what=str(op))
