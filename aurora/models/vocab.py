"""Draft vocabulary map: keep the N most frequent target tokens (SpecForge's rule: counted under the loss
mask, ties broken by id, kept ids sorted ascending) and express it as d2t offsets and a t2d mask."""
import torch


def build_vocab_map(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [V] token frequencies -> (d2t [Vd] int64 offsets, t2d [V] bool)."""
    V = counts.numel()
    if not 0 < draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be in (0, {V}], got {draft_vocab_size}")
    if draft_vocab_size == V:  # no pruning: identity map
        return torch.zeros(V, dtype=torch.long), torch.ones(V, dtype=torch.bool)
    # stable descending sort: equal counts keep ascending id order
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    kept = torch.sort(order[:draft_vocab_size]).values
    d2t = kept - torch.arange(draft_vocab_size)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[kept] = True
    return d2t, t2d


def count_tokens(token_lists, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_lists:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=vocab_size)
    return counts
