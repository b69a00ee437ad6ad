"""Quantized (and sharded) weights replace the originals: the floats are released after compiling.

The contract (README "Frozen weights", llmopt/weight_release.py):
- a compiled ``quantize=`` model holds no float copy of a quantized weight: its storage is
  0 bytes, the parameter keeps shape, stride, dtype and device (Dynamo's guards hold);
- a recompile (new batch size, dynamic shape) reuses the quantized constants: it never
  quantizes again, so never quantizes freed memory;
- an eager call of a module whose weight was released, or its ``load_state_dict``, raises
  a clear llmopt error; a compile that would need the freed values raises one too;
- ``options={"release_weights": False}`` keeps the originals;
- a storage that another live compiled graph reads in place is not released.
The memory bound (compiled peak <= eager + 10% of the weight bytes) is in test_weight_storage.
"""
import copy

import pytest
import torch

import llmopt
from conftest import assert_close
from llmopt.weight_release import ReleasedWeightError, released
from models.tiny import tiny_model, tokens

QUANTIZED = {"llama": ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"),
             "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj")}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def held_bytes(model) -> int:
    """Bytes of the distinct storages behind the parameters (merged Q/K/V share one)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def compile_int8(model, **extra):
    return torch.compile(model, backend="llmopt", options={"strict": True, "quantize": "int8", **extra})


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_quantized_floats_are_released_and_a_recompile_reuses_the_quantized_weights(name, monkeypatch):
    model = tiny_model(name)
    kept = copy.deepcopy(model)  # the reference: the same quantized compile, originals kept
    before = held_bytes(model)
    compiled, reference = compile_int8(model), compile_int8(kept, release_weights=False)
    with torch.no_grad():
        got = compiled(tokens(1, 6)).logits
        assert any("released" in n for n in llmopt.last_report().notes)
        assert_close(got, reference(tokens(1, 6)).logits, torch.float32, what="released vs kept, first compile")
        for module in QUANTIZED[name]:
            w = model.get_submodule(module).weight
            assert released(w) is not None and w.untyped_storage().nbytes() == 0
            assert w.shape == kept.get_submodule(module).weight.shape
            assert w.stride() == kept.get_submodule(module).weight.stride()
        assert held_bytes(model) < 0.5 * before
        assert held_bytes(kept) == before

        from llmopt.quant import schemes

        calls = []
        real_quantize = schemes.quantize_weight
        monkeypatch.setattr(schemes, "quantize_weight", lambda *a, **k: calls.append(a) or real_quantize(*a, **k))
        last_report = (llmopt.reports() or [None])[-1]  # the registry keeps the last 64 reports
        for batch, seq in ((3, 6), (2, 9)):  # new shapes: Dynamo recompiles, llmopt re-freezes
            got = compiled(tokens(batch, seq)).logits
            assert_close(got, reference(tokens(batch, seq)).logits, torch.float32, what=f"recompile {batch}x{seq}")
        assert llmopt.reports()[-1] is not last_report  # it did recompile
        released_calls = [a for a in calls if a[0].untyped_storage().nbytes() == 0]
        assert not released_calls, "a recompile quantized a released weight"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_eager_use_of_a_released_weight_raises_a_clear_error(name):
    model = tiny_model(name)
    compiled = compile_int8(model)
    with torch.no_grad():
        compiled(tokens(1, 6))
        with pytest.raises(ReleasedWeightError, match="called eagerly.*released after torch.compile.*release_weights"):
            model(tokens(1, 6))
        with pytest.raises(ReleasedWeightError, match="load_state_dict.*release_weights"):
            model.load_state_dict(model.state_dict())
        compiled(tokens(1, 6))  # the compiled model still works


def test_release_weights_false_keeps_the_originals():
    model = tiny_model("llama")
    before = held_bytes(model)
    compiled = compile_int8(model, release_weights=False)
    x = tokens(1, 6)
    with torch.no_grad():
        compiled(x)
        assert held_bytes(model) >= before
        assert not any("released" in n for n in llmopt.last_report().notes)
        model(x)  # eager still works


def test_a_compile_that_needs_released_values_raises_instead_of_reading_freed_memory():
    model = tiny_model("llama")
    with torch.no_grad():
        compile_int8(model)(tokens(1, 6))
        torch._dynamo.reset()
        unquantized = torch.compile(model, backend="llmopt", options={"strict": True})
        with pytest.raises(Exception, match="released after an earlier compile") as info:
            unquantized(tokens(1, 6))
        assert "release_weights" in str(info.value)


def test_an_unoptimized_fallback_over_released_weights_raises_a_clear_error():
    """A call with grad mode on recompiles; llmopt optimizes inference only and would hand
    the Dynamo graph back to run as is, reading the released floats: that must be a
    ReleasedWeightError naming the fix, not torch's storage-size error (found by calling a
    quantized model outside torch.no_grad())."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="llmopt", options={"quantize": "int8"})  # not strict: it falls back
    with torch.no_grad():
        expected = compiled(tokens(1, 6)).logits
    with pytest.raises(Exception, match="would run unoptimized.*autograd is recording.*reads model.layers.*"
                                        "released.*torch.no_grad.*release_weights") as info:
        compiled(tokens(1, 6))
    assert "setStorage" not in str(info.value)
    with torch.no_grad():
        assert_close(compiled(tokens(1, 6)).logits, expected, torch.float32, what="the compiled model still works")


def test_weights_another_compiled_graph_reads_in_place_are_not_released():
    model = tiny_model("llama")
    x = tokens(1, 6)
    with torch.no_grad():
        want = model(x).logits
        plain = torch.compile(model, backend="llmopt", options={"strict": True})
        plain(x)
        before = held_bytes(model)
        compile_int8(model)(x)
        assert held_bytes(model) == before  # the first graph reads every float weight
        assert_close(plain(x).logits, want, torch.float32)
        model(x)


def test_release_during_quantization_indexes_the_graph_once_per_compile(monkeypatch):
    """release_unread runs after each quantized linear: it looks the weight's other readers up
    in an index built once per compile (linear in the linears), not in a scan per linear."""
    from llmopt import weight_release

    builds = []
    real = weight_release._readers_by_storage
    monkeypatch.setattr(weight_release, "_readers_by_storage", lambda gm: builds.append(gm) or real(gm))
    model = tiny_model("llama")
    with torch.no_grad():
        compile_int8(model)(tokens(1, 6))
    quantized = next(p.rewrites for p in llmopt.last_report().passes if p.name == "quantize_linears")
    assert quantized > 4 and len(builds) == 1
    assert released(model.get_submodule("model.layers.0.self_attn.q_proj").weight) is not None
