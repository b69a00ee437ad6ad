"""Resolve the ``MODEL_OR_CONFIG`` argument of ``llmopt inspect | bench`` into a model and inputs.

A user names the model they care about in one of four ways, and the tools must never
download anything:

- a **preset**: ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-gpt2``,
  ``tiny-bert`` (test-sized), ``llama-100m`` (~110M parameters, the CPU benchmark model),
  ``llama-2-7b``, ``llama-3-8b`` (the published shapes) — configs only, random weights;
- a Hugging Face **model_type** (``llama``, ``mistral``, ``gpt2``...): that family's
  config shrunk to a small size (hidden 64, 2 layers), random weights;
- a local **directory** holding ``config.json``: weights from its ``*.safetensors`` files
  if there are any, else random (pickled ``*.bin`` checkpoints are never loaded);
- ``module:factory`` (or ``path/to/file.py:factory``): a Python callable returning a
  model, or ``(model, example_inputs)`` with the inputs as a tensor, a tuple of positional
  arguments or a dict of keyword arguments.

Weights are seeded (``seed``), so two runs build the same model. ``transformers`` is
imported only for the Hugging Face forms.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@dataclass(frozen=True)
class Preset:
    model_type: str
    config: dict[str, Any]
    description: str
    encoder: bool = False


PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset("llama", dict(_TINY, head_dim=16), "Llama, hidden 64, 2 layers, GQA 4/2 heads"),
    "tiny-mistral": Preset("mistral", dict(_TINY, head_dim=16, sliding_window=64),
                           "Mistral, hidden 64, 2 layers, sliding window 64"),
    "tiny-qwen2": Preset("qwen2", dict(_TINY), "Qwen2, hidden 64, 2 layers (QKV biases)"),
    "tiny-gpt2": Preset("gpt2", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     bos_token_id=1, eos_token_id=2), "GPT-2, hidden 64, 2 layers"),
    "tiny-bert": Preset("bert", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=256),
                        "BERT encoder, hidden 64, 2 layers", encoder=True),
    "llama-100m": Preset("llama", dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                                       head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True),
                         "Llama, hidden 768, 12 layers, 12 heads, tied embeddings (~110M parameters)"),
    "llama-2-7b": Preset("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                       head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5),
                         "Llama-2-7B shapes (random weights)"),
    "llama-3-8b": Preset("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                       rope_theta=500000.0),
                         "Llama-3-8B shapes (random weights)"),
}

# Families whose Hugging Face "causal LM" class is a decoder bolted onto an encoder: the
# tools build the plain encoder for them.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "distilbert", "albert",
                 "deberta", "deberta-v2", "mpnet", "modernbert"}

# The small size a bare model_type gets (only keys the family's config has are set).
_SMALL_OVERRIDES = dict(_TINY, ffn_dim=160, n_inner=160)


@dataclass
class ModelSpec:
    """A resolved model: the module, how it was built, and example inputs for one forward."""

    name: str
    model: torch.nn.Module
    kind: str  # "causal-lm" | "encoder" | "custom"
    source: str  # "preset" | "model_type" | "directory" | "factory"
    weights: str  # "random (seed 0)" | "safetensors: N tensors" | "from factory"
    dtype: torch.dtype
    device: torch.device
    config: Any = None
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None) if self.config is not None else None

    @property
    def is_causal_lm(self) -> bool:
        return self.kind == "causal-lm"

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def parameter_bytes(self) -> int:
        seen, total = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def prompt(self, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
        """Random token ids ``[batch, seq]`` (never 0, often the pad id)."""
        vocab = self.vocab_size
        if vocab is None:
            raise ValueError(f"{self.name}: no vocab_size known; it has no Hugging Face config")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab, (batch, seq), generator=g).to(self.device)

    def summary(self) -> dict[str, Any]:
        cfg = {}
        if self.config is not None:
            for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
                value = getattr(self.config, key, None)
                if value is not None:
                    cfg[key] = value
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "kind": self.kind,
            "source": self.source,
            "weights": self.weights,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "parameters": self.num_parameters(),
            "config": cfg,
            "notes": list(self.notes),
        }


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve(
    spec: str,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = None,
    batch: int = 1,
    seq: int = 16,
    layers: int | None = None,
    seed: int = 0,
) -> ModelSpec:
    """Build the model named by ``spec`` (see the module doc) with example inputs ``[batch, seq]``.

    ``layers`` overrides the number of decoder layers of a Hugging Face config (to inspect
    a 7B-shaped layer without building 32 of them).
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device) if device is not None else default_device()
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    if os.path.isdir(spec):
        out = _from_directory(spec, dtype, device, layers, seed)
    elif ":" in spec:
        out = _from_factory(spec, dtype, device, seed)
    elif spec in PRESETS:
        preset = PRESETS[spec]
        config = _hf_config(preset.model_type, preset.config, layers)
        model = _build_hf(config, dtype, device, seed, encoder=preset.encoder)
        out = ModelSpec(spec, model, _kind(config, preset.encoder), "preset", f"random (seed {seed})",
                        dtype, device, config)
    else:
        out = _from_model_type(spec, dtype, device, layers, seed)
    if not out.example_args and not out.example_kwargs:
        out.example_args = (out.prompt(batch, seq, seed),)
    return out


