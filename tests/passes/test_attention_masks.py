"""passes/attention/masks.py on its own: what a mask is proven to mean, never assumed.

Each mask is built the way models build it (``arange`` comparisons as in Hugging Face
``masking_utils``, a frozen ``tril`` buffer as in GPT-2, a padding ``attention_mask``
input), traced to ATen, and handed to ``MaskAnalysis``: a position rule
becomes the kernel's ``causal``/``window``/``q_offset`` and disappears; anything that is
not one stays a mask; an input-dependent part is never dropped.
"""
import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from llmopt.passes.attention.masks import MaskAnalysis, MaskPlan, fit_positions

B, H = 2, 4


def traced(fn, *inputs):
    """(graph module, the node fn returns) for fn traced to ATen (make_fx records a fake
    value on every node; tensors fn closes over become frozen get_attr constants)."""
    gm = make_fx(fn, tracing_mode="real")(*inputs)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return gm, out.args[0]


def plan_for(fn, *inputs, sq=6, skv=6) -> MaskPlan | str:
    gm, mask = traced(fn, *inputs)
    return MaskAnalysis(gm).additive_or_bool(mask, (B, H, sq, skv))


def positions(sq, skv):
    return torch.arange(sq)[:, None], torch.arange(skv)[None, :]


def padding(skv=6):
    """An attention_mask input (1 = token, 0 = padding): known only at run time."""
    return torch.ones(B, skv, dtype=torch.int64)


# ------------------------------------------------------------------------------ proven rules
def test_causal_arange_comparison_is_proven_and_dropped():
    def causal(pad):
        i, j = positions(6, 6)
        return j <= i

    plan = plan_for(causal, padding())
    assert (plan.causal, plan.window, plan.q_offset, plan.expr) == (True, 0, 0, None)
    assert plan.what == "mask: proven causal"


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_is_proven(window):
    def sliding(pad):
        i, j = positions(6, 6)
        return (j <= i) & (i - j < window)

    plan = plan_for(sliding, padding())
    assert (plan.causal, plan.window, plan.expr) == (True, window, None)
    assert plan.what == f"mask: proven causal + window {window}"


def test_a_suffix_of_the_keys_becomes_a_query_offset():
    # 2 new queries after 4 cached keys: query i sits at position i + 4.
    def chunk(pad):
        i, j = positions(2, 6)
        return j <= i + 4

    plan = plan_for(chunk, padding(), sq=2, skv=6)
    assert (plan.causal, plan.q_offset, plan.window, plan.expr) == (True, 4, 0, None)


def test_gpt2_tril_buffer_sliced_is_proven_causal():
    bias = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]

    def gpt2(pad):
        return bias[:, :, 2:8, :8]  # bias[:, :, k - q : k, :k] with q = 6, k = 8

    plan = plan_for(gpt2, padding(8), sq=6, skv=8)
    assert (plan.causal, plan.q_offset, plan.expr) == (True, 2, None)


def test_constant_additive_mask_with_minus_inf_is_proven_causal():
    def additive(pad):
        i, j = positions(6, 6)
        return torch.zeros(6, 6).masked_fill(j > i, -math.inf)

    plan = plan_for(additive, padding())
    assert (plan.causal, plan.expr) == (True, None)
    assert plan.what == "mask: constant, proven causal"


def test_all_true_constant_is_dropped_without_claiming_causality():
    plan = plan_for(lambda pad: torch.ones(6, 6, dtype=torch.bool), padding())
    assert (plan.causal, plan.window, plan.expr) == (False, 0, None)


def test_anti_causal_mask_is_a_window_not_causal():
    def anti(pad):
        i, j = positions(6, 6)
        return j >= i

    plan = plan_for(anti, padding())
    # j >= i is exactly "i + off - j < window" with the causal bound out of reach.
    assert plan.expr is None and plan.window == 6 and plan.q_offset == 5
    assert "no upper bound on the keys" in plan.what and "causal" not in plan.what


# ------------------------------------------------------------------------------ kept masks
def test_padding_mask_is_kept_next_to_the_proven_causal_part():
    def causal_and_padding(pad):
        i, j = positions(6, 6)
        return (j <= i) & pad.bool()[:, None, None, :]

    plan = plan_for(causal_and_padding, padding())
    assert plan.causal and plan.expr is not None and plan.expr[0] == "node"
    assert plan.what == "mask: proven causal, bool mask for the input-dependent part"


def test_bidirectional_padding_mask_is_not_causal():
    plan = plan_for(lambda pad: pad.bool()[:, None, None, :].expand(B, 1, 6, 6), padding())
    assert not plan.causal and plan.expr is not None and plan.window == 0


