"""The one-shot GPU check: ``python -m llmopt.tools.gpu_check --out benchmarks/results/``.

No session that built llmopt had a GPU. The day one is lent (the device tool's ``status``
says so), this command is the first thing to run: in under 9 minutes on one H100/H200 it
proves and measures the CUDA path, and writes what it found for the session to commit.

Steps, each a subprocess with its own time limit (a hang or a crash in one step is
recorded and the next one still runs):

1. ``ops`` — every llmopt kernel family on the device against its PyTorch reference at
   Llama-3-8B decode shapes (bf16), relative Frobenius error within the tolerance table
   of ``tests/conftest.py``: ``python -m llmopt.tools.gpu_check --ops-only``.
1b. ``capture-cache`` — a tiny Llama compiled (``aten`` executor, to fit in 30 s) and run
   twice on the device, Dynamo reset between: the second compile must find each graph in
   llmopt's capture cache (``hit``, docs/compile_time.md) and generate the same tokens:
   the hit path on CUDA (``--capture-cache-only``; left out with >= 2 GPUs, where the
   ``tp`` step takes its time). The ``bench-int8``/``bench-int4`` steps hit the ``bench``
   step's entries with the Inductor executor and CUDA graphs.
2. ``kernel-benchmarks`` — ``benchmarks/bench_fusions.py --quick``, ``bench_attention.py
   --quick``, ``bench_linear.py`` (M = 1, 16, 64 on the Llama-3-8B shapes): times against
   eager / SDPA / Inductor with the fraction of the measured copy bandwidth (roofline).
3. ``speculative`` — ``benchmarks/bench_speculative.py --device cuda --compile``: a tiny
   target and draft trained there, acceptance and tokens/s of the draft and n-gram
   proposers at k = 2, 4 against plain decoding.
4. ``moe`` — ``benchmarks/bench_moe.py`` on a Mixtral-shaped model (8 experts, top-2,
   hidden 1024): prefill and decode tokens/s of eager, Inductor, llmopt, int8 and int4.
5. ``tp`` — only with >= 2 GPUs: ``benchmarks/bench_tp.py --device cuda`` (1 GPU vs all,
   NCCL, bf16, peak memory per rank).
6. ``bench`` — ``llmopt bench llama-3-8b --dtype bf16`` with eager, Inductor max-autotune
   and llmopt; then llmopt with ``--quantize int8`` and ``--quantize int4-g128``.

It writes ``gpu-check-<device>-<date>.json`` (every step: command, exit status, seconds,
result files, the tail of its output; and the headline figures) and prints a one-screen
summary, also saved as ``gpu-check-<device>-<date>.txt``. Result files of the steps land
in ``--out`` as well.

``--device cpu`` rehearses the same steps at a reduced size (tiny shapes, ``tiny-llama``,
one repeat) so that a typo fails on CPU, in the tests (tests/tools/test_gpu_check.py), and not on
the day a GPU is lent. Run from a source checkout (the kernel benchmarks live in
``benchmarks/``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmopt import compat
from llmopt.codegen.locked_file import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
GPU_BUDGET_S = 9 * 60  # under the device tool's 10-minute limit per call


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    outputs: list[str] = dataclasses.field(default_factory=list)  # result files it writes
    rc: int | None = None
    seconds: float = 0.0
    tail: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0


def plan(device: str, out: Path) -> list[Step]:
    """The steps for ``device`` (``cuda``: full size; ``cpu``: the rehearsal)."""
    py = sys.executable
    cuda = device == "cuda"
    bench = REPO / "benchmarks"
    # time limits on CUDA add up to the 9-minute budget (GPU_BUDGET_S)
    tp = cuda and torch.cuda.device_count() >= 2
    steps = [Step("ops", [py, "-m", "llmopt.tools.gpu_check", "--ops-only", "--device", device], 45 if cuda else 120)]
    if not tp:  # with tensor parallelism the budget has no room left for it
        steps.append(Step("capture-cache", [py, "-m", "llmopt.tools.gpu_check", "--capture-cache-only",
                                            "--device", device], 30 if cuda else 120))
    if cuda:
        kernel_args = [
            [str(bench / "bench_fusions.py"), "--quick"],
            [str(bench / "bench_attention.py"), "--quick"],
            [str(bench / "bench_linear.py"), "--m", "1,16,64", "--models", "llama-3-8b",
             "--out", str(out / f"linear-{_today()}.json")],
        ]
    else:
        tiny = ["--inductor", "none", "--rep", "1", "--warmup", "0", "--copy-mib", "1"]
        kernel_args = [
            [str(bench / "bench_fusions.py"), "--tokens", "3", "--hidden", "32", "--intermediate", "48",
             "--heads", "2", "--kv-heads", "1", "--head-dim", "16", *tiny],
            [str(bench / "bench_attention.py"), "--prefill-seq", "16", "--prefill-batch", "1",
             "--decode-context", "16", "--decode-batch", "1", "--heads", "2", "--kv-heads", "1",
             "--head-dim", "16", *tiny],
        ]
    for args in kernel_args:
        steps.append(Step(f"kernel-benchmarks:{Path(args[0]).stem}", [py, *args], 45 if cuda else 120))
    # Speculative decoding: acceptance and tokens/s vs plain decoding on models trained in the
    # benchmark (issue 20), compiled with llmopt on the GPU.
    spec = [str(bench / "bench_speculative.py"), "--device", device]
    spec += ["--compile", "--ks", "2,4", "--proposers", "draft,ngram"] if cuda else ["--tiny", "--no-write"]
    steps.append(Step("speculative", [py, *spec], 40 if cuda else 120))
    # Mixture of experts (issue 19): a Mixtral-shaped model (8 experts, top-2), prefill and
    # decode tokens/s of eager, Inductor, llmopt and its int8/int4 experts.
    moe = [str(bench / "bench_moe.py")]
    moe += (["--hidden", "1024", "--intermediate", "2048", "--layers", "4", "--heads", "8", "--kv-heads", "4",
             "--vocab", "8192", "--rep", "3"] if cuda else ["--quick", "--no-write"])
    steps.append(Step("moe", [py, *moe], 60 if cuda else 180))
    # Tensor parallelism (issue 18), only where there are GPUs to split over: 1 GPU vs all.
    if tp:
        steps.append(Step("tp", [py, str(bench / "bench_tp.py"), "--device", "cuda", "--rounds", "3"], 50))
    if cuda:
        model, size = "llama-3-8b", ["--dtype", "bf16"]
        runs = [("bench", "eager,inductor-max-autotune,llmopt", None), ("bench-int8", "llmopt", "int8"),
                ("bench-int4", "llmopt", "int4-g128")]
    else:
        model, size = "tiny-llama", ["--dtype", "fp32", "--layers", "1", "--prompt-len", "8", "--new-tokens", "3",
                                     "--repeats", "1", "--warmup", "0"]
        runs = [("bench", "eager,llmopt", None), ("bench-int8", "llmopt", "int8"), ("bench-int4", "llmopt", "int4-g32")]
    for name, backends, quantize in runs:
        path = out / f"{name}-{device}-{_today()}.json"
        cmd = [py, "-m", "llmopt.tools.cli", "bench", model, *size, "--device", device, "--backends", backends,
               "--out", str(path), "--quiet"]
        if quantize:
            cmd += ["--quantize", quantize]
        steps.append(Step(name, cmd, (120 if name == "bench" else 45) if cuda else 180, outputs=[str(path)]))
    return steps


def _today() -> str:
    return datetime.date.today().isoformat()


def run_step(step: Step, env: dict[str, str], in_process: bool = False) -> Step:
    """Run one step as a subprocess with its time limit; ``in_process`` runs the same
    command line in this process instead (the tests' rehearsal: no interpreter start-up
    per step, no time limit)."""
    start = time.perf_counter()
    if in_process:
        step.rc, output = _run_in_process(step.command, env)
    else:
        try:
            done = subprocess.run(step.command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=step.timeout_s)
            step.rc = done.returncode
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            step.rc = 124
            output = f"{_text(exc.stdout)}{_text(exc.stderr)}\n[timed out after {step.timeout_s:.0f} s]"
    step.seconds = time.perf_counter() - start
    step.tail = output[-3000:]
    return step


def _run_in_process(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    import contextlib
    import io
    import runpy

    assert command[0] == sys.executable
    module = command[2] if command[1] == "-m" else None
    argv = command[2:] if module else command[1:]
    saved_argv, saved_path, saved_env = sys.argv, list(sys.path), dict(os.environ)
    buffer = io.StringIO()
    rc = 0
    try:
        sys.argv = list(argv)
        os.environ.update({k: v for k, v in env.items() if k == "LLMOPT_BENCH_RESULTS"})
        if not module:
            sys.path.insert(0, str(Path(argv[0]).parent))
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                if module:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception as exc:  # noqa: BLE001 - recorded as the step's failure
                import traceback
                traceback.print_exc()
                rc = 1
                del exc
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
    return rc, buffer.getvalue()


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


# ---------------------------------------------------------------------------------------
# Step 1: every op on the device against its reference
# ---------------------------------------------------------------------------------------

_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # tests/conftest.py's table


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def check_ops(device: str) -> list[dict[str, Any]]:
    """Each llmopt op family once at decode shapes on ``device`` vs its reference in fp32
    (reduced shapes on CPU). Returns one row per op: name, relative error, tolerance, ok."""
    import llmopt.codegen  # noqa: F401  registers the ops
    from llmopt.codegen import attention_decode as ad
    from llmopt.codegen import attention_paged as ap
    from llmopt.codegen import gated_activation as ga
    from llmopt.codegen import kv_cache
    from llmopt.codegen import linear as lin
    from llmopt.codegen import int4_weight_only as i4
    from llmopt.codegen import int8_weight_only as i8
    from llmopt.codegen.quant_packing import pack_int4
    from llmopt.codegen import residual_norm as rn
    from llmopt.codegen import rope

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    h, inter, hq, hkv, d, ctx = (4096, 14336, 32, 8, 128, 4096) if cuda else (64, 160, 4, 2, 16, 64)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    rows = []

    def record(name, fn):
        try:
            actual, expected = fn()
            err = _rel(actual, expected)
            rows.append({"op": name, "rel_err": err, "tolerance": _TOLERANCE[dtype], "ok": err <= _TOLERANCE[dtype]})
        except Exception as exc:  # noqa: BLE001 - a failing op is the finding
            rows.append({"op": name, "error": f"{type(exc).__name__}: {exc}", "ok": False})

    x = rnd(1, h)
    w = rnd(inter, h, scale=h ** -0.5)
    record("linear (GEMV)", lambda: (torch.ops.llmopt.linear(x, w, None, None, "", ""),
                                     lin.linear_ref(x.float(), w.float())))
    x16 = rnd(16, h)
    record("linear (flat GEMM, M=16)", lambda: (torch.ops.llmopt.linear(x16, w, None, None, "", ""),
                                                lin.linear_ref(x16.float(), w.float())))
    wi8 = torch.randint(-127, 128, (inter, h), generator=g, dtype=torch.int8).to(device)
    s8 = (torch.rand(inter, generator=g) * 0.01 + 1e-3).to(device=device, dtype=dtype)
    record("int8 weight-only", lambda: (torch.ops.llmopt.int8_weight_only_linear(x, wi8, s8, None),
                                        i8.int8_weight_only_linear_ref(x.float(), wi8, s8.float())))
    group = 32
    q4 = torch.randint(0, 16, (inter, h), generator=g, dtype=torch.uint8)
    packed = pack_int4(q4).to(device)
    s4 = (torch.rand(inter, h // group, generator=g) * 0.01 + 1e-3).to(device=device, dtype=dtype)
    z4 = torch.full((inter, h // group), 8.0).to(device=device, dtype=dtype)
    record("int4 weight-only (group 32)", lambda: (
        torch.ops.llmopt.int4_weight_only_linear(x, packed, s4, z4, group, None),
        i4.int4_weight_only_linear_ref(x.float(), packed, s4.float(), z4.float(), group)))
    nw = rnd(h)
    record("rms_norm", lambda: (torch.ops.llmopt.rms_norm(x, nw, 1e-5), rn.rms_norm_ref(x.float(), nw.float(), 1e-5)))
    gate, up = rnd(1, inter), rnd(1, inter)
    record("gated_activation (silu)", lambda: (torch.ops.llmopt.gated_activation(gate, up, "silu"),
                                               ga.gated_activation_ref(gate.float(), up.float(), "silu")))
    q = rnd(1, hq, 1, d)
    k = rnd(1, hkv, 1, d)
    pos = torch.arange(ctx, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=g)[None, :]
    cos = torch.cat([pos.cos(), pos.cos()], -1)[None, :1].to(device=device, dtype=dtype)
    sin = torch.cat([pos.sin(), pos.sin()], -1)[None, :1].to(device=device, dtype=dtype)
    record("rope", lambda: (torch.ops.llmopt.rope(q, k, cos, sin, d, False)[0],
                            rope.rope_ref(q.float(), k.float(), cos.float(), sin.float(), d, False)[0]))
    kc, vc = rnd(1, hkv, ctx, d), rnd(1, hkv, ctx, d)
    lens = torch.tensor([ctx - 3], device=device, dtype=torch.int32)
    record("attention_decode", lambda: (
        torch.ops.llmopt.attention_decode(q, kc, vc, lens, None, d ** -0.5),
        ad.attention_decode_ref(q.float(), kc.float(), vc.float(), lens, None, d ** -0.5)))
    bs = ap.DEFAULT_BLOCK_SIZE
    k_pool = kc[0].reshape(hkv, ctx // bs, bs, d).permute(1, 0, 2, 3).contiguous()
    v_pool = vc[0].reshape(hkv, ctx // bs, bs, d).permute(1, 0, 2, 3).contiguous()
    tables = torch.arange(ctx // bs, device=device, dtype=torch.int32)[None]
    record("paged_attention_decode", lambda: (
        torch.ops.llmopt.paged_attention_decode(q, k_pool, v_pool, tables, lens, d ** -0.5),
        ad.attention_decode_ref(q.float(), kc.float(), vc.float(), lens, None, d ** -0.5)))

    def append():
        k_cache, v_cache = torch.zeros_like(kc), torch.zeros_like(vc)
        positions = torch.tensor([5], device=device, dtype=torch.int64)
        torch.ops.llmopt.kv_cache_append(k_cache, v_cache, positions, k, k)
        expected_k, expected_v = torch.zeros_like(kc), torch.zeros_like(vc)
        kv_cache.kv_cache_append_ref(expected_k, expected_v, positions, k, k)
        return k_cache[:, :, 5].float(), expected_k[:, :, 5].float()

    record("kv_cache_append", append)
    if cuda:
        torch.cuda.synchronize()
    return rows


def check_capture_cache(device: str) -> dict[str, Any]:
    """Step 1b: a tiny Llama (bf16 on CUDA) compiled with llmopt (``aten`` executor) and generating twice, each
    time from a fresh Dynamo state and an identical fresh model, over a cache directory of
    its own. The first compile stores each graph's capture, the second must hit and give
    the same tokens (the same post-pass graph, so the same compiled code)."""
    import tempfile

    import transformers as tf

    import llmopt

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    prompt = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    runs = []
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="llmopt-gpu-check-") as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        try:
            for _ in range(2):
                compat.reset_dynamo()
                llmopt.clear_reports()
                torch.manual_seed(0)
                model = tf.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
                model.forward = torch.compile(model.forward, backend="llmopt", options={"inner": "aten"})
                with torch.no_grad():
                    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                         cache_implementation="static")
                runs.append((out.cpu(), [r.capture_cache for r in llmopt.reports()]))
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    (first, stored), (second, statuses) = runs
    same = torch.equal(first, second)
    ok = "stored" in stored and statuses == ["hit" if s == "stored" else s for s in stored] and same
    return {"first": stored, "second": statuses, "same_tokens": same, "ok": ok}


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------


def _headlines(steps: list[Step]) -> list[str]:
    lines = []
    for step in steps:
        for path in step.outputs:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            for r in data.get("results", []):
                if not isinstance(r, dict):
                    continue
                decode = r.get("decode_tokens_per_s")
                ratio = (r.get("vs_eager") or {}).get("decode_vs_eager")
                roofline = r.get("roofline_fraction")
                label = r.get("label") or r.get("backend")
                if decode is not None:
                    extra = f", {ratio:.2f}x eager" if isinstance(ratio, (int, float)) else ""
                    extra += f", {roofline:.0%} of roofline" if isinstance(roofline, (int, float)) else ""
                    lines.append(f"  {step.name:11s} {label:28s} decode {decode:9.1f} tok/s{extra}")
    return lines


def summary(device_name: str, steps: list[Step], ops: list[dict] | None, seconds: float) -> str:
    lines = [f"llmopt GPU check on {device_name}: {sum(s.ok for s in steps)}/{len(steps)} steps passed "
             f"in {seconds:.0f} s", ""]
    for s in steps:
        lines.append(f"  {'ok  ' if s.ok else 'FAIL'} {s.name:38s} {s.seconds:6.0f} s  (exit {s.rc})")
    if ops:
        bad = [r for r in ops if not r["ok"]]
        lines += ["", f"  ops: {len(ops) - len(bad)}/{len(ops)} within tolerance"]
        for r in bad:
            why = r.get("error") or "rel err {:.2e} > {:.0e}".format(r["rel_err"], r["tolerance"])
            lines.append(f"    FAIL {r['op']}: {why}")
    heads = _headlines(steps)
    if heads:
        lines += ["", *heads]
    return "\n".join(lines) + "\n"



def run(device: str, out: Path, in_process: bool = False) -> tuple[dict[str, Any], str]:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LLMOPT_BENCH_RESULTS=str(out), PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("TRITON_INTERPRET", None)  # real kernels on CUDA; the references on CPU
    steps = plan(device, out)
    for step in steps:
        print(f"llmopt.tools.gpu_check: {step.name} ...", file=sys.stderr, flush=True)
        run_step(step, env, in_process)
    ops = None
    try:
        ops = json.loads(steps[0].tail.strip().splitlines()[-1]) if steps[0].ok else None
    except (ValueError, IndexError):
        ops = None
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()}, rehearsal)"
    text = summary(name, steps, ops, seconds)
    data = {
        "format": "llmopt-gpu-check", "device": name, "date": _today(), "seconds": seconds,
        "budget_s": GPU_BUDGET_S if device == "cuda" else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "triton": _version("triton"), "transformers": _version("transformers")},
        "ok": all(s.ok for s in steps) and bool(ops) and all(r["ok"] for r in ops),
        "ops": ops, "steps": [dataclasses.asdict(s) for s in steps],
    }
    stem = f"gpu-check-{device}-{_today()}"
    atomic_write_text(out / f"{stem}.json", json.dumps(data, indent=1, default=str) + "\n")
    atomic_write_text(out / f"{stem}.txt", text)
    return data, text


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - absent package
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmopt.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for every result file")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda (default when a GPU is visible) or cpu (the rehearsal at reduced size)")
    parser.add_argument("--ops-only", action="store_true", help=argparse.SUPPRESS)  # step 1, in its own process
    parser.add_argument("--capture-cache-only", action="store_true", help=argparse.SUPPRESS)  # step 1b
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("llmopt.tools.gpu_check: no GPU is visible; pass --device cpu to rehearse the check on CPU",
              file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("llmopt.tools.gpu_check: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    if args.capture_cache_only:
        result = check_capture_cache(device)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if args.ops_only:
        rows = check_ops(device)
        print(json.dumps(rows))
        return 0 if all(r["ok"] for r in rows) else 1
    data, text = run(device, Path(args.out))
    print(text, end="")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
