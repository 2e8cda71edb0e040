"""Swap guard: score a draft on held-out samples by its simulated acceptance, and vet candidates.

Under lossless speculative sampling the draft's k-th token is accepted with probability
a_k = sum_x min(p(x), q_k(x)) (p: the target's full softmax, q: the draft's over its vocabulary), given the
earlier ones were. TTT step k at position t conditions on the true tokens, i.e. on acceptance of steps
< k, so the expected tokens per verify round from position t is 1 + sum_k prod_{j<=k} a_j(t) (the 1 is the
bonus/correction token). Greedy serving accepts iff argmaxes agree; that chained figure is reported too.

Both are averages over positions, which is not what the engine reports (completion tokens / verify rounds):
a round that starts in an easy stretch covers several positions at once, so positions overweight long
chains: on chat the position average reads well above what the engine served (scripts/sweep_train.py;
docs/measurements.md). For greedy serving the engine's figure can be replayed exactly: walk each completion
round by round from the prefill token, accept the draft's leading argmaxes that equal the served next tokens,
move on by accepted + 1 (`served_greedy_accept_length`). The guard compares candidate and live on one measure,
so its bias cancels there.
"""
import contextlib

import torch

from aurora.models.draft import Eagle3Draft
from aurora.sample import Sample
from aurora.training.bounds import bound_samples, pack
from aurora.training.ttt import batch_target, collate, trainable, ttt_forward


def simulated_acceptance(draft: Eagle3Draft, samples: list[Sample], lm_head: torch.Tensor | None, ttt_length: int,
                         target_to_draft: torch.Tensor, device="cpu", chunk_tokens: int | None = None,
                         turn=contextlib.nullcontext) -> dict:
    """Returns accept_length (sampling, expected tokens per round), greedy_accept_length, and step_accept
    (mean a_k per step over trained positions). Positions count where all K steps have a target.
    chunk_tokens: the samples are scored in batches of at most this many padded tokens (samples longer than
    that are split into windows, see bounds.py), so memory is bounded whatever the held-out lengths; the
    figures are the same sums as one batch gives, combined exactly. turn: a context each chunk runs inside (the
    trainer's DeviceShare.training, so serving steps between chunks)."""
    return simulated_acceptances(draft, [None], samples, lm_head, ttt_length, target_to_draft, device, chunk_tokens,
                                 turn)[0]


def simulated_acceptances(draft: Eagle3Draft, states: list[dict | None], samples: list[Sample],
                          lm_head: torch.Tensor | None, ttt_length: int, target_to_draft: torch.Tensor, device="cpu",
                          chunk_tokens: int | None = None, turn=contextlib.nullcontext) -> list[dict]:
    """simulated_acceptance of several weights on the same samples, one result per state: each chunk's target
    distribution (the target's LM head over its whole vocabulary, the larger part of a pass for a small draft)
    is computed once and every state is loaded into `draft` in turn to score it (None: `draft` as it is)."""
    K = ttt_length
    if chunk_tokens is None:
        groups = [trainable(samples)]
    else:
        items, _, _ = bound_samples(trainable(samples), chunk_tokens)
        groups = [[s for _, s in g] for g in pack(items, chunk_tokens)]
    if not groups or not groups[0]:
        raise ValueError("no sample with >= 3 tokens")
    totals = [None] * len(states)
    for group in groups:
        with turn():
            parts = _acceptance_sums(draft, states, group, lm_head, K, target_to_draft, device)
        totals = [p if t is None else {k: t[k] + p[k] for k in t} for t, p in zip(totals, parts)]
    return [_summary(total) for total in totals]


def _summary(total: dict) -> dict:
    n = max(total["positions"], 1)
    return {"accept_length": 1.0 + total["chain"] / n, "greedy_accept_length": 1.0 + total["chain_greedy"] / n,
            "served_greedy_accept_length": total["verified"] / max(total["rounds"], 1),
            "completion_tokens": total["tokens"], "verify_tokens": total["verified"], "rounds": total["rounds"],
            "served_greedy_step_accept": (total["hit"] / total["tried"].clamp_min(1)).tolist(),
            "served_greedy_step_hit": total["hit"].tolist(), "served_greedy_step_tried": total["tried"].tolist(),
            "step_accept": (total["step_sum"] / total["step_count"].clamp_min(1)).tolist(),
            "positions": total["positions"]}


