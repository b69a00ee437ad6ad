"""GPTQ / AWQ checkpoints in the Hugging Face safetensors layout: write from known weights, load back.

The writers here are independent of llmopt's (plain loops over the documented bit layout of
AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's ``WQLinear_GEMM``), so a shared misreading of
the format would not cancel out.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quant.quant_fixtures import tiny_llama, token_batches

from llmopt.codegen.quant_packing import pack_int4, unpack_int4
from llmopt.quant import (
    QuantizedLinear, QuantizedWeight, awq_to_quantized, dequantize, gptq_to_quantized, load_hf_quantized,
    quantize_weight, quantized_to_awq, quantized_to_gptq,
)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _words(values):
    """Pack 8 nibbles (first = least significant) into a signed int32."""
    word = 0
    for i, v in enumerate(values):
        word |= int(v) << (4 * i)
    return word - (1 << 32) if word >= 1 << 31 else word


def autogptq_pack(codes_nk, zeros_ng, scales_ng, g_idx, zero_offset=1):
    """codes [N, K] (natural column order), zeros/scales [N, G]: AutoGPTQ tensors."""
    n, k = codes_nk.shape
    g = zeros_ng.shape[1]
    qweight = torch.tensor([[_words(codes_nk[col, row * 8:(row + 1) * 8]) for col in range(n)]
                            for row in range(k // 8)], dtype=torch.int32)
    z = zeros_ng.t().to(torch.int64) - zero_offset  # [G, N]
    qzeros = torch.tensor([[_words(z[r, c * 8:(c + 1) * 8]) for c in range(n // 8)] for r in range(g)], dtype=torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales_ng.t().half().contiguous(),
            "g_idx": g_idx.to(torch.int32)}


def autoawq_pack(codes_nk, zeros_ng, scales_ng):
    n, k = codes_nk.shape
    c = codes_nk.t()  # [K, N]
    z = zeros_ng.t()  # [G, N]
    qweight = torch.tensor([[_words([c[r, j * 8 + o] for o in AWQ_ORDER]) for j in range(n // 8)] for r in range(k)],
                           dtype=torch.int32)
    qzeros = torch.tensor([[_words([z[r, j * 8 + o] for o in AWQ_ORDER]) for j in range(n // 8)]
                           for r in range(z.shape[0])], dtype=torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales_ng.t().half().contiguous()}


def _known(n=16, k=64, group=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(1, 16, (n, k // group), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half().float()
    return codes, zeros, scales


def _expected(codes, zeros, scales, group):
    return (codes.float() - zeros.float().repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)


@pytest.mark.parametrize("zero_offset", [1, 0], ids=["v1", "v2"])
def test_gptq_layout_round_trip(zero_offset):
    codes, zeros, scales = _known()
    t = autogptq_pack(codes, zeros, scales, torch.arange(64) // 32, zero_offset)
    qw = gptq_to_quantized(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 32, zero_offset)
    assert qw.perm is None and qw.group_size == 32
    assert torch.equal(dequantize(qw), _expected(codes, zeros, scales, 32))
    back = quantized_to_gptq(qw, zero_offset)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[key], t[key]), key


def test_gptq_act_order_g_idx():
    codes, zeros, scales = _known()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    g_idx = torch.empty(64, dtype=torch.int64)
    g_idx[perm] = torch.arange(64) // 32  # GPTQ: column perm[j] belongs to group j // G
    # group g's scale applies to the columns with g_idx == g
    expected = (codes.float() - zeros.float()[:, g_idx]) * scales[:, g_idx]
    t = autogptq_pack(codes, zeros, scales, g_idx)
    qw = gptq_to_quantized(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 32)
    assert qw.perm is not None
    assert torch.equal(dequantize(qw), expected)
    layer = QuantizedLinear(qw)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)
    back = quantized_to_gptq(qw)
    assert torch.equal(back["qweight"], t["qweight"]) and torch.equal(back["g_idx"], t["g_idx"])


def test_awq_layout_round_trip():
    codes, zeros, scales = _known(seed=1)
    t = autoawq_pack(codes, zeros, scales)
    qw = awq_to_quantized(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(dequantize(qw), _expected(codes, zeros, scales, 32))
    back = quantized_to_awq(qw)
    for key in t:
        assert torch.equal(back[key], t[key]), key


def test_gptq_v1_cannot_store_zero_point_zero():
    codes, zeros, scales = _known()
    zeros[0, 0] = 0
    qw = QuantizedWeight("int4", pack_int4(codes), scales, zeros.float(), 32)
    with pytest.raises(ValueError, match="gptq_v2"):
        quantized_to_gptq(qw, zero_offset=1)


def _write_checkpoint(tmp_path, model, method, tensors_of):
    """A HF-layout checkpoint: every decoder linear quantized, the rest in float."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            qw = quantize_weight(module.weight.detach(), "int4-g32")
            codes = unpack_int4(qw.data).long()
            for key, value in tensors_of(codes, qw.zeros.long(), qw.scales).items():
                state[f"{name}.{key}"] = value
    for key, value in model.state_dict().items():
        if not any(key == f"{p}.weight" for p in {k.rsplit('.', 1)[0] for k in state}):
            state[key] = value.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    qc = {"quant_method": method, "bits": 4, "group_size": 32}
    if method == "gptq":
        qc.update(desc_act=False, sym=False, checkpoint_format="gptq")
    else:
        qc.update(zero_point=True, version="gemm")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_load_hf_checkpoint_into_a_model(tmp_path, method):
    source = tiny_llama()
    if method == "gptq":
        _write_checkpoint(tmp_path, source, "gptq",
                          lambda c, z, s: autogptq_pack(c, z, s, torch.arange(c.shape[1]) // 32))
    else:
        _write_checkpoint(tmp_path, source, "awq", autoawq_pack)
    model = load_hf_quantized(tmp_path, lambda: tiny_llama(seed=7))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14
    # same logits as quantizing the source model directly (fp16 scales in the file)
    ids = token_batches(1, seed=5)[0]
    reference = tiny_llama()
    for name in quantized:
        lin = reference.get_submodule(name)
        with torch.no_grad():
            qw = quantize_weight(lin.weight, "int4-g32")
            qw.scales = qw.scales.half().float()
            lin.weight.copy_(dequantize(qw))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_hf_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantization_config"):
        load_hf_quantized(tmp_path, tiny_llama)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 8}}))
    with pytest.raises(ValueError, match="4-bit"):
        load_hf_quantized(tmp_path, tiny_llama)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bnb"}}))
    with pytest.raises(ValueError, match="gptq"):
        load_hf_quantized(tmp_path, tiny_llama)


