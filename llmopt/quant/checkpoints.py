"""Load GPTQ and AWQ checkpoints in their Hugging Face safetensors layout into llmopt's format.

Both store, per quantized linear ``[N, K]`` (``N`` = out_features), int32 tensors packing
eight 4-bit values each, fp16 ``scales [K // G, N]``, and dequantize as ``(q - z) * s``.

GPTQ (AutoGPTQ ``qlinear_cuda_old`` / exllama / transformers' GPTQ integration):

* ``qweight`` int32 ``[K // 8, N]``, packed along K: ``q[k, n]`` is bits
  ``4 * (k % 8) ... +3`` of ``qweight[k // 8, n]``;
* ``qzeros`` int32 ``[K // G, N // 8]``, packed along N: ``z[g, n]`` is bits
  ``4 * (n % 8)`` of ``qzeros[g, n // 8]``. AutoGPTQ's original format ("gptq", v1) stores
  ``z - 1`` and adds 1 back when dequantizing; GPTQModel's ``checkpoint_format: "gptq_v2"``
  stores ``z``. We read ``quantization_config.checkpoint_format`` (default v1, ``+1``).
  A v1 file cannot represent ``z = 0`` (AutoGPTQ writes -1 into the packed word);
* ``g_idx`` int32 ``[K]``: the group of input column ``k``; ``k // G`` without act_order
  (``desc_act``), a permutation-derived index with it. We sort columns by group (the
  exllama reordering), which gives llmopt's ``perm`` layout; an identity order is dropped.

AWQ (AutoAWQ ``WQLinear_GEMM``, ``version: "gemm"``):

* ``qweight`` int32 ``[K, N // 8]`` and ``qzeros`` int32 ``[K // G, N // 8]``, both packed
  along N in the interleaved order ``[0, 2, 4, 6, 1, 3, 5, 7]``: nibble ``i`` of word ``j``
  holds column ``8 j + order[i]``; zeros stored as is; no ``g_idx``.

Only 4-bit checkpoints are read (8-bit GPTQ uses per-group zero points, which llmopt's
symmetric per-channel int8 cannot hold). The writers (``quantized_to_gptq`` /
``quantized_to_awq``) produce the same layouts, for export and for the round-trip tests.

A malformed checkpoint (invalid JSON, a non-integer ``bits``, a tensor missing or in two
shards, tensors that disagree in shape, a shard the index names but the directory lacks)
raises :class:`~llmopt.quant.checkpoint_files.CheckpointError` or ``FileNotFoundError``
naming the file and the field or tensor. These formats carry no checksums.
"""
from __future__ import annotations

import glob
import os
from typing import Callable

import torch
from torch import nn

from llmopt.codegen.quant_packing import pack_int4, unpack_int4

from .checkpoint_files import CheckpointError, install_quantized_linear, load_safetensors, read_json_object
from .io import unloaded_keys
from .schemes import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = tuple(range(0, 32, 4))


