"""The rank side of the tensor-parallel tests: one scenario per run, results as JSON.

Run by ``launch.run_ranks`` (never imported by pytest as a test module). Every scenario
builds the same seeded tiny model on each rank, computes the single-process reference
eagerly, then compiles with ``options={"tensor_parallel": "auto"}`` and records what the
tests assert: relative errors, greedy tokens, the pass's counts, collectives in the final
graph, bytes of weights the rank's graph holds, graphs compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import transformers as tf

import llmopt
from llmopt import backend, compat
from conftest import relative_error
from models.tiny import _common, tiny_model, tokens

OPTIONS = {"tensor_parallel": "auto", "strict": True}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(name: str):
    if name == "llama_mqa":  # one KV head: replicated over the ranks
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**_common(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1))
        return tf.LlamaForCausalLM(cfg).eval()
    if name == "llama_i128":  # intermediate 128: each rank's down_proj K (64) is whole int4 groups of 32
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**_common(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))
        return tf.LlamaForCausalLM(cfg).eval()
    if name == "llama_3heads":
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**_common(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=3))
        return tf.LlamaForCausalLM(cfg).eval()
    return tiny_model(name)


graphs_pipeline_original = backend.run_pipeline


def capture_graphs():
    graphs = []
    pipeline = backend.run_pipeline

    def run_pipeline(gm, ctx):
        total = pipeline(gm, ctx)
        graphs.append(gm)
        return total

    backend.run_pipeline = run_pipeline
    return graphs


@contextlib.contextmanager
def cache_heads_recorded():
    """The K/V head count of every StaticKVCache built inside the block."""
    from llmopt.runtime.static_cache import StaticKVCache

    heads, init = [], StaticKVCache.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        heads.append(self.shape[1])

    StaticKVCache.__init__ = record
    try:
        yield heads
    finally:
        StaticKVCache.__init__ = init


def graph_facts(gm) -> dict:
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    consts = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    weight_bytes = sum(getattr(gm, t).numel() * getattr(gm, t).element_size() for t in consts)
    return {
        "all_reduce": ops.count("_c10d_functional.all_reduce.default"),
        "all_gather": ops.count("_c10d_functional.all_gather_into_tensor.default"),
        "weight_bytes": weight_bytes,
    }


def pass_facts(report) -> dict:
    details = [r.detail for r in report.rewrites if r.pass_name == "shard_tensor_parallel"]
    record = next(p for p in report.passes if p.name == "shard_tensor_parallel")
    return {
        "column": sum(d.startswith("column-parallel") for d in details),
        "row": sum(d.startswith("row-parallel") for d in details),
        "vocab": sum(d.startswith("vocab-parallel") for d in details),
        "rewrites": record.rewrites,
        "status": record.status,
    }


def scenario_families(args) -> dict:
    """Prefill logits of every family; greedy generation where the KV cache is split (Llama,
    2 KV heads) and where it is replicated (1 KV head)."""
    out = {}
    graphs = capture_graphs()
    for name in ("llama", "llama_mqa", "qwen2", "gpt2"):
        model = build(name)
        ids = tokens(1, 6)
        compat.reset_dynamo()
        llmopt.clear_reports()
        del graphs[:]
        generates = name in ("llama", "llama_mqa")
        with torch.no_grad():  # the eager references first: compiling releases the full weights
            ref_logits = model(ids, use_cache=False).logits
            if generates:
                ref = llmopt.generate(model, ids, max_new_tokens=5, stop_token_ids=())
                ref_again = llmopt.generate(model, ids[:, :4], max_new_tokens=7, stop_token_ids=())
            compiled = torch.compile(model, backend="llmopt", options=OPTIONS)
            logits = compiled(ids, use_cache=False).logits
        out[name] = {"logits_error": relative_error(logits, ref_logits), **pass_facts(llmopt.last_report()),
                     **graph_facts(graphs[0]), "param_bytes": held_parameter_bytes(model),
                     "held": [(n, p.untyped_storage().nbytes()) for n, p in model.named_parameters() if p.untyped_storage().nbytes()]}
        log(f"{name}: logits")
        if generates:
            with torch.no_grad():  # new shapes: recompiles take the shards from the cache
                with cache_heads_recorded() as heads:  # the cache generate allocates itself
                    got = llmopt.generate(compiled, ids, max_new_tokens=5, stop_token_ids=())
                out[name]["generate_cache_heads"] = heads
                n_graphs = len(llmopt.reports())
                again = llmopt.generate(compiled, ids[:, :4], max_new_tokens=7, stop_token_ids=())
            out[name].update(tokens=got.tolist(), ref_tokens=ref.tolist(), again_equal=bool(torch.equal(again, ref_again)),
                             graphs_first=n_graphs, graphs_second=len(llmopt.reports()))
            log(f"{name}: generate")
    compat.reset_dynamo()
    del graphs[:]
    with torch.no_grad():  # Llama compiled on one device: what a rank's graph saves
        torch.compile(build("llama"), backend="llmopt", options={"strict": True})(tokens(1, 6), use_cache=False)
    out["llama"]["single_weight_bytes"] = graph_facts(graphs[0])["weight_bytes"]
    return out


def held_parameter_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters (a released one: 0)."""
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def rank_held_bytes(model, graphs) -> dict:
    """What the rank holds for ``model``: the distinct storages behind its parameters, the
    constants its compiled ``graphs`` read and the release cache's derived constants
    (weight_release.cached_for); ``graph``: those the graphs read."""
    from llmopt.weight_release import cached_for

    def constants(gm):
        for target in {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}:
            obj = gm
            for part in target.split("."):
                obj = getattr(obj, part)
            yield from ([obj] if isinstance(obj, torch.Tensor) else [*obj.parameters(), *obj.buffers()])

    read = {id(t.untyped_storage()): t.untyped_storage() for gm in graphs for t in constants(gm)}
    params = list(model.parameters())
    held = dict(read)
    held.update({id(t.untyped_storage()): t.untyped_storage() for t in [*params, *cached_for(params)]})
    return {"held": sum(s.nbytes() for s in held.values()), "graph": sum(s.nbytes() for s in read.values()),
            "param": held_parameter_bytes(model)}


