"""The engine plans each decode step's paged attention once and every layer runs on that plan.

Specification (plan once per step, run per layer; issue 17):
- in a decode-only step the runner plans before the forward (``PagedAttentionMetadata.decode_plan``)
  and every layer passes that plan's workspace to ``llmopt::paged_attention_decode``: one
  plan per decode-only forward, no plan or workspace made by a layer or a launcher;
- the tokens are those of the engine with the reference kernels.
(The compiled engine's graph, where the layers' writes to the one workspace are re-inplaced,
is checked in tests/passes/test_reinplace_kv.py.)
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("the paged engine needs transformers >= 5", allow_module_level=True)

from llmopt.codegen import attention_paged  # noqa: E402
from llmopt.runtime import SamplingParams  # noqa: E402
from llmopt.runtime import paged_cache  # noqa: E402
from llmopt.runtime.engine import Engine  # noqa: E402
from runtime.tiny_lm import VOCAB, tiny_model  # noqa: E402


def test_engine_plans_each_decode_step_once(triton_kernels, monkeypatch):
    model = tiny_model("llama", 0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 3)]
    params = SamplingParams(max_new_tokens=4, stop_token_ids=())
    with monkeypatch.context() as mp:
        mp.setenv("LLMOPT_KERNELS", "reference")
        with Engine(model, max_num_seqs=2, block_size=8, max_model_len=32) as engine:
            expected = engine.generate(prompts, params)

    plans, workspaces = [], []
    real_plan = paged_cache.plan_paged_decode

    def recording_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    real_op = torch.ops.llmopt.paged_attention_decode

    def recording_op(*args):
        workspaces.append(args[8])
        return real_op(*args)

    monkeypatch.setattr(paged_cache, "plan_paged_decode", recording_plan)
    with Engine(model, max_num_seqs=2, block_size=8, max_model_len=32) as engine:
        # from here on: the steps (the probe at construction planned once too)
        plans.clear()
        monkeypatch.setattr(torch.ops.llmopt, "paged_attention_decode", recording_op)
        launcher_plans = []  # what the launcher plans for an unplanned call (it looks the name up here)
        monkeypatch.setattr(attention_paged, "plan_paged_decode",
                            lambda *a, **k: launcher_plans.append(a) or real_plan(*a, **k))
        assert engine.generate(prompts, params) == expected
        decode_steps = engine.stats.decode_only_steps
    layers = model.config.num_hidden_layers
    assert decode_steps > 0 and len(plans) == decode_steps, "one plan per decode-only step"
    assert len(workspaces) == decode_steps * layers
    for step, plan in enumerate(plans):
        assert all(ws is plan.workspace for ws in workspaces[step * layers:(step + 1) * layers]), \
            "every layer of the step runs on the step's workspace"
    assert launcher_plans == [], "no layer plans (or allocates a workspace) for itself"
