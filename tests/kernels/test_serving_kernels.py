"""The serving kernels against the torch forms the model uses: rope_cache_write vs apply_rotary + index-put into
the cache, add_rms_norm vs x + d then F.rms_norm, silu_mul vs F.silu(g) * u.
On a machine without CUDA they run in Triton's interpreter (fp32); on the GPU also in bf16."""
import pytest
import torch
import torch.nn.functional as F
from aurora_kernels import add_rms_norm, rope_cache_write, silu_mul

from aurora.models.layers import apply_rotary

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")


def _rotary(B, T, hd, dtype, device, gen):
    pos = torch.randint(0, 500, (B, T), generator=gen).to(device)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
    f = pos.float()[..., None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 Triton kernels need a CUDA GPU (the CPU interpreter runs fp32 only)"))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, nh, nkv, hd, row0", [(3, 5, 6, 2, 16, 2), (1, 1, 9, 3, 64, 0), (2, 7, 4, 4, 24, 1)])
def test_matches_torch_rotary_and_cache_put(B, T, nh, nkv, hd, row0, dtype):
    dev = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(B * 100 + T)
    slots, max_len = row0 + B + 1, 40
    qkv = torch.randn(B, T, nh + 2 * nkv, hd, generator=gen).to(dev, dtype)
    cos, sin = _rotary(B, T, hd, dtype, dev, gen)
    write_pos = torch.stack([torch.randperm(max_len, generator=gen)[:T] for _ in range(B)]).to(dev)
    k_cache = torch.randn(slots, max_len, nkv, hd, generator=gen).to(dev, dtype)
    v_cache = torch.randn(slots, max_len, nkv, hd, generator=gen).to(dev, dtype)
    # reference, in fp32 from the same inputs
    f = qkv.float()
    q_ref = apply_rotary(f[:, :, :nh], cos.float(), sin.float())
    k_ref = apply_rotary(f[:, :, nh:nh + nkv], cos.float(), sin.float())
    kc_ref, vc_ref = k_cache.float().clone(), v_cache.float().clone()
    rows = torch.arange(row0, row0 + B, device=dev)[:, None]
    kc_ref[rows, write_pos] = k_ref
    vc_ref[rows, write_pos] = f[:, :, nh + nkv:]

    v_in = qkv[:, :, nh + nkv:].clone()
    q = rope_cache_write(qkv, cos, sin, k_cache, v_cache, row0, write_pos, nh)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (B, T, nh, hd)  # in place, a view
    torch.testing.assert_close(q.float(), q_ref, **tol)
    torch.testing.assert_close(k_cache.float(), kc_ref, **tol)  # written slots, and every other slot untouched
    torch.testing.assert_close(v_cache.float(), vc_ref, rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, :, nh + nkv:], v_in, rtol=0, atol=0)  # v heads of qkv are not modified


def test_rejects_mismatched_shapes():
    qkv = torch.zeros(1, 2, 7, 8)
    cos = torch.zeros(1, 2, 8)
    cache = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="not nh=4"):
        rope_cache_write(qkv, cos, cos, cache, cache, 0, torch.zeros(1, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="kv heads"):
        rope_cache_write(torch.zeros(1, 2, 8, 8), cos, cos, cache[..., :1, :], cache[..., :1, :], 0,
                         torch.zeros(1, 2, dtype=torch.long), 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 576), (1, 1, 100), (2, 3, 33)])
def test_add_rms_norm_matches_torch(shape, dtype):
    dev = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(shape[-1])
    x, d = (torch.randn(*shape, generator=gen).to(dev, dtype) for _ in range(2))
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dev, dtype)
    total, normed = add_rms_norm(x, d, w, 1e-5)
    want_total = x + d  # the residual stream rounds to its dtype here, as in the model
    want = F.rms_norm(want_total.float(), (shape[-1],), w.float(), 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)
    torch.testing.assert_close(normed.float(), want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 2 * 1536), (1, 1, 2 * 7), (2, 3, 2 * 1100)])
def test_silu_mul_matches_torch(shape, dtype):
    dev = "cuda" if CUDA else "cpu"
    gu = (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1]))).to(dev, dtype)
    g, u = gu.float().chunk(2, -1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(silu_mul(gu).float(), F.silu(g) * u, **tol)

