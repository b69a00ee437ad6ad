"""`llmopt autotune`: shape collection, dry run, the no-GPU error, resume and interruption.

Timing needs a GPU; here ``tune_shape`` is replaced by a fake that records its calls (and
can raise ``KeyboardInterrupt`` mid-run), and the CLI is told a GPU is present, so the
table bookkeeping — skip what is there, save after every pair, resume — is tested on CPU.
"""
import collections
import json

import pytest
import torch

from llmopt.tools import autotune_cli
from llmopt.codegen.tuning_table import TuningEntry, TuningTable
from llmopt.tools.model_spec import resolve

GPU = "NVIDIA Test GPU"


pytestmark = pytest.mark.usefixtures("isolated_tuning_tables")  # (tests/conftest.py)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible "GPU" whose timings come from a fake ``tune_shape``; returns the list of calls."""
    class Calls(list):
        state = {"interrupt_at": None}

    calls = Calls()
    state = calls.state

    def fake_tune_shape(N, K, M, dtype, device="cuda", *, sweep=True, warmup=10, rep=50):
        if state["interrupt_at"] is not None and len(calls) == state["interrupt_at"]:
            raise KeyboardInterrupt
        calls.append((N, K, M))
        kernel = "gemv" if M == 1 else "flat_gemm" if M <= 32 else "mm"
        return TuningEntry(kernel, {"BLOCK_N": 16} if kernel != "mm" else {}, 10.0 + M, 15.0 + M)

    monkeypatch.setattr(autotune_cli, "_cuda_available", lambda: True)
    monkeypatch.setattr(autotune_cli, "device_name", lambda device: GPU)
    monkeypatch.setattr(autotune_cli, "tune_shape", fake_tune_shape)
    return calls


def shape_counts(shapes):
    return collections.Counter({(s.N, s.K): s.count for s in shapes})


# tiny-llama: hidden 64, 4 heads of 16 (2 KV heads), intermediate 160, vocab 256, 2 layers.
TINY_LLAMA = {(128, 64): 2, (64, 64): 2, (320, 64): 2, (64, 160): 2, (256, 64): 1}


def test_config_inference_of_tiny_llama():
    shapes, how = autotune_cli.collect_shapes("tiny-llama", torch.float32, "config")
    assert shape_counts(shapes) == TINY_LLAMA
    assert [s.names for s in shapes] == [("q+k+v",), ("o_proj",), ("gate+up",), ("down_proj",), ("lm_head",)]
    assert "config" in how


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "gemma"])
def test_config_inference_matches_the_compiled_graph(model):
    """What the config says == what merge_parallel_linears produces in the real graph."""
    spec = resolve(model, dtype=torch.float32, device="cpu", batch=1, seq=4)
    from_graph = autotune_cli.shapes_from_graph(spec)
    from_config = autotune_cli.shapes_from_config(spec.config)
    assert from_config is not None
    assert shape_counts(from_graph) == shape_counts(from_config)


def test_big_presets_need_no_weights():
    shapes, _ = autotune_cli.collect_shapes("llama-3-8b", torch.bfloat16)
    assert shape_counts(shapes) == {(6144, 4096): 32, (4096, 4096): 32, (28672, 4096): 32, (4096, 14336): 32,
                                    (128256, 4096): 1}
    shapes, _ = autotune_cli.collect_shapes("llama-2-7b", torch.bfloat16)
    assert (12288, 4096) in shape_counts(shapes) and (22016, 4096) in shape_counts(shapes)


def test_unknown_family_uses_the_graph():
    shapes, how = autotune_cli.collect_shapes("tiny-gpt2", torch.float32)
    assert "graph" in how
    # GPT-2's c_attn is one Conv1D (N = 3 * 64), c_proj, c_fc (4 * 64), mlp c_proj, lm_head.
    assert shape_counts(shapes) == {(192, 64): 2, (64, 64): 2, (256, 64): 3, (64, 256): 2}


