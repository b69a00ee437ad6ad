"""llmopt.prepare_moe: per-expert-loop MoE blocks become StackedMoeBlocks, fusable.

transformers 4.48's Mixtral block (reproduced in tests/models/moe_loops.py, and the real
one under transformers 4.48 when /tmp/tf448 holds it): replaced (proven equal first), the
compiled graph then holds one llmopt.fused_experts per block, outputs equal eager's,
quantize="int8" composes; a 5.x model with experts_implementation="eager" is switched to
grouped_mm and fused; a block that is not a loop of gated MLPs is left with its reason (and not
proven again); llmopt.compile, llmopt.generate and the Engine prepare the model themselves.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import llmopt
from conftest import assert_close
from models.moe_loops import HIDDEN, MixtralSparseMoeBlock448
from models.tiny import NUM_LAYERS, tiny_model, tokens

from llmopt.moe_prepare import StackedMoeBlock


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([MixtralSparseMoeBlock448() for _ in range(2)])

    def forward(self, x):
        logits = []
        for block in self.blocks:
            x, router_logits = block(x)
            logits.append(router_logits)
        return x, torch.stack(logits)


def seeded_two_blocks():
    """(model, tokens, its eager output) for a seeded TwoBlocks."""
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        return model, x, model(x)


def test_loop_blocks_are_replaced_and_fused():
    model, x, expected = seeded_two_blocks()
    done = llmopt.prepare_moe(model)
    assert done.replaced == ["blocks.0", "blocks.1"] and done.left == {}
    assert all(isinstance(b, StackedMoeBlock) for b in model.blocks)
    assert not any(".experts." in n for n, _ in model.named_parameters())  # one copy: the stacks
    with torch.no_grad():
        out = torch.compile(model, backend="llmopt", options={"strict": True})(x)
    report = llmopt.last_report()
    assert report.ops_after.get("llmopt.fused_experts.default") == 2
    assert report.ops_after.get("llmopt.moe_route.default") == 2
    assert_close(out[0], expected[0].double())
    assert_close(out[1], expected[1].double())


def test_quantize_composes_with_prepared_blocks():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    llmopt.prepare_moe(model)
    x = torch.randn(1, 4, HIDDEN)
    with torch.no_grad():
        torch.compile(model, backend="llmopt", options={"strict": True, "quantize": "int8"})(x)
    assert llmopt.last_report().ops_after.get("llmopt.fused_experts_int8.default") == 2


def test_eager_experts_implementation_is_switched_to_grouped_mm():
    model = tiny_model("mixtral", experts_implementation="eager")
    done = llmopt.prepare_moe(model)
    assert done.experts_implementation == "grouped_mm" and done.replaced == []
    x = tokens(1, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="llmopt", options={"strict": True})(x).logits
        expected = model(x).logits
    assert llmopt.last_report().rewrites_by_pass()["fuse_moe"] == NUM_LAYERS
    assert_close(out, expected.double())


def test_a_dense_model_is_left_untouched():
    """Its config says experts_implementation "eager" too; it has no experts to switch."""
    model = tiny_model("llama")
    done = llmopt.prepare_moe(model)
    assert done.replaced == [] and done.left == {} and done.experts_implementation is None


def test_blocks_that_are_not_loops_of_gated_mlps_are_left_with_the_reason():
    model = TwoBlocks().eval()
    model.blocks[1].experts[2].w2 = nn.Linear(24, HIDDEN, bias=True)  # an expert bias
    done = llmopt.prepare_moe(model)
    assert done.replaced == ["blocks.0"]
    assert "not a bias-free gated MLP" in done.left["blocks.1"]
    assert isinstance(model.blocks[1], MixtralSparseMoeBlock448)


class SharedExpert(nn.Module):
    def __init__(self, inter):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, inter, bias=False)
        self.up_proj = nn.Linear(HIDDEN, inter, bias=False)
        self.down_proj = nn.Linear(inter, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LoopWithSharedExpert(MixtralSparseMoeBlock448):
    """transformers 4.4x Qwen2-MoE's shape: the loop plus a sigmoid-gated shared expert."""

    def __init__(self, shared_inter=40):
        super().__init__()
        self.shared_expert = SharedExpert(shared_inter)
        self.shared_expert_gate = nn.Linear(HIDDEN, 1, bias=False)

    def forward(self, hidden_states):
        out, logits = super().forward(hidden_states)
        x = hidden_states.view(-1, HIDDEN)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out + shared.view(out.shape), logits


def test_a_shared_expert_is_folded_into_the_stacks():
    torch.manual_seed(0)
    model = nn.ModuleDict({"block": LoopWithSharedExpert()}).eval()
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        expected = model["block"](x)
    done = llmopt.prepare_moe(model)
    assert done.replaced == ["block"], done.left
    block = model["block"]
    assert block.shared_chunks == 2 and block.gate_up_proj.shape[0] == 4 + 2  # 40 units over I = 24: 2 chunks
    assert not hasattr(block, "shared_expert")  # released: held once, in the stacks
    with torch.no_grad():
        out = torch.compile(block, backend="llmopt", options={"strict": True})(x)
    assert llmopt.last_report().ops_after.get("llmopt.fused_experts.default") == 1
    assert_close(out[0], expected[0].double())