def _unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32, least significant nibble first, expanded along ``dim``."""
    packed = packed.to(torch.int32)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    if dim == 0:
        vals = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [R, 8, C]
        return vals.reshape(-1, packed.shape[1])
    vals = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [R, C, 8]
    return vals.reshape(packed.shape[0], -1)


def _pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_unpack_int32` (values in [0, 15])."""
    v = values.to(torch.int64)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=v.device)
    if dim == 0:
        words = (v.reshape(-1, 8, v.shape[1]) << shifts[None, :, None]).sum(dim=1)
    else:
        words = (v.reshape(v.shape[0], -1, 8) << shifts[None, None, :]).sum(dim=2)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def _check_dtypes(fmt: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None) -> None:
    """The packed words are int32 and the scales float: anything else would be silently
    converted into wrong codes."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{fmt} {name} must be a 2-D int32 tensor (eight 4-bit values per word), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if not scales.is_floating_point() or scales.dim() != 2:
        raise ValueError(f"{fmt} scales must be a 2-D float tensor, got {scales.dtype} {tuple(scales.shape)}")
    if g_idx is not None and (g_idx.is_floating_point() or g_idx.dtype == torch.bool or g_idx.dim() != 1):
        raise ValueError(f"{fmt} g_idx must be a 1-D integer tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")


def gptq_to_quantized(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None,
    group_size: int | None = None, zero_offset: int = 1,
) -> QuantizedWeight:
    """One GPTQ linear (4-bit) -> :class:`QuantizedWeight` (``int4``, maybe with ``perm``)."""
    _check_dtypes("GPTQ", qweight, qzeros, scales, g_idx)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // 8) or k % groups:
        raise ValueError(f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} (expected [K/8, N], [K/G, N/8], [K/G, N])")
    group = k // groups
    if group_size not in (None, -1) and group_size != group:
        raise ValueError(f"GPTQ group_size={group_size} but the tensors have {groups} groups for K={k}")
    codes = _unpack_int32(qweight, dim=0).t()  # [N, K]
    zeros = (_unpack_int32(qzeros, dim=1) + zero_offset).t()  # [N, K/G]
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        natural = torch.arange(k, device=g_idx.device) // group
        if not torch.equal(g_idx, natural):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], natural):
                raise ValueError("GPTQ g_idx does not put exactly group_size columns in each group")
            codes = codes[:, perm]
    return QuantizedWeight(
        "int4", pack_int4(codes), scales.t().contiguous(), zeros.to(scales.dtype).contiguous(), group, perm
    )


def quantized_to_gptq(qw: QuantizedWeight, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """:class:`QuantizedWeight` (int4) -> GPTQ tensors ``qweight, qzeros, scales, g_idx``."""
    if qw.scheme != "int4":
        raise ValueError(f"GPTQ checkpoints hold int4 weights; got scheme {qw.scheme!r}")
    codes = unpack_int4(qw.data).to(torch.int64)  # [N, K] in stored order
    n, k = codes.shape
    g = torch.arange(k) // qw.group_size
    if qw.perm is not None:
        natural = torch.empty_like(codes)
        natural[:, qw.perm.cpu()] = codes
        codes = natural
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[qw.perm.cpu()] = g
    else:
        g_idx = g
    z = torch.round(qw.zeros.to(torch.float32)).to(torch.int64) - zero_offset
    if z.min() < 0 or z.max() > 15:
        raise ValueError("zero points outside the storable range for this GPTQ format "
                         "(v1 cannot store z = 0: use zero_offset=0, i.e. checkpoint_format gptq_v2)")
    return {
        "qweight": _pack_int32(codes.t().contiguous(), dim=0),
        "qzeros": _pack_int32(z.t().contiguous(), dim=1),
        "scales": qw.scales.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def awq_to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """One AWQ GEMM linear -> :class:`QuantizedWeight` (``int4``)."""
    _check_dtypes("AWQ", qweight, qzeros, scales)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // 8) or k % groups:
        raise ValueError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} (expected [K, N/8], [K/G, N/8], [K/G, N])")
    # nibble i of word j holds column 8 j + AWQ_ORDER[i]: undo the interleave
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))

    def deinterleave(t):
        u = _unpack_int32(t, dim=1)
        return u.reshape(u.shape[0], -1, 8)[:, :, inverse].reshape(u.shape[0], -1)

    codes = deinterleave(qweight).t()  # [N, K]
    zeros = deinterleave(qzeros).t()  # [N, K/G]
    return QuantizedWeight("int4", pack_int4(codes), scales.t().contiguous(), zeros.to(scales.dtype).contiguous(),
                           k // groups)


def quantized_to_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """:class:`QuantizedWeight` (int4, no act_order) -> AWQ GEMM tensors ``qweight, qzeros, scales``."""
    if qw.scheme != "int4" or qw.perm is not None:
        raise ValueError("AWQ checkpoints hold int4 weights without act_order permutation")
    order = torch.tensor(AWQ_ORDER)

    def interleave(v):  # v: [R, C], C % 8 == 0
        return _pack_int32(v.reshape(v.shape[0], -1, 8)[:, :, order].reshape(v.shape[0], -1), dim=1)

    codes = unpack_int4(qw.data).to(torch.int64).t().contiguous()  # [K, N]
    z = torch.round(qw.zeros.to(torch.float32)).to(torch.int64).t().contiguous()  # [K/G, N]
    return {"qweight": interleave(codes), "qzeros": interleave(z), "scales": qw.scales.t().to(torch.float16).contiguous()}


def _config_field(qc: dict, path: str, name: str, default, *, allowed=None):
    """``qc[name]`` as an int (or one of ``allowed``); a wrong value names the file and field."""
    value = qc.get(name, default)
    if allowed is not None and value in allowed:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: quantization_config.{name} must be an integer, found {value!r}")
    return value


def read_hf_quantization_config(directory: str | os.PathLike) -> tuple[dict, str]:
    """``quantization_config`` of ``config.json``, else AutoGPTQ's ``quantize_config.json``,
    and the path of the file it came from."""
    cfg_path = os.path.join(directory, "config.json")
    if os.path.exists(cfg_path):
        qc = read_json_object(cfg_path).get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise CheckpointError(f"{cfg_path}: quantization_config must be a JSON object, found {qc!r}")
        if qc:
            return qc, cfg_path
    alt = os.path.join(directory, "quantize_config.json")
    if os.path.exists(alt):
        qc = read_json_object(alt)
        qc.setdefault("quant_method", "gptq")
        return qc, alt
    raise FileNotFoundError(f"no quantization_config in {cfg_path} and no {alt}: not a GPTQ/AWQ checkpoint?")


def _shard_files(directory: str | os.PathLike) -> list[str]:
    """Every ``*.safetensors`` file; the shards a ``model.safetensors.index.json`` names must exist."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: weight_map must be a JSON object (tensor name -> shard file)")
        for shard in sorted(set(map(str, weight_map.values()))):
            if not os.path.isfile(os.path.join(directory, shard)):
                raise FileNotFoundError(f"{os.path.join(directory, shard)} not found, but {index_path} (the index) "
                                        "names it: the checkpoint is incomplete")
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return files


