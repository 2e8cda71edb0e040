"""Sampling at the edges of what float32 holds: a top_p too small for float32 (it reads 0) keeps the most likely
token (top-p's definition for any top_p > 0), instead of emptying the distribution into NaNs."""
import torch

from aurora.engine.sampling import probs


def test_top_p_underflowing_float32_keeps_the_top_token():
    logits = torch.tensor([[[0.5, 3.0, -1.0, 2.0]]])
    for top_p in (5e-324, 1e-46, 1e-30):
        p = probs(logits, torch.tensor([1.0]), torch.tensor([top_p], dtype=torch.float32), torch.tensor([0]))
        assert torch.equal(p, torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])), (top_p, p)
    # an ordinary top_p is unchanged: the smallest set whose mass reaches it
    p = probs(logits, torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([0]))
    full = torch.softmax(logits[0, 0], -1)
    want = torch.where(torch.tensor([False, True, False, True]), full, 0.0)
    assert torch.allclose(p[0, 0], want / want.sum())
