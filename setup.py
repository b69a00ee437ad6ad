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
    # Tested ranges, lower and upper bounds (the exact versions CI runs are in
    # .ci/constraints.txt; README "Testing against the newest releases" runs the suite on
    # whatever the registry serves newest). torch's range admits every build from 2.6 on
    # that we test, so that with a CPU build already installed pip never resolves (and
    # downloads) another torch.
    install_requires=["torch>=2.6,<2.14", "networkx>=3.0,<4", "safetensors>=0.4,<1"],
    extras_require={
        "triton": ["triton>=3.2,<3.10"],
        "dev": [
            "triton>=3.2,<3.10",
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "hypothesis>=6.100,<7",
            "transformers>=4.48,<5.26",
            "matplotlib>=3.8,<4",
        ],
    },
    entry_points={
        "torch_dynamo_backends": ["llmopt = llmopt.backend:llmopt_backend"],
        "console_scripts": ["llmopt = llmopt.tools.cli:main"],
    },
)
