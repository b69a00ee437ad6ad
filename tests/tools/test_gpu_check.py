"""The one-shot GPU check's CPU rehearsal: the same steps, same command lines, reduced size.

``python -m llmopt.tools.gpu_check --device cpu`` must pass here so that the day a GPU is lent
the check does not fail on a typo. The steps run in this process (``in_process=True``:
the same argv through ``runpy``) to spare an interpreter start-up per step.
"""
import json

import llmopt.tools.gpu_check as gpu_check


def test_cpu_rehearsal_runs_every_step_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_KERNELS", "auto")  # the CPU path: references, as a user's CPU run
    data, text = gpu_check.run("cpu", tmp_path, in_process=True)
    failed = {s["name"]: s["tail"][-1500:] for s in data["steps"] if s["rc"] != 0}
    assert not failed, failed
    assert data["ok"] and data["ops"] and all(r["ok"] for r in data["ops"])
    names = [s["name"] for s in data["steps"]]
    assert names[:2] == ["ops", "capture-cache"] and {"bench", "bench-int8", "bench-int4"} <= set(names)
    assert any(n.startswith("kernel-benchmarks:") for n in names)
    for step in data["steps"]:
        for path in step["outputs"]:
            assert json.loads(open(path).read())["results"], path
    stem = tmp_path / f"gpu-check-cpu-{gpu_check._today()}"
    assert json.loads(stem.with_suffix(".json").read_text())["ok"]
    assert stem.with_suffix(".txt").read_text() == text and f"{len(names)}/{len(names)} steps passed" in text
    assert len(text.splitlines()) <= 40, "one screen"


def test_capture_cache_step_hits_on_the_second_compile():
    result = gpu_check.check_capture_cache("cpu")
    assert result["ok"], result
    assert result["second"][0] == "hit" and result["same_tokens"]


def test_the_gpu_plan_runs_the_full_size_steps(tmp_path):
    """What the GPU run will execute (checked without a GPU): Llama-3-8B in bf16, eager vs
    Inductor max-autotune vs llmopt, then int8 and int4, within the 9-minute budget."""
    steps = gpu_check.plan("cuda", tmp_path)
    bench = next(s for s in steps if s.name == "bench")
    assert "llama-3-8b" in bench.command and "bf16" in bench.command
    assert "eager,inductor-max-autotune,llmopt" in bench.command
    assert [s.command[-1] for s in steps if s.name in ("bench-int8", "bench-int4")] == ["int8", "int4-g128"]
    spec = next(s for s in steps if s.name == "speculative")
    assert "bench_speculative.py" in spec.command[1] and "cuda" in spec.command and "--compile" in spec.command
    moe = next(s for s in steps if s.name == "moe")
    assert "bench_moe.py" in moe.command[1] and "--quick" not in moe.command
    assert sum(s.timeout_s for s in steps) <= gpu_check.GPU_BUDGET_S


def test_the_gpu_plan_adds_tensor_parallelism_with_two_gpus(tmp_path, monkeypatch):
    """With >= 2 GPUs the check also runs bench_tp over NCCL (1 GPU vs all), still in budget."""
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 2)
    steps = gpu_check.plan("cuda", tmp_path)
    tp = next(s for s in steps if s.name == "tp")
    assert "bench_tp.py" in tp.command[1] and tp.command[2:4] == ["--device", "cuda"]
    assert sum(s.timeout_s for s in steps) <= gpu_check.GPU_BUDGET_S
    assert "capture-cache" not in [s.name for s in steps]  # no room left in the budget
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 1)
    names = [s.name for s in gpu_check.plan("cuda", tmp_path)]
    assert "tp" not in names and "capture-cache" in names