def test_constant_mask_that_is_no_position_rule_is_kept_not_assumed_causal():
    def checkerboard(pad):
        i, j = positions(6, 6)
        return (i + j) % 2 == 0

    plan = plan_for(checkerboard, padding())
    assert not plan.causal and plan.expr is not None
    assert plan.what == "mask: bool (constant, not a position rule)"


def test_causal_mask_with_one_hole_is_kept():
    hole = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    hole[4, 1] = False

    plan = plan_for(lambda pad: hole.clone(), padding())
    assert not plan.causal and plan.expr is not None


def test_soft_mask_with_an_input_dependent_part_is_passed_as_is():
    # HF eager: where(causal & padding, 0, finfo.min). A fully padded row gets a uniform
    # softmax from a finite fill, which the kernel's causal flag would not reproduce.
    def soft(pad):
        i, j = positions(6, 6)
        cond = (j <= i) & pad.bool()[:, None, None, :]
        return torch.where(cond, 0.0, torch.finfo(torch.float32).min)

    gm, mask = traced(soft, padding())
    plan = MaskAnalysis(gm).additive_or_bool(mask, (B, H, 6, 6))
    assert not plan.causal and plan.expr == ("node", mask)


def test_soft_constant_mask_with_an_empty_row_is_passed_as_is():
    def strictly_causal(pad):
        i, j = positions(6, 6)
        return torch.where(j < i, 0.0, torch.finfo(torch.float32).min)  # row 0 keeps no key

    gm, mask = traced(strictly_causal, padding())
    plan = MaskAnalysis(gm).additive_or_bool(mask, (B, H, 6, 6))
    assert not plan.causal and plan.expr == ("node", mask)


def test_float_mask_from_an_input_is_passed_through():
    plan = plan_for(lambda bias: bias * 2.0, torch.zeros(B, 1, 6, 6))
    assert not plan.causal and plan.what == "mask: additive, passed through"


# ------------------------------------------------------------------------------ refusals
def test_mask_that_does_not_broadcast_to_the_scores_is_refused():
    reason = plan_for(lambda pad: torch.ones(5, 6, dtype=torch.bool), padding())
    assert isinstance(reason, str) and "does not broadcast" in reason


def test_integer_mask_is_refused():
    reason = plan_for(lambda pad: pad[:, None, None, :] * 1, padding())
    assert isinstance(reason, str) and "dtype" in reason


@pytest.mark.parametrize("fill", [0.0, 1.0, math.nan])
def test_eager_mask_filled_with_a_non_negative_value_is_refused(fill):
    gm, cond = traced(lambda pad: pad.bool()[:, None, None, :], padding())
    reason = MaskAnalysis(gm).combine_eager([("where", ("node", cond), fill)], (B, H, 6, 6))
    assert isinstance(reason, str) and "not a large negative value" in reason


def test_eager_where_then_additive_mask_keeps_the_additive_part():
    # GPT-2 before masking_utils: where(tril_buffer, s, finfo.min) + attention_mask.
    def gpt2(bias_input):
        i, j = positions(6, 6)
        return j <= i, bias_input

    gm = make_fx(gpt2, tracing_mode="real")(torch.zeros(B, 1, 1, 6))
    cond, bias = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    fill = torch.finfo(torch.float32).min
    plan = MaskAnalysis(gm).combine_eager([("where", ("node", cond), fill), ("add", bias)], (B, H, 6, 6))
    assert plan.causal and plan.expr == ("node", bias)


# ------------------------------------------------------------------------------ the position rule
def _rule(sq, skv, off=0, window=0):
    i, j = positions(sq, skv)
    allowed = j <= i + off
    return allowed & (i + off - j < window) if window else allowed


@pytest.mark.parametrize("sq,skv,off,window", [(6, 6, 0, 0), (2, 9, 7, 0), (3, 7, 4, 2), (5, 5, 0, 1), (4, 10, 6, 3)])
def test_fit_positions_recovers_the_rule_that_built_the_mask(sq, skv, off, window):
    assert fit_positions(_rule(sq, skv, off, window), (B, H, sq, skv)) == ("causal", off, window, True)


def test_fit_positions_reports_rows_without_a_key():
    assert fit_positions(_rule(4, 4, off=-1), (B, H, 4, 4)) == ("causal", -1, 0, False)


def test_fit_positions_all_true_and_no_rule():
    assert fit_positions(torch.ones(3, 3, dtype=torch.bool), (B, H, 3, 3)) == ("all",)
    rule = _rule(4, 4)
    rule[3, 1] = False  # a hole inside the causal triangle
    assert fit_positions(rule, (B, H, 4, 4)) is None


def test_fit_positions_requires_one_rule_for_every_batch_and_head():
    per_batch = torch.stack([_rule(4, 4), _rule(4, 4, window=2)])[:, None]  # [2, 1, 4, 4]
    assert fit_positions(per_batch, (2, H, 4, 4)) is None
