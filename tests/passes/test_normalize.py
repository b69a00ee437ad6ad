"""normalize: linear spellings become one ``aten.linear``; provable no-ops disappear."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import llmopt
from conftest import assert_close


def compile_and_run(module, *inputs, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend="llmopt", options={"strict": True, "only": ["normalize"], **options})(*inputs)
    return out, llmopt.last_report()


class Spellings(nn.Module):
    """The same y = x W^T + b written four ways."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(24, 16))
        self.b = nn.Parameter(torch.randn(24))

    def forward(self, x):
        if self.how == "linear":
            return F.linear(x, self.w, self.b)
        if self.how == "addmm":
            return torch.addmm(self.b, x.reshape(-1, 16), self.w.t()).view(*x.shape[:-1], 24)
        if self.how == "matmul":
            return x @ self.w.t() + self.b
        if self.how == "conv1d":  # GPT-2 Conv1D: weight stored [K, N]
            return torch.addmm(self.b, x.view(-1, 16), self.w.t().contiguous().detach()).view(*x.shape[:-1], 24)
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["linear", "addmm", "matmul"])
def test_linear_spellings_become_aten_linear(how):
    m = Spellings(how).eval()
    x = torch.randn(2, 5, 16)
    out, report = compile_and_run(m, x)
    assert_close(out, m(x).detach(), torch.float32)
    assert report.ops_after.get("aten.linear.default", 0) >= 1
    assert "aten.addmm.default" not in report.ops_after
    assert "aten.mm.default" not in report.ops_after


def test_gpt2_conv1d_weight_is_transposed_once():
    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 24))  # [K, N]
            self.bias = nn.Parameter(torch.randn(24))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, 16), self.weight).view(*x.shape[:-1], 24)

    m = Conv1D().eval()
    x = torch.randn(3, 4, 16)
    out, report = compile_and_run(m, x)
    assert_close(out, m(x).detach(), torch.float32)
    assert report.ops_after == {"aten.linear.default": 1}


def test_noops_are_removed():
    class NoOps(nn.Module):
        def forward(self, x):
            y = x * 2
            y = y.view(y.shape)
            y = y.contiguous().clone()
            y = y.to(y.dtype)
            y = F.dropout(y, p=0.1, training=False)
            y = y.expand(*y.shape)
            return y[:, :] + 1

    x = torch.randn(4, 8)
    out, report = compile_and_run(NoOps(), x)
    assert_close(out, x * 2 + 1, torch.float32)
    assert report.ops_after == {"aten.add.Tensor": 1, "aten.mul.Tensor": 1}


def test_layout_changing_clone_is_kept():
    class T(nn.Module):
        def forward(self, x):
            return (x * 2).transpose(0, 1).contiguous().view(-1)

    x = torch.randn(3, 5)
    out, report = compile_and_run(T(), x)
    assert_close(out, (x * 2).t().reshape(-1), torch.float32)
    assert report.ops_after.get("aten.clone.default") == 1


def test_casts_that_change_dtype_are_kept():
    class C(nn.Module):
        def forward(self, x):
            return (x * 2).to(torch.float16).to(torch.float32)

    x = torch.randn(3, 5)
    out, report = compile_and_run(C(), x)
    assert_close(out, (x * 2).half().float(), torch.float32)
    assert report.ops_after.get("aten._to_copy.default") == 2


def test_non_constant_weight_is_canonicalized_too():
    f = lambda x, w: x @ w.t()  # noqa: E731  (w is an input, not a frozen weight)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    out, report = compile_and_run(f, x, w)
    assert_close(out, x @ w.t(), torch.float32)
    assert report.ops_after == {"aten.linear.default": 1}


def test_untransposed_non_constant_operand_stays_a_matmul():
    f = lambda x, w: x @ w  # noqa: E731
    x, w = torch.randn(4, 8), torch.randn(8, 6)
    out, report = compile_and_run(f, x, w)
    assert_close(out, x @ w, torch.float32)
    assert "aten.linear.default" not in report.ops_after


def test_duplicate_pure_ops_are_merged():
    class Twice(nn.Module):
        def forward(self, x, c):
            a = x * c.unsqueeze(1)
            b = (x + 1) * c.unsqueeze(1)  # the same unsqueeze again (one per layer in HF models)
            return a + b

    x, c = torch.randn(2, 3, 4), torch.randn(2, 4)
    out, report = compile_and_run(Twice(), x, c)
    assert_close(out, x * c.unsqueeze(1) + (x + 1) * c.unsqueeze(1), torch.float32)
    assert report.ops_after.get("aten.unsqueeze.default") == 1


def test_random_ops_are_not_merged():
    f = lambda x: x + torch.rand_like(x) - torch.rand_like(x)  # noqa: E731
    x = torch.zeros(1000)
    out, report = compile_and_run(f, x)
    assert out.abs().sum() > 0  # two different draws do not cancel


def _graph_with_writes():
    """``m1 = pos < 4`` twice around two in-place writes: one of ``cache`` (which ``m``
    does not read) and one of ``pos`` (which it does)."""
    g = fx.Graph()
    pos, cache, new = g.placeholder("pos"), g.placeholder("cache"), g.placeholder("new")
    m1 = g.call_function(torch.ops.aten.lt.Scalar, (pos, 4))
    g.call_function(torch.ops.aten.copy_.default, (cache, new))          # writes cache only
    m2 = g.call_function(torch.ops.aten.lt.Scalar, (pos, 4))             # same as m1
    g.call_function(torch.ops.aten.add_.Tensor, (pos, 1))                # writes pos
    m3 = g.call_function(torch.ops.aten.lt.Scalar, (pos, 4))             # differs from m1
    g.output((m1, m2, m3, g.call_function(torch.ops.aten.logical_and.default, (m2, m3))))
    return fx.GraphModule(torch.nn.Module(), g)


def test_merge_across_writes_of_other_inputs_only():
    from llmopt.passes.normalize import merge_duplicates

    gm = _graph_with_writes()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    merged = merge_duplicates(gm, outputs=set())
    gm.graph.lint()
    assert merged == 1  # m2 → m1 (the cache write does not touch pos); m3 stays
    lts = [n for n in gm.graph.nodes if n.target == torch.ops.aten.lt.Scalar]
    assert len(lts) == 2 and out.args[0][1] is lts[0]
    pos = torch.tensor(3)
    m1, m2, m3, both = gm(pos, torch.zeros(2), torch.ones(2))
    assert bool(m1) and bool(m2) and not bool(m3)
