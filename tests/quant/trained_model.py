"""A small causal LM trained on a fixed text, for quantization quality checks.

No package on this machine ships trained causal-LM weights (we searched the installed
packages and the PyPI package list for bundled GPT-2/Llama/TinyStories weights; none can
be used without a download at run time), so the suite trains one: a 2-layer Llama over
bytes (vocab 256), for a fixed number of steps on text that ships with Python itself (the
docstrings of a fixed list of standard-library modules). Training is seeded and runs once;
the weights are cached as safetensors (never pickle) under a name keyed by the corpus and
the recipe, and written atomically (two test processes may race).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os

import torch

MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "re", "subprocess",
    "textwrap", "threading", "typing", "dataclasses", "datetime", "decimal", "fractions", "heapq",
    "statistics", "unittest", "string", "random", "shutil", "tempfile", "csv", "enum", "abc", "contextlib",
    "inspect", "ast", "pickle", "socket", "email", "http.client", "urllib.parse", "zipfile", "tarfile",
)
SEQ = 64
STEPS = 400
BATCH = 32


def corpus() -> bytes:
    """Module and public-function docstrings, ASCII only, in a fixed order."""
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(inspect.getdoc(obj) or "")
    text = "\n\n".join(p for p in parts if p)
    return text.encode("ascii", "ignore")


def split_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tokens: the last 10% of the corpus is never trained on."""
    data = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).to(torch.long)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )


def build():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config())


def _train(model, train: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    # One thread: on a shared 2-core machine OpenMP threads spin against other processes and
    # training runs several times slower with two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_steps(model, train, gen)
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _train_steps(model, train, gen) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    model.train()
    for step in range(STEPS):
        lr = 5e-3 * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([train[s:s + SEQ] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def trained_model(cache_dir: str):
    """The trained model (float32, eval), from ``cache_dir`` or trained now (~1 min on 2 cores)."""
    from safetensors.torch import load_file, save_file

    recipe = f"{config().to_json_string()}|{SEQ}|{STEPS}|{BATCH}|{torch.__version__}".encode()
    key = hashlib.sha256(corpus() + recipe).hexdigest()[:16]
    path = os.path.join(cache_dir, f"byte-llama-{key}.safetensors")
    model = build()
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model.eval()
    _train(model, split_tokens()[0])
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model


def windows(tokens: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[count, SEQ]`` windows of ``tokens``."""
    n = len(tokens) // SEQ if count is None else min(count, len(tokens) // SEQ)
    return tokens[: n * SEQ].view(n, SEQ)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, batch: int = 64) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``tokens``."""
    wins = windows(tokens)
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        logits = model(chunk).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)
