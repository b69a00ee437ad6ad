"""Weight-only int8 / int4 expert stacks of mixture-of-experts blocks, and ``QuantizedExperts``.

The experts of a MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE) are most of its weights and
are stored as two 3-D stacks (transformers 5.x): ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``. Quantizing them is quantizing each expert's ``[N, K]`` matrix
with the linear schemes (``llmopt.quant.schemes.quantize_weight``: int8 per output
channel, int4 RTN per group of ``group_size`` inputs), one expert at a time so the
transient fp32 copy is one expert's, not the stack's.

Two users:

* ``quantize_(model, "int8" | Int4WeightOnly(...))`` swaps every experts module it
  recognizes (the two stacks above, not transposed, no biases, one gated activation:
  SiLU / GELU / tanh-GELU) for :class:`QuantizedExperts`, whose forward takes what
  transformers passes to ``self.experts(hidden_states, top_k_index, top_k_weights)`` and
  calls ``llmopt::fused_experts_int8`` / ``_int4``. The float stacks are released.
* the compiler's ``quantize=`` option (``llmopt.passes.quantize_experts``) builds the same
  module from the frozen stacks of a fused MoE block and emits its op call.

W8A8 and GPTQ have no expert form: their experts stay float (``quantize_`` warns once).
A config's ``compute_dtype`` does not apply to experts: they compute in the tokens' dtype.
Source: the linear schemes of this package; vLLM's weight-only fused MoE layouts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Int4WeightOnly, Int8WeightOnly, parse_quantize
from .schemes import quantize_weight

EXPERT_SCHEMES = (Int8WeightOnly, Int4WeightOnly)


@dataclass
class QuantizedStack:
    """One quantized ``[E, N, K]`` stack: int8 ``data [E, N, K]`` and ``scales [E, N]``, or
    packed int4 ``data [E, N, K / 2]`` and ``scales, zeros [E, N, K / group_size]``."""

    scheme: str
    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None


def expert_scheme_problem(config, hidden: int, inter: int) -> str | None:
    """Why ``config`` cannot quantize experts of these sizes, or None."""
    if not isinstance(config, EXPERT_SCHEMES):
        return f"{type(config).__name__} has no expert kernels (int8 and int4 weight-only do): experts kept in float"
    if isinstance(config, Int4WeightOnly) and (hidden % config.group_size or inter % config.group_size):
        return (f"int4 group_size={config.group_size} does not divide the experts' hidden size {hidden} and "
                f"intermediate size {inter}: experts kept in float")
    return None


def quantize_stack(stack: torch.Tensor, config) -> QuantizedStack:
    """Quantize each expert ``stack[e]`` (``[N, K]``) under ``config``, expert by expert."""
    config = parse_quantize(config)
    e = stack.shape[0]
    first = quantize_weight(stack[0].detach(), config)

    def alloc(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_empty((e, *t.shape))

    data, scales, zeros = alloc(first.data), alloc(first.scales), alloc(first.zeros)
    for i in range(e):
        qw = first if i == 0 else quantize_weight(stack[i].detach(), config)
        data[i], scales[i] = qw.data, qw.scales
        if zeros is not None:
            zeros[i] = qw.zeros
    return QuantizedStack(first.scheme, data, scales, zeros, first.group_size)


_PROBE = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32)
_ACTIVATION_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
}


def activation_name(act_fn) -> str | None:
    """The fused ops' name of the activation module ``act_fn`` computes, found by evaluating
    it (transformers' activation classes change names between releases)."""
    if act_fn is None:
        return None
    with torch.no_grad():
        try:
            got = act_fn(_PROBE)
        except (TypeError, RuntimeError):
            return None
        for name, fn in _ACTIVATION_FNS.items():
            if torch.allclose(got, fn(_PROBE), rtol=1e-5, atol=1e-6):
                return name
    return None


def expert_stacks_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``(gate_up [E, 2I, H], down [E, H, I], activation)`` when ``module`` is an experts module
    in transformers' concatenated, untransposed, bias-free layout, else None."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or not getattr(
            module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        return None
    if gate_up.dim() != 3 or down.dim() != 3 or not gate_up.is_floating_point():
        return None
    e, two_i, h = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        return None
    activation = activation_name(getattr(module, "act_fn", None))
    return None if activation is None else (gate_up, down, activation)


class QuantizedExperts(nn.Module):
    """The experts of a MoE block with int8 / int4 stacks: ``forward(hidden_states [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` (transformers' experts call)."""

    def __init__(self, gate_up: QuantizedStack, down: QuantizedStack, activation: str):
        super().__init__()
        if gate_up.scheme != down.scheme or gate_up.group_size != down.group_size:
            raise ValueError("QuantizedExperts: both stacks must share scheme and group size")
        self.scheme = gate_up.scheme
        self.group_size = gate_up.group_size
        self.activation = activation
        self.num_experts = gate_up.data.shape[0]
        self.register_buffer("w_gate_up", gate_up.data)
        self.register_buffer("gate_up_scales", gate_up.scales)
        self.register_buffer("gate_up_zeros", gate_up.zeros)
        self.register_buffer("w_down", down.data)
        self.register_buffer("down_scales", down.scales)
        self.register_buffer("down_zeros", down.zeros)

    @classmethod
    def from_stacks(cls, gate_up: torch.Tensor, down: torch.Tensor, activation: str, config) -> "QuantizedExperts":
        return cls(quantize_stack(gate_up, config), quantize_stack(down, config), activation)

    def call(self, x, weights, ids, tensor=None) -> tuple[object, tuple]:
        """The registered op this module runs and its arguments; ``tensor(name)`` gives what
        to pass for a buffer (default: the buffer; ``quantize_experts`` passes graph nodes)."""
        t = tensor or (lambda name: getattr(self, name))
        if self.scheme == "int8":
            return torch.ops.llmopt.fused_experts_int8.default, (
                x, t("w_gate_up"), t("gate_up_scales"), t("w_down"), t("down_scales"), weights, ids, self.activation)
        return torch.ops.llmopt.fused_experts_int4.default, (
            x, t("w_gate_up"), t("gate_up_scales"), t("gate_up_zeros"), t("w_down"), t("down_scales"),
            t("down_zeros"), weights, ids, self.activation, self.group_size)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        op, args = self.call(hidden_states, top_k_weights, top_k_index)
        return op(*args)

    def extra_repr(self) -> str:
        e, two_i = self.w_gate_up.shape[:2]
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"num_experts={e}, intermediate={two_i // 2}, scheme={self.scheme}{group}, activation={self.activation}"


def quantize_experts_(model: nn.Module, config, filter_fn=None) -> dict[str, str]:
    """Swap each recognized experts module of ``model`` for :class:`QuantizedExperts`, in
    place. Returns ``{fqn: why}`` for the experts modules left in float."""
    from .calibration import set_submodule

    config = parse_quantize(config)
    left = {}
    targets = [(fqn, m) for fqn, m in model.named_modules() if expert_stacks_of(m) is not None]
    for fqn, module in targets:
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        gate_up, down, activation = expert_stacks_of(module)
        problem = expert_scheme_problem(config, gate_up.shape[2], down.shape[2])
        if problem is not None:
            left[fqn] = problem
            continue
        with torch.no_grad():
            set_submodule(model, fqn, QuantizedExperts.from_stacks(gate_up, down, activation, config))
    return left
