"""Kernels: one module per op family (Triton kernel, launcher, reference, op registration).

``codegen`` imports nothing from the rest of llmopt. Importing this package registers
every ``llmopt::*`` op with ``torch.library`` (the explicit op registry).
"""
