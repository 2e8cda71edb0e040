"""Slot KV cache: one contiguous region per running sequence, indexed by its batch row.

k, v: [layers, slots, max_len, n_kv, hd]. Running sequences occupy rows 0..B-1 (the scheduler keeps them
packed), so a decode step attends over a view `k[layer, :B, :S]` with no gather. Rejected draft positions
need no rollback copy: they lie beyond the sequence's length and are masked out, then overwritten.
"""
import torch
from aurora_kernels import rope_cache_write

from aurora.models.layers import Attend, fold_mask, sdpa


class SlotKVCache:
    def __init__(self, layers: int, slots: int, max_len: int, n_kv: int, head_dim: int, dtype, device,
                 fused_rope: bool = False):
        shape = (layers, slots, max_len, n_kv, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len
        self.fused_rope = fused_rope  # offer attend.rope_qkv: rotary + cache write in one Triton kernel

    def attend(self, row0: int, write_pos: torch.Tensor, mask: torch.Tensor) -> Attend:
        """Rows row0..row0+B-1; write_pos [B,T] cache positions of the new tokens; mask [B,1,T,S] bool."""
        B, S = write_pos.shape[0], mask.shape[-1]
        rows = torch.arange(row0, row0 + B, device=write_pos.device)[:, None]
        folded = {}  # the GQA-folded mask as an additive bias, built at the first layer and shared by all (a bool
                    # mask would be converted to one inside every layer's attention: 2-3 more kernels a layer)

        def cached(layer: int, q):  # q against the rows' cached keys/values (the new ones already written)
            if not folded:
                m = fold_mask(mask, q.shape[2] // self.k.shape[3])
                folded["mask"] = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill_(~m, float("-inf"))
            return sdpa(q, self.k[layer, row0:row0 + B, :S], self.v[layer, row0:row0 + B, :S], folded["mask"])

        def fn(layer: int, q, k, v):
            kc, vc = self.k[layer], self.v[layer]
            kc[rows, write_pos] = k.to(kc.dtype)
            vc[rows, write_pos] = v.to(vc.dtype)
            return cached(layer, q)

        def rope_qkv(layer: int, qkv, cos, sin, n_heads: int):
            """From the fused projection qkv [B,T,nh+2nkv,hd] (not yet rotated): rotate, store k/v, attend."""
            return cached(layer, rope_cache_write(qkv, cos, sin, self.k[layer], self.v[layer], row0, write_pos,
                                                  n_heads))

        if self.fused_rope:
            fn.rope_qkv = rope_qkv
        return fn

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first `length` slots to another row (keeps running rows packed when one finishes)."""
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]


def block_mask(cache_len: torch.Tensor, tree: torch.Tensor, S: int) -> torch.Tensor:
    """Visibility for T new tokens whose block of M cache slots starts at cache_len.

    cache_len [B] tokens already cached; tree [B,T,M] bool, tree[b,i,j] = the token in block slot j is
    query i's ancestor or itself (a lower-triangular [T,T] for a chain). Returns [B,1,T,S]: the cached
    prefix plus the visible part of the block.
    """
    B, T, M = tree.shape
    rel = torch.arange(S, device=cache_len.device)[None, :] - cache_len[:, None]  # [B,S]
    in_block = (rel >= 0) & (rel < M)
    block = torch.gather(tree, 2, rel.clamp(0, M - 1)[:, None, :].expand(B, T, S))  # [B,T,S]
    return ((rel < 0)[:, None, :] | (in_block[:, None, :] & block))[:, None]
