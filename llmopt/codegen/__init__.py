"""Kernels: one module per op family (Triton kernel, launcher, reference, op registration).

``codegen`` imports nothing from the rest of llmopt. Importing this package registers
every ``llmopt::*`` op with ``torch.library`` (the explicit op registry).
"""
from . import residual_norm, gated_activation, rope  # noqa: F401  norms, gated activation, rope
from . import attention_decode  # noqa: F401  registers llmopt::attention_decode
from . import attention_prefill  # noqa: F401  registers llmopt::attention_prefill
from . import kv_cache  # noqa: F401  registers llmopt::kv_cache_append, rope_kv_cache_append
from . import zero_pages  # noqa: F401  registers llmopt::zeros_index_copy (lazily zeroed CPU caches)
from . import flat_gemm, gemv, linear, tuning_table  # noqa: F401  registers llmopt::linear
from . import moe_experts, moe_quant, moe_route  # noqa: F401  registers llmopt::moe_route, fused_experts(_int8, _int4)
