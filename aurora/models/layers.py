"""Building blocks shared by the target and the draft: RMSNorm, rotary embedding, GQA attention, SwiGLU MLP.

Attention does not own a KV cache. It projects q/k/v, applies RoPE and hands them to an `attend`
callable chosen by the caller: the engine passes one backed by a slot KV cache, the trainer one that
implements training-time-test masking. One layer definition therefore serves serving and training.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from aurora_kernels import serving as fused_ops
from torch import nn

# attend(layer_index, q [B,T,nh,hd], k [B,T,nkv,hd], v [B,T,nkv,hd]) -> [B,T,nh,hd]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel on CUDA (statistics in fp32); equals HF Llama's RMSNorm in fp32
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm, fused: bool = False):
    """(x + delta, norm(x + delta)): the residual stream and the next block's input; one Triton kernel if fused."""
    if fused:
        return fused_ops.add_rms_norm(x, delta, norm.weight.to(x.dtype), norm.eps)
    x = x + delta
    return x, norm(x)


class Rotary(nn.Module):
    """cos/sin for positions; inverse frequencies come from transformers so every RoPE variant it knows works."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        hf = LlamaRotaryEmbedding(config)
        self.register_buffer("inv_freq", hf.inv_freq.float().clone(), persistent=False)
        self.scaling = float(hf.attention_scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq  # [B,T,hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B,T,n,hd], cos/sin [B,T,hd]
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, layer_index: int, in_dim: int, hidden: int, n_heads: int, n_kv: int, head_dim: int,
                 bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        self.layer_index, self.n_heads, self.n_kv, self.head_dim = layer_index, n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(in_dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, n_kv * head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, n_kv * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        # Qwen3-style per-head q/k norm
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps else None
        self.qkv_weight: torch.Tensor | None = None  # set by fuse() for frozen weights (the target)
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One [q;k;v] GEMM instead of three; q/k/v_proj weights become views of the fused tensor."""
        with torch.no_grad():
            self.qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            if self.q_proj.bias is not None:
                self.qkv_bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            nq, nk = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), self.qkv_weight.split([nq, nk, nk])):
                getattr(self, name).weight = nn.Parameter(part, requires_grad=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_weight is not None and self.q_norm is None:  # rotary on q and k together
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(B, T, -1, self.head_dim)
            rope_qkv = getattr(attend, "rope_qkv", None)
            if rope_qkv is not None:  # the engine's KV cache rotates and stores k/v in one kernel
                return self.o_proj(rope_qkv(self.layer_index, qkv, cos, sin, self.n_heads).reshape(B, T, -1))
            nqk = self.n_heads + self.n_kv
            qk = apply_rotary(qkv[:, :, :nqk], cos, sin)
            out = attend(self.layer_index, qk[:, :, :self.n_heads], qk[:, :, self.n_heads:], qkv[:, :, nqk:])
            return self.o_proj(out.reshape(B, T, -1))
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(self.layer_index, q, k, v)  # [B,T,nh,hd]
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse() for frozen weights
        self.fused_act = False  # SiLU(gate) * up in one Triton kernel (serving; after fuse())

    def fuse(self) -> None:
        if self.gate_proj.bias is not None:
            return
        with torch.no_grad():
            self.gate_up_weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
            g, u = self.gate_up_weight.chunk(2)
            self.gate_proj.weight = nn.Parameter(g, requires_grad=False)
            self.up_proj.weight = nn.Parameter(u, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate_up = F.linear(x, self.gate_up_weight)
            if self.fused_act:
                return self.down_proj(fused_ops.silu_mul(gate_up))
            g, u = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B,T,nh,hd], k/v [B,S,nkv,hd] (any strides), mask [B,1,T,S] (bool, True = visible, or an additive
    bias) or already folded by fold_mask to [B,1,rep*T,S] -> [B,T,nh,hd].

    Grouped-query attention without copying K/V: the `rep` query heads that share a KV head are folded into
    the query-length axis, so each KV head is read once, straight from the cache view."""
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    rep = nh // nkv
    q = q.view(B, T, nkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, rep * T, hd)
    if mask is not None and mask.shape[2] != rep * T:
        mask = fold_mask(mask, rep)
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.view(B, nkv, rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, nh, hd)


def fold_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """[B,1,T,S] -> [B,1,rep*T,S], the layout sdpa folds grouped query heads into (done once per forward)."""
    return mask.expand(mask.shape[0], 1, *mask.shape[2:]).repeat(1, 1, rep, 1) if rep > 1 else mask
