"""The kernels string of ``llmopt::linear`` and the launch configs it may carry.

A linear's kernel depends on its row count M, so the ``select_linear_kernel`` pass bakes
one kernel per M bucket into the op call (FlashDecoding++, Hong et al., 2023, §5):

    "1:gemv[BLOCK_N=16,BLOCK_K=512,SPLIT_K=2,num_warps=4,num_stages=2],2:flat_gemm,...,inf:mm"

Buckets are ``min(next_pow2(M), 64)`` (:func:`llmopt.codegen.buckets.m_bucket`), and
``"inf"`` above 64 (:func:`m_bucket_label` writes the label), so a growing sequence never
changes bucket past 64. A bucket may carry the launch config its
tuning-table entry holds; without one its kernel runs its heuristic config. The string is
the whole run-time choice: a compiled graph needs no table (each graph keeps the table it
was compiled with).

This module also holds which configs a kernel can launch (:func:`config_problem`), used
both on the string (a bad config fails at compile time) and on every tuning-table entry
at load. Why here and not in the table module: the op parses the string at every call
and must not depend on how tables are stored.
"""
from __future__ import annotations

import functools
import math
import re

import triton.language as tl

from llmopt.codegen.buckets import MAX_M_BUCKET, m_bucket
from llmopt.codegen.flat_gemm import FLAT_GEMM_CONFIG_KEYS
from llmopt.codegen.gemv import GEMV_CONFIG_KEYS, validate_config

M_BUCKETS = ("1", "2", "4", "8", "16", "32", "64", "inf")
KERNELS = ("gemv", "flat_gemm", "mm")


# ---------------------------------------------------------------------------------------
# Which launch configs a kernel can run
# ---------------------------------------------------------------------------------------

# The config keys each kernel's launcher takes (its own tuple; ``mm`` takes none).
_CONFIG_KEYS = {"gemv": GEMV_CONFIG_KEYS, "flat_gemm": FLAT_GEMM_CONFIG_KEYS, "mm": ()}
# flat_gemm's tiles go through tl.dot, which needs every tile side >= 16 on a GPU (the
# launcher refuses less on CUDA).
_DOT_MIN_BLOCK = {"flat_gemm": 16}
# A CUDA thread block holds at most 1024 threads: 32 warps.
_MAX_WARPS = 32


def config_keys(kernel: str) -> tuple[str, ...]:
    """The launch-config keys ``kernel`` accepts (the kernel module's own key tuple)."""
    return _CONFIG_KEYS[kernel]


def _power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


def config_problem(kernel: str, config) -> str | None:
    """Why ``config`` cannot launch ``kernel`` (one sentence), or None when it can.

    The rules are the kernels' own: the keys of their config tuples and their
    ``validate_config`` (BLOCK_* powers of two, ``SPLIT_K`` >= 1); Triton's (``num_warps`` a
    power of two, at most 32; ``num_stages`` >= 1; a tile of at most
    ``TRITON_MAX_TENSOR_NUMEL`` elements); ``tl.dot``'s 16-wide minimum for ``flat_gemm``.
    A partial config is valid (the launcher fills the rest from its heuristic config).
    """
    if kernel not in _CONFIG_KEYS:
        return f"kernel {kernel!r} is not one of {', '.join(KERNELS)}"
    if not isinstance(config, dict):
        return f"config must be an object of NAME: integer, got {type(config).__name__}"
    for name, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool):
            return f"config {name}={value!r} must be an integer"
    try:
        validate_config(config, _CONFIG_KEYS[kernel], kernel)
    except ValueError as err:
        return str(err)
    blocks = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
    smallest = _DOT_MIN_BLOCK.get(kernel, 1)
    for name, value in blocks.items():
        if value < smallest:
            return f"{kernel} config {name}={value} is below {smallest} (tl.dot tiles are at least 16 wide)"
    sides = sorted(blocks.values(), reverse=True)[:2]  # the largest tile is the two largest sides
    if sides and math.prod(sides) > tl.TRITON_MAX_TENSOR_NUMEL:
        return (f"{kernel} config {blocks} makes a tile of more than {tl.TRITON_MAX_TENSOR_NUMEL} elements, "
                "Triton's limit")
    warps = config.get("num_warps")
    if warps is not None and not (_power_of_two(warps) and warps <= _MAX_WARPS):
        return f"{kernel} config num_warps={warps} must be a power of two from 1 to {_MAX_WARPS}"
    stages = config.get("num_stages")
    if stages is not None and stages < 1:
        return f"{kernel} config num_stages={stages} must be >= 1"
    return None


