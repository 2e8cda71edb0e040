"""Swap guard: score a draft on held-out samples by its simulated acceptance, and vet candidates.

Under lossless speculative sampling the draft's k-th token is accepted with probability
a_k = sum_x min(p(x), q_k(x)) (p: the target's full softmax, q: the draft's over its vocabulary), given the
earlier ones were. TTT step k at position t conditions on the true tokens, i.e. on acceptance of steps
< k, so the expected tokens per verify round from position t is 1 + sum_k prod_{j<=k} a_j(t) (the 1 is the
bonus/correction token). Greedy serving accepts iff argmaxes agree; that chained figure is reported too.
"""
import torch

from aurora.models.draft import Eagle3Draft
from aurora.sample import Sample
from aurora.training.ttt import batch_target, collate, ttt_forward


@torch.no_grad()
def simulated_acceptance(draft: Eagle3Draft, samples: list[Sample], lm_head: torch.Tensor | None, ttt_length: int,
                         target_to_draft: torch.Tensor, device="cpu") -> dict:
    """Returns accept_length (sampling, expected tokens per round), greedy_accept_length, and step_accept
    (mean a_k per step over trained positions). Positions count where all K steps have a target."""
    K = ttt_length
    batch = collate(samples, K, target_to_draft, device)
    B, L = batch.shape
    tdist = batch_target(batch, draft, lm_head)
    p = tdist.full_probs().view(B, L, -1)
    p_pad = torch.cat([p, p.new_zeros(B, K, p.shape[-1])], 1)                   # rows beyond L: no target
    # greedy target choice as a draft id, -1 where the target's argmax lies outside the draft vocabulary
    t_arg = torch.where(tdist.in_vocab.view(B, L), p.argmax(-1), -1)
    t_arg = torch.cat([t_arg, t_arg.new_full((B, K), -1)], 1)
    valid = torch.stack([batch.target_mask[:, 1 + k:1 + k + L] for k in range(K)])  # [K,B,L]
    acc, greedy = [], []
    for k, (_, logits) in enumerate(ttt_forward(draft, batch, K)):
        q = logits.float().softmax(-1)
        acc.append(torch.minimum(p_pad[:, 1 + k:1 + k + L], q).sum(-1))        # [B,L]
        greedy.append((logits.argmax(-1) == t_arg[:, 1 + k:1 + k + L]).float())
    acc, greedy = torch.stack(acc), torch.stack(greedy)                          # [K,B,L]
    full = valid.all(0)                                                          # [B,L]
    n = full.sum().clamp_min(1)
    chain = lambda a: (a.cumprod(0).sum(0) * full).sum() / n  # noqa: E731
    step = [float((acc[k] * valid[k]).sum() / valid[k].sum().clamp_min(1)) for k in range(K)]
    return {"accept_length": 1.0 + float(chain(acc)), "greedy_accept_length": 1.0 + float(chain(greedy)),
            "step_accept": step, "positions": int(full.sum())}


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
