"""The command-line options the examples (and the MoE / tensor-parallel benchmarks) share.

Each script builds a small model from a config and generates from it, so they take the same
model-shape and run-length options (``--layers``, ``--hidden``, ``--new-tokens``, ...).
Each option is declared once here, with its help text; a script names the ones it takes
and its own defaults::

    p = argparse.ArgumentParser()
    add_model_options(p, layers=4, hidden=256, new_tokens=64)

A script run as ``python examples/x.py`` finds this module because Python puts the
script's folder first on ``sys.path``; the benchmark scripts put the checkout on
``sys.path`` and import it as ``examples._options``.
"""
from __future__ import annotations

import argparse

# option (the keyword of add_model_options) -> help text; every one is an integer.
MODEL_OPTIONS = {
    "layers": "decoder layers",
    "hidden": "hidden size",
    "intermediate": "MLP (expert) intermediate size",
    "experts": "experts per MoE layer",
    "top_k": "experts each token is routed to",
    "heads": "attention heads",
    "kv_heads": "key/value heads (GQA)",
    "vocab": "vocabulary size",
    "new_tokens": "tokens to generate",
    "prompt_len": "prompt tokens",
    "rounds": "timing rounds (the median is reported)",
}


def add_model_options(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """Add ``--<name>`` (underscores as dashes) for each keyword, with its value as the
    default, in the order given. A name not in :data:`MODEL_OPTIONS` is a typo here, not a
    user error: it raises ``TypeError`` naming the options there are."""
    unknown = sorted(set(defaults) - set(MODEL_OPTIONS))
    if unknown:
        raise TypeError(f"add_model_options: no option {unknown}; the shared options are {sorted(MODEL_OPTIONS)} "
                        "(declare a script's own options with parser.add_argument)")
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                            help=f"{MODEL_OPTIONS[name]} (default {default})")
