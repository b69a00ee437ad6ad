"""Every private PyTorch API llmopt touches, version-gated, in one place.

llmopt supports torch 2.6 through 2.13. Public APIs come first; where only a private one
does the job (AOTAutograd capture, Inductor as inner executor, Dynamo's marks on module
state), it is wrapped here so that a change in a new torch release is fixed in one file.
``tests/test_compat.py`` exercises each wrapper on the installed version.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def aot_inference_capture(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    fw_compiler: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable],
) -> Callable:
    """Lower a Dynamo graph to a functionalized ATen inference graph and compile it.

    ``fw_compiler(aten_gm, fake_inputs)`` receives the graph whose placeholders are, in
    order, the Dynamo graph's inputs (parameters and buffers of inlined modules included),
    and returns a *boxed* callable (``fn(list_of_args)`` with ``fn._boxed_call = True``).
    Input mutations (KV caches written in place) are kept in the graph as ``copy_`` into
    the placeholder (``keep_inference_input_mutations``), so the cache stays an input.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=fw_compiler,
        inference_compiler=fw_compiler,
        keep_inference_input_mutations=True,
    )


def module_state_kind(t: Any) -> str | None:
    """How Dynamo marked a graph input: ``"unguarded"`` for parameters/buffers of an
    inlined ``nn.Module``, ``"guarded"`` for ``mark_static_address`` (e.g. HF StaticCache
    tensors), ``None`` for ordinary inputs."""
    if not isinstance(t, torch.Tensor):
        return None
    return getattr(t, "_dynamo_static_input_type", None)


def inductor_compile(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    cudagraphs: bool = False,
    static_input_idxs: Sequence[int] = (),
) -> Callable:
    """Compile an ATen inference graph with Inductor; returns a boxed callable.

    ``cudagraphs`` replays the compiled graph from CUDA graphs (Inductor's cudagraph
    trees); ``static_input_idxs`` are inputs whose address never changes (KV caches marked
    with ``mark_static_address``), which the replay then reads in place instead of copying.
    """
    from torch._inductor.compile_fx import compile_fx_inner

    # Frozen weights are real tensors in a graph otherwise traced with fake ones; Inductor's
    # own freezing lets the fake mode accept them the same way.
    fake_mode = detect_fake_mode(example_inputs)
    previous = getattr(fake_mode, "allow_non_fake_inputs", None)
    if fake_mode is not None:
        fake_mode.allow_non_fake_inputs = True
    try:
        # Inductor expects its own decompositions applied (AOT would have done it had
        # Inductor been the backend): retrace the rewritten graph with them. llmopt ops
        # have no decomposition and stay intact as extern calls.
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        gm = make_fx(gm, decomposition_table=select_decomp_table())(*example_inputs)
        kwargs = {}
        if cudagraphs:
            from torch._inductor.utils import BoxedBool

            kwargs = {"cudagraphs": BoxedBool(True), "static_input_idxs": list(static_input_idxs)}
        compiled = compile_fx_inner(gm, list(example_inputs), **kwargs)
    finally:
        if fake_mode is not None:
            fake_mode.allow_non_fake_inputs = previous
    if getattr(compiled, "_boxed_call", False) or not callable(getattr(compiled, "forward", None)):

        def run(args):
            return compiled(list(args))

    else:  # pragma: no cover - older torch returned an unboxed callable

        def run(args):
            return compiled(*args)

    run._boxed_call = True
    return run


def detect_fake_mode(inputs: Sequence[Any]):
    """The FakeTensorMode the inputs of a compiled graph live in, or None."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(inputs)


def list_dynamo_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends()


def reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def graph_break_reasons() -> Any:
    """Dynamo's explanation object for a function (graph count, break reasons)."""
    import torch._dynamo

    return torch._dynamo.explain


def statically_true(expr: Any) -> bool:
    """True when a (possibly symbolic) boolean is known true without adding a guard."""
    if isinstance(expr, bool):
        return expr
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(expr))


def real_tensor_mode():
    """Context manager that suspends the active FakeTensorMode.

    The compiler of an AOT graph runs with fake tensors active; computing on frozen
    constants (concatenating, transposing, quantizing weights) needs real tensors.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()