def run_parts(args, *parts) -> dict:
    """Several scenarios in one launch (a launch costs the ranks' start-up), each from a clean Dynamo."""
    out = {}
    for part in parts:
        compat.reset_dynamo()
        llmopt.clear_reports()
        out[part.__name__.removeprefix("scenario_")] = part(args)
        log(part.__name__)
    return out


def scenario_runtime(args) -> dict:
    """Quantized linears, the Engine (and with a draft model), the errors."""
    return run_parts(args, scenario_quantized, scenario_engine, scenario_speculative, scenario_heads, scenario_diverged)


def scenario_memory(args) -> dict:
    """What a rank holds: the vocab-parallel embedding and the per-rank KV cache; HF's own static cache."""
    return run_parts(args, scenario_embedding, scenario_rank_cache, scenario_hf_static)


def scenario_quantized(args) -> dict:
    """int8 (per-channel) and int4 (groups of 32 along K) under TP against the same scheme on one
    device: row shards keep whole groups (the local K of o_proj 32 and down_proj 64 are multiples
    of 32), so the weights quantize exactly as on one device and the tokens are equal."""
    out = {}
    for scheme, name in (("int8", "llama"), ("int4-g32", "llama_i128")):
        compat.reset_dynamo()
        llmopt.clear_reports()
        model = build(name)
        ids = tokens(1, 6)
        with torch.no_grad():
            # the TP compile below quantizes the same floats: the reference keeps them
            single = torch.compile(model, backend="llmopt", options={"strict": True, "quantize": scheme,
                                                                       "release_weights": False})
            ref = llmopt.generate(single, ids, max_new_tokens=6, stop_token_ids=())
            compat.reset_dynamo()
            llmopt.clear_reports()
            tp = torch.compile(model, backend="llmopt", options={**OPTIONS, "quantize": scheme})
            got = llmopt.generate(tp, ids, max_new_tokens=6, stop_token_ids=())
        report = llmopt.reports()[0]
        quantized = next(p.rewrites for p in report.passes if p.name == "quantize_linears")
        out[scheme] = {"tokens": got.tolist(), "ref_tokens": ref.tolist(), "quantized": quantized, **pass_facts(report)}
    return out


