"""SGLang's split-KV verify kernel (what `--sglang-splitkv-verify` turns on, plugin/verify_attention.py) against
plain-torch causal attention on an NVIDIA GPU: a prefix read from a paged KV pool through kv_indices, then the
verified block's own keys, one query per verified token. Shapes of SmolLM2 (9 query / 3 KV heads of 64) and of
MiniMax M2.5 at TP 8 (6 / 1 of 128), verify widths 1 (depth 0) and 5 (lookahead 4), ragged prefixes.
  scripts/device/env.sh python -m pytest tests/sglang/test_verify_attention_gpu.py -q
"""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None,
    reason="needs SGLang 0.5.17 (the `sglang` extra) and a CUDA GPU: run tests/sglang on the GPU machine")


def reference(q, k_ext, v_ext, k_buf, v_buf, prefix_lens, kv_indices, width, scale):
    """fp32 attention of each verified token over its request's prefix and the block's tokens up to itself."""
    out, start = [], 0
    for b, n in enumerate(prefix_lens):
        idx = kv_indices[start:start + n]
        start += n
        rows = slice(b * width, (b + 1) * width)
        k = torch.cat([k_buf[idx], k_ext[rows]]).float()  # [n + width, Hkv, D]
        v = torch.cat([v_buf[idx], v_ext[rows]]).float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("thd,khd->htk", q[rows].float(), k) * scale  # [H, width, n + width]
        key, query = torch.arange(n + width, device=q.device), n + torch.arange(width, device=q.device)
        causal = key[None, :] <= query[:, None]
        s = s.masked_fill(~causal[None], float("-inf"))
        out.append(torch.einsum("htk,khd->thd", s.softmax(-1), v))
    return torch.cat(out)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (6, 1, 128)])
@pytest.mark.parametrize("width", [1, 5])
def test_splitkv_verify_equals_causal_attention(heads, kv_heads, dim, width):
    """Also where the caching allocator hands the kernel's scratch a block that held NaN: the short prefixes leave
    splits empty, whose scratch the kernel weighs by 0 (Aurora zeroes it)."""
    from sglang.kernels.ops.attention import verify_splitkv as vs

    from aurora.sglang_engine.plugin import verify_attention

    assert verify_attention.enable()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    prefix_lens = [1, 37, 300, 1023, 4100]
    bs, pool = len(prefix_lens), sum(prefix_lens) + 64
    vs._VK_CACHE.clear()
    n_splits = vs.choose_n_splits(sum(prefix_lens) / bs)
    poison = torch.full((bs, heads, n_splits, vs.triton.next_power_of_2(width), dim), float("nan"), device=dev)
    del poison  # its block goes back to the caching allocator, NaN and all, for the scratch to be cut from
    k_buf = torch.randn(pool, kv_heads, dim, device=dev, dtype=dt)
    v_buf = torch.randn(pool, kv_heads, dim, device=dev, dtype=dt)
    kv_indices = torch.randperm(pool, device=dev)[:sum(prefix_lens)].to(torch.int64)  # scattered pages
    kv_indptr = torch.tensor([0] + prefix_lens, device=dev).cumsum(0).to(torch.int32)
    qo_indptr = torch.arange(0, (bs + 1) * width, width, device=dev, dtype=torch.int32)
    q = torch.randn(bs * width, heads, dim, device=dev, dtype=dt)
    k_ext = torch.randn(bs * width, kv_heads, dim, device=dev, dtype=dt)
    v_ext = torch.randn(bs * width, kv_heads, dim, device=dev, dtype=dt)
    o = torch.zeros_like(q)
    scale = dim ** -0.5
    mask = torch.ones(sum((n + width) * width for n in prefix_lens), device=dev, dtype=torch.uint8)
    mask_indptr = torch.tensor([0] + [(n + width) * width for n in prefix_lens], device=dev).cumsum(0).to(torch.int32)
    ran = vs.verify_splitkv_fwd(q, k_ext, v_ext, o, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, mask, True,
                             mask_indptr, width, 1.0, 1.0, scale, max_bs=bs)
    assert ran, "the split-KV kernel declined a causal topk-1 verify"
    ref = reference(q, k_ext, v_ext, k_buf, v_buf, prefix_lens, kv_indices, width, scale)
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)  # bf16 output of an fp32-accumulating kernel
