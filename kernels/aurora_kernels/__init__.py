"""Aurora's fused GPU kernels. Depends on torch and triton only; triton is imported lazily, so the torch
paths work on machines without it."""

from .linear_divergence import DivergenceOutput, fused_linear_divergence
from .serving import add_rms_norm, rope_cache_write, silu_mul

__all__ = ["fused_linear_divergence", "DivergenceOutput", "rope_cache_write", "add_rms_norm", "silu_mul"]