def scenario_embedding(args) -> dict:
    """The vocab-parallel embedding, forced on a tiny table (the size threshold set to 0)."""
    from llmopt.passes.shard_tensor_parallel import collectives

    graphs = capture_graphs()
    model = build("llama")
    ids = tokens(1, 6)
    threshold = collectives.EMBEDDING_SHARD_MIN_BYTES
    collectives.EMBEDDING_SHARD_MIN_BYTES = 0
    try:
        with torch.no_grad():
            ref_logits = model(ids, use_cache=False).logits
            ref = llmopt.generate(model, ids, max_new_tokens=5, stop_token_ids=())  # before: compiling releases
            compiled = torch.compile(model, backend="llmopt", options=OPTIONS)
            logits = compiled(ids, use_cache=False).logits
            got = llmopt.generate(compiled, ids, max_new_tokens=5, stop_token_ids=())
    finally:
        collectives.EMBEDDING_SHARD_MIN_BYTES = threshold
        backend.run_pipeline = graphs_pipeline_original
    report = llmopt.reports()[0]
    details = [r.detail for r in report.rewrites if r.pass_name == "shard_tensor_parallel"]
    return {"logits_error": relative_error(logits, ref_logits), "tokens": got.tolist(), "ref_tokens": ref.tolist(),
            "embedding": sum(d.startswith("vocab-parallel embedding") for d in details), **pass_facts(report),
            **graph_facts(graphs[0]), "table_shape": [list(getattr(graphs[0], n.args[0].target).shape)
                                                     for n in graphs[0].graph.nodes if n.target == torch.ops.aten.embedding.default]}


def scenario_rank_cache(args) -> dict:
    """A StaticKVCache of this rank's KV heads only (tensor_parallel=...): greedy tokens equal to
    one process, no marker op left in the sharded graphs, and a clear error when not compiled."""
    from llmopt.runtime.static_cache import StaticKVCache

    out = {}
    for name in ("llama", "llama_mqa"):
        compat.reset_dynamo()
        llmopt.clear_reports()
        graphs = capture_graphs()
        model = build(name)
        ids = tokens(1, 6)
        cache = StaticKVCache(model.config, batch_size=1, max_seq_len=16, tensor_parallel="auto")
        try:
            with torch.no_grad():
                ref = llmopt.generate(model, ids, max_new_tokens=5, stop_token_ids=())
                ref_again = llmopt.generate(model, ids[:, :4], max_new_tokens=7, stop_token_ids=())
                compiled = torch.compile(model, backend="llmopt", options=OPTIONS)  # releases the full weights
                got = llmopt.generate(compiled, ids, max_new_tokens=5, stop_token_ids=(), cache=cache)
                n_graphs = len(llmopt.reports())
                again = llmopt.generate(compiled, ids[:, :4], max_new_tokens=7, stop_token_ids=(), cache=cache)
        finally:
            backend.run_pipeline = graphs_pipeline_original
        ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
        try:
            with torch.no_grad():  # an uncompiled model (the compiled one's full weights are released)
                build(name)(ids, past_key_values=StaticKVCache(model.config, batch_size=1, max_seq_len=16,
                                                               tensor_parallel="auto"))
            eager_error = None
        except Exception as exc:
            eager_error = f"{type(exc).__name__}: {exc}"
        out[name] = {"tokens": got.tolist(), "ref_tokens": ref.tolist(), "again_equal": bool(torch.equal(again, ref_again)),
                     "cache_heads": cache.shape[1], "graphs": n_graphs, "graphs_second": len(llmopt.reports()),
                     "markers": sum("tp_full_heads" in o or "tp_local_heads" in o for o in ops),
                     "eager_error": eager_error,
                     "sharded_per_graph": [next(p.rewrites for p in r.passes if p.name == "shard_tensor_parallel")
                                           for r in llmopt.reports()]}
    return out


