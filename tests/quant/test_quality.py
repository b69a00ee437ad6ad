"""Quantization quality on a trained model: held-out perplexity per scheme.

The model is a byte-level 2-layer Llama trained by the suite on Python's own docstrings
(see ``trained_model.py``: no package here ships trained causal-LM weights). GPTQ is
calibrated on training text only; perplexity is measured on the held-out tail.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch

from quant.trained_model import perplexity, split_tokens, trained_model, windows

from llmopt.quant import GPTQ, W8A8, Int4WeightOnly, Int8WeightOnly, quantize_


EVAL_WINDOWS = 200


def _cache_dir() -> str:
    """A directory that outlives one checkout (the temp dir), so a fresh clone on the same
    machine reuses the trained weights; the file name is keyed by the training recipe."""
    path = os.path.join(tempfile.gettempdir(), "llmopt-test-cache")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def lm(request):
    return trained_model(_cache_dir())


@pytest.fixture
def one_thread():
    """Small CPU ops on a shared 2-core machine: a second OpenMP thread only spins (3-5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_perplexity_per_scheme(lm, request, one_thread):
    train, held = split_tokens()
    held = held[: EVAL_WINDOWS * 64]
    calibration = list(windows(train, 64).split(16))

    ppl = {"fp32": perplexity(lm, held)}
    for name, cfg, calib in (
        ("int8", "int8", None),  # lm_head included (quantize_head: the int8 default)
        ("int8-head-float", Int8WeightOnly(quantize_head=False), None),
        ("w8a8-smoothquant", W8A8(0.5), calibration),
        ("int4-g128-rtn", Int4WeightOnly(group_size=128), None),
        ("int4-g128-gptq", GPTQ(bits=4, group_size=128), calibration),
        ("int4-g32-rtn", Int4WeightOnly(group_size=32), None),
    ):
        ppl[name] = perplexity(quantize_(copy.deepcopy(lm), cfg, calibration=calib), held)
    print("\nheld-out perplexity:", json.dumps({k: round(v, 4) for k, v in ppl.items()}))
    if getattr(request.config, "cache", None) is not None:
        request.config.cache.set("llmopt/quant-perplexity", ppl)

    assert ppl["fp32"] < 40, "the fixture model did not train"  # uniform over bytes would be 256
    assert ppl["int8"] <= ppl["fp32"] * 1.01
    assert ppl["int8-head-float"] <= ppl["fp32"] * 1.01
    assert ppl["int4-g128-gptq"] <= ppl["int4-g128-rtn"]
