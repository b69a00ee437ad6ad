"""Each private-API wrapper of llmopt.compat works on the installed torch."""
import torch

from llmopt import compat


def test_version_tuple():
    assert compat.TORCH_VERSION >= (2, 6)


def test_aot_capture_gives_aten_graph():
    seen = {}

    def fw(gm, inputs):
        seen["targets"] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

        def run(args):
            return gm(*args)

        run._boxed_call = True
        return run

    def backend(gm, inputs):
        return compat.aot_inference_capture(gm, inputs, fw)

    f = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, backend=backend)
    with torch.no_grad():
        pass
        f(torch.randn(4))
    assert all(t.startswith("aten.") for t in seen["targets"])


def test_module_state_kind_marks_parameters():
    kinds = []

    def backend(gm, inputs):
        kinds.extend(compat.module_state_kind(t) for t in inputs)
        return gm.forward

    m = torch.nn.Linear(3, 3)
    torch.compile(m, backend=backend)(torch.randn(1, 3))
    assert "unguarded" in kinds or len(list(m.parameters())) == 2


def test_statically_true():
    assert compat.statically_true(True)
    assert not compat.statically_true(False)


def test_real_tensor_mode_is_a_context_manager():
    with compat.real_tensor_mode():
        assert torch.ones(2).sum().item() == 2
