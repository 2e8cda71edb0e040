"""Loss pieces for draft training: the target distribution over the draft vocabulary, the divergence
(through aurora_kernels' fused LM head + divergence, one call for all TTT steps), and the rejected-proposal
term. Pure tensor functions; the TTT module decides which rows they see.

Divergences (p = target restricted to the draft vocabulary and renormalised, q = draft):
  fkl = KL(p || q)  (Aurora's and SpecForge's soft cross-entropy minus H(p): same gradient), the default
  rkl = KL(q || p)  (target zeros floored at exp(-20) by the kernel)
  tv  = 0.5 * sum |p - q|  (1 - tv is the acceptance probability of lossless speculative sampling)
Rejected-proposal term (the Aurora paper's "learn from rejections", absent from its released code): where the
target rejected a drafted token x, add -log(1 - q(x)) at the draft row that proposed it, lowering q(x).
"""
from dataclasses import dataclass

import torch
from aurora_kernels import fused_linear_divergence

OBJECTIVES = ("fkl", "rkl", "tv")


@dataclass
class TargetDist:
    logits: torch.Tensor    # [N, Vd] fp32 target logits at the draft vocabulary's ids (draft-id order)
    lse_full: torch.Tensor  # [N] fp32 logsumexp over the target's whole vocabulary
    in_vocab: torch.Tensor  # [N] bool, the target's argmax lies inside the draft vocabulary

    def full_probs(self) -> torch.Tensor:
        """[N, Vd] target probabilities of the draft-vocabulary tokens under the full softmax (not renormalised):
        what lossless verification compares the draft against."""
        return (self.logits - self.lse_full[:, None]).exp()


@torch.no_grad()
def target_distribution(target_hidden: torch.Tensor, lm_head: torch.Tensor, draft_to_target: torch.Tensor,
                        chunk_rows: int = 1024, rows: torch.Tensor | None = None) -> TargetDist:
    """target_hidden [N, H] final normed target states, lm_head [V, H], draft_to_target [Vd] target ids.
    `rows` [M] long: the only rows ever read (the others are padding or outside the loss); they alone pay for the
    [., V] product, the largest cost of a step on a CPU, and the rest get logits -1e4 with lse 0 (every
    probability 0) and no in-vocabulary argmax. Chunked so only a [chunk, V] slice of full logits exists at once."""
    N, Vd = target_hidden.shape[0], draft_to_target.numel()
    hidden = target_hidden if rows is None else target_hidden[rows]
    t2d = torch.zeros(lm_head.shape[0], dtype=torch.bool, device=lm_head.device)
    t2d.index_fill_(0, draft_to_target, True)  # not an index_put of a host scalar: no host copy (CUDA graphs)
    parts = []
    for s in range(0, hidden.shape[0], chunk_rows):
        full = (hidden[s:s + chunk_rows].to(lm_head.dtype) @ lm_head.t()).float()  # [c, V]
        sub = full[:, draft_to_target]
        top, arg = full.max(-1)
        lse = full.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)  # in place: no second [c, V] buffer
        parts.append((sub, lse, t2d[arg]))
    dev = lm_head.device
    if parts:
        logits, lse, in_vocab = (torch.cat(p) for p in zip(*parts))
    else:
        logits, lse = lm_head.new_zeros(0, Vd, dtype=torch.float32), lm_head.new_zeros(0, dtype=torch.float32)
        in_vocab = torch.zeros(0, dtype=torch.bool, device=dev)
    if rows is None:
        return TargetDist(logits, lse, in_vocab)
    out = TargetDist(torch.full((N, Vd), -1e4, device=dev), torch.zeros(N, device=dev),
                     torch.zeros(N, dtype=torch.bool, device=dev))
    out.logits[rows], out.lse_full[rows], out.in_vocab[rows] = logits, lse, in_vocab
    return out