def load_hf_quantized(
    directory: str | os.PathLike,
    model_or_factory: nn.Module | Callable[[], nn.Module],
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a GPTQ or AWQ checkpoint directory into the given architecture.

    Each ``<prefix>.qweight`` becomes a :class:`QuantizedLinear` at ``<prefix>``; every other
    tensor is loaded with a strict key check. ``dtype`` (optional) casts scales, zeros and
    biases (fp16 in the files) to the model's compute dtype. A malformed file raises
    :class:`CheckpointError` naming the file and the field or tensor.
    """
    qc, qc_path = read_hf_quantization_config(directory)
    method = str(qc.get("quant_method", "")).lower()
    bits = _config_field(qc, qc_path, "bits", qc.get("w_bit", 4))
    group_size = _config_field(qc, qc_path, "group_size", None, allowed=(None, -1))
    if method not in ("gptq", "awq"):
        raise ValueError(f"quant_method {method!r} is not supported; llmopt reads 'gptq' and 'awq'")
    if bits != 4:
        raise ValueError(f"{method} bits={bits} is not supported; llmopt reads 4-bit checkpoints")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version {qc.get('version')!r} is not supported; llmopt reads 'gemm'")
    if method == "awq" and qc.get("zero_point", True) is False:
        raise ValueError("AWQ without zero points is not supported")
    zero_offset = 0 if str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1

    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # tensor name -> file, for messages
    for path in _shard_files(directory):
        for key, value in load_safetensors(path).items():
            if key in tensors:
                raise CheckpointError(f"tensor {key!r} is in both {path} and {source[key]}: which one to load "
                                      "is ambiguous; remove the stale shard")
            tensors[key], source[key] = value, path

    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    for prefix in prefixes:
        where = source[f"{prefix}.qweight"]
        needed = ("qweight", "qzeros", "scales")
        for name in needed:
            if f"{prefix}.{name}" not in tensors:
                raise CheckpointError(f"{where}: {prefix}.{name} is missing ({method} stores qweight, qzeros and "
                                      "scales for each quantized linear)")
        qweight, qzeros, scales = (tensors.pop(f"{prefix}.{s}") for s in needed)
        g_idx = tensors.pop(f"{prefix}.g_idx", None)
        bias = tensors.pop(f"{prefix}.bias", None)
        try:
            if method == "gptq":
                qw = gptq_to_quantized(qweight, qzeros, scales, g_idx, group_size, zero_offset)
            else:
                qw = awq_to_quantized(qweight, qzeros, scales)
        except ValueError as e:
            raise CheckpointError(f"{where}: {prefix}: {e}") from e
        if dtype is not None:
            qw.scales, qw.zeros = qw.scales.to(dtype), qw.zeros.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        install_quantized_linear(model, prefix, qw, bias, where)
    result = model.load_state_dict(tensors, strict=False)
    quantized = tuple(f"{p}." for p in prefixes)
    missing = unloaded_keys(model, [k for k in result.missing_keys if not k.startswith(quantized)], set(tensors))
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint and model differ: missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}")
    return model
