"""Training-time test (TTT): unroll the draft K steps over a padded batch of samples, as SpecForge does.

Alignment (REFERENCE.md §1, aurora/sample.py). A sample of T tokens gives L = T-1 draft positions.
  step 0, position t: g = fc(aux[t]), input token x[t+1]           -> predicts x[t+2]
  step k, position t: g = step k-1's pre-norm output at t, input x[t+1+k] -> predicts x[t+2+k]
Step k at t therefore learns from the target distribution at position t+1+k (target_hidden[t+1+k]), and is
trained where loss_mask[t+2+k] holds and that target's argmax is inside the draft vocabulary. Step k runs at
rotary position t+k, as serving runs it (the chain's step k after the extend at n-1 sits at position n-1+k:
aurora/engine/model_runner.py, SGLang) and as SpecForge trains it (position_ids + k): with position t at
every step, a step-k query would see its own earlier steps' keys at relative distance 0 and the context at
distances serving never shows.
Attention (SpecForge's cache_hidden path): a query of step k at t sees step-0 keys at positions <= t
(causal, padding masked) plus the keys of steps 1..k at the same position t (the "diagonal"); one softmax
over all of them.
Rejected proposals: round r fed x[s] (s = round_start[r]) then proposals[r]; proposal j guessed token index
s+1+j; a = accepted[r] < k means x = proposals[r, a] was rejected at token index i = s+1+a. The TTT row that
reproduces what the serving draft saw is step a at position s-1 (context up to s-1, then the accepted tokens
as inputs); we penalise x there when a < K, and also at the step-0 row t = i-2 (full true context) when a > 0.
"""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from aurora.models.draft import Eagle3Draft
from aurora.sample import Sample
from aurora.training.loss import (TargetDist, divergence, one_hot_distribution, rejection_term, target_distribution,
                                  with_topk)


@dataclass
class TTTBatch:
    ids: torch.Tensor            # [B, L+K] ids[b, i] = x[i+1] (step k reads ids[:, k:k+L]), 0 where absent
    aux: torch.Tensor            # [B, L, 3Ht]
    positions: torch.Tensor      # [B, L]
    key_valid: torch.Tensor      # [B, L] bool, t < L_b
    target_hidden: torch.Tensor | None  # [B*L, H] row b*L+i = target state at position i (predicts x[i+1]);
                                        # None: one-hot targets from the tokens (see aurora/sample.py)
    target_mask: torch.Tensor    # [B, L+K] bool: row i exists and loss_mask[i+1] (in-vocab applied by the loss)
    target_rows: torch.Tensor | None  # [M] long: the rows b*L+i with target_mask[b, i], the only target rows the
                                      # loss and the guard read (found on the host: no device sync); None one-hot
    step_rows: torch.Tensor      # [R] long: the rows k*B*L + b*L + t of the K unrolled steps whose target row
                                 # t+1+k exists (target_mask), the only ones the loss can weigh (found on the host)
    step_weight: torch.Tensor    # [R] float: 1, or 0 for padding (row 0 again: a batch with no step row, or a
                                 # fixed-shape batch's padding)
    reject_rows: torch.Tensor    # [R, 3] (step, b, t) rows that proposed a rejected token
    reject_token: torch.Tensor   # [R] draft id of the rejected token
    reject_weight: torch.Tensor  # [R] float: 1, or 0 for the padding of a fixed-shape batch
    num_tokens: int
    topk: tuple | None = None    # one-hot batches: (ids [B*L, K] target ids, -1 where none; logits [B*L, K];
                                 # lse [B*L]), the target's top K where the samples carry it (aurora/sample.py)

    @property
    def shape(self) -> tuple[int, int]:
        return self.aux.shape[0], self.aux.shape[1]


def trainable(samples: list[Sample]) -> list[Sample]:
    """The samples a TTTBatch holds, in order: those with >= 3 tokens (at least one predicted token)."""
    return [s for s in samples if s.num_tokens >= 3]


