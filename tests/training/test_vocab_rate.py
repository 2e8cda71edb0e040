"""Day-0 vocabulary from samples (counted under the loss mask), and invalid samples refused. Which requests leave a
sample is the engine's choice at admission (tests/engine/test_capture.py)."""
import torch

from aurora.training import OnlineTrainer, TrainConfig, vocab_from_samples
from conftest import make_draft
from test_buffer import sample


def test_vocab_counts_only_trained_tokens():
    s = sample(0, T=6)
    s.token_ids = torch.tensor([9, 9, 9, 3, 3, 5])
    s.loss_mask = torch.tensor([False, False, False, True, True, True])  # the prompt's 9s do not count
    d2t, t2d = vocab_from_samples([s], 2, 10)
    assert t2d.nonzero().flatten().tolist() == [3, 5]
    assert (torch.arange(2) + d2t).tolist() == [3, 5]


def test_every_offered_sample_is_kept_and_invalid_ones_refused(target, samples):
    tr = OnlineTrainer(make_draft(target, samples), target.lm_head.weight,
                       TrainConfig(heldout_every=0), lambda s, v, acc: None)
    kept = sum(tr.add_sample(samples[i % len(samples)]) for i in range(40))
    assert kept == 40 and tr.status()["samples_captured"] == kept
    assert not tr.add_sample(sample(0, H=8))  # wrong hidden size: refused, counted, never reaches training
    assert tr.status()["samples_invalid"] == 1