def scenario_engine(args) -> dict:
    from llmopt.runtime.engine import Engine

    model = build("llama")
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (5, 9, 3)]
    params = [llmopt.SamplingParams(max_new_tokens=6, stop_token_ids=()),
              llmopt.SamplingParams(max_new_tokens=6, stop_token_ids=(), temperature=0.8, seed=7),
              llmopt.SamplingParams(max_new_tokens=4, stop_token_ids=())]
    with torch.no_grad():
        refs = [llmopt.generate(model, torch.tensor([p]), sampling=s)[0, len(p):].tolist() for p, s in zip(prompts, params)]
        compiled = torch.compile(model, backend="llmopt", options=OPTIONS)
        with Engine(compiled, max_num_seqs=4, block_size=8, max_model_len=64, max_num_batched_tokens=24) as engine:
            outs = engine.generate(prompts, params)
            pool_heads = engine.cache.layout.num_kv_heads
            # unseeded sampling: each rank's own generator draws, rank 0's tokens are broadcast
            torch.manual_seed(100 + args.rank)
            unseeded = engine.generate(prompts[:2], llmopt.SamplingParams(max_new_tokens=5, stop_token_ids=(),
                                                                          temperature=1.0))
            try:  # rank 1 schedules one request more: both ranks stop with a clear error
                extra = prompts[:2] if args.rank == 0 else prompts
                engine.generate(extra, llmopt.SamplingParams(max_new_tokens=3, stop_token_ids=()))
                diverged = None
            except Exception as exc:
                diverged = f"{type(exc).__name__}: {exc}"
    sharded = [next(p.rewrites for p in r.passes if p.name == "shard_tensor_parallel") for r in llmopt.reports()]
    reinplaced = [next(p.rewrites for p in r.passes if p.name == "reinplace_kv") for r in llmopt.reports()]
    return {"outputs": outs, "refs": refs, "sharded_per_graph": sharded, "unseeded": unseeded, "diverged": diverged,
            "pool_heads": pool_heads, "reinplaced_per_graph": reinplaced}


def scenario_speculative(args) -> dict:
    """The Engine with a draft model (a differently seeded tiny Llama, eager and replicated on
    every rank) over the sharded target: greedy tokens equal to one process's plain greedy."""
    from llmopt.runtime.engine import Engine

    model = build("llama")
    draft = tiny_model("llama", seed=1)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (5, 9, 3)]
    params = llmopt.SamplingParams(max_new_tokens=7, stop_token_ids=())
    with torch.no_grad():
        refs = [llmopt.generate(model, torch.tensor([p]), sampling=params)[0, len(p):].tolist() for p in prompts]
        compiled = torch.compile(model, backend="llmopt", options=OPTIONS)
        with Engine(compiled, max_num_seqs=4, block_size=8, max_model_len=64, max_num_batched_tokens=24,
                    speculative=llmopt.Speculative(draft=draft, k=3)) as engine:
            outs = engine.generate(prompts, params)
            proposed = sum(engine.speculative_stats(i).proposed[0] for i in range(len(prompts)))
    sharded = [next(p.rewrites for p in r.passes if p.name == "shard_tensor_parallel") for r in llmopt.reports()]
    return {"outputs": outs, "refs": refs, "proposed": proposed, "sharded_per_graph": sharded}