def test_a_left_block_is_not_proven_again(monkeypatch):
    from llmopt import moe_prepare

    model = TwoBlocks().eval()
    model.blocks[1].experts[2].w2 = nn.Linear(24, HIDDEN, bias=True)
    llmopt.prepare_moe(model)
    calls = []
    monkeypatch.setattr(moe_prepare, "_stacked_block", lambda block: calls.append(block) or (None, "?"))
    again = llmopt.prepare_moe(model)
    assert calls == [] and "not a bias-free gated MLP" in again.left["blocks.1"]


def test_llmopt_compile_prepares_loop_blocks_itself():
    model, x, expected = seeded_two_blocks()
    with torch.no_grad():
        out = llmopt.compile(model, options={"strict": True})(x)
    assert all(isinstance(b, StackedMoeBlock) for b in model.blocks)
    assert llmopt.last_report().ops_after.get("llmopt.fused_experts.default") == 2
    assert_close(out[0], expected[0].double())


def test_generate_and_engine_prepare_the_model_they_receive():
    """An eager-experts 5.x model: llmopt.generate on its torch.compile wrapper switches it to
    grouped_mm first (so the compiled graphs fuse), tokens equal eager's; the Engine does the
    same at construction."""
    model = tiny_model("mixtral", experts_implementation="eager")
    x = tokens(1, 5)
    with torch.no_grad():
        expected = llmopt.generate(tiny_model("mixtral", experts_implementation="eager"), x, 4)
        llmopt.clear_reports()
        got = llmopt.generate(torch.compile(model, backend="llmopt", options={"strict": True}), x, 4)
    assert torch.equal(got, expected)
    assert model.config._experts_implementation == "grouped_mm"
    assert all(r.rewrites_by_pass().get("fuse_moe") == NUM_LAYERS for r in llmopt.reports())
    from llmopt.runtime.engine import Engine

    other = tiny_model("mixtral", experts_implementation="eager")
    Engine(other, max_num_seqs=1, block_size=8, max_model_len=16).close()
    assert other.config._experts_implementation == "grouped_mm"


_TF448 = Path(os.environ.get("LLMOPT_TF448", "/tmp/tf448"))


@pytest.mark.skipif(not (_TF448 / "transformers").is_dir(), reason="transformers 4.48 not installed in /tmp/tf448")
def test_real_transformers_448_mixtral_is_fused_with_equal_greedy_tokens():
    """In a subprocess with transformers 4.48 first on the path."""
    script = textwrap.dedent("""
        import copy, torch, transformers as tf, llmopt
        assert tf.__version__.startswith("4.48"), tf.__version__
        torch.manual_seed(0)
        cfg = tf.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=128)
        model = tf.MixtralForCausalLM(cfg).eval()
        eager = copy.deepcopy(model)
        pristine = copy.deepcopy(model)  # never given to llmopt.generate (which prepares what it receives)
        assert len(llmopt.prepare_moe(model).replaced) == 2
        x = torch.randint(1, 256, (1, 6))
        with torch.no_grad():
            compiled = torch.compile(model, backend="llmopt", options={"strict": True})
            err = ((compiled(x).logits - eager(x).logits).norm() / eager(x).logits.norm()).item()
            assert llmopt.last_report().ops_after.get("llmopt.fused_experts.default") == 2
            assert err < 1e-5, err
            assert torch.equal(llmopt.generate(compiled, x, 8), llmopt.generate(eager, x, 8))
            # Not prepared by hand: llmopt.generate prepares the model under the wrapper itself.
            torch._dynamo.reset()
            plain = copy.deepcopy(pristine)
            llmopt.clear_reports()
            assert torch.equal(llmopt.generate(torch.compile(plain, backend="llmopt"), x, 8), llmopt.generate(eager, x, 8))
            assert all(r.ops_after.get("llmopt.fused_experts.default") == 2 for r in llmopt.reports())
            assert not any(type(m).__name__ == "MixtralSparseMoeBlock" for m in plain.modules())
            # Plain torch.compile with Dynamo's capture_dynamic_output_shape_ops (this process's
            # own choice): the whole model is one graph, fuse_moe stacks the per-expert weights.
            torch._dynamo.reset()
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
            loop = copy.deepcopy(pristine)
            out = torch.compile(loop, backend="llmopt", options={"strict": True})(x).logits
            assert llmopt.last_report().rewrites_by_pass()["fuse_moe"] == 2
            expected = pristine(x).logits
            err = ((out - expected).norm() / expected.norm()).item()
            assert err < 1e-5, err
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{_TF448}{os.pathsep}{root}"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
