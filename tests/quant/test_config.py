"""Quantization configs: construction checks, string parsing, JSON round trip."""
from __future__ import annotations

import json

import pytest

from llmopt.quant import (
    GPTQ, W8A8, Int4WeightOnly, Int8KVCache, Int8WeightOnly, config_from_dict, config_to_dict, parse_quantize,
)


@pytest.mark.parametrize("text, expected", [
    ("int8", Int8WeightOnly()),
    ("int4", Int4WeightOnly(group_size=128)),
    ("int4-g128", Int4WeightOnly(group_size=128)),
    ("int4-g64", Int4WeightOnly(group_size=64)),
    ("INT4-G32", Int4WeightOnly(group_size=32)),
    ("w8a8", W8A8(smooth_alpha=0.5)),
    ("gptq", GPTQ(bits=4, group_size=128, act_order=False, damp=0.01)),
    ("int8-kv", Int8KVCache()),
])
def test_parse_quantize_strings(text, expected):
    assert parse_quantize(text) == expected


def test_parse_quantize_passes_configs_through():
    cfg = Int4WeightOnly(group_size=64, symmetric=True)
    assert parse_quantize(cfg) is cfg


def test_parse_quantize_names_valid_values():
    with pytest.raises(ValueError, match="int4-g128.*w8a8.*gptq"):
        parse_quantize("int3")
    with pytest.raises(TypeError, match="Int4WeightOnly"):
        parse_quantize(4)


@pytest.mark.parametrize("bad, match", [
    (lambda: Int4WeightOnly(group_size=96), "group_size"),
    (lambda: W8A8(smooth_alpha=1.5), "smooth_alpha"),
    (lambda: GPTQ(bits=3), "bits"),
    (lambda: GPTQ(bits=8), "group_size=None"),
    (lambda: GPTQ(damp=0.0), "damp"),
    (lambda: GPTQ(group_size=256), "group_size"),
    (lambda: Int8WeightOnly(compute_dtype="int8"), "compute_dtype"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


@pytest.mark.parametrize("cfg", [Int8WeightOnly(), Int8WeightOnly(compute_dtype="bfloat16"), Int4WeightOnly(64, True),
                                 W8A8(0.8), GPTQ(act_order=True),
                                 GPTQ(bits=8, group_size=None), Int8KVCache()])
def test_json_round_trip(cfg):
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data) == cfg
    assert parse_quantize(data) == cfg


def test_config_from_dict_rejects_unknown():
    with pytest.raises(ValueError, match="unknown quantization config type"):
        config_from_dict({"type": "Int2"})
    with pytest.raises(ValueError, match="no field"):
        config_from_dict({"type": "W8A8", "alpha": 0.5})