def scenario_moe(args) -> dict:
    """Tiny Mixtral (4 experts, top-2, I = 96): expert stacks sharded along I, prefill logits and
    greedy tokens against the eager model in one process; int8 experts against int8 on one device."""
    graphs = capture_graphs()
    model = build("mixtral")
    ids = tokens(1, 6)
    try:
        with torch.no_grad():
            ref_logits = model(ids, use_cache=False).logits
            ref = llmopt.generate(model, ids, max_new_tokens=6, stop_token_ids=())
            compiled = torch.compile(model, backend="llmopt", options=OPTIONS)
            logits = compiled(ids, use_cache=False).logits
            facts = {**pass_facts(llmopt.last_report()), **graph_facts(graphs[0])}
            got = llmopt.generate(compiled, ids, max_new_tokens=6, stop_token_ids=())
            facts["held_float"] = rank_held_bytes(model, graphs)  # after the prefill and decode recompiles
            # Each later compile takes a fresh copy (same seed, same weights): compiling releases
            # the weights it sharded or quantized (README "Frozen weights").
            compat.reset_dynamo()
            single = torch.compile(build("mixtral"), backend="llmopt", options={"strict": True})
            single(ids, use_cache=False)
            facts["single_weight_bytes"] = graph_facts(graphs[-1])["weight_bytes"]
            compat.reset_dynamo()
            ref8 = llmopt.generate(torch.compile(build("mixtral"), backend="llmopt",
                                                 options={"strict": True, "quantize": "int8"}),
                                   ids, max_new_tokens=6, stop_token_ids=())
            compat.reset_dynamo()
            llmopt.clear_reports()
            model8, first8 = build("mixtral"), len(graphs)
            got8 = llmopt.generate(torch.compile(model8, backend="llmopt", options={**OPTIONS, "quantize": "int8"}),
                                   ids, max_new_tokens=6, stop_token_ids=())
            facts["held_int8"] = rank_held_bytes(model8, graphs[first8:])
    finally:
        backend.run_pipeline = graphs_pipeline_original
    report = llmopt.reports()[0]
    details = [r.detail for r in report.rewrites if r.pass_name == "shard_tensor_parallel"]
    return {"logits_error": relative_error(logits, ref_logits), "tokens": got.tolist(), "ref_tokens": ref.tolist(),
            "int8_tokens": got8.tolist(), "int8_ref_tokens": ref8.tolist(), **facts,
            "experts": sum(d.startswith("experts tensor-parallel") for d in details),
            "int8_experts": next(p.rewrites for p in report.passes if p.name == "quantize_linears")}


def scenario_hf_static(args) -> dict:
    """Hugging Face generate(cache_implementation="static"): HF allocates the cache inside the
    prefill graph; its attention is sharded there too, and the tokens equal one process's."""
    from compiled import generate_eager_and_compiled

    out = {}
    for name in ("llama", "llama_mqa"):
        compat.reset_dynamo()
        llmopt.clear_reports()
        ref, got = generate_eager_and_compiled(build(name), tokens(1, 6), OPTIONS, max_new_tokens=6,
                                               cache_implementation="static")
        out[name] = {"tokens": got.tolist(), "ref_tokens": ref.tolist(),
                     "sharded_per_graph": [next(p.rewrites for p in r.passes if p.name == "shard_tensor_parallel")
                                           for r in llmopt.reports()]}
    return out


def scenario_heads(args) -> dict:
    model = build("llama_3heads")
    try:
        with torch.no_grad():
            torch.compile(model, backend="llmopt", options=OPTIONS)(tokens(1, 4), use_cache=False)
    except Exception as exc:  # Dynamo wraps backend errors; the message is what the user reads
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def scenario_diverged(args) -> dict:
    """Ranks fed different tokens (as unseeded sampling would do): a clear error."""
    model = build("llama")
    try:
        with torch.no_grad():
            torch.compile(model, backend="llmopt", options=OPTIONS)(tokens(1, 4, seed=args.rank), use_cache=False)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def scenario_dead_rank(args) -> dict:
    if args.rank == 1:
        os._exit(3)  # this rank dies before the first forward
    model = build("llama")
    start = time.monotonic()
    try:
        with torch.no_grad():
            torch.compile(model, backend="llmopt", options=OPTIONS)(tokens(1, 4), use_cache=False)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def scenario_dead_mid_decode(args) -> dict:
    """Rank 1 exits after two decode steps of llmopt.generate; rank 0 goes on decoding."""
    model = build("llama")
    compiled = torch.compile(model, backend="llmopt", options=OPTIONS)
    with torch.no_grad():
        llmopt.generate(compiled, tokens(1, 4), max_new_tokens=3, stop_token_ids=())  # compiled: prefill, decode
        if args.rank == 1:  # the same call, cut short: this rank leaves after its third token
            llmopt.generate(compiled, tokens(1, 4), max_new_tokens=3, stop_token_ids=())
            os._exit(3)
        start = time.monotonic()
        try:
            llmopt.generate(compiled, tokens(1, 4), max_new_tokens=12, stop_token_ids=())
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=30))
    result = globals()[f"scenario_{args.scenario}"](args)
    path = os.path.join(args.out, f"rank{args.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    if not args.scenario.startswith("dead_"):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
