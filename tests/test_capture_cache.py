"""The capture cache (llmopt/capture_cache.py): a second compile of the same graph skips
AOTAutograd and gives the same graph, the same compiled code and the same outputs."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

import llmopt
import llmopt.backend as backend
from llmopt import capture_cache, compat
from models.tiny import tiny_model, tokens

FAMILIES = ["llama", "gpt2", "gemma", "phi", "qwen2", "mistral", "mixtral", "qwen2_moe"]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The capture cache in a fresh directory of its own."""
    monkeypatch.setattr(capture_cache, "cache_dir", lambda: tmp_path)
    return tmp_path


@pytest.fixture
def post_pass_code(monkeypatch):
    """The code of every graph handed to the executor (after the passes), in order."""
    codes = []
    real = backend._make_executor

    def spy(gm, *args, **kwargs):
        codes.append(gm.code)
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "_make_executor", spy)
    return codes


def _generate(name, options=None):
    """Greedy static-cache generate of a fresh tiny model with its forward compiled; the
    tokens and the capture cache status of each compiled graph."""
    torch._dynamo.reset()
    llmopt.clear_reports()
    model = tiny_model(name)
    model.forward = torch.compile(model.forward, backend="llmopt", options={"strict": True, **(options or {})})
    with torch.no_grad():
        out = model.generate(tokens(2, 7), max_new_tokens=4, do_sample=False, pad_token_id=0,
                             cache_implementation="static")
    return out, [r.capture_cache for r in llmopt.reports()]


@pytest.mark.parametrize("name", FAMILIES)
def test_second_compile_hits_and_gives_the_same_graph(name, cache, post_pass_code):
    first, stored = _generate(name)
    # Prefill and decode are cached; a recompile with a dynamic scalar (Mistral's sliding
    # window) is not, and says so.
    assert stored[0] == "stored", stored
    assert all(s == "stored" or s.startswith("not cached: input") and "SymInt" in s for s in stored), stored
    codes_first = list(post_pass_code)
    post_pass_code.clear()
    second, statuses = _generate(name)
    assert statuses == ["hit" if s == "stored" else s for s in stored], statuses
    assert torch.equal(first, second)
    # The same post-pass graph, names included: Inductor's FX graph cache finds it again.
    assert post_pass_code == codes_first
    assert len(list(cache.glob("*.json"))) == stored.count("stored")


def test_hit_gives_inductor_the_same_decomposed_graph(cache, monkeypatch):
    """With the Inductor executor, the graph handed to Inductor after llmopt's node-by-node
    decomposition is the same after a hit as after a capture (the hit compiles in
    AOTAutograd's state: a factory call inside a decomposition is traced fake, not baked in
    as a constant), so Inductor's FX graph cache hits. Inductor's own compile is stood in
    for by running the graph as is."""
    from torch._inductor.decomposition import select_decomp_table

    codes = []

    def stand_in(gm, example_inputs, cudagraphs=False, static_input_idxs=(), decompositions=None, decompose=None):
        fake_mode = compat.detect_fake_mode(example_inputs)
        previous, fake_mode.allow_non_fake_inputs = fake_mode.allow_non_fake_inputs, True
        try:
            codes.append(decompose(gm, example_inputs, {**select_decomp_table(), **(decompositions or {})}).code)
        finally:
            fake_mode.allow_non_fake_inputs = previous

        def run(args):
            return gm(*args)

        run._boxed_call = True
        return run

    monkeypatch.setattr(compat, "inductor_compile", stand_in)
    first, statuses = _generate("llama", {"inner": "inductor"})
    assert statuses == ["stored", "stored"]
    captured = list(codes)
    codes.clear()
    second, statuses = _generate("llama", {"inner": "inductor"})
    assert statuses == ["hit", "hit"]
    assert len(codes) == 2 and codes == captured
    assert torch.equal(first, second)