@torch.no_grad()
def one_hot_distribution(next_ids: torch.Tensor, draft_to_target: torch.Tensor, vocab_size: int) -> TargetDist:
    """The target distribution as its own next token (samples without target_hidden): next_ids [N] target ids.
    Logits 0 at the token and -1e4 elsewhere give an exact one-hot softmax in fp32 (fkl = cross-entropy)."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_to_target.device)
    t2d[draft_to_target] = torch.arange(draft_to_target.numel(), device=draft_to_target.device)
    d = t2d[next_ids.to(t2d.device)]
    logits = torch.full((next_ids.numel(), draft_to_target.numel()), -1e4, device=t2d.device)
    logits[d >= 0, d[d >= 0]] = 0.0
    return TargetDist(logits, torch.zeros(next_ids.numel(), device=t2d.device), d >= 0)


@torch.no_grad()
def with_topk(base: TargetDist, topk_ids: torch.Tensor, topk_logits: torch.Tensor, lse: torch.Tensor,
              draft_to_target: torch.Tensor, vocab_size: int) -> TargetDist:
    """`base` (one-hot rows) with the rows that carry the target's top K replaced by them: topk_ids [N, K] target
    ids (-1 in rows without), topk_logits [N, K], lse [N] over the full vocabulary. Such a row's logits are the K
    tokens' (the rest at -1e4, so the draft-vocabulary softmax is the top K renormalised) and its full_probs the
    K tokens' exact probabilities; its argmax is the top-1 token."""
    dev = base.logits.device
    topk_ids, topk_logits, lse = topk_ids.to(dev), topk_logits.to(dev), lse.to(dev)
    rows = topk_ids[:, 0] >= 0
    if not bool(rows.any()):
        return base
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=dev)
    t2d[draft_to_target] = torch.arange(draft_to_target.numel(), device=dev)
    ids = topk_ids[rows].long()
    d = torch.where(ids >= 0, t2d[ids.clamp_min(0)], -1)                       # [n, K] draft ids, -1 outside
    part = torch.full((d.shape[0], base.logits.shape[1] + 1), -1e4, device=dev)  # a spare column takes the -1s
    part.scatter_(1, torch.where(d >= 0, d, part.shape[1] - 1), topk_logits[rows].float())
    logits, lse_full, in_vocab = base.logits.clone(), base.lse_full.clone(), base.in_vocab.clone()
    logits[rows] = part[:, :-1]
    lse_full[rows] = lse[rows].float()
    in_vocab[rows] = d[:, 0] >= 0
    return TargetDist(logits, lse_full, in_vocab)


def divergence(h: torch.Tensor, lm_head_weight: torch.Tensor, target_logits: torch.Tensor,
               target_index: torch.Tensor, row_weight: torch.Tensor, objective: str):
    """The one adapter to aurora_kernels: h [R, H] normed draft states (rows of every TTT step),
    lm_head_weight [Vd, H] (the draft's, trainable), target_logits [M, Vd], target_index [R] into M,
    row_weight [R] (0 masks). Returns (loss = sum_r w_r div_r, per-row divergence [R], argmax match [R])."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if torch.is_autocast_enabled(h.device.type):  # a custom op autocast does not reach: its GEMMs in that dtype too
        dtype = torch.get_autocast_dtype(h.device.type)
        h, lm_head_weight = h.to(dtype), lm_head_weight.to(dtype)
    out = fused_linear_divergence(h, lm_head_weight, target_logits, kind="logits", objective=objective,
                                  row_weight=row_weight, target_index=target_index, reduction="sum")
    return out.loss, out.row_divergence, out.argmax_match


def rejection_term(h: torch.Tensor, lm_head_weight: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """h [R, H] normed draft states of the rows that proposed a rejected token, token [R] its draft id.
    Returns [R] -log(1 - q(token)) (differentiable), computed as -log(-expm1(log q)) for stability."""
    logq = torch.log_softmax((h @ lm_head_weight.t()).float(), -1).gather(1, token[:, None]).squeeze(1)
    return -torch.log(-torch.expm1(logq.clamp_max(-1e-6)))