def test_dry_run_lists_merged_shapes_and_candidates(capsys, tmp_path):
    table = tmp_path / "t.json"
    assert autotune_cli.main(["tiny-llama", "--dry-run", "--batch", "1,4", "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "q+k+v x2  N=128 K=64" in out and "gate+up x2  N=320 K=64" in out and "lm_head x1  N=256 K=64" in out
    assert "o_proj x2  N=64 K=64" in out and "down_proj x2  N=64 K=160" in out
    assert "gemv (" in out and "flat_gemm (" in out and "mm (cuBLAS)" in out
    assert "10 (shape, M) pairs to time" in out
    assert not table.exists()  # nothing written


def test_without_gpu_exits_2_with_a_clear_message(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(autotune_cli, "_cuda_available", lambda: False)
    assert autotune_cli.main(["tiny-llama", "--table", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err


def test_without_cuda_in_torch_the_message_names_the_build(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(autotune_cli, "_cuda_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert autotune_cli.main(["tiny-llama", "--table", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "built without CUDA" in err and torch.__version__ in err and "--dry-run" in err


def test_table_locked_by_another_writer_fails_clearly(fake_gpu, capsys, monkeypatch, tmp_path):
    """A save that cannot get the lock in time stops the run with exit 1 and says what is
    kept; the pairs saved before are in the table (no traceback, no half-written file)."""
    from llmopt.codegen import tuning_table

    path = tmp_path / "t.json"
    saves = []
    real_save = TuningTable.save

    def save_then_locked(self, *args, **kwargs):
        saves.append(len(self))
        if len(saves) == 3:
            raise tuning_table.TuningTableLocked(f"could not lock {path}.lock within 60 s: another process ...")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(TuningTable, "save", save_then_locked)
    assert autotune_cli.main(["tiny-llama", "--batch", "1,2", "--table", str(path)]) == 1
    err = capsys.readouterr().err
    assert "could not save the tuning table" in err and "could not lock" in err and "resume" in err
    assert len(TuningTable.load(path, device_name=GPU)) == 2


def test_usage_errors_exit_2(capsys):
    assert autotune_cli.main(["tiny-llama", "--dry-run", "--batch", "0,1"]) == 2
    assert autotune_cli.main(["no-such-model-xyz", "--dry-run"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_tunes_every_pair_saves_and_resumes(fake_gpu, capsys, tmp_path):
    path = tmp_path / "t.json"
    argv = ["tiny-llama", "--batch", "1,2", "--table", str(path)]
    assert autotune_cli.main(argv) == 0
    assert sorted(fake_gpu) == sorted((n, k, m) for n, k in TINY_LLAMA for m in (1, 2))
    table = TuningTable.load(path, device_name=GPU)
    assert len(table) == 10
    assert table.get(GPU, torch.bfloat16, 320, 64, "1").kernel == "gemv"
    out = capsys.readouterr().out
    assert "→ gemv" in out and "cuBLAS" in out and "1.45x" in out  # (15 + 1) / (10 + 1)
    assert "chosen kernel per shape" in out

    del fake_gpu[:]
    assert autotune_cli.main(argv) == 0  # everything is in the table: nothing to time
    assert fake_gpu == []
    assert "resuming: 10" in capsys.readouterr().out

    assert autotune_cli.main([*argv, "--batch", "1,2,16"]) == 0  # a new M: only its bucket
    assert sorted(m for _, _, m in fake_gpu) == [16] * 5

    del fake_gpu[:]
    assert autotune_cli.main([*argv, "--no-resume"]) == 0
    assert len(fake_gpu) == 10
    assert len(TuningTable.load(path, device_name=GPU)) == 15


def test_interrupted_run_keeps_what_it_timed_and_resumes(fake_gpu, capsys, tmp_path):
    path = tmp_path / "t.json"
    argv = ["tiny-llama", "--batch", "1,2", "--table", str(path)]
    fake_gpu.state["interrupt_at"] = 3
    assert autotune_cli.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(TuningTable.load(path, device_name=GPU)) == 3
    fake_gpu.state["interrupt_at"] = None
    assert autotune_cli.main(argv) == 0
    assert len(fake_gpu) == 10  # 3 before the interrupt + the 7 missing
    assert len(set(fake_gpu)) == 10


def test_foreign_table_is_replaced_not_merged(fake_gpu, tmp_path):
    path = tmp_path / "t.json"
    other = TuningTable(path, device_name="Another GPU")
    other.put("Another GPU", torch.bfloat16, 128, 64, "1", TuningEntry("mm", {}, 1.0, 1.0))
    other.save(path)
    with pytest.warns(RuntimeWarning, match="tuned on 'Another GPU'"):
        assert autotune_cli.main(["tiny-llama", "--batch", "1", "--table", str(path)]) == 0
    assert len(fake_gpu) == 5
    data = json.loads(path.read_text())
    assert data["device_name"] == GPU and len(data["entries"]) == 5


def test_progress_line_without_tqdm(fake_gpu, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(autotune_cli, "tqdm", None)
    assert autotune_cli.main(["tiny-llama", "--batch", "1", "--table", str(tmp_path / "t.json")]) == 0
    err = capsys.readouterr().err
    assert "[5/5] 100.0%" in err and "ETA" in err


def test_main_help_returns_0(capsys):
    assert autotune_cli.main(["--help"]) == 0
    assert "MODEL_OR_CONFIG" in capsys.readouterr().out
