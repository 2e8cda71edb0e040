"""Day-0 draft vocabulary from the first captured samples.

The map (d2t/t2d) must be fixed before training starts and never changed by a publish: SGLang copies d2t
into its `hot_token_id` once at start-up, and the draft's lm_head rows mean "these token ids" — a new map
would need a restart of the engine's draft, not a weight copy. So: collect a first batch of samples
(or an offline corpus), call this once, `draft.set_vocab_map(d2t, t2d)`, then build the trainer.
"""
import torch

from aurora.models.vocab import build_vocab_map, count_tokens
from aurora.sample import Sample


def vocab_from_samples(samples: list[Sample], draft_vocab_size: int, vocab_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecForge's rule: count target tokens under the loss mask, keep the most frequent, sorted ascending.
    Returns (d2t [draft_vocab_size] int64 offsets, t2d [vocab_size] bool)."""
    counts = count_tokens((s.token_ids[s.loss_mask.bool()] for s in samples), vocab_size)
    return build_vocab_map(counts, draft_vocab_size)
