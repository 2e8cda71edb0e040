"""Fused rotary embedding + KV-cache write for a serving step's fused q/k/v projection.

Unfused, a decode step spends about seven small kernels per layer here (rotate q and k: multiply, negate,
concatenate, multiply, add; scatter k and v into the cache). `rope_cache_write` does it in one launch.
"""
import torch


def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, row0: int, write_pos: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [B,T,nh+2*nkv,hd] (contiguous; q heads, then k, then v), cos/sin [B,T,hd] (the rotate-half layout,
    both halves equal), k_cache/v_cache [slots, max_len, nkv, hd] (contiguous), write_pos [B,T] cache positions.
    Rotates the q heads in place, writes rotated k and raw v of token (b, t) to cache row row0 + b at
    write_pos[b, t]. Returns q = qkv[:, :, :nh] (a view)."""
    B, T, heads, hd = qkv.shape
    n_kv = (heads - n_heads) // 2
    if n_heads + 2 * n_kv != heads or hd % 2:
        raise ValueError(f"qkv has {heads} heads of {hd}: not nh={n_heads} + 2 * nkv with an even head size")
    if k_cache.shape[-2:] != (n_kv, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not hold {n_kv} kv heads of {hd}")
    if cos.shape != (B, T, hd) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{B}, {T}, {hd}], got {tuple(cos.shape)}")
    if not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous()
            and v_cache.is_contiguous()):
        raise ValueError("qkv, cos, sin and the caches must be contiguous")
    from ._triton_rope import launch
    launch(qkv, cos, sin, k_cache, v_cache, row0, write_pos.contiguous(), n_heads, n_kv)
    return qkv[:, :, :n_heads]
