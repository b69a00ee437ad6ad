"""save_quantized / load_quantized: no lost files, no silent wrong answer, clear errors.

* Saving into a non-empty directory is refused unless ``overwrite=True``; every file is
  written under a temporary name and renamed, so a crash midway leaves the old files whole.
* The manifest holds the SHA-256 of ``model.safetensors``; each module's scheme is checked
  against the record inside the (hashed) tensor file and against its tensors' dtypes and
  shapes. A corrupted or edited checkpoint raises instead of loading with wrong logits.
* A malformed manifest raises a ``CheckpointError`` (a ValueError) naming the file and field.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant.quant_fixtures import tiny_llama, token_batches

import llmopt.quant.io as qio
from llmopt.quant import CheckpointError, load_quantized, quantize_, save_quantized


MODULE = "model.layers.0.self_attn.q_proj"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _saved(path, scheme="int8", seed=0):
    model = quantize_(tiny_llama(seed=seed), scheme)
    save_quantized(model, path)
    return model


def _files(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _rewrite(path, edit_tensors=None, edit_meta=None, rehash=True, metadata="keep"):
    """Change a saved checkpoint the way a bad tool (or an older llmopt) would."""
    tensor_file, manifest = path / "model.safetensors", path / "quantization.json"
    meta = json.loads(manifest.read_text())
    if edit_tensors is not None or metadata != "keep":
        from safetensors import safe_open

        with safe_open(str(tensor_file), "pt") as f:
            header = f.metadata()
        tensors = load_file(str(tensor_file))
        if edit_tensors is not None:
            edit_tensors(tensors)
        save_file(tensors, str(tensor_file), metadata=header if metadata == "keep" else {"format": "pt"})
    if edit_meta is not None:
        edit_meta(meta)
    if rehash and "files" in meta:
        meta["files"]["model.safetensors"]["sha256"] = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
        meta["files"]["model.safetensors"]["bytes"] = tensor_file.stat().st_size
    manifest.write_text(json.dumps(meta))


# -- 1. no lost data ------------------------------------------------------------------------

def test_save_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"an HF checkpoint")
    (tmp_path / "config.json").write_text("{}")
    model = quantize_(tiny_llama(), "int8")
    with pytest.raises(FileExistsError) as info:
        save_quantized(model, tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "model.safetensors" in message
    assert "overwrite=True" in message and "empty directory" in message
    assert (tmp_path / "model.safetensors").read_bytes() == b"an HF checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    save_quantized(model, tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "quantization.json"]
    assert (tmp_path / "config.json").read_text() == "{}"  # not ours: left alone
    ids = token_batches(1, seed=5)[0]
    assert torch.equal(_logits(load_quantized(tmp_path, lambda: tiny_llama(seed=1)), ids), _logits(model, ids))


def test_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        save_quantized(quantize_(tiny_llama(), "int8"), target)


def test_crash_midway_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    old_model = _saved(tmp_path, "int8")
    before = _files(tmp_path)

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)  # a partial file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(qio, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantize_(tiny_llama(seed=1), "int4-g32"), tmp_path, overwrite=True)
    assert _files(tmp_path) == before  # same names, same bytes: no partial or temporary file
    monkeypatch.undo()
    ids = token_batches(1, seed=5)[0]
    assert torch.equal(_logits(load_quantized(tmp_path, tiny_llama), ids), _logits(old_model, ids))


def test_crash_between_the_renames_is_detected(tmp_path, monkeypatch):
    """The two files are renamed one after the other; a new tensor file with the old
    manifest (or the reverse) does not load."""
    _saved(tmp_path, "int8")
    real_replace, calls = os.replace, []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(qio.os, "replace", replace_once)
    with pytest.raises(OSError, match="killed"):
        save_quantized(quantize_(tiny_llama(seed=1), "int8"), tmp_path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "quantization.json"]
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(tmp_path, tiny_llama)


# -- 3. integrity ---------------------------------------------------------------------------

def test_manifest_records_the_tensor_file_hash(tmp_path):
    _saved(tmp_path)
    meta = json.loads((tmp_path / "quantization.json").read_text())
    data = (tmp_path / "model.safetensors").read_bytes()
    assert meta["files"] == {"model.safetensors": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}


def test_corrupted_tensor_bytes_are_detected(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # one bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256.*corrupted"):
        load_quantized(tmp_path, tiny_llama)


def test_truncated_tensor_file_is_detected(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*bytes"):
        load_quantized(tmp_path, tiny_llama)


def test_edited_scheme_is_detected(tmp_path):
    """int8 -> w8a8 keeps every dtype and shape: the record inside the tensor file catches it."""
    _saved(tmp_path, "int8")
    _rewrite(tmp_path, edit_meta=lambda m: m["modules"][MODULE].update(scheme="w8a8"))
    with pytest.raises(CheckpointError, match=rf"quantization\.json.*{MODULE}.*scheme.*w8a8.*int8"):
        load_quantized(tmp_path, tiny_llama)


def _old_format(path):
    """What an llmopt before the hash wrote: no ``files`` in the manifest, no record in the tensors."""
    _rewrite(path, edit_meta=lambda m: m.pop("files"), metadata="plain")


def test_older_manifest_without_hash_loads_with_a_warning(tmp_path):
    model = _saved(tmp_path, "int4-g32")
    _old_format(tmp_path)
    with pytest.warns(UserWarning, match=r"no sha256.*re-save"):
        loaded = load_quantized(tmp_path, tiny_llama)
    ids = token_batches(1, seed=5)[0]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("scheme, edit, field", [
    ("int8", lambda info: info.update(scheme="int4", group_size=32), "qdata"),
    ("int4-g32", lambda info: info.update(scheme="int8", group_size=None), "qdata"),
    ("int4-g32", lambda info: info.update(group_size=64), "scales"),
    ("int8", lambda info: info.update(has_bias=True), "bias"),
    ("int8", lambda info: info.update(act_order=True), "perm"),
], ids=["int8-as-int4", "int4-as-int8", "group-size", "bias", "act-order"])
def test_scheme_is_checked_against_the_tensors(tmp_path, scheme, edit, field):
    """Without the record (an older checkpoint), dtypes and shapes still catch a wrong scheme."""
    _saved(tmp_path, scheme)
    _old_format(tmp_path)
    _rewrite(tmp_path, edit_meta=lambda m: edit(m["modules"][MODULE]))
    with pytest.warns(UserWarning, match="no sha256"), \
            pytest.raises(CheckpointError, match=rf"model\.safetensors.*{MODULE}.*{field}"):
        load_quantized(tmp_path, tiny_llama)


def test_tensor_dtype_is_checked(tmp_path):
    _saved(tmp_path, "int8")
    _rewrite(tmp_path, edit_tensors=lambda t: t.update({f"{MODULE}.qdata": t[f"{MODULE}.qdata"].to(torch.int16)}))
    with pytest.raises(CheckpointError, match=rf"{MODULE}\.qdata is int16.*needs int8"):
        load_quantized(tmp_path, tiny_llama)


def test_act_order_permutation_is_checked(tmp_path):
    _saved(tmp_path, "int4-g32")
    _old_format(tmp_path)
    perm = torch.arange(64)
    perm[0] = 1  # column 1 twice, column 0 never

    def add_perm(tensors):
        tensors[f"{MODULE}.perm"] = perm

    _rewrite(tmp_path, edit_tensors=add_perm, edit_meta=lambda m: m["modules"][MODULE].update(act_order=True))
    with pytest.warns(UserWarning, match="no sha256"), \
            pytest.raises(CheckpointError, match=rf"{MODULE}\.perm is not a permutation of 0\.\.63"):
        load_quantized(tmp_path, tiny_llama)


# -- 4. clear errors ------------------------------------------------------------------------

def _set(path, value):
    def edit(meta):
        *parents, last = path
        node = meta
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()

MANIFEST_EDITS = {
    "unknown-scheme": (("modules", MODULE, "scheme"), "int3", r"scheme.*'int3'.*int8, int4, w8a8"),
    "unknown-dtype": (("modules", MODULE, "compute_dtype"), "float99", r"compute_dtype.*'float99'"),
    "missing-key": (("modules", MODULE, "in_features"), _DELETE, r"in_features.*missing"),
    "wrong-type": (("modules", MODULE, "group_size"), "32", r"group_size.*integer"),
    "modules-not-object": (("modules",), [], r"'modules'.*object"),
    "missing-modules": (("modules",), _DELETE, r"'modules'.*missing"),
    "missing-alias": (("aliases", "lm_head.weight"), "model.nope", r"aliases.*lm_head\.weight.*model\.nope"),
    "unknown-hash-file": (("files", "other.safetensors"), {"sha256": "0" * 64, "bytes": 1}, r"files.*other"),
    "bad-hash": (("files", "model.safetensors", "sha256"), "abc", r"sha256.*64 hex"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_malformed_manifest_names_the_file_and_the_field(tmp_path, case):
    model = tiny_llama(tie_word_embeddings=(case == "missing-alias"))
    save_quantized(quantize_(model, "int8"), tmp_path)
    path, value, pattern = MANIFEST_EDITS[case]
    _rewrite(tmp_path, edit_meta=_set(path, value), rehash=False)
    with pytest.raises(CheckpointError, match=rf"quantization\.json.*{pattern}") as info:
        load_quantized(tmp_path, lambda: tiny_llama(tie_word_embeddings=(case == "missing-alias")))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text, pattern", [
    ('{"format": "llmopt-quantized", "vers', r"not valid JSON.*line 1"),
    ("[1, 2]", r"JSON object.*list"),
    ('{"format": "something-else", "version": 1}', r"format.*something-else"),
    ('{"format": "llmopt-quantized", "version": 7}', r"version.*7"),
])
def test_unreadable_manifest(tmp_path, text, pattern):
    _saved(tmp_path)
    (tmp_path / "quantization.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"quantization\.json.*{pattern}"):
        load_quantized(tmp_path, tiny_llama)


def test_missing_tensor_names_module_and_field(tmp_path):
    _saved(tmp_path, "int4-g32")
    _rewrite(tmp_path, edit_tensors=lambda t: t.pop(f"{MODULE}.zeros"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{MODULE}.*zeros.*missing"):
        load_quantized(tmp_path, tiny_llama)


def test_unreadable_tensor_file(tmp_path):
    _saved(tmp_path)
    _old_format(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.warns(UserWarning, match="no sha256"), \
            pytest.raises(CheckpointError, match=r"model\.safetensors.*cannot be read"):
        load_quantized(tmp_path, tiny_llama)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_quantized(tmp_path, tiny_llama)
