"""TTT forward against an independent step-by-step reference written from REFERENCE.md §1/§2."""
import math

import torch
import torch.nn.functional as F

from aurora.models.draft import DraftConfig, new_draft
from aurora.sample import Sample
from aurora.training.ttt import collate, ttt_forward


def rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, inv_freq):
    # x [nh, hd] at one position; rotate_half convention
    f = pos * inv_freq
    cos, sin = torch.cat([f, f]).cos(), torch.cat([f, f]).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_ttt(draft, samples, K):
    """Per sample, per step, per position: explicit key lists; no batching, no masks tensors."""
    c, m = draft.config, draft.midlayer
    a = m.self_attn
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    W = lambda lin, x: x @ lin.weight.t()  # noqa: E731
    outs = []
    for s in samples:
        x, L = s.token_ids, s.num_tokens - 1
        g = [W(draft.fc, s.aux_hidden[t]) for t in range(L)]
        keys, vals, per_step = [], [], []
        for k in range(K):
            kk, vv, qq = [], [], []
            for t in range(L):
                tok = x[t + 1 + k] if t + 1 + k < s.num_tokens else torch.tensor(0)
                inp = torch.cat([rms(draft.embed.weight[tok], m.input_layernorm.weight, c.rms_norm_eps),
                                 rms(g[t], m.hidden_norm.weight, c.rms_norm_eps)])
                qq.append(rope(W(a.q_proj, inp).view(nh, hd), t + k, inv_freq))  # step k at position t+k
                kk.append(rope(W(a.k_proj, inp).view(nkv, hd), t + k, inv_freq))
                vv.append(W(a.v_proj, inp).view(nkv, hd))
            keys.append(kk)
            vals.append(vv)
            hs, logits = [], []
            for t in range(L):
                heads = []
                for h in range(nh):
                    kv = h // (nh // nkv)
                    ks = [keys[0][s_][kv] for s_ in range(t + 1)] + [keys[j][t][kv] for j in range(1, k + 1)]
                    vs = [vals[0][s_][kv] for s_ in range(t + 1)] + [vals[j][t][kv] for j in range(1, k + 1)]
                    w = torch.softmax(torch.stack([qq[t][h] @ key for key in ks]) / math.sqrt(hd), 0)
                    heads.append(sum(wi * vi for wi, vi in zip(w, vs)))
                hcur = g[t] + W(a.o_proj, torch.cat(heads))
                z = rms(hcur, m.post_attention_layernorm.weight, c.rms_norm_eps)
                hcur = hcur + W(m.mlp.down_proj, F.silu(W(m.mlp.gate_proj, z)) * W(m.mlp.up_proj, z))
                hs.append(hcur)
                logits.append(W(draft.lm_head, rms(hcur, draft.norm.weight, c.rms_norm_eps)))
            per_step.append((torch.stack(hs), torch.stack(logits)))
            g = hs  # the next step reads this step's pre-norm output at the same position
        outs.append(per_step)
    return outs


def tiny_samples(n, lengths, H3, H, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, T in zip(range(n), lengths):
        out.append(Sample(request_id=str(i), token_ids=torch.randint(0, V, (T,), generator=gen), prompt_len=2,
                          aux_hidden=torch.randn(T - 1, H3, generator=gen),
                          target_hidden=torch.randn(T - 1, H, generator=gen),
                          loss_mask=torch.arange(T) >= 2))
    return out


def test_ttt_forward_matches_reference():
    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=48, vocab_size=50, draft_vocab_size=50, target_hidden_size=24)
    draft = new_draft(cfg, seed=3)
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for n, p in draft.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    draft.share_embedding(torch.nn.Embedding(50, 32))
    K = 3
    samples = tiny_samples(3, [9, 6, 11], 72, 32, 50)  # unequal lengths: padding must not leak
    batch = collate(samples, K, torch.arange(50))
    got = ttt_forward(draft, batch, K)
    ref = reference_ttt(draft, samples, K)
    for b, s in enumerate(samples):
        L = s.num_tokens - 1
        for k in range(K):
            torch.testing.assert_close(got[k][0][b, :L], ref[b][k][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[k][1][b, :L], ref[b][k][1], rtol=1e-4, atol=1e-5)


def test_chunked_attention_matches_reference_and_unchunked_gradients():
    """Samples longer than one attention chunk: the chunked, recomputed path gives the reference's outputs and
    the same gradients as attending over the whole sample at once."""
    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=48, vocab_size=50, draft_vocab_size=50, target_hidden_size=24)
    draft = new_draft(cfg, seed=5)
    draft.share_embedding(torch.nn.Embedding(50, 32))
    K = 3
    samples = tiny_samples(3, [23, 9, 17], 72, 32, 50, seed=1)  # L = 22: chunks of 5 leave a ragged last one
    batch = collate(samples, K, torch.arange(50))
    ref = reference_ttt(draft, samples, K)
    grads = []
    for chunk in (5, 1024):
        draft.zero_grad()
        got = ttt_forward(draft, batch, K, attn_chunk=chunk)
        for b, s in enumerate(samples):
            L = s.num_tokens - 1
            for k in range(K):
                torch.testing.assert_close(got[k][1][b, :L], ref[b][k][1], rtol=1e-4, atol=1e-5)
        mask = batch.key_valid[..., None]
        sum((logits * mask).pow(2).sum() for _, logits in got).backward()
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)