@torch.no_grad()
def _acceptance_sums(draft: Eagle3Draft, states: list[dict | None], samples: list[Sample], lm_head: torch.Tensor | None,
                     K: int, target_to_draft: torch.Tensor, device) -> list[dict]:
    """The sums simulated_acceptance averages, over one batch, per state (float64 on the host, so chunks add
    exactly)."""
    batch = collate(samples, K, target_to_draft, device)
    B, L = batch.shape
    tdist = batch_target(batch, draft, lm_head)
    p = tdist.full_probs().view(B, L, -1)
    p_pad = torch.cat([p, p.new_zeros(B, K, p.shape[-1])], 1)                   # rows beyond L: no target
    # greedy target choice as a draft id, -1 where the target's argmax lies outside the draft vocabulary
    t_arg = torch.where(tdist.in_vocab.view(B, L), p.argmax(-1), -1)
    t_arg = torch.cat([t_arg, t_arg.new_full((B, K), -1)], 1)
    valid = torch.stack([batch.target_mask[:, 1 + k:1 + k + L] for k in range(K)])  # [K,B,L]
    served = target_to_draft.to(batch.ids.device)[batch.ids]                      # [B,L+K] draft id of x[i+1], -1
    full = valid.all(0)                                                          # [B,L]
    chain = lambda a: float((a.cumprod(0).sum(0) * full).double().sum())  # noqa: E731
    out = []
    for state in states:
        if state is not None:
            draft.load_state_dict(state, strict=False)
        acc, greedy, hits = [], [], []
        for k, (_, logits) in enumerate(ttt_forward(draft, batch, K)):
            q = logits.float().softmax(-1)
            acc.append(torch.minimum(p_pad[:, 1 + k:1 + k + L], q).sum(-1))        # [B,L]
            arg = logits.argmax(-1)
            greedy.append((arg == t_arg[:, 1 + k:1 + k + L]).float())
            hits.append(arg == served[:, 1 + k:1 + k + L])  # step k at t guessed the served token x[t+2+k]
        acc, greedy = torch.stack(acc), torch.stack(greedy)                          # [K,B,L]
        tokens, verified, rounds, tried, hit = _walk_rounds(torch.stack(hits).cpu(), trainable(samples), K)
        out.append({"chain": chain(acc), "chain_greedy": chain(greedy), "positions": int(full.sum()),
                    "step_sum": (acc * valid).flatten(1).double().sum(1).cpu(),
                    "step_count": valid.flatten(1).double().sum(1).cpu(), "tokens": tokens, "verified": verified,
                    "rounds": rounds, "tried": torch.tensor(tried, dtype=torch.float64),
                    "hit": torch.tensor(hit, dtype=torch.float64)})
    return out


def _walk_rounds(hits: torch.Tensor, samples: list[Sample], K: int) -> tuple[int, int, int, list[int], list[int]]:
    """Replay greedy serving over each completion: hits [K,B,L] (step k at t guessed x[t+2+k]). The prefill
    emits x[P]; a round after x[m] runs the draft at t = m-1, accepts its leading hits, emits accepted + 1.
    Returns (completion tokens, tokens committed by verify rounds, verify rounds) summed over samples, as the
    engine counts them (the prefill's token is a completion token but no round's), and per depth j the rounds
    that reached it and those that accepted there (the served conditional acceptance that the engine's depth
    decision starts a new version from)."""
    tokens = verified = rounds = 0
    tried, hit = [0] * K, [0] * K
    for b, s in enumerate(samples):
        T, m = s.num_tokens, s.prompt_len
        h = hits[:, b].tolist()
        tokens += T - m
        verified += max(T - m - 1, 0)
        while m < T - 1:
            a = 0
            while a < K and m + a < T - 1:
                tried[a] += 1
                if not h[a][m - 1]:
                    break
                hit[a] += 1
                a += 1
            m, rounds = m + a + 1, rounds + 1
    return tokens, verified, rounds, tried, hit


def predicted_acceptance(sim: dict, pseudo_rounds: float) -> list[float]:
    """The per-position acceptance a new version starts serving from (the engine's depth decision reads it before
    a speculative round has been paid for): the served-greedy walk's hits over its tries plus `pseudo_rounds`
    tries that accepted nothing. A held-out set of a few requests (after a restart it holds only that start's
    samples) then predicts little, and one of thousands of rounds reads as measured."""
    return [h / (t + pseudo_rounds) if t + pseudo_rounds > 0 else 0.0
            for h, t in zip(sim["served_greedy_step_hit"], sim["served_greedy_step_tried"])]


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
