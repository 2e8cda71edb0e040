"""Fused kernels for a serving step of a Llama-family target (Triton; imported lazily).

Unfused, a decode step spends ~20 small kernels per layer, and at small batch those launches are the step's
cost. These three remove about nine of them:
- `rope_cache_write`: rotary on q and k of the fused q/k/v projection + the k/v write into the KV cache
  (replaces multiply, negate, concatenate, multiply, add and two cache scatters);
- `add_rms_norm`: the residual add and the next RMSNorm (two kernels -> one, twice per layer);
- `silu_mul`: SiLU(gate) * up from the fused gate/up projection (two -> one).
"""
import torch


def _check_contiguous(*tensors: torch.Tensor) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("inputs must be contiguous")


def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, row0: int, write_pos: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [B,T,nh+2*nkv,hd] (q heads, then k, then v), cos/sin [B,T,hd] (the rotate-half layout, both halves
    equal), k_cache/v_cache [slots, max_len, nkv, hd], write_pos [B,T] cache positions. Rotates the q heads in
    place, writes rotated k and raw v of token (b, t) to cache row row0 + b at write_pos[b, t].
    Returns q = qkv[:, :, :nh] (a view)."""
    B, T, heads, hd = qkv.shape
    n_kv = (heads - n_heads) // 2
    if n_heads + 2 * n_kv != heads or hd % 2:
        raise ValueError(f"qkv has {heads} heads of {hd}: not nh={n_heads} + 2 * nkv with an even head size")
    if k_cache.shape[-2:] != (n_kv, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not hold {n_kv} kv heads of {hd}")
    if cos.shape != (B, T, hd) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{B}, {T}, {hd}], got {tuple(cos.shape)}")
    _check_contiguous(qkv, cos, sin, k_cache, v_cache)
    from ._triton_serving import rope_cache_write as launch
    launch(qkv, cos, sin, k_cache, v_cache, row0, write_pos.contiguous(), n_heads, n_kv)
    return qkv[:, :, :n_heads]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, RMSNorm(x + delta) * weight) over the last dimension, as two new tensors."""
    if delta.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, delta {tuple(delta.shape)}, weight {tuple(weight.shape)}")
    _check_contiguous(x, delta, weight)
    from ._triton_serving import add_rms_norm as launch
    return launch(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate, then up) -> SiLU(gate) * up [..., I]."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"last dimension {gate_up.shape[-1]} is not gate and up of equal size")
    _check_contiguous(gate_up)
    from ._triton_serving import silu_mul as launch
    return launch(gate_up)
