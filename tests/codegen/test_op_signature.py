"""op_signature (llmopt/codegen/op_signature.py): an op defined with its reference's signature.

Specification: ``signature_of(ref)`` gives the decorated body ``ref``'s names, defaults and
annotations (string annotations resolved), so ``torch.library.custom_op`` infers the
reference's schema; ``extra`` parameters follow with the body's own annotations; a body
whose names, order or defaults differ from the reference's is a TypeError at definition.
"""
from __future__ import annotations

import inspect
from typing import Optional

import pytest
import torch

from llmopt.codegen.op_signature import signature_of


def scale_ref(x: torch.Tensor, bias: Optional[torch.Tensor], factor: float = 2.0) -> torch.Tensor:
    out = x * factor
    return out if bias is None else out + bias


@torch.library.custom_op("llmopt_test::scaled", mutates_args=())
@signature_of(scale_ref)
def scaled(x, bias, factor=2.0):
    return scale_ref(x, bias, factor)


@scaled.register_fake
def _(x, bias, factor=2.0):
    return x.new_empty(x.shape)


def test_the_op_schema_is_the_references():
    assert str(torch.ops.llmopt_test.scaled.default._schema) == (
        "llmopt_test::scaled(Tensor x, Tensor? bias, float factor=2.) -> Tensor")
    x = torch.randn(3)
    assert torch.equal(scaled(x, None, factor=3.0), x * 3.0)
    torch.library.opcheck(scaled, (x, torch.randn(3)))


def test_extra_parameters_follow_the_references():
    @signature_of(scale_ref, extra=("out",))
    def launch(x, bias, factor=2.0, out: Optional[torch.Tensor] = None):
        return out

    params = inspect.signature(launch).parameters
    assert list(params) == ["x", "bias", "factor", "out"]
    assert params["x"].annotation is torch.Tensor and params["out"].annotation == Optional[torch.Tensor]
    assert inspect.signature(launch).return_annotation is torch.Tensor


@pytest.mark.parametrize("body", [
    lambda x, bias, factor=3.0: x,  # another default
    lambda x, factor=2.0, bias=None: x,  # another order
    lambda x, bias: x,  # a parameter missing
])
def test_a_body_that_differs_from_its_reference_fails_at_definition(body):
    with pytest.raises(TypeError, match="must take the parameters of its reference"):
        signature_of(scale_ref)(body)


def test_missing_extra_fails():
    with pytest.raises(TypeError, match="then out"):
        signature_of(scale_ref, extra=("out",))(lambda x, bias, factor=2.0, result=None: x)