def _gptq_checkpoint(tmp_path, config_text=None):
    """A GPTQ (gptq_v2) checkpoint of tiny_llama written with llmopt's own packer (fast)."""
    model = tiny_llama()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            for key, value in quantized_to_gptq(quantize_weight(module.weight.detach(), "int4-g32"), 0).items():
                state[f"{name}.{key}"] = value
    quantized = {k.rsplit(".", 1)[0] for k in state}
    state.update({k: v.contiguous() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in quantized})
    save_file(state, str(tmp_path / "model.safetensors"))
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}
    (tmp_path / "config.json").write_text(config_text or json.dumps({"quantization_config": qc}))
    return state


QPROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("text, pattern", [
    ('{"quantization_config": {"quant_method": "gp', r"config\.json.*not valid JSON"),
    ('[1]', r"config\.json.*JSON object"),
    ('{"quantization_config": "gptq"}', r"config\.json.*quantization_config.*object"),
    ('{"quantization_config": {"quant_method": "gptq", "bits": "four"}}', r"config\.json.*bits.*'four'"),
    ('{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": "32"}}',
     r"config\.json.*group_size.*'32'"),
])
def test_load_hf_malformed_config_names_file_and_field(tmp_path, text, pattern):
    from llmopt.quant import CheckpointError

    _gptq_checkpoint(tmp_path, config_text=text)
    with pytest.raises(CheckpointError, match=pattern):
        load_hf_quantized(tmp_path, tiny_llama)


def test_load_hf_tensor_errors_name_file_and_tensor(tmp_path):
    from llmopt.quant import CheckpointError

    state = _gptq_checkpoint(tmp_path)
    assert len([n for n, m in load_hf_quantized(tmp_path, tiny_llama).named_modules()
                if isinstance(m, QuantizedLinear)]) == 14
    path = tmp_path / "model.safetensors"

    missing = {k: v for k, v in state.items() if k != f"{QPROJ}.qzeros"}
    save_file(missing, str(path))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{QPROJ}\.qzeros.*missing"):
        load_hf_quantized(tmp_path, tiny_llama)

    bad_shape = dict(state, **{f"{QPROJ}.scales": state[f"{QPROJ}.scales"][:1]})
    save_file(bad_shape, str(path))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{QPROJ}.*GPTQ tensors disagree"):
        load_hf_quantized(tmp_path, tiny_llama)

    float_words = dict(state, **{f"{QPROJ}.qweight": state[f"{QPROJ}.qweight"].float()})
    save_file(float_words, str(path))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{QPROJ}.*qweight must be a 2-D int32"):
        load_hf_quantized(tmp_path, tiny_llama)

    renamed = {k.replace("q_proj", "zz_proj"): v for k, v in state.items()}
    save_file(renamed, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.zz_proj.*no such module"):
        load_hf_quantized(tmp_path, tiny_llama)

    save_file(state, str(path))
    dup = {f"{QPROJ}.qweight": state[f"{QPROJ}.qweight"]}
    save_file(dup, str(tmp_path / "model-extra.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{QPROJ}\.qweight.* in both ") as info:
        load_hf_quantized(tmp_path, tiny_llama)
    assert "model-extra.safetensors" in str(info.value) and f"{tmp_path}/model.safetensors" in str(info.value)
    (tmp_path / "model-extra.safetensors").unlink()

    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*cannot be read"):
        load_hf_quantized(tmp_path, tiny_llama)


def test_load_hf_index_names_a_missing_shard(tmp_path):
    _gptq_checkpoint(tmp_path)
    index = {"weight_map": {f"{QPROJ}.qweight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*index"):
        load_hf_quantized(tmp_path, tiny_llama)
