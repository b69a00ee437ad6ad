"""Helpers the MoE pass tests share: a fresh Dynamo per test, a strict llmopt compile, and
the fuse_moe rewrites' details and near-miss reasons of a report."""
import pytest
import torch

import llmopt
from conftest import assert_close

PASS = "fuse_moe"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_and_run(module, *inputs, **options):
    with torch.no_grad():
        out = torch.compile(module, backend="llmopt", options={"strict": True, **options})(*inputs)
    return out, llmopt.last_report()


def near_misses(report):
    return [nm.reason for nm in report.near_misses if nm.pass_name == PASS]


def details(report):
    return [rw.detail for rw in report.rewrites if rw.pass_name == PASS]


def fused_once_and_equal(module, x, **options):
    """Compile ``module`` on ``x``: exactly one fuse_moe rewrite, output equal to eager's
    within the tolerance table. Returns the report. Eager runs first: compiling releases
    the weights it replaced with derived copies (a chunked shared expert, quantized stacks)."""
    with torch.no_grad():
        want = module(x)
    out, report = compile_and_run(module, x, **options)
    assert report.rewrites_by_pass()[PASS] == 1, near_misses(report)
    assert_close(out, want)
    return report