def test_encoder_without_cache_hits(cache):
    """(A fresh model each time: after a compile, the model's q/k/v weights are views into
    their merged storage, another input layout and so another key.)"""
    x = tokens(2, 9)
    outs, statuses = [], []
    for _ in range(2):
        model = tiny_model("bert")
        torch._dynamo.reset()
        with torch.no_grad():
            outs.append(torch.compile(model, backend="llmopt", options={"strict": True})(x).last_hidden_state)
        statuses.append(llmopt.last_report().capture_cache)
    assert statuses == ["stored", "hit"]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def _value_signature(gm: fx.GraphModule) -> list:
    """Every node's values (shape, stride, offset, dtype, device) and which storage each
    shares, numbered in order of appearance."""
    storages, out = {}, []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(v, torch.Tensor):
                group = storages.setdefault(StorageWeakRef(v.untyped_storage()), len(storages))
                out.append((node.name, tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.device, group))
            else:
                out.append((node.name, v))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_round_trip_keeps_nodes_values_and_aliasing(name, monkeypatch):
    """Serialized and rebuilt in Dynamo's fake mode, the captured graph has the same code,
    node values and storage sharing (views share their base's storage: Inductor's
    reinplacing reads it) as AOTAutograd's."""
    checked = []
    real = backend.compile_inference_graph

    def spy(gm, fake_inputs, *args, **kwargs):
        plan = compat.aot_output_plan(len(fake_inputs))
        assert plan is not None
        data = json.loads(json.dumps(capture_cache.serialize(gm, plan)))
        rebuilt = capture_cache.deserialize(data, compat.detect_fake_mode(fake_inputs), fake_inputs)
        assert rebuilt.code == gm.code
        assert _value_signature(rebuilt) == _value_signature(gm)
        for a, b in zip(rebuilt.graph.nodes, gm.graph.nodes):
            assert (a.op, a.name, a.target) == (b.op, b.name, b.target)
            assert a.meta.get("nn_module_stack", {}).keys() == b.meta.get("nn_module_stack", {}).keys()
        checked.append(gm)
        return real(gm, fake_inputs, *args, **kwargs)

    monkeypatch.setattr(backend, "compile_inference_graph", spy)
    _generate(name, {"capture_cache": False})
    assert len(checked) == 2


def test_output_that_is_an_input_and_version_bumps_match_aot(cache):
    """A graph returning an input it writes in place: the hit returns the very input object
    and bumps its version counter as AOTAutograd's wrapper does."""

    def step(x, idx, buf):
        buf.index_copy_(0, idx, x)
        return buf * 2, buf

    results = []
    x = torch.randn(1, 4)
    for _ in range(2):
        torch._dynamo.reset()
        buf = torch.zeros(3, 4)
        version = buf._version
        doubled, same = torch.compile(step, backend="llmopt")(x, torch.tensor([1]), buf)
        results.append((llmopt.last_report().capture_cache, same is buf, buf._version - version, doubled.clone()))
    (s1, is1, v1, d1), (s2, is2, v2, d2) = results
    assert (s1, s2) == ("stored", "hit")
    assert is1 and is2
    assert v1 == v2
    assert torch.equal(d1, d2) and torch.equal(d1[1], x[0] * 2)


def test_corrupt_entry_is_a_miss_with_a_warning(cache, caplog):
    first, _ = _generate("llama")
    for path in cache.glob("*.json"):
        data = json.loads(path.read_text())
        data["payload"]["nodes"][-2][1] = "tampered"
        path.write_text(json.dumps(data))
    second, statuses = _generate("llama")
    assert statuses == ["stored", "stored"]  # captured again, and the entries replaced
    assert "not used" in caplog.text and "checksum" in caplog.text
    assert torch.equal(first, second)
    assert _generate("llama")[1] == ["hit", "hit"]


def test_truncated_entry_is_a_miss(cache, caplog):
    _generate("llama")
    for path in cache.glob("*.json"):
        path.write_text(path.read_text()[:1000])
    assert _generate("llama")[1] == ["stored", "stored"]
    assert "not used" in caplog.text


def test_off_by_option_and_by_inductor_switch(cache, monkeypatch):
    assert _generate("llama", {"capture_cache": False})[1] == ["off", "off"]
    assert not list(cache.glob("*.json"))
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    assert _generate("llama")[1] == ["off", "off"]
    with pytest.raises(TypeError, match="capture_cache"):
        llmopt.options.Options(capture_cache="yes")