def describe_presets() -> str:
    return "\n".join(f"  {name:<14} {p.description}" for name, p in PRESETS.items())


# -- Hugging Face forms ------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dev dependency
        raise RuntimeError("this model spec needs transformers (pip install transformers)") from exc
    return transformers


def _hf_config(model_type: str, overrides: dict[str, Any], layers: int | None):
    tf = _transformers()
    overrides = dict(overrides)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
        overrides[key] = layers
    return tf.AutoConfig.for_model(model_type, **overrides)


def _kind(config, encoder: bool) -> str:
    return "encoder" if encoder or getattr(config, "model_type", "") in ENCODER_TYPES else "causal-lm"


def _build_hf(config, dtype: torch.dtype, device: torch.device, seed: int, encoder: bool = False):
    tf = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(seed)
    causal = not encoder and config.model_type not in ENCODER_TYPES and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
    # Built directly on the device and in the dtype: a 7B-shaped model is never
    # materialized in fp32 on the host first.
    # transformers < 4.56 names the keyword torch_dtype (5.x deprecates that spelling).
    from packaging.version import Version

    dtype_keyword = "dtype" if Version(tf.__version__) >= Version("4.56") else "torch_dtype"
    with torch.device(device):
        model = cls.from_config(config, **{dtype_keyword: dtype})
    return model.eval()


def _from_model_type(name: str, dtype, device, layers, seed) -> ModelSpec:
    tf = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if name not in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"unknown model {name!r}: not a local directory, not module:factory, not a preset "
            f"({', '.join(PRESETS)}) and not a Hugging Face model_type (e.g. llama, mistral, gpt2, bert)"
        )
    default = tf.AutoConfig.for_model(name)
    fields = default.to_dict()
    overrides = {k: v for k, v in _SMALL_OVERRIDES.items() if k in fields or k in getattr(default, "attribute_map", {})}
    for key, small in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        if isinstance(fields.get(key), int) and fields[key] >= _SMALL_OVERRIDES["vocab_size"]:
            overrides[key] = small  # keep special tokens inside the shrunk vocabulary
    if fields.get("head_dim") is not None:
        overrides["head_dim"] = overrides.get("hidden_size", 64) // overrides.get("num_attention_heads", 4)
    config = _hf_config(name, overrides, layers)
    model = _build_hf(config, dtype, device, seed)
    return ModelSpec(name, model, _kind(config, False), "model_type", f"random (seed {seed})", dtype, device, config,
                     notes=[f"small default config of model_type {name!r}"])


