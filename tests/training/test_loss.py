"""Loss per objective against plain-torch formulas; the rejected-proposal term lowers q(x)."""
import dataclasses

import pytest
import torch

from aurora.training.loss import target_distribution
from aurora.training.ttt import collate, step_masks, ttt_forward, ttt_loss
from conftest import make_draft


def plain_divergence(p, logq, objective):
    q = logq.exp()
    if objective == "fkl":
        return (torch.where(p > 0, p * (p.log() - logq), torch.zeros_like(p))).sum(-1)
    if objective == "rkl":
        return (q * (logq - p.log().clamp_min(-20.0))).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


def d2t_ids(draft):
    return torch.arange(draft.config.draft_vocab_size) + draft.d2t


def t2d_index(draft):
    idx = torch.full((draft.config.vocab_size,), -1, dtype=torch.long)
    idx[d2t_ids(draft)] = torch.arange(draft.config.draft_vocab_size)
    return idx


def cut(s, T):
    """The sample's first T tokens (a shorter request)."""
    return dataclasses.replace(s, token_ids=s.token_ids[:T], aux_hidden=s.aux_hidden[:T - 1],
                               target_hidden=s.target_hidden[:T - 1], loss_mask=s.loss_mask[:T])


@pytest.mark.parametrize("objective", ["fkl", "rkl", "tv"])
@pytest.mark.parametrize("ragged", [False, True], ids=["equal-lengths", "unequal-lengths"])
def test_loss_matches_plain_formula(target, samples, objective, ragged):
    """Unequal lengths pad the batch: the loss weighs only the step rows with a target (batch.step_rows), and must
    equal the plain sum over every position."""
    draft = make_draft(target, samples)
    K, decay = 3, 0.8
    lm = target.lm_head.weight
    batch_samples = [cut(s, T) for s, T in zip(samples[:5], (40, 13, 27, 9, 33))] if ragged else samples[:5]
    batch = collate(batch_samples, K, t2d_index(draft))
    B, L = batch.shape
    if ragged:  # padding rows and the steps' last rows left out
        assert batch.step_rows.numel() < K * B * L
    loss, per_step, acc = ttt_loss(draft, batch, lm, objective, K, decay, reject_weight=0.0)
    loss.backward()
    got_grad = draft.fc.weight.grad.clone()
    draft.zero_grad()

    # plain torch: full target logits, restrict to the draft vocabulary, mask out-of-vocab argmax
    full = (batch.target_hidden @ lm.t()).view(B, L, -1)
    in_vocab = draft.t2d[full.argmax(-1)]
    p = full[..., d2t_ids(draft)].softmax(-1)
    ref, ref_steps, ref_acc = 0.0, [], []
    for k, (_, logits) in enumerate(ttt_forward(draft, batch, K)):
        rows = torch.zeros(B, L, dtype=torch.bool)
        pk = torch.zeros_like(p)
        for b in range(B):
            for t in range(L):
                i = t + 1 + k  # the target position step k at t learns from
                if i < L and batch.target_mask[b, i] and in_vocab[b, i]:
                    rows[b, t] = True
                    pk[b, t] = p[b, i]
        div = plain_divergence(pk[rows], logits[rows].log_softmax(-1), objective)
        ref_steps.append(div.mean())
        ref_acc.append((logits[rows].argmax(-1) == pk[rows].argmax(-1)).float().mean())
        ref = ref + decay ** k * div.mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_step, torch.stack(ref_steps).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc, torch.stack(ref_acc))
    ref.backward()
    torch.testing.assert_close(got_grad, draft.fc.weight.grad, rtol=1e-4, atol=1e-7)
    assert step_masks(batch, target_distribution(batch.target_hidden, lm, d2t_ids(draft)), K).any()


def test_reject_term_lowers_q_of_rejected_token(target, samples):
    """The draft first learns the batch (so it is confident), then a round rejects its favourite guess."""
    s, K, lm = samples[0], 3, target.lm_head.weight
    draft = make_draft(target, samples)
    idx = t2d_index(draft)

    def train(d, batch, weight, steps, lr):
        opt = torch.optim.AdamW(d.parameters(), lr=lr)
        for _ in range(steps):
            loss, _, _ = ttt_loss(d, batch, lm, "fkl", K, 0.8, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()

    train(draft, collate([s], K, idx), 0.0, 30, 3e-3)
    with torch.no_grad():  # serving row: round fed x[12]; step 1 at position 11 guessed token index 14
        top = ttt_forward(draft, collate([s], K, idx), K)[1][1][0, 11].topk(2).indices
    y = int(d2t_ids(draft)[top[0]])
    if y == int(s.token_ids[14]):
        y = int(d2t_ids(draft)[top[1]])
    s2 = type(s)(**{**s.__dict__, "round_start": torch.tensor([12]),
                    "proposals": torch.tensor([[int(s.token_ids[13]), y, 0]]), "accepted": torch.tensor([1])})
    batch = collate([s2], K, idx)
    assert sorted(map(tuple, batch.reject_rows.tolist())) == [(0, 0, 12), (1, 0, 11)]

    def q_after(weight):
        d = make_draft(target, samples)
        d.load_state_dict(draft.state_dict())
        train(d, batch, weight, 5, 1e-3)
        with torch.no_grad():
            out = ttt_forward(d, batch, K)
        yd = int(idx[y])
        return float(out[1][1][0, 11].softmax(-1)[yd]), float(out[0][1][0, 12].softmax(-1)[yd])

    q_off, q_on = q_after(0.0), q_after(1.0)
    assert q_on[0] < 0.7 * q_off[0] and q_on[1] < 0.7 * q_off[1], (q_off, q_on)


def test_target_distribution_on_chosen_rows_matches_the_full_softmax():
    """Rows outside the loss are skipped; the rest match plain torch over the whole vocabulary."""
    g = torch.Generator().manual_seed(0)
    V, H, N = 300, 16, 37
    lm, hidden = torch.randn(V, H, generator=g), torch.randn(N, H, generator=g)
    d2t = torch.randperm(V, generator=g)[:40]
    rows = torch.rand(N, generator=g) < 0.6
    got = target_distribution(hidden, lm, d2t, chunk_rows=8, rows=rows.nonzero().squeeze(1))
    full = hidden @ lm.t()
    torch.testing.assert_close(got.logits[rows], full[rows][:, d2t])
    torch.testing.assert_close(got.lse_full[rows], torch.logsumexp(full[rows], -1))
    in_vocab = torch.isin(full.argmax(-1), d2t)
    assert torch.equal(got.in_vocab, in_vocab & rows)
    assert float(got.full_probs()[~rows].max()) == 0.0  # skipped rows hold no probability
    everything = target_distribution(hidden, lm, d2t, chunk_rows=8)
    torch.testing.assert_close(everything.lse_full, torch.logsumexp(full, -1))
    assert torch.equal(everything.in_vocab, in_vocab)
