"""Frozen weights are held once, and a weight changed after compiling is never silently old.

The contract (README "Frozen weights", llmopt/frozen_weights.py):
- in place (``p.data.copy_``, ``p.copy_`` under no_grad, ``load_state_dict``): the compiled
  graph reads the weights' storage — merged Q/K/V and gate/up included, whose parameters
  are views into the merged weight — so it gives the new weights' logits without a
  recompile; a quantized weight raises instead (the graph reads its quantized copy);
- replaced (``p.data = new``, ``module.weight = nn.Parameter(new)``): raises at the next
  call (or Dynamo recompiles on the new object, and the logits are the new ones);
- peak memory of a compiled model is at most eager's + 10% of the weight bytes, quantized
  inside the graph (``quantize="int8"``) too: the floats are released (test_weight_release).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import llmopt
from conftest import assert_close
from llmopt.frozen_weights import reusable_storage
from models.tiny import tiny_model, tokens

CHANGED = "weight changed after compilation"

# Per model: a merged (Llama q_proj) or re-laid-out (GPT-2 Conv1D c_attn, read through a
# transposed view) linear weight, a linear weight read as is, and a norm weight.
WEIGHTS = {
    "llama": ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.1.post_attention_layernorm.weight"],
    "gpt2": ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.h.0.ln_2.weight"],
}
QUANTIZED = {"llama": "model.layers.0.self_attn.k_proj.weight", "gpt2": "transformer.h.1.attn.c_attn.weight"}
SPELLINGS = ["p.data.copy_", "p.copy_", "load_state_dict", "p.data =", "nn.Parameter"]
IN_PLACE = {"p.data.copy_", "p.copy_", "load_state_dict"}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def change(model: nn.Module, name: str, how: str, seed: int = 1) -> None:
    """Give ``name`` new random values, spelled ``how``."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    p = getattr(module, attr)
    new = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype) * p.detach().std()
    if how == "p.data.copy_":
        p.data.copy_(new)
    elif how == "p.copy_":
        with torch.no_grad():
            p.copy_(new)
    elif how == "load_state_dict":
        state = model.state_dict()
        state[name] = new
        model.load_state_dict(state)
    elif how == "p.data =":
        p.data = new
    elif how == "nn.Parameter":
        setattr(module, attr, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        raise ValueError(how)


def compiled_logits(compiled, x):
    with torch.no_grad():
        return compiled(x).logits


def assert_new_logits_or_raises(model, compiled, x, may_raise: bool):
    with torch.no_grad():
        want = model(x).logits
    try:
        got = compiled_logits(compiled, x)
    except RuntimeError as exc:
        assert may_raise, f"raised on an in-place change the graph should see: {exc}"
        assert CHANGED in str(exc) and "torch.compiler.reset()" in str(exc)
        return "raised"
    assert_close(got, want, torch.float32, what="compiled logits after the change vs eager")
    return "new logits"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_weight_change_gives_new_logits_or_raises(name):
    """Every spelling, on merged / re-laid-out / as-is linear weights and a norm weight."""
    model = tiny_model(name)
    compiled = torch.compile(model, backend="llmopt", options={"strict": True})
    x = tokens(1, 6)
    compiled_logits(compiled, x)
    for seed, how in enumerate(SPELLINGS, start=1):
        for i, weight in enumerate(WEIGHTS[name]):
            change(model, weight, how, seed=10 * seed + i)
        outcome = assert_new_logits_or_raises(model, compiled, x, may_raise=how not in IN_PLACE)
        if how in IN_PLACE:
            assert outcome == "new logits", how  # no recompile needed: the graph reads these storages
        elif how == "p.data =":
            assert outcome == "raised"  # the same parameter object: only the storage check sees it
        if outcome == "raised":
            torch._dynamo.reset()  # what the message says to do; the next call recompiles
            assert assert_new_logits_or_raises(model, compiled, x, may_raise=False) == "new logits"


@pytest.mark.parametrize("how", [s for s in SPELLINGS if s != "p.data.copy_"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_quantized_weight_change_raises(name, how):
    model = tiny_model(name)
    compiled = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": "int8", "release_weights": False})
    x = tokens(1, 6)
    compiled_logits(compiled, x)
    change(model, QUANTIZED[name], how)
    outcome = assert_new_logits_or_raises(model, compiled, x, may_raise=True)
    if how != "nn.Parameter":
        assert outcome == "raised"


@pytest.mark.xfail(strict=True, reason="documented limit: an in-place write through p.data to a weight the compiler "
                   "quantized bypasses the version counter and cannot be seen without reading the weights at "
                   "every call (README 'Frozen weights'; use llmopt.quantize_ before compiling)")
def test_quantized_weight_changed_through_data_is_seen():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": "int8", "release_weights": False})
    x = tokens(1, 6)
    compiled_logits(compiled, x)
    change(model, QUANTIZED["llama"], "p.data.copy_")
    assert_new_logits_or_raises(model, compiled, x, may_raise=True)


def test_unquantized_weights_of_a_quantized_model_are_read_in_place():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": "int8", "release_weights": False})
    x = tokens(1, 6)
    compiled_logits(compiled, x)
    change(model, "model.layers.1.post_attention_layernorm.weight", "p.data.copy_")
    got = compiled_logits(compiled, x)
    torch._dynamo.reset()  # the reference: the same quantized compile of the changed model
    assert_close(got, compiled_logits(compiled, x), torch.float32)


def test_merged_parameters_are_views_of_one_storage_shared_by_every_graph():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    compiled = torch.compile(model, backend="llmopt", options={"strict": True})
    compiled_logits(compiled, tokens(1, 6))
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.storage_offset() == q.storage_offset() + q.numel() and v.storage_offset() == k.storage_offset() + k.numel()
    assert any("read in place by the graph" in n for n in llmopt.last_report().notes)
    ptrs = [p.data_ptr() for p in model.parameters()]

    # A second graph (another batch size) merges the same weights without a copy.
    compiled_logits(compiled, tokens(2, 3))
    assert len(llmopt.reports()) >= 2
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    change(model, "model.layers.0.self_attn.v_proj.weight", "p.copy_")
    for batch, seq in ((1, 6), (2, 3)):  # both graphs see the change
        assert assert_new_logits_or_raises(model, compiled, tokens(batch, seq), may_raise=False) == "new logits"


def test_inductor_executor_reads_weights_in_place():
    """Inductor's FX graph cache must not hand the compiled graph copies of the weights
    (it did on a cache hit: the second compile of the same graph)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            return self.a(self.norm(x))

    torch.manual_seed(0)
    x = torch.randn(3, 16)
    for _ in range(2):  # the second compile hits Inductor's cache
        torch._dynamo.reset()
        m = Net().eval()
        f = torch.compile(m, backend="llmopt", options={"strict": True, "inner": "inductor"})
        with torch.no_grad():
            f(x)
            m.norm.weight.data.copy_(torch.randn(16))
            m.a.weight.data.copy_(torch.randn(16, 16))
            assert_close(f(x), m(x), torch.float32)


def test_a_weight_merged_twice_is_derived():
    """One linear applied twice to the same input: the merged weight holds it twice, and a
    parameter can be a view of one place only, so an in-place change raises."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8, bias=False)
            self.b = nn.Parameter(torch.randn(8))

        def forward(self, x):  # two different linears (one has a bias), one weight
            return self.a(x) * nn.functional.linear(x, self.a.weight, self.b).sigmoid()

    m = Twice().eval()
    x = torch.randn(3, 16)
    f = torch.compile(m, backend="llmopt", options={"strict": True, "only": ["normalize", "merge_parallel_linears"]})
    with torch.no_grad():
        assert_close(f(x), m(x), torch.float32)
        assert llmopt.last_report().rewrites_by_pass().get("merge_parallel_linears") == 1
        m.a.weight.copy_(torch.randn(8, 16))
        with pytest.raises(RuntimeError, match=f"{CHANGED}: a.weight was modified in place"):
            f(x)


def test_reusable_storage_only_for_adjacent_pieces():
    base = torch.randn(10, 4)
    a, b, c = base[0:2], base[2:7], base[7:10]
    merged = reusable_storage([a, b, c], [2, 5, 3])
    assert merged is not None and merged.data_ptr() == base.data_ptr() and torch.equal(merged, base)
    assert reusable_storage([a, c], [2, 3]) is None  # not adjacent
    assert reusable_storage([b, a], [5, 2]) is None  # wrong order
    assert reusable_storage([torch.randn(2, 4), torch.randn(5, 4)], [2, 5]) is None  # two storages
    bias = torch.zeros(10)
    bias[0:2], bias[7:10] = 1.0, 2.0
    assert torch.equal(reusable_storage([bias[0:2], None, bias[7:10]], [2, 5, 3]), bias)  # gap of zeros
    bias[4] = 3.0
    assert reusable_storage([bias[0:2], None, bias[7:10]], [2, 5, 3]) is None  # gap not zero


# ----------------------------------------------------------------------------- memory
# A Llama whose weights dominate the process (~300 MB fp32, 4 layers so it compiles fast;
# the compiler's own resident memory, ~15-20 MB whatever the model, stays a small part).
MEMORY_CONFIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)

_RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch, transformers as tf
    sys.path.insert(0, sys.argv[1])
    from models.tiny import tiny_model, tokens

    def peak_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**json.loads(sys.argv[2]))).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randint(1, 4096, (1, 16))
    with torch.no_grad():
        # Load and warm the compiler machinery first, with the same options (quantizing
        # imports its own modules): what is measured below is the weights, not the imports.
        small = tiny_model("llama")
        torch.compile(small, backend="llmopt", options=json.loads(sys.argv[3]))(tokens(1, 6))
        torch._dynamo.reset()
        del small
        gc.collect()
        model(x)
        eager_peak = peak_kb()
        compiled = torch.compile(model, backend="llmopt", options={"strict": True, **json.loads(sys.argv[3])})
        compiled(x)
        compiled(x)
        compiled_peak = peak_kb()
    print(json.dumps({"weight_bytes": weight_bytes, "eager_peak_kb": eager_peak, "compiled_peak_kb": compiled_peak}))
    """
)


# float: merged weights are the members' storage; int8: the quantized weights replace the
# floats (released as each linear is quantized, llmopt/weight_release.py).
MEMORY_OPTIONS = {"float": {}, "int8": {"quantize": "int8"}}


@pytest.mark.parametrize("options", sorted(MEMORY_OPTIONS))
def test_compiled_peak_rss_within_ten_percent_of_weights_over_eager(options):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests_dir), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, tests_dir, json.dumps(MEMORY_CONFIG), json.dumps(MEMORY_OPTIONS[options])],
        check=True, capture_output=True, text=True, timeout=600, env=env,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    extra = (m["compiled_peak_kb"] - m["eager_peak_kb"]) * 1024
    assert m["weight_bytes"] > 100e6
    assert extra <= 0.10 * m["weight_bytes"], (
        f"compiled peak RSS is eager's + {extra / 1e6:.1f} MB = {extra / m['weight_bytes']:.0%} of the "
        f"{m['weight_bytes'] / 1e6:.0f} MB of weights (limit 10%)"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (max_memory_allocated)")
@pytest.mark.parametrize("options", sorted(MEMORY_OPTIONS))
def test_compiled_peak_cuda_memory_within_ten_percent_of_weights_over_eager(options):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**MEMORY_CONFIG)).eval().cuda()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randint(1, 4096, (1, 16), device="cuda")
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(x)
        eager_peak = torch.cuda.max_memory_allocated()
        compiled = torch.compile(model, backend="llmopt", options={"strict": True, **MEMORY_OPTIONS[options]})
        compiled(x)
        compiled(x)
        torch.cuda.synchronize()
        compiled_peak = torch.cuda.max_memory_allocated()
        after = torch.cuda.memory_allocated()
    extra = compiled_peak - eager_peak
    assert extra <= 0.10 * weight_bytes, f"compiled peak is eager's + {extra / weight_bytes:.0%} of the weight bytes"
    assert after <= weight_bytes * 1.10  # held once after compiling, not only at the peak
