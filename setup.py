"""Packaging metadata for llmopt.

The ``torch_dynamo_backends`` entry point makes ``torch.compile(model, backend="llmopt")``
work without ``import llmopt``: TorchDynamo discovers backends through that group.
"""
from setuptools import find_packages, setup

setup(
    name="llmopt",
    version="0.1.0",
    description="A torch.compile backend for fast, memory-lean LLM inference",
    packages=find_packages(include=["llmopt", "llmopt.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned above 2.6: with a CPU build already installed, pip
    # must not resolve (and download) another torch.
    install_requires=["torch>=2.6", "networkx>=3.0", "safetensors>=0.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        "dev": [
            "triton>=3.2",
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "transformers>=4.48",
            "matplotlib>=3.8",
        ],
    },
    entry_points={
        "torch_dynamo_backends": ["llmopt = llmopt.backend:llmopt_backend"],
        "console_scripts": ["llmopt = llmopt.cli:main"],
    },
)