def test_another_librarys_custom_op(cache):
    """A custom op outside aten/prims/llmopt: cached when it stays one call in the capture
    (keyed by its fake implementation's source: transformers' MoE ``grouped_mm_fallback``
    is one, in the families above); a graph whose capture decomposes another library's op
    is captured every time (the op's Python could change under the same name), and the
    report says why."""

    @torch.library.custom_op("llmopt_test_cc::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    lib = torch.library.Library("llmopt_test_cc", "FRAGMENT")
    lib.define("thrice(Tensor x) -> Tensor")
    lib.impl("thrice", lambda x: x * 3, "CompositeImplicitAutograd")
    statuses = []
    for fn in (lambda x: twice(x) + 1, lambda x: torch.ops.llmopt_test_cc.thrice(x) + 1) * 2:
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(fn, backend="llmopt")(torch.ones(4))
        statuses.append(llmopt.last_report().capture_cache)
        assert out[0] in (3.0, 4.0)
    assert statuses[0] == "stored" and statuses[2] == "hit"
    assert statuses[1] == statuses[3] and statuses[1].startswith("not cached:") and "llmopt_test_cc" in statuses[1]


def test_autocast_is_not_cached(cache):
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(lambda x, w: x @ w, backend="llmopt")(torch.randn(4, 4), torch.randn(4, 4))
    assert llmopt.last_report().capture_cache == "not cached: autocast is on"


def _key(fn, *inputs):
    keys = []

    def spy_backend(gm, example_inputs):
        keys.append(capture_cache.key_of(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=spy_backend)(*inputs)
    return keys[0]


def test_key_follows_what_decides_the_capture():
    def f(x, w):
        return torch.nn.functional.silu(x @ w) * 0.5

    def g(x, w):
        return torch.nn.functional.silu(x @ w) * 0.25

    x, w = torch.randn(2, 4), torch.randn(4, 3)
    base = _key(f, x, w)
    assert _key(f, x.clone(), w.clone()) == base  # values do not matter, metadata does
    assert _key(g, x, w) != base  # a constant
    assert _key(f, torch.randn(3, 4), w) != base  # a shape
    assert _key(f, x.double(), w.double()) != base  # a dtype
    assert _key(f, x, torch.randn(3, 4).t()) != base  # a stride
    with torch.no_grad():
        assert _key(f, x, w) != base  # the grad mode


def test_key_is_the_same_in_another_process(tmp_path):
    """No address or id leaks into the key: a second process finds the first one's entry."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import llmopt
        from models.tiny import tiny_model, tokens
        model = tiny_model("llama")
        model.forward = torch.compile(model.forward, backend="llmopt")
        with torch.no_grad():
            model.generate(tokens(1, 5), max_new_tokens=2, do_sample=False, pad_token_id=0,
                           cache_implementation="static")
        print(",".join(r.capture_cache for r in llmopt.reports()))
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "LLMOPT_CPU_EXECUTOR": "aten"}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert runs[0].stdout.split()[-1] == "stored,stored"
    assert runs[1].stdout.split()[-1] == "hit,hit"


_atoms = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=8),
                   st.floats(allow_nan=False), st.sampled_from([float("inf"), float("-inf")]),
                   st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
                   st.sampled_from([torch.device("cpu"), torch.device("cuda", 1)]),
                   st.sampled_from([torch.strided, torch.contiguous_format, torch.channels_last]))


@settings(max_examples=200, deadline=None)
@given(st.recursive(_atoms, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.lists(inner, max_size=4).map(tuple)), max_leaves=12))
def test_argument_encoding_round_trips(arg):
    encoded = json.loads(json.dumps(capture_cache._encode(arg), allow_nan=False))
    decoded = capture_cache._decode(encoded, {})
    assert decoded == arg and type(decoded) is type(arg)
    assert repr(decoded) == repr(arg)


def test_a_failing_cache_never_fails_the_compile(cache, monkeypatch, caplog):
    """An unexpected error in the cache (here, in the key) is one warning line and a
    capture as without a cache; strict mode raises it."""

    def broken(gm, inputs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(capture_cache, "key_of", broken)
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.relu(x) * 3, backend="llmopt")
    with torch.no_grad():
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert llmopt.last_report().capture_cache.startswith("not cached: the lookup failed (RuntimeError: disk on fire")
    assert "capture cache lookup failed" in caplog.text
    torch._dynamo.reset()
    g = torch.compile(lambda x: torch.relu(x) * 3, backend="llmopt", options={"strict": True})
    with pytest.raises(Exception, match="disk on fire"), torch.no_grad():
        g(torch.ones(3))


def test_an_unwritable_cache_directory_is_a_warning(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(capture_cache, "cache_dir", lambda: blocker / "sub")  # under a file: mkdir fails
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(lambda x: x + 1, backend="llmopt", options={"strict": True})(torch.ones(2))
    assert llmopt.last_report().capture_cache.startswith("not cached: the entry could not be written")
    assert "not written" in caplog.text


def test_a_hit_that_fails_to_compile_is_captured_again(cache, monkeypatch, caplog):
    _generate("llama")
    real = backend.compile_inference_graph

    def fail_on_hit(*args, capture_cache="", **kwargs):
        if capture_cache == "hit":
            raise RuntimeError("stale entry")
        return real(*args, capture_cache=capture_cache, **kwargs)

    monkeypatch.setattr(backend, "compile_inference_graph", fail_on_hit)
    torch._dynamo.reset()
    llmopt.clear_reports()
    model = tiny_model("llama")
    model.forward = torch.compile(model.forward, backend="llmopt")  # not strict
    with torch.no_grad():
        out = model.generate(tokens(2, 7), max_new_tokens=4, do_sample=False, pad_token_id=0,
                             cache_implementation="static")
    statuses = [r.capture_cache for r in llmopt.reports()]
    assert statuses and all(s.startswith("not used: compiling the cached capture failed") for s in statuses)
    assert torch.equal(out, _generate("llama", {"capture_cache": False})[0])


def test_eviction_keeps_the_recently_used_entries(cache, monkeypatch):
    monkeypatch.setattr(capture_cache, "MAX_ENTRIES", 5)
    monkeypatch.setattr(capture_cache, "KEEP_ENTRIES", 3)
    names = [f"{i:064x}.json" for i in range(6)]
    for age, name in enumerate(names):  # names[0] is the newest
        path = cache / name
        path.write_text("{}")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    (cache / "notes.txt").write_text("not an entry")
    assert capture_cache.evict(cache) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted([*names[:3], "notes.txt"])
    assert capture_cache.evict(cache) == 0


def test_a_hit_marks_its_entry_recently_used(cache):
    _generate("llama")
    for path in cache.glob("*.json"):
        os.utime(path, (1_000_000, 1_000_000))
    _generate("llama")
    assert all(path.stat().st_mtime > 1_000_000 for path in cache.glob("*.json"))


def test_version_bumps_on_a_torch_that_takes_one_tensor_per_call(monkeypatch):
    real = torch.autograd.graph.increment_version

    def one_at_a_time(t):
        if not isinstance(t, torch.Tensor):
            raise TypeError("increment_version(): argument 'tensor' must be Tensor")
        real(t)

    monkeypatch.setattr(torch.autograd.graph, "increment_version", one_at_a_time)
    monkeypatch.setattr(capture_cache, "_INCREMENT_MANY", True)
    a, b = torch.zeros(2), torch.zeros(2)
    before = (a._version, b._version)
    capture_cache._increment_versions((a, b))
    capture_cache._increment_versions((a, b))
    assert (a._version - before[0], b._version - before[1]) == (2, 2)
    assert capture_cache._INCREMENT_MANY is False


@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_warm_compile_of_a_quantized_model_stays_on_inductor(cache, quantize):
    """A quantized model's constants live in submodules (``llmopt_qlinear_<layer>.qdata``).
    On a warm compile the capture cache hits, Inductor's FX graph cache hits too, and its
    hit path looked each frozen constant up with a flat ``getattr``: the dotted names
    raised and the model ran the aten executor (`compat._flat_constant_names`). Strict
    mode raises instead of falling back, so both compiles must stay on Inductor."""
    options = {"inner": "inductor", "quantize": quantize}
    first, stored = _generate("llama", options)
    second, statuses = _generate("llama", options)
    assert stored[0] == "stored" and statuses[0] == "hit", (stored, statuses)
    assert all(r.executor == "inductor" for r in llmopt.reports()), [r.executor for r in llmopt.reports()]
    assert torch.equal(first, second)
