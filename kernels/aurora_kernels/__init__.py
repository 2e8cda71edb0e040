"""Aurora's fused GPU kernels. Depends on torch and triton only; triton is imported lazily, so the torch
paths work on machines without it."""

from .linear_divergence import DivergenceOutput, fused_linear_divergence
from .rope_cache import rope_cache_write

__all__ = ["fused_linear_divergence", "DivergenceOutput", "rope_cache_write"]
