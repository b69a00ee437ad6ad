"""``llmopt.prepare_moe(model)``: MoE blocks written as a per-expert Python loop become fusable.

transformers 4.4x-4.5x (Mixtral, Qwen2-MoE, Qwen3-MoE) run a sparse block as a loop over
experts with a data-dependent ``torch.where`` and ``index_add_``, and 5.x does the same
with ``experts_implementation="eager"``. Dynamo cannot trace that loop into one graph (it
runs the block eagerly and compiles each expert MLP apart), so ``fuse_moe`` never sees a
block. This opt-in, instance-level transformation fixes that without patching any class:

* a loop block (``gate``: an ``nn.Linear`` router; ``experts``: an ``nn.ModuleList`` of
  gated MLPs ``w2(act(w1 x) * w3 x)`` or ``down(act(gate x) * up x)`` without biases;
  ``top_k``; optional ``norm_topk_prob`` (Qwen), else renormalized (Mixtral); an optional
  Qwen2-MoE ``shared_expert`` + ``shared_expert_gate``, folded into the stacks as
  ``ceil(I_s / I)`` chunk-experts, as ``fuse_moe`` does) is *replaced* in its parent by a
  :class:`StackedMoeBlock`: the experts' weights stacked once into ``gate_up_proj [E, 2I, H]``
  and ``down_proj [E, H, I]`` (the per-expert modules are released: one copy of the
  weights), its forward calling ``llmopt::moe_route`` + ``llmopt::fused_experts`` directly
  and returning what the loop returned (``(hidden, router_logits)``);
* each replacement is **proven** before it is kept: old and new block run on the same
  random tokens and must agree (relative error 1e-4 in fp32, 2e-2 in 16-bit; a wrong
  reading is off by tens of percent), otherwise the block stays and the reason is returned;
* a transformers 5.x model with ``experts_implementation="eager"`` is switched to
  ``"grouped_mm"`` (transformers' own ``set_experts_implementation``), which ``fuse_moe``
  fuses.

State-dict keys change (``experts.0.w1.weight`` → ``gate_up_proj``): prepare a loaded
model for inference; save checkpoints from the original. Training is not supported (the
stacked parameters are plain parameters, but the jitter noise of training is dropped).

Source: transformers 4.48 ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock`` (the loop
spellings); transformers 5's stacked ``*Experts`` layout (the target layout).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .codegen import moe_experts, moe_route  # noqa: F401  registers llmopt::moe_route, llmopt::fused_experts
from .codegen.moe_experts import chunk_experts, zero_preserving

# Gated-MLP attribute names: (gate, up, down).
_MLP_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
_PROOF_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 2e-2
# Set on a loop block that could not be replaced: the automatic callers (every generate
# call) do not prove it again. An instance attribute, so no global state.
_LEFT_MARK = "_llmopt_prepare_moe_left"

log = logging.getLogger("llmopt")


@dataclass
class MoePreparation:
    """What :func:`prepare_moe` did: blocks replaced, blocks left (with why), and whether the
    transformers 5.x experts implementation was switched."""

    replaced: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    experts_implementation: str | None = None


class StackedMoeBlock(nn.Module):
    """A sparse MoE block over stacked expert weights: ``forward(hidden [B, S, H]) ->
    (out [B, S, H], router_logits [B S, E])``, routing and experts as two llmopt ops.

    A shared expert (Qwen2-MoE) is folded into the stacks as ``shared_chunks`` chunk-experts
    after the ``E`` routed ones (``codegen.moe_experts.chunk_experts``), every token routed to
    them with the weight ``sigmoid(shared_expert_gate(x))``: one fused call for both."""

    def __init__(self, gate: nn.Linear, gate_up: torch.Tensor, down: torch.Tensor, top_k: int, renormalize: bool,
                 activation: str, shared_chunks: int = 0, shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.gate = gate
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.top_k, self.renormalize, self.activation = top_k, renormalize, activation
        self.shared_chunks, self.shared_expert_gate = shared_chunks, shared_expert_gate
        routed = gate_up.shape[0] - shared_chunks
        self.register_buffer("shared_ids", torch.arange(routed, routed + shared_chunks, device=gate_up.device).view(1, -1),
                             persistent=False)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, ids = torch.ops.llmopt.moe_route(router_logits, self.top_k, "softmax", self.renormalize)
        if self.shared_chunks:
            g = torch.sigmoid(self.shared_expert_gate(x)).to(weights.dtype)
            weights = torch.cat([weights, g.expand(-1, self.shared_chunks)], dim=1)
            ids = torch.cat([ids, self.shared_ids.expand(x.shape[0], -1)], dim=1)
        out = torch.ops.llmopt.fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.activation)
        return out.reshape(shape), router_logits

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return (f"experts={e - self.shared_chunks}, shared_chunks={self.shared_chunks}, hidden={h}, "
                f"intermediate={two_i // 2}, top_k={self.top_k}, renormalize={self.renormalize}")


def _expert_weights(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module] | None:
    for names in _MLP_NAMES:
        linears = [getattr(expert, n, None) for n in names]
        if all(type(lin) is nn.Linear and lin.bias is None for lin in linears):
            return linears[0].weight, linears[1].weight, linears[2].weight, getattr(expert, "act_fn", None)
    return None


def _stacked_block(block: nn.Module) -> tuple[StackedMoeBlock | None, str]:
    """The replacement of a loop block, or (None, why not)."""
    from .quant.experts import activation_name

    gate, experts, top_k = getattr(block, "gate", None), getattr(block, "experts", None), getattr(block, "top_k", None)
    if type(gate) is not nn.Linear or gate.bias is not None or not isinstance(experts, nn.ModuleList):
        return None, "not a loop block (an nn.Linear router and an nn.ModuleList of experts)"
    if len(experts) != gate.out_features or not isinstance(top_k, int):
        return None, f"{len(experts)} experts for a router of {gate.out_features} outputs, or no integer top_k"
    parts = [_expert_weights(e) for e in experts]
    if any(p is None for p in parts):
        return None, "an expert is not a bias-free gated MLP (w1/w3/w2 or gate_proj/up_proj/down_proj)"
    # No act_fn attribute (a hand-written expert): SiLU, the MoE default; the proof checks it.
    names = {"silu" if p[3] is None else activation_name(p[3]) for p in parts}
    if len(names) != 1 or None in names:
        return None, "the experts' activation is not one of silu, gelu, tanh gelu"
    activation = names.pop()
    shared, shared_gate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    if (shared is None) != (shared_gate is None):
        return None, "a shared expert without its gate (or the reverse)"
    shared_parts = _expert_weights(shared) if shared is not None else None
    if shared is not None and (shared_parts is None or (shared_parts[3] is not None and activation_name(shared_parts[3]) != activation)
                               or not zero_preserving(activation)):
        return None, "the shared expert is not a bias-free gated MLP with the experts' activation"
    with torch.no_grad():
        gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u, _, _ in parts])
        down = torch.stack([d for _, _, d, _ in parts])
        chunks = 0
        if shared_parts is not None:  # appended as chunk-experts: the shared expert's modules are released
            s_gu, s_d = chunk_experts(*shared_parts[:3], gate_up.shape[1] // 2)
            gate_up, down, chunks = torch.cat([gate_up, s_gu]), torch.cat([down, s_d]), s_gu.shape[0]
    renormalize = bool(getattr(block, "norm_topk_prob", True))
    return StackedMoeBlock(gate, gate_up, down, top_k, renormalize, activation, chunks, shared_gate), ""


def _agree(old: nn.Module, new: nn.Module) -> str | None:
    """None when both blocks compute the same on random tokens, else why not."""
    p = new.gate_up_proj
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, p.shape[2], generator=g).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        expected, got = old(x), new(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    tol = _PROOF_TOLERANCE.get(p.dtype, _HALF_TOLERANCE)
    e, a = expected.double(), got[0].double()
    den = torch.linalg.vector_norm(e).item()
    err = torch.linalg.vector_norm(a - e).item() / (den or 1.0)
    return None if math.isfinite(err) and err <= tol else f"the stacked block differs from the loop (relative error {err:.2g})"


def prepare_moe(model: nn.Module) -> MoePreparation:
    """Make ``model``'s MoE blocks fusable by ``fuse_moe``, in place (see the module doc).

    Returns what was done; call it after loading and before ``torch.compile``."""
    from .quant.calibration import set_submodule

    done = MoePreparation()
    config = getattr(model, "config", None)
    # Only a model with transformers 5's stacked experts modules (a dense model's config
    # says "eager" too, and its set_experts_implementation raises ValueError).
    stacked = any(isinstance(getattr(m, "experts", None), nn.Module) and not isinstance(m.experts, nn.ModuleList)
                  for m in model.modules())
    if (stacked and getattr(config, "_experts_implementation", None) == "eager"
            and hasattr(model, "set_experts_implementation")):
        try:
            model.set_experts_implementation("grouped_mm")
            done.experts_implementation = "grouped_mm"
        except ValueError as exc:  # this model's experts have no grouped_mm: they stay as they are
            done.left["<experts_implementation>"] = f"not switched to grouped_mm: {exc}"
    loops = [(fqn, m) for fqn, m in model.named_modules()
             if isinstance(getattr(m, "experts", None), nn.ModuleList) and hasattr(m, "gate")]
    for fqn, block in loops:
        if not fqn:
            done.left["<the model>"] = "the model itself is the block: prepare a module that contains it"
            continue
        why = getattr(block, _LEFT_MARK, None)
        if why is None:
            new, why = _stacked_block(block)
            if new is not None:
                why = _agree(block, new)
        if why:
            done.left[fqn] = why
            setattr(block, _LEFT_MARK, why)
            continue
        set_submodule(model, fqn, new)  # the per-expert modules go with the old block
        done.replaced.append(fqn)
    return done


def prepare_moe_automatically(model) -> MoePreparation | None:
    """:func:`prepare_moe` as llmopt's entry points call it (``llmopt.compile``,
    ``llmopt.generate``, ``llmopt.Engine``): on the module under a ``torch.compile`` wrapper,
    logged when it changed something, free when there is nothing to do (one walk over the
    modules; a block already left is not proven again). Each replacement is proven as in
    :func:`prepare_moe`, so the model computes what it computed before."""
    from torch import nn

    module = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not isinstance(module, nn.Module):
        return None
    done = prepare_moe(module)
    if done.replaced or done.experts_implementation:
        log.info("llmopt: prepared MoE blocks for fusion (llmopt.prepare_moe): replaced %s%s", done.replaced or "none",
                 f"; experts_implementation switched to {done.experts_implementation}" if done.experts_implementation else "")
    return done
