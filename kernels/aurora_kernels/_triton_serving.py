"""Triton kernels for the serving step (aurora_kernels.serving; imported only when they run).

- rope + cache write: one program per (token, head) of the fused q/k/v projection: q heads are rotated in
  place; each k head is rotated and written, with its v head, straight into the KV cache at the token's slot.
- add + RMSNorm: one program per row: the residual sum (kept in the stream's dtype) and its norm.
- SiLU(gate) * up: from the fused gate/up projection's output.
All arithmetic in fp32, rounded once (the unfused torch forms round after each op).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, row0, T, NH, NKV,
                       stride_tok, stride_slot, stride_pos, HALF: tl.constexpr, BLOCK: tl.constexpr):
    tok = tl.program_id(0)  # b * T + t
    h = tl.program_id(1)    # q heads 0..NH-1, then k heads
    d = tl.arange(0, BLOCK)
    m = d < HALF
    src = qkv_ptr + tok.to(tl.int64) * stride_tok + h * (2 * HALF)
    x1 = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=m, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + tok.to(tl.int64) * (2 * HALF) + d, mask=m, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + tok.to(tl.int64) * (2 * HALF) + d, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s  # x * cos + rotate_half(x) * sin, first and second half
    o2 = x2 * c + x1 * s
    if h < NH:
        tl.store(src + d, o1.to(qkv_ptr.dtype.element_ty), mask=m)
        tl.store(src + HALF + d, o2.to(qkv_ptr.dtype.element_ty), mask=m)
    else:
        kh = h - NH
        row = row0 + tok // T
        pos = tl.load(pos_ptr + tok)
        dst = row.to(tl.int64) * stride_slot + pos * stride_pos + kh * (2 * HALF)
        tl.store(k_ptr + dst + d, o1.to(k_ptr.dtype.element_ty), mask=m)
        tl.store(k_ptr + dst + HALF + d, o2.to(k_ptr.dtype.element_ty), mask=m)
        vsrc = qkv_ptr + tok.to(tl.int64) * stride_tok + (NH + NKV + kh) * (2 * HALF)
        tl.store(v_ptr + dst + d, tl.load(vsrc + d, mask=m, other=0.0).to(v_ptr.dtype.element_ty), mask=m)
        tl.store(v_ptr + dst + HALF + d, tl.load(vsrc + HALF + d, mask=m, other=0.0).to(v_ptr.dtype.element_ty),
                 mask=m)


def rope_cache_write(qkv, cos, sin, k_cache, v_cache, row0: int, write_pos, n_heads: int, n_kv: int) -> None:
    B, T, _, hd = qkv.shape
    half = hd // 2
    _rope_cache_kernel[(B * T, n_heads + n_kv)](
        qkv, cos, sin, k_cache, v_cache, write_pos, row0, T, n_heads, n_kv,
        qkv.stride(1), k_cache.stride(0), k_cache.stride(1), HALF=half, BLOCK=triton.next_power_of_2(half))


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, norm_ptr, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    s = tl.load(x_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32) + \
        tl.load(d_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
    s = s.to(sum_ptr.dtype.element_ty)  # the residual stream keeps its dtype, as x + d does
    tl.store(sum_ptr + row * N + cols, s, mask=m)
    sf = s.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(norm_ptr + row * N + cols, (sf * r * w).to(norm_ptr.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(gu_ptr + row * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x, d, w, eps: float):
    N = x.shape[-1]
    rows = x.numel() // N
    total, normed = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, d, w, total, normed, N, eps, BLOCK=triton.next_power_of_2(N))
    return total, normed


def silu_mul(gu):
    I2 = gu.shape[-1]
    I = I2 // 2
    out = torch.empty(*gu.shape[:-1], I, dtype=gu.dtype, device=gu.device)
    block = min(1024, triton.next_power_of_2(I))
    _silu_mul_kernel[(gu.numel() // I2, triton.cdiv(I, block))](gu, out, I, BLOCK=block)
    return out