def collate(samples: list[Sample], ttt_length: int, target_to_draft: torch.Tensor, device="cpu",
            shape: tuple[int, int] | None = None, pad_rows=None) -> TTTBatch:
    """Right-pad trainable(samples) into a TTTBatch. target_to_draft [V] long: draft id of each target id, -1 if
    absent.
    shape (B, L) and pad_rows (a count -> a count >= it): a batch whose every tensor has a size from a short list,
    what a CUDA graph replays (aurora/training/graphed.py). Rows past the samples are padding (keys valid, so their
    attention is finite; no target); the step, target and rejected-proposal rows are padded to pad_rows(count) with
    row 0 at weight 0 (a target row is only read where a step row of weight > 0 points). Raises ValueError when
    the samples do not fit the shape."""
    samples = trainable(samples)
    if not samples:
        raise ValueError("no sample with >= 3 tokens")
    K, B = ttt_length, len(samples)
    L = max(s.num_tokens - 1 for s in samples)
    if shape is not None:
        if B > shape[0] or L > shape[1]:
            raise ValueError(f"{B} samples of up to {L} positions do not fit the shape {shape}")
        B, L = shape
    s0 = samples[0]
    # States kept on the trainer's GPU by its engine are batched there. They were made on the engine's stream and are
    # read here on this thread's: the callers (train_step, the guard) hold the samples until they have read their
    # results on the host, so no block is freed, and reused by the engine, while a read is queued. record_stream
    # would tie the blocks to the trainer's stream instead, whose green context may be gone before the last sample is
    # freed (CUDA then aborts the process).
    sdev = s0.aux_hidden.device
    ids = torch.zeros(B, L + K, dtype=torch.long)
    aux = torch.zeros(B, L, s0.aux_hidden.shape[1], dtype=s0.aux_hidden.dtype, device=sdev)
    one_hot = any(s.target_hidden is None for s in samples)
    th = None if one_hot else torch.zeros(B, L, s0.target_hidden.shape[1], dtype=s0.target_hidden.dtype, device=sdev)
    key_valid = torch.zeros(B, L, dtype=torch.bool)
    key_valid[len(samples):] = True  # padding rows of a fixed shape: keys to attend, no target (no NaN to mask)
    target_mask = torch.zeros(B, L + K, dtype=torch.bool)
    kt = max((s.target_topk_ids.shape[1] for s in samples if s.target_topk_ids is not None), default=0)
    topk = None
    if one_hot and kt:
        topk = (torch.full((B, L, kt), -1, dtype=torch.int32), torch.zeros(B, L, kt), torch.zeros(B, L))
    rows, toks = [], []
    for b, s in enumerate(samples):
        n = s.num_tokens - 1
        ids[b, :n] = s.token_ids[1:]
        aux[b, :n] = s.aux_hidden
        if th is not None:
            th[b, :n] = s.target_hidden
        if topk is not None and s.target_topk_ids is not None:
            k = s.target_topk_ids.shape[1]
            topk[0][b, :n, :k], topk[1][b, :n, :k] = s.target_topk_ids, s.target_topk_logits
            topk[2][b, :n] = s.target_lse
        key_valid[b, :n] = True
        target_mask[b, :n] = s.loss_mask[1:].bool()
        for start, props, a in zip(s.round_start.tolist(), s.proposals.tolist(), s.accepted.tolist()):
            if a >= len(props):
                continue
            i = start + 1 + a  # token index of the rejected guess
            x = props[a]
            if x < 0 or i >= s.num_tokens or x == int(s.token_ids[i]) or target_to_draft[x] < 0:
                continue  # not a real rejection (none proposed there, or outside the draft vocabulary: q(x) is 0)
            cand = [(a, start - 1)] if a < K else []
            if a > 0:
                cand.append((0, i - 2))
            for k, t in cand:
                if 0 <= t < n and t + 1 + k < n:
                    rows.append((k, b, t))
                    toks.append(int(target_to_draft[x]))
    # a batch of unequal lengths is padded to its longest (the trainer packs similar lengths together, and chat
    # batches still pad about a third): only the step rows with a target pay for the LM head and the divergence,
    # the largest part of a step
    step_rows = torch.stack([target_mask[:, 1 + k:1 + k + L] for k in range(K)]).reshape(-1).nonzero().squeeze(1)
    target_rows = target_mask[:, :L].reshape(-1).nonzero().squeeze(1)
    # each row set is padded with row 0 at weight 0: to pad_rows(count) for a fixed shape, and the step rows always
    # to at least one (with nothing to learn here, that row keeps the loss a graph of the draft)
    pad = pad_rows or (lambda n: n)
    rejected, real_steps = len(rows), step_rows.numel()
    rows += [(0, 0, 0)] * (pad(rejected) - rejected)
    toks += [0] * (len(rows) - len(toks))
    step_rows = _padded(step_rows, pad(max(real_steps, 1)))
    target_rows = _padded(target_rows, pad(target_rows.numel()))
    step_weight = (torch.arange(step_rows.numel()) < real_steps).float()
    reject_weight = (torch.arange(len(rows)) < rejected).float()
    to = _uploader(device)
    return TTTBatch(ids=to(ids), aux=to(aux),
                    positions=torch.arange(L, device=device).expand(B, L), key_valid=to(key_valid),
                    target_hidden=None if th is None else to(th.reshape(B * L, -1)),
                    target_mask=to(target_mask),
                    target_rows=None if th is None else to(target_rows),
                    step_rows=to(step_rows), step_weight=to(step_weight),
                    reject_rows=to(torch.tensor(rows, dtype=torch.long).reshape(-1, 3)),
                    reject_token=to(torch.tensor(toks, dtype=torch.long)),
                    reject_weight=to(reject_weight),
                    num_tokens=sum(s.num_tokens for s in samples),
                    topk=None if topk is None else tuple(to(t.reshape(B * L, *t.shape[2:])) for t in topk))