def test_collate_alignment_and_reject_rows():
    V = 20
    s = tiny_samples(1, [10], 6, 2, V)[0]
    s.token_ids = torch.arange(10)
    # round 0 fed x[4], proposals for indices 5,6,7; the first was accepted, the 2nd (guess 99->idx 6) rejected
    s.round_start = torch.tensor([4, 7])
    s.proposals = torch.tensor([[5, 13, 7], [8, 9, 3]])  # round 1: all 3 accepted... last is wrong on purpose
    s.accepted = torch.tensor([1, 3])
    t2d = torch.arange(V)
    b = collate([s], 3, t2d)
    L = 9
    assert b.ids.shape == (1, L + 3) and b.ids[0, :L].tolist() == list(range(1, 10))
    assert b.target_mask[0, :L].tolist() == [i + 1 >= 2 for i in range(L)]
    # rejected 13 at token index 6: exact serving row (step 1, t = 4-1 = 3) and the step-0 row t = 6-2 = 4
    assert sorted(map(tuple, b.reject_rows.tolist())) == [(0, 0, 4), (1, 0, 3)]
    assert b.reject_token.tolist() == [13, 13]


def test_kv_cache_samples_match_full_recompute(target):
    """The fixture's cached generation gives the same hidden states as one full causal forward."""
    from conftest import causal_attend, generate_samples

    s = generate_samples(target, 2, prompt_len=4, new_tokens=6, seed=5)
    ids = torch.stack([x.token_ids for x in s])
    T = ids.shape[1]
    hidden, aux = target(ids, torch.arange(T).expand(2, T), causal_attend)
    torch.testing.assert_close(torch.stack([x.target_hidden for x in s]), hidden[:, :T - 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([x.aux_hidden for x in s]), aux[:, :T - 1], rtol=1e-4, atol=1e-5)


def test_ttt_step_k_equals_serving_chain_step_k(target):
    """Each TTT step at the last context position equals what the serving engine's draft chain computes at
    that depth (ModelRunner: extend at n-1, then chain steps at n, n+1, ...), for rows of different lengths;
    step 0 also equals the prefill's draft output at every context position. The TTT sample is the served
    sequence itself: the prompt, the sampled x[n], then the chain's own proposals, with the target's aux states
    that the verify forward captured for them."""
    from aurora.engine.model_runner import ModelRunner

    K = 4
    draft = new_draft(DraftConfig.from_target(target.config), seed=7)
    with torch.no_grad():  # non-trivial norms, peaked draft logits (a near-tie would make the chain's argmax fragile)
        for n, p in draft.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
        draft.lm_head.weight.mul_(8.0)
    draft.share_embedding(target.embed_tokens)
    runner = ModelRunner(target, draft, max_batch=3, max_len=64, lookahead=K, capture=True, cuda_graphs=False)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, target.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 5, 14)]
    calls = []
    # prefill and extend compute no logits (a round computes them when it drafts): take them from the hidden
    hook = draft.register_forward_hook(lambda m, args, out: calls.append((args[2].clone(), out[0].clone(),
                                                                          draft.logits(out[0]).detach())))
    try:
        first = runner.prefill(0, prompts, greedy=True, filtering=False)
        step0 = (runner.d_hidden[:3].clone(), draft.logits(runner.d_hidden[:3]).detach())
        _, _, props = runner.round(3, max(map(len, prompts)), filtering=False, greedy_only=True)
    finally:
        hook.remove()
    chain = calls[1:K]  # prefill, then the K-1 chain steps of the round, then its draft extend
    assert len(calls) == K + 1 and all(pos.shape == (3, 1) for pos, _, _ in chain)
    samples = []
    for b, p in enumerate(prompts):
        n = len(p)
        assert [int(pos[b, 0]) for pos, _, _ in chain] == list(range(n, n + K - 1))  # serving advances with depth
        ids = torch.tensor(p + [first[b]] + props[b, :K - 1].tolist())
        T = len(ids)
        samples.append(Sample(request_id=str(b), token_ids=ids, prompt_len=n,
                              aux_hidden=runner.aux_store[b, :T - 1].clone(),
                              target_hidden=runner.hid_store[b, :T - 1].clone(),
                              loss_mask=torch.ones(T, dtype=torch.bool)))
    got = ttt_forward(draft, collate(samples, K, draft.target_to_draft()), K)
    for b, p in enumerate(prompts):
        n = len(p)
        torch.testing.assert_close(got[0][0][b, :n], calls[0][1][b, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[0][1][b, :n], calls[0][2][b, :n], rtol=1e-4, atol=1e-5)
        serving = [step0[0][b], *[h[b, 0] for _, h, _ in chain]], [step0[1][b], *[lg[b, 0] for _, _, lg in chain]]
        for k in range(K):
            torch.testing.assert_close(got[k][0][b, n - 1], serving[0][k], rtol=1e-4, atol=1e-5, msg=f"step {k}")
            torch.testing.assert_close(got[k][1][b, n - 1], serving[1][k], rtol=1e-4, atol=1e-5, msg=f"step {k}")
