"""Shared helpers for tests that compile with the llmopt backend and compare with eager.

Why: the pass tests and the end-to-end tests each spelled out the same compile-and-report
step, the same compiled-vs-eager-vs-fp64 check and the same greedy ``generate`` run twice
(eager, then with the compiled forward); one copy here keeps them checking the same thing.
"""
import copy

import torch

import llmopt
from conftest import assert_close


def compile_and_report(module, *inputs, only=None):
    """``module(*inputs)`` compiled with llmopt in strict mode (only the passes in ``only``
    when given), from a fresh Dynamo state; returns (output, the compile report)."""
    torch._dynamo.reset()
    options = {"strict": True}
    if only is not None:
        options["only"] = list(only)
    with torch.no_grad():
        out = torch.compile(module, backend="llmopt", options=options)(*inputs)
    return out, llmopt.last_report()


def near_misses_of(report, pass_name):
    """The reasons of the near misses ``pass_name`` recorded in ``report``."""
    return [nm.reason for nm in report.near_misses if nm.pass_name == pass_name]


def fp64_truth(module, *inputs):
    """The module run in fp64 on the same (rounded) weights and inputs: the ground truth."""
    ref = copy.deepcopy(module).double()
    with torch.no_grad():
        return ref(*[t.double() if t.is_floating_point() else t for t in inputs])


def check_numerics(actual, module, inputs, dtype):
    """Compiled output vs the fp64 truth and vs eager, within the suite's tolerance for ``dtype``."""
    with torch.no_grad():
        eager = module(*inputs)
    expected = fp64_truth(module, *inputs)
    for a, e, t in zip(flat(actual), flat(eager), flat(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, t, dtype, what="compiled vs fp64 truth")
        assert_close(a, e.to(a.dtype), dtype, what="compiled vs eager")


def flat(x):
    """``x`` as a list of tensors (a lone tensor becomes a list of one)."""
    return list(x) if isinstance(x, (tuple, list)) else [x]


def generate_eager_and_compiled(model, x, options=None, **kwargs):
    """Greedy ``model.generate(x, **kwargs)`` eager, then again with ``model.forward``
    compiled by llmopt (``options``, strict by default); returns (eager tokens, compiled tokens)."""
    kwargs = dict(do_sample=False, pad_token_id=0, **kwargs)
    with torch.no_grad():
        expected = model.generate(x, **kwargs)
        model.forward = torch.compile(model.forward, backend="llmopt", options=options or {"strict": True})
        actual = model.generate(x, **kwargs)
    return expected, actual


def check_logits(logits, model, x, dtype, family):
    """Compiled logits of an HF ``model`` on tokens ``x`` vs its fp64 run and vs eager."""
    with torch.no_grad():
        eager = model(x)[0]
        expected = copy.deepcopy(model).double()(x)[0]
    assert_close(logits, expected, dtype, what=f"{family} logits vs fp64")
    assert_close(logits, eager, dtype, what=f"{family} logits vs eager")