def _padded(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([index, index.new_zeros(n - index.numel())])


def _uploader(device):
    """Host -> device copies for a batch (a tensor already there stays). To a GPU from pinned memory without
    waiting: a copy from pageable memory synchronises the stream first, and under a GPU shared with serving every
    sync waits its turn."""
    if torch.device(device).type != "cuda":
        return lambda t: t.to(device)
    return lambda t: t.to(device) if t.is_cuda else t.pin_memory().to(device, non_blocking=True)


ATTN_CHUNK = 1024  # queries per attention chunk: longer samples are attended chunk by chunk, recomputed in backward


def _attend_chunk(q, k0, v0, key_valid, q_start: int, *diag):
    """Queries q [B,nh,C,hd] at positions q_start.. against step-0 keys/values [B,nh,K0,hd] (K0 = q_start + C:
    later keys are causally invisible) and each later step's key/value at the query's own position (diag:
    n keys [B,nh,C,hd], then n values). One softmax over all of them (SpecForge's cache_hidden attention)."""
    n = len(diag) // 2
    C, K0 = q.shape[2], k0.shape[2]
    causal = torch.arange(K0, device=q.device)[None, :] <= torch.arange(q_start, q_start + C, device=q.device)[:, None]
    visible = (causal[None] & key_valid[:, None, :K0])[:, None]          # [B,1,C,K0]
    scores = (q @ k0.transpose(2, 3)).masked_fill(~visible, float("-inf"))
    extra = [(q * kj).sum(-1, keepdim=True) for kj in diag[:n]]          # each [B,nh,C,1]
    probs = torch.cat([scores, *extra], dim=-1).float().softmax(-1).to(q.dtype)
    out = probs[..., :K0] @ v0
    for j, vj in enumerate(diag[n:]):
        out = out + probs[..., K0 + j, None] * vj
    return out


class TTTAttend:
    """The `attend` callable for the draft's attention during TTT. Holds the keys/values of earlier steps.
    Plain matmul + softmax, queries in chunks of `chunk`: a sample longer than one chunk never holds a
    [L, L] score tensor (each chunk's scores are recomputed in backward), so memory stays O(chunk * L)."""

    def __init__(self, key_valid: torch.Tensor, chunk: int = ATTN_CHUNK):
        self.key_valid, self.chunk = key_valid, chunk
        self.cache: dict[int, tuple[list, list]] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B,T,nh,hd], k/v [B,T,nkv,hd] of the current step
        keys, values = self.cache.setdefault(layer, ([], []))
        rep = q.shape[2] // k.shape[2]
        keys.append(k.repeat_interleave(rep, dim=2).transpose(1, 2))    # [B,nh,T,hd]
        values.append(v.repeat_interleave(rep, dim=2).transpose(1, 2))
        q = q.transpose(1, 2) * q.shape[-1] ** -0.5                        # [B,nh,T,hd]
        T = q.shape[2]
        recompute = T > self.chunk and torch.is_grad_enabled()
        outs = []
        for i0 in range(0, T, self.chunk):
            i1 = min(T, i0 + self.chunk)
            args = (q[:, :, i0:i1], keys[0][:, :, :i1], values[0][:, :, :i1], self.key_valid, i0,
                    *[kj[:, :, i0:i1] for kj in keys[1:]], *[vj[:, :, i0:i1] for vj in values[1:]])
            # no RNG to replay (and saving the CUDA generator's state cannot be captured in a CUDA graph)
            outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False, preserve_rng_state=False) if recompute
                        else _attend_chunk(*args))
        return torch.cat(outs, 2).transpose(1, 2)  # [B,T,nh,hd]


def ttt_forward(draft: Eagle3Draft, batch: TTTBatch, ttt_length: int, with_logits: bool = True,
                attn_chunk: int = ATTN_CHUNK, position_step: int = 1):
    """Returns per step (pre-norm hidden [B,L,H], logits [B,L,Vd] or None without with_logits).
    position_step: step k runs at rotary position t + k * position_step; 1 is how serving runs it, 0 (every step
    at t) exists only to measure what that alignment is worth (scripts/sweep_train.py positions=fixed)."""
    B, L = batch.shape
    attend = TTTAttend(batch.key_valid, attn_chunk)
    g = draft.project(batch.aux)
    out = []
    for k in range(ttt_length):
        h, logits = draft(batch.ids[:, k:k + L], g, batch.positions + k * position_step, attend, with_logits)
        out.append((h, logits))
        g = h
    return out


