"""A training sample: what one finished request leaves for the trainer. Plain data, shared by engine and trainer.

Token alignment (REFERENCE.md §1): draft position t reads (embed(x[t+1]), aux[t]) and predicts x[t+2].
The target's distribution is kept as its final normed hidden state per position (H values instead of V):
the trainer recomputes target logits with the frozen target LM head, exactly, at a fraction of the bytes.
An engine that cannot expose that state (SGLang keeps only the aux states) leaves target_hidden None: the
trainer then learns from the target's own next tokens (one-hot targets: the argmax under greedy serving,
a draw from the target's distribution under sampling, so cross-entropy still estimates KL(target||draft)),
or, where the engine captured them, from the target's K most likely tokens with their logits and the
log-sum-exp over the whole vocabulary (target_topk_*: SGLang's verify logits, a row per verified position;
positions without them, such as prompt positions, stay one-hot).
"""
import random
from dataclasses import dataclass, field

import torch

TOPK_FIELDS = ("target_topk_ids", "target_topk_logits", "target_lse")  # row-aligned with aux_hidden, or all None


@dataclass
class Sample:
    request_id: str
    token_ids: torch.Tensor      # [T] int64: prompt + completion
    prompt_len: int
    aux_hidden: torch.Tensor     # [T-1, 3H] target aux hidden states at positions 0..T-2 (the last token was never fed)
    target_hidden: torch.Tensor | None  # [T-1, H] final normed hidden at 0..T-2 (lm_head(.) predicts x[t+1])
                                        # None: one-hot targets (see above)
    loss_mask: torch.Tensor      # [T] bool: token positions whose prediction is trained
    # speculative rounds while serving: round r fed x[round_start[r]] then proposals[r] (target ids) to the
    # target; proposals[r, j] was a guess for token index round_start[r] + 1 + j; the first accepted[r]
    # were accepted, proposals[r, accepted[r]] (if accepted[r] < k) was rejected by the target. A tree round
    # records its accepted path, then the best-scored child the target rejected at the next depth (-1 where
    # its pruned tree had no child there: nothing was proposed, nothing rejected).
    round_start: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [R]
    proposals: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))  # [R, k]
    accepted: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))      # [R]
    draft_version: int = 0
    greedy: bool = True
    # the target's top K at positions 0..T-2 (row t: its distribution of x[t+1]), only without target_hidden
    target_topk_ids: torch.Tensor | None = None     # [T-1, K] int32 target ids, -1 in rows without them
    target_topk_logits: torch.Tensor | None = None  # [T-1, K] float logits of those ids
    target_lse: torch.Tensor | None = None          # [T-1] float32 log-sum-exp of the row's full logits

    def __post_init__(self):
        T = self.token_ids.numel()
        target_rows = T - 1 if self.target_hidden is None else self.target_hidden.shape[0]
        if self.aux_hidden.shape[0] != T - 1 or target_rows != T - 1:
            raise ValueError(f"sample {self.request_id}: hidden states must cover T-1={T - 1} positions, got "
                             f"{self.aux_hidden.shape[0]} aux and {target_rows} target")
        if self.loss_mask.shape != (T,):
            raise ValueError(f"sample {self.request_id}: loss_mask must be [{T}]")
        topk = [getattr(self, f) for f in TOPK_FIELDS]
        if any(t is not None for t in topk):
            ids, logits, lse = topk
            if self.target_hidden is not None or ids is None or logits is None or lse is None \
                    or ids.dim() != 2 or ids.shape[0] != T - 1 or logits.shape != ids.shape or lse.shape != (T - 1,):
                raise ValueError(f"sample {self.request_id}: target_topk_ids/logits [T-1, K] and target_lse [T-1] "
                                 f"come together, without target_hidden")

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.token_ids, self.aux_hidden, self.target_hidden,
                                                          self.loss_mask, self.round_start, self.proposals,
                                                          self.accepted, *(getattr(self, f) for f in TOPK_FIELDS))
                   if t is not None)


def sampled(rng: random.Random, sample_rate: float, pacer=None) -> bool:
    """Whether an arriving request will leave a sample (either engine decides at admission, so an unsampled one
    costs serving no copy): with chance sample_rate times the capture pacer's rate (aurora/training/pacing.py)."""
    return rng.random() < sample_rate * (pacer.rate() if pacer is not None else 1.0)
