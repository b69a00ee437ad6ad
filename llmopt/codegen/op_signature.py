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
"""
from __future__ import annotations

import inspect
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def _names_and_defaults(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def signature_of(reference: Callable) -> Callable[[F], F]:
    """Decorator: give the decorated op body ``reference``'s signature (annotations resolved,
    so a ``from __future__ import annotations`` module works). The body's parameter names,
    kinds and defaults must equal the reference's; ``TypeError`` says where they differ."""
    signature = inspect.signature(reference, eval_str=True)

    def apply(body: F) -> F:
        own = inspect.signature(body)
        if _names_and_defaults(own) != _names_and_defaults(signature):
            raise TypeError(
                f"{body.__module__}.{body.__qualname__}{own} must take the parameters of its reference "
                f"{reference.__module__}.{reference.__qualname__}{signature} (same names, order and defaults); "
                "change both together"
            )
        body.__signature__ = signature
        return body

    return apply


__all__ = ["signature_of"]