# ---------------------------------------------------------------------------------------
# Buckets and the compact kernels string
# ---------------------------------------------------------------------------------------


def m_bucket_label(M: int) -> str:
    """The linear's bucket label for M rows: ``str(m_bucket(M))``, or ``"inf"`` for M > 64
    (the kernels string and the tuning table keep prefill sizes apart from M = 64)."""
    return "inf" if M > MAX_M_BUCKET else str(m_bucket(M))


_KERNELS_ITEM = re.compile(r"\s*(\w+)\s*:\s*(\w+)\s*(?:\[([^\[\]]*)\])?\s*")
_CONFIG_ITEM = re.compile(r"\s*(\w+)\s*=\s*(-?\d+)\s*")


def _split_top_level(spec: str) -> list[str]:
    """``spec`` split at the commas outside ``[...]``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return items


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple[dict[str, str], dict[str, dict | None]]:
    kernels, configs = dict.fromkeys(M_BUCKETS, "mm"), dict.fromkeys(M_BUCKETS)
    for item in filter(str.strip, _split_top_level(spec)):
        m = _KERNELS_ITEM.fullmatch(item)
        if m is None or m.group(1) not in M_BUCKETS or m.group(2) not in KERNELS:
            raise ValueError(
                f"bad kernels entry {item!r} in {spec!r}: expected 'bucket:kernel' or 'bucket:kernel[NAME=int,...]' "
                f"with bucket in {', '.join(M_BUCKETS)} and kernel in {', '.join(KERNELS)}"
            )
        bucket, kernel, body = m.groups()
        kernels[bucket] = kernel
        if body is not None and body.strip():
            config = {}
            for part in body.split(","):
                cm = _CONFIG_ITEM.fullmatch(part)
                if cm is None:
                    raise ValueError(f"bad kernels entry {item!r} in {spec!r}: config item {part!r} is not "
                                     "NAME=integer")
                config[cm.group(1)] = int(cm.group(2))
            problem = config_problem(kernel, config)
            if problem:
                raise ValueError(f"bad kernels entry {item!r} in {spec!r}: {problem}")
            configs[bucket] = config
    return kernels, configs


def parse_kernels(spec: str) -> dict[str, str]:
    """Parse ``"1:gemv,2:flat_gemm,...,inf:mm"`` into {bucket: kernel}; missing buckets → ``mm``.

    A bucket may carry its launch config, ``"1:gemv[BLOCK_N=16,SPLIT_K=4]"``
    (:func:`parse_kernel_configs`); an impossible one raises ValueError. The result is
    cached (the op parses its string at every call), so do not mutate it.
    """
    return _parse_spec(spec)[0]


def parse_kernel_configs(spec: str) -> dict[str, dict | None]:
    """{bucket: launch config or None (the kernel's heuristic config)} of a kernels string.

    Cached like :func:`parse_kernels`: copy a config before changing it.
    """
    return _parse_spec(spec)[1]


def format_kernels(choice: dict[str, str], configs: dict[str, dict | None] | None = None) -> str:
    """The compact string of {bucket: kernel} and their configs, in bucket order (inverse of
    :func:`parse_kernels` / :func:`parse_kernel_configs`); config keys in the kernel's order."""
    items = []
    for b in M_BUCKETS:
        kernel = choice.get(b, "mm")
        config = (configs or {}).get(b)
        if config:
            keys = [k for k in config_keys(kernel) if k in config] + sorted(set(config) - set(config_keys(kernel)))
            items.append(f"{b}:{kernel}[{','.join(f'{k}={config[k]}' for k in keys)}]")
        else:
            items.append(f"{b}:{kernel}")
    return ",".join(items)


__all__ = [
    "KERNELS",
    "M_BUCKETS",
    "config_keys",
    "config_problem",
    "format_kernels",
    "m_bucket_label",
    "parse_kernel_configs",
    "parse_kernels",
]