def batch_target(batch: TTTBatch, draft: Eagle3Draft, lm_head: torch.Tensor | None) -> TargetDist:
    """The target distribution at every row b*L+i: from the target's final states through its LM head, or
    when the samples carry no final states, the target's top K where captured and elsewhere one-hot at the next
    token x[i+1] = ids[b, i]."""
    d2t_ids = torch.arange(draft.config.draft_vocab_size, device=draft.d2t.device) + draft.d2t
    if batch.target_hidden is None:
        B, L = batch.shape
        next_ids = batch.ids[:, :L].reshape(-1)
        d2t_ids = d2t_ids.to(batch.ids.device)
        dist = one_hot_distribution(next_ids, d2t_ids, draft.config.vocab_size)
        return dist if batch.topk is None else with_topk(dist, *batch.topk, d2t_ids, draft.config.vocab_size)
    return target_distribution(batch.target_hidden, lm_head, d2t_ids, rows=batch.target_rows)


def step_masks(batch: TTTBatch, tdist: TargetDist, ttt_length: int) -> torch.Tensor:
    """[K, B, L] bool: step k at t is trained (target row t+1+k valid, in-vocab argmax)."""
    B, L = batch.shape
    in_vocab = torch.zeros(B, L + ttt_length, dtype=torch.bool, device=batch.ids.device)
    in_vocab[:, :L] = tdist.in_vocab.view(B, L)
    ok = batch.target_mask & in_vocab
    return torch.stack([ok[:, 1 + k:1 + k + L] for k in range(ttt_length)])


def target_rows(batch: TTTBatch, ttt_length: int) -> torch.Tensor:
    """[K*B*L] index into the flattened target rows (b*L + t+1+k, clamped; masked rows are weighted 0)."""
    B, L = batch.shape
    dev = batch.ids.device
    t = torch.arange(L, device=dev)
    idx = [torch.arange(B, device=dev)[:, None] * L + (t + 1 + k).clamp_max(L - 1) for k in range(ttt_length)]
    return torch.stack(idx).reshape(-1)


def ttt_loss(draft: Eagle3Draft, batch: TTTBatch, lm_head: torch.Tensor, objective: str, ttt_length: int,
             step_decay: float, reject_weight: float, position_step: int = 1):
    """Returns (loss, loss_per_step [K], acc_per_step [K]) for one batch; the last two detached tensors (no
    host sync here: the trainer reads everything in one).
    loss = sum_k decay^k * mean_k(div) + reject_weight * sum(-log(1-q(x))) / (trained step-0 rows)."""
    K = ttt_length
    tdist = batch_target(batch, draft, lm_head)
    steps = ttt_forward(draft, batch, K, with_logits=False, position_step=position_step)
    masks = step_masks(batch, tdist, K).float()                         # [K,B,L]
    counts = masks.flatten(1).sum(1).clamp_min(1.0)                      # [K]
    decay = step_decay ** torch.arange(K, device=masks.device, dtype=torch.float32)
    weight = (masks * (decay / counts)[:, None, None]).reshape(-1)       # [K*B*L]
    h = torch.cat([draft.norm(hk) for hk, _ in steps]).reshape(-1, steps[0][0].shape[-1])  # step-major rows
    rows = batch.step_rows  # every row of weight > 0 among them: the sums below are those over all K*B*L rows
    w, m = weight[rows] * batch.step_weight, masks.reshape(-1)[rows] * batch.step_weight  # padding counts nothing
    loss, div, match = divergence(h[rows], draft.lm_head.weight, tdist.logits, target_rows(batch, K)[rows], w,
                                  objective)
    B, L = batch.shape
    step = rows // (B * L)
    loss_per_step = masks.new_zeros(K).index_add_(0, step, div.detach() * m) / counts
    acc_per_step = masks.new_zeros(K).index_add_(0, step, match.float() * m) / counts
    if reject_weight > 0 and batch.reject_rows.numel():
        k, b, t = batch.reject_rows.unbind(1)
        rej = rejection_term(h[k * B * L + b * L + t], draft.lm_head.weight, batch.reject_token)
        loss = loss + reject_weight * (rej * batch.reject_weight).sum() / counts[0]
    return loss, loss_per_step, acc_per_step
