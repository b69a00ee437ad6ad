"""Define a custom op with its reference's signature: the op's schema written once.

An llmopt op and its eager reference (the CPU implementation and the tests' oracle) take
the same arguments by design. ``torch.library.custom_op`` infers the op's schema from the
decorated function's annotations through ``inspect.signature`` (torch's
``infer_schema``, the same from torch 2.4 to 2.13), and ``inspect.signature`` returns a
function's ``__signature__`` when it has one. So::

    @torch.library.custom_op("llmopt::rms_norm", mutates_args=())
    @signature_of(rms_norm_ref)
    def rms_norm(x, weight, eps, weight_offset=0.0):
        ...

gives the op the names, defaults and annotations of ``rms_norm_ref``: a type changed
there changes the op's schema, and a parameter renamed or added on one side only fails
at import, not at the first call with keyword arguments. The op's body names its
parameters (without types) because it uses them.

A function that takes the reference's arguments and more (an op's ``workspace``, a Triton
launcher's ``out``) declares only those after the reference's, with their annotations,
and names them in ``extra``: ``@signature_of(attention_prefill_ref, extra=("out",))``.
"""
from __future__ import annotations

import inspect
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def _names_and_defaults(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def signature_of(reference: Callable, extra: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator: give the decorated function ``reference``'s signature (annotations
    resolved, so a ``from __future__ import annotations`` module works), followed by its own
    parameters named in ``extra``. Its other parameters' names, kinds and defaults must
    equal the reference's; ``TypeError`` says where they differ."""
    signature = inspect.signature(reference, eval_str=True)

    def apply(body: F) -> F:
        own = inspect.signature(body, eval_str=True)
        params = list(own.parameters.values())
        shared, added = params[: len(params) - len(extra)], params[len(params) - len(extra):]
        if (_names_and_defaults(own.replace(parameters=shared)) != _names_and_defaults(signature)
                or tuple(p.name for p in added) != tuple(extra)):
            raise TypeError(
                f"{body.__module__}.{body.__qualname__}{own} must take the parameters of its reference "
                f"{reference.__module__}.{reference.__qualname__}{signature} (same names, order and defaults)"
                + (f", then {', '.join(extra)}" if extra else "") + "; change both together"
            )
        body.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *added],
                                               return_annotation=signature.return_annotation)
        return body

    return apply


__all__ = ["signature_of"]