def _from_directory(path: str, dtype, device, layers, seed) -> ModelSpec:
    tf = _transformers()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: a model directory must hold config.json")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    if layers is not None:
        config.num_hidden_layers = layers
    model = _build_hf(config, dtype, device, seed)
    notes = []
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        weights = _load_safetensors(model, files, notes)
    else:
        weights = f"random (seed {seed})"
        if glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pt")):
            notes.append("found pickled *.bin/*.pt weights: not loaded (llmopt reads safetensors only); "
                         "weights are random — convert with safetensors to use them")
    return ModelSpec(os.path.basename(os.path.normpath(path)), model, _kind(config, False), "directory", weights,
                     dtype, device, config, notes=notes)


def _load_safetensors(model: torch.nn.Module, files: list[str], notes: list[str]) -> str:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    own = model.state_dict()
    if not any(k in own for k in state):
        # A checkpoint of the base model loaded into the ...ForCausalLM class (or back).
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and any(f"{prefix}.{k}" in own for k in state):
            state = {f"{prefix}.{k}": v for k, v in state.items()}
        elif prefix:
            state = {k.removeprefix(f"{prefix}."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    missing = [k for k in missing if k not in tied]
    if missing:
        notes.append(f"{len(missing)} tensors missing from the checkpoint (random): {missing[:5]}")
    if unexpected:
        notes.append(f"{len(unexpected)} checkpoint tensors unused: {unexpected[:5]}")
    return f"safetensors: {len(state)} tensors from {len(files)} file(s)"


# -- module:factory ----------------------------------------------------------------------
def _from_factory(spec: str, dtype, device, seed) -> ModelSpec:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r}: expected module:factory (e.g. mypkg.models:build)")
    module = _import(module_name)
    try:
        factory: Callable = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    torch.manual_seed(seed)
    result = factory if isinstance(factory, torch.nn.Module) else factory()
    inputs = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, inputs = result
    if not isinstance(result, torch.nn.Module):
        raise TypeError(f"{spec!r} returned {type(result).__name__}; expected an nn.Module or (module, example_inputs)")
    model = result.to(device=device)
    model = model.to(dtype=dtype) if _has_float_params(model) else model
    model.eval()
    config = getattr(model, "config", None)
    out = ModelSpec(attr, model, "custom", "factory", "from factory", dtype, device, config)
    try:
        from transformers import PreTrainedModel
        if isinstance(model, PreTrainedModel):
            out.kind = _kind(config, False) if hasattr(model, "generate") and model.can_generate() else "encoder"
    except ImportError:  # pragma: no cover
        pass
    if inputs is None:
        if out.vocab_size is None:
            raise ValueError(f"{spec!r} returned a model without example inputs and without a config.vocab_size; "
                             "return (model, example_inputs) from the factory")
        return out
    if isinstance(inputs, torch.Tensor):
        out.example_args = (_to(inputs, device, dtype),)
    elif isinstance(inputs, dict):
        out.example_kwargs = {k: _to(v, device, dtype) for k, v in inputs.items()}
    elif isinstance(inputs, (tuple, list)):
        out.example_args = tuple(_to(v, device, dtype) for v in inputs)
    else:
        raise TypeError(f"{spec!r}: example inputs must be a tensor, a tuple/list or a dict, got {type(inputs).__name__}")
    return out


def _import(name: str):
    if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
            raise ValueError(f"no such file: {name}")
        mod_name = "_llmopt_factory_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(name)[:-3])
        spec = importlib.util.spec_from_file_location(mod_name, name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: factories next to the user's code
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {name!r} for module:factory ({exc})") from exc


def _has_float_params(model: torch.nn.Module) -> bool:
    return any(p.is_floating_point() for p in model.parameters())


def _to(value: Any, device, dtype):
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return value


__all__ = ["DTYPES", "PRESETS", "ModelSpec", "Preset", "default_device", "describe_presets", "parse_dtype", "resolve"]
