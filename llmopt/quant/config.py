"""Quantization configs: small frozen dataclasses, parsed from strings, saved as JSON.

A config says *what* to do to the weights; ``llmopt.quant.quantize_`` (standalone) and the
compiler's ``quantize`` option (inside the frozen graph) say *where*. Strings accepted by
:func:`parse_quantize` are the short names a user types on a command line or in
``torch.compile(..., options={"quantize": "int4-g128"})``.

``compute_dtype`` (weight-only configs and GPTQ): ``None`` (default) runs the quantized
matmul in the activations' dtype (exact dequantize-and-multiply semantics). ``"bfloat16"``
casts the linear's input to bf16 and its output back: on CPU it selects PyTorch's bf16
int4 / int8 weight-pack kernels. A float32 model needs no cast for speed in decode: its
int8 and int4 linears with a few rows run GEMVs llmopt has Inductor generate
(llmopt/codegen/int8_weight_only_cpu.py, int4_weight_only_cpu.py), float32-exact; the
cast's extra error (activations rounded to 8 mantissa bits, ~0.2% relative) is below the
weight quantization error.

``quantize_head`` (weight-only and W8A8 configs): whether the output head (``lm_head``)
is quantized too, when it is not tied to the input embeddings (a tied head stays float:
quantizing it would add a copy instead of saving memory). Default: ``True`` for int8 —
per-channel int8 moves the held-out perplexity of the suite's trained model by <0.1%
(tests/quant/test_quality.py), and the head is the single largest matrix of a small
model (22% of a 100M Llama's linear weights, ~18% of its float32 decode time on CPU),
as gpt-fast and torchao do; ``False`` for int4 and W8A8, where the logits are the most
sensitive output and GPTQ/AWQ checkpoints keep the head in float by convention.
``GPTQ`` never quantizes the head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

INT4_GROUP_SIZES = (32, 64, 128)
COMPUTE_DTYPES = (None, "bfloat16", "float16", "float32")


def _check_compute_dtype(owner: str, value) -> None:
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"{owner}(compute_dtype={value!r}) is not valid; use one of {COMPUTE_DTYPES}")



@dataclass(frozen=True)
class Int8WeightOnly:
    """int8 weights, one symmetric scale per output channel; activations stay float.

    ``compute_dtype``: see the module docstring (on CPU, float32 is already fast).
    ``quantize_head``: see the module docstring (default True: an untied head is int8 too).
    """

    compute_dtype: str | None = None
    quantize_head: bool = True
    name = "int8"

    def __post_init__(self):
        _check_compute_dtype("Int8WeightOnly", self.compute_dtype)


@dataclass(frozen=True)
class Int4WeightOnly:
    """int4 weights (two per byte) with one scale (and zero point) per ``group_size`` inputs.

    ``symmetric=False`` (default) uses the full [0, 15] range with a per-group zero point;
    ``symmetric=True`` fixes the zero point at 8 (codes -8..7 around zero).
    ``compute_dtype``, ``quantize_head`` (default False): see the module docstring.
    """

    group_size: int = 128
    symmetric: bool = False
    compute_dtype: str | None = None
    quantize_head: bool = False
    name = "int4"

    def __post_init__(self):
        _check_compute_dtype("Int4WeightOnly", self.compute_dtype)
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"Int4WeightOnly(group_size={self.group_size!r}) is not supported; use one of {INT4_GROUP_SIZES}"
            )


@dataclass(frozen=True)
class W8A8:
    """SmoothQuant W8A8: int8 per-channel weights, per-token dynamic int8 activations.

    ``smooth_alpha`` is the migration strength of Xiao et al. 2022: smoothing factors
    ``s = max|X|**alpha / max|W|**(1 - alpha)`` per input channel, computed from
    calibration batches and folded into the preceding norm. Without calibration data the
    weights are quantized without smoothing. ``quantize_head`` (default False): see the
    module docstring.
    """

    smooth_alpha: float = 0.5
    quantize_head: bool = False
    name = "w8a8"

    def __post_init__(self):
        if not 0.0 <= float(self.smooth_alpha) <= 1.0:
            raise ValueError(f"W8A8(smooth_alpha={self.smooth_alpha!r}) must lie in [0, 1]")


@dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al. 2022): quantize column by column, compensating the error with
    the inverse Hessian of the layer's calibration inputs.

    ``bits=4`` produces the :class:`Int4WeightOnly` layout (asymmetric unless ``symmetric``)
    with ``group_size`` in (32, 64, 128) or ``None`` (one group per row); ``bits=8`` the
    :class:`Int8WeightOnly` layout (per output channel, symmetric; ``group_size`` must be
    ``None``). ``act_order`` quantizes columns by decreasing Hessian diagonal; ``damp`` is
    the fraction of the mean diagonal added to it; ``block_size`` the lazy-batch width;
    ``compute_dtype``: see the module docstring.
    """

    bits: int = 4
    group_size: int | None = 128
    act_order: bool = False
    damp: float = 0.01
    symmetric: bool = False
    block_size: int = 128
    compute_dtype: str | None = None
    name = "gptq"

    def __post_init__(self):
        _check_compute_dtype("GPTQ", self.compute_dtype)
        if self.bits not in (4, 8):
            raise ValueError(f"GPTQ(bits={self.bits!r}) is not supported; use bits=4 or bits=8")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("GPTQ(bits=8) quantizes per output channel (the Int8WeightOnly layout); pass group_size=None")
        if self.bits == 4 and self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"GPTQ(group_size={self.group_size!r}) is not supported; use one of {INT4_GROUP_SIZES} or None"
            )
        if not 0.0 < float(self.damp) < 1.0:
            raise ValueError(f"GPTQ(damp={self.damp!r}) must lie in (0, 1); 0.01 is the paper's value")
        if self.block_size <= 0:
            raise ValueError(f"GPTQ(block_size={self.block_size!r}) must be positive")


