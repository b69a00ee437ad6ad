"""Capturing the final (post-pass) FX graph of each compile, shared by the pass tests.

``backend.run_pipeline`` is wrapped so that every graph the llmopt backend compiles is
appended, after its passes, to the returned list (compile order: a generate call gives
the prefill graph, then the decode graph). ``as_cuda=True`` also runs
``select_linear_kernel``'s CUDA branch on CPU (the device name reported as a test GPU):
the simulation that test_select_linear_kernel.py's module docstring explains.
"""
from __future__ import annotations

import dataclasses

import torch

from llmopt import backend, passes
from llmopt.passes import select_linear_kernel as slk

TEST_GPU = "NVIDIA Test GPU"


def capture_final_graphs(monkeypatch, as_cuda: bool = False, gpu_name: str = TEST_GPU) -> list:
    captured = []
    pipeline = backend.run_pipeline

    def run_pipeline(gm, ctx):
        if as_cuda:  # the CPU branch would take the linears first: it rewrites them too
            options = dataclasses.replace(ctx.options, disable=(*ctx.options.disable, "select_linear_kernel"))
            ctx = dataclasses.replace(ctx, options=options)
        total = pipeline(gm, ctx)
        if as_cuda:
            cuda_ctx = dataclasses.replace(ctx, device=torch.device("cuda"))
            total += passes._run_one("select_linear_kernel", slk, gm, cuda_ctx)
        captured.append(gm)
        return total

    monkeypatch.setattr(backend, "run_pipeline", run_pipeline)
    if as_cuda:
        monkeypatch.setattr(slk, "device_name", lambda device: gpu_name)
    return captured