@dataclass(frozen=True)
class Int8KVCache:
    """int8 K/V cache with one symmetric scale per attention head (``[H]``).

    The quantize/dequantize functions live in :mod:`llmopt.quant.kv_cache`; the runtime
    applies them when it writes and reads its cache. It does not change any linear.
    """

    name = "int8-kv"


QuantizeConfig = Union[Int8WeightOnly, Int4WeightOnly, W8A8, GPTQ, Int8KVCache]

_CONFIG_TYPES = {cls.__name__: cls for cls in (Int8WeightOnly, Int4WeightOnly, W8A8, GPTQ, Int8KVCache)}

_STRINGS = {
    "int8": Int8WeightOnly,
    "int4": lambda: Int4WeightOnly(group_size=128),
    "int4-g128": lambda: Int4WeightOnly(group_size=128),
    "int4-g64": lambda: Int4WeightOnly(group_size=64),
    "int4-g32": lambda: Int4WeightOnly(group_size=32),
    "w8a8": W8A8,
    "gptq": GPTQ,
    "int8-kv": Int8KVCache,
}
VALID_STRINGS = tuple(_STRINGS)


def parse_quantize(value: Any) -> QuantizeConfig:
    """A config from a config (returned as is), a string (``"int4-g64"``) or a JSON dict."""
    if isinstance(value, tuple(_CONFIG_TYPES.values())):
        return value
    if isinstance(value, dict):
        return config_from_dict(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _STRINGS:
            return _STRINGS[key]()
        raise ValueError(f"unknown quantization {value!r}; valid values: {', '.join(VALID_STRINGS)} "
                         "or a config such as Int4WeightOnly(group_size=128)")
    raise TypeError(
        f"quantize must be a config (Int8WeightOnly(), Int4WeightOnly(...), W8A8(...), GPTQ(...), Int8KVCache()) "
        f"or one of the strings {', '.join(VALID_STRINGS)}; got {type(value).__name__}"
    )


def config_to_dict(config: QuantizeConfig) -> dict:
    """JSON-ready dict: ``{"type": "Int4WeightOnly", "group_size": 128, "symmetric": False}``."""
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def config_from_dict(data: dict) -> QuantizeConfig:
    """Inverse of :func:`config_to_dict`; unknown types or fields raise a clear error."""
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in _CONFIG_TYPES:
        raise ValueError(f"unknown quantization config type {kind!r}; valid: {', '.join(_CONFIG_TYPES)}")
    cls = _CONFIG_TYPES[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - fields
    if extra:
        raise ValueError(f"{kind} has no field(s) {sorted(extra)}; valid: {sorted(fields)}")
    return cls(**data)
