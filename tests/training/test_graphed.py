"""The trainer's graphed step (aurora/training/graphed.py): a fixed-shape batch computes the loss and gradients of
the plain batch (CPU: the same math the graph replays), the trainer's packing always fits a graph shape, and on a
GPU replayed steps train the draft as the eager steps do."""
import math
import random

import pytest
import torch

from aurora.sample import Sample
from aurora.training.bounds import pack
from aurora.training.graphed import bucket_length, graph_shape, length_buckets, pack_length, row_bucket
from aurora.training.ttt import collate, ttt_loss

from conftest import make_draft

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def varied(samples: list[Sample], t2d: torch.Tensor, seed: int = 0) -> list[Sample]:
    """Copies cut to different lengths, each with speculative rounds whose proposals the target rejected (in the
    draft vocabulary and not the token that came), so the rejected-proposal term has rows."""
    rng, out = random.Random(seed), []
    in_vocab = (t2d >= 0).nonzero().squeeze(1).tolist()
    for i, s in enumerate(samples):
        T = rng.randint(12, s.num_tokens)
        starts = list(range(s.prompt_len, T - 4, 4))
        props = [[rng.choice(in_vocab) for _ in range(3)] for _ in starts]
        for r, st in enumerate(starts):
            if r % 2:  # every other round: the first guess was right
                props[r][0] = int(s.token_ids[st + 1])
        out.append(Sample(f"v{i}", s.token_ids[:T].clone(), s.prompt_len, s.aux_hidden[:T - 1].clone(),
                          s.target_hidden[:T - 1].clone(), s.loss_mask[:T].clone(),
                          round_start=torch.tensor(starts, dtype=torch.long),
                          proposals=torch.tensor(props, dtype=torch.long).reshape(-1, 3),
                          accepted=torch.tensor([r % 2 for r in range(len(starts))], dtype=torch.long)))
    return out


def loss_and_grads(draft, batch, lm_head, K=3):
    draft.zero_grad(set_to_none=True)
    loss, per_step, acc = ttt_loss(draft, batch, lm_head, "fkl", K, 0.8, 0.5)
    loss.backward()
    return loss.detach(), per_step, acc, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}


def test_a_fixed_shape_batch_gives_the_plain_batchs_loss_and_gradients(target, samples):
    """What a graph replays: the batch padded to a larger fixed shape (more rows, more positions) with its step,
    target and rejected rows padded by repeating row 0 at weight 0, gives the loss, per-step statistics and
    gradients of the batch padded only to its longest sample. A padding row that attended to no key would turn
    every sum to NaN; a padding step row that counted would count row 0 again."""
    draft = make_draft(target, samples)
    t2d = draft.target_to_draft()
    batch_samples = varied(samples[:5], t2d)
    batch_samples[0].loss_mask[1:] = True  # row 0, the padding's, is a step row of weight > 0 itself
    plain = collate(batch_samples, 3, t2d)
    assert plain.reject_rows.shape[0] > 4 and plain.step_rows[0] == 0  # both padded row sets are exercised
    B, L = plain.shape
    fixed = collate(batch_samples, 3, t2d, shape=(B + 3, L + 9), pad_rows=lambda n: n + 37)
    assert fixed.shape == (B + 3, L + 9)
    for name in ("step_rows", "target_rows", "reject_rows"):
        assert getattr(fixed, name).shape[0] == getattr(plain, name).shape[0] + 37, name
    assert fixed.reject_weight.sum() == plain.reject_rows.shape[0]
    assert fixed.step_weight.sum() == plain.step_rows.numel() == plain.step_weight.sum()
    a, b = loss_and_grads(draft, plain, target.lm_head.weight), loss_and_grads(draft, fixed, target.lm_head.weight)
    assert torch.isfinite(b[0]) and a[0] > 0
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert a[3].keys() == b[3].keys() and len(a[3]) > 5
    for n in a[3]:
        torch.testing.assert_close(a[3][n], b[3][n], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        collate(batch_samples, 3, t2d, shape=(B - 1, L))
    with pytest.raises(ValueError, match="do not fit"):
        collate(batch_samples, 3, t2d, shape=(B, L - 1))


def test_the_trainers_packing_always_fits_a_graph_shape(target, samples):
    """Packed by bucket length, every group of a buffer batch gets the shape batch_tokens // bucket rows, so a
    trainer replays one graph per bucket; a bucket pads a sample of 32 tokens or more, or a row set of 64 rows or
    more, by at most half."""
    for batch_tokens in (128, 512, 2048, 2000):
        buckets = length_buckets(batch_tokens)
        assert buckets[-1] == batch_tokens and buckets[0] >= 32 and buckets == sorted(buckets)
        assert all(n <= bucket_length(n, buckets) <= max(48, 1.5 * n) for n in range(1, batch_tokens + 1))
    assert row_bucket(0) == 0 and row_bucket(1) == 64
    assert all(n <= row_bucket(n) <= max(64, 1.5 * n) and row_bucket(n) % 16 == 0 for n in range(1, 40000))
    assert len({row_bucket(n) for n in range(1, 40000)}) <= 20
    draft = make_draft(target, samples)
    rng = random.Random(1)
    pool = varied(samples * 3, draft.target_to_draft(), seed=2)
    for batch_tokens in (128, 256):
        items = [(i, s) for i, s in enumerate(pool) if s.num_tokens <= batch_tokens]
        rng.shuffle(items)
        size = pack_length(batch_tokens)
        groups = pack(items, batch_tokens, length=lambda it: size(it[1].num_tokens))
        shapes = set()
        for g in groups:
            group = [s for _, s in g]
            B, L = graph_shape(group, batch_tokens)
            assert B == batch_tokens // size(max(s.num_tokens for s in group)) >= len(group)
            b = collate(group, 3, draft.target_to_draft(), shape=(B, L), pad_rows=row_bucket)  # fits, or raises
            shapes.add((B, L, b.step_rows.numel(), b.target_rows.numel(), b.reject_rows.shape[0]))
        assert len(shapes) < len(groups)  # shapes repeat: graphs are reused
    big = varied(samples[:40], draft.target_to_draft())
    assert graph_shape(big, 128)[0] == 64  # more samples than the packer gives: the next power of two
    assert graph_shape([samples[0]], 16) is None  # longer than the batch: eager


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_train_the_draft_as_eager_steps_do(target, samples, precision):
    """Two trainers from the same draft, one replaying CUDA graphs and one eager, take the same steps over batches
    of several shapes (rejected rows included): the same losses and the same weights after, within the rounding of
    different reduction orders. The graphs are captured once per shape and replayed after."""
    from aurora.training import OnlineTrainer, TrainConfig

    tr = {g: OnlineTrainer(make_draft(target, samples), target.lm_head.weight,
                           TrainConfig(lr=1e-2, warmup_steps=1, ttt_length=3, batch_tokens=256, precision=precision,
                                       graphs=g, device="cuda"), lambda *_: None)
          for g in (True, False)}
    assert tr[False].graphs is None and tr[True].graphs is not None
    start = {n: p.detach().clone() for n, p in tr[True].master.named_parameters()}
    pool = varied(samples, tr[True].target_to_draft, seed=4)
    batches = [pool[0:6], pool[6:9], pool[9:15], pool[0:6], pool[15:16], pool[6:9]]
    losses = {g: [t.train_step(b) for b in batches] for g, t in tr.items()}
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), **tol)
    # the weights moved the same way. In bf16 the two row sets round differently, and AdamW turns a small gradient
    # difference into a full-size step where a weight's gradient is near 0: the updates are compared by direction
    for (n, p), q in zip(tr[True].master.named_parameters(), tr[False].master.parameters()):
        graphed, eager = (p - start[n]).flatten(), (q - start[n]).flatten()
        assert eager.norm() > 0, n
        if precision == "fp32":
            assert (graphed - eager).norm() / eager.norm() < 1e-3, n
        else:
            cos = torch.nn.functional.cosine_similarity(graphed, eager, dim=0)
            assert cos > 0.9, (n, float(cos))
    st = tr[True].graphs.stats()
    assert st["replays"] == len(batches) and st["eager_steps"] == 0 and st["failed_shapes"] == []
    assert 2 <= st["graphs"] < len(batches)
    assert tr[True].status()["graphs"]["replays"] == len(batches)
    # past max_graphs a new shape runs eagerly, and still trains
    g = tr[True].graphs
    g.max_graphs = st["graphs"]
    assert math.isfinite(tr[True].train_step(pool[20:40])) and g.stats()["eager_steps"] == 1
    assert g.stats()["graphs"] == st["graphs"]


@cuda
def test_graphed_steps_are_captured_again_as_the_ttt_steps_grow(target, samples):
    """train_steps="auto" with graphs: each time a TTT step joins, the graphs are dropped and captured for the new
    unroll, and the graphed trainer grows and steps as the eager one does (the same losses, the same count)."""
    from aurora.training import OnlineTrainer, TrainConfig

    tr = {g: OnlineTrainer(make_draft(target, samples), target.lm_head.weight,
                           TrainConfig(lr=1e-2, warmup_steps=1, ttt_length=3, batch_tokens=256, precision="fp32",
                                       graphs=g, device="cuda", train_steps="auto", grow_after=2, grow_reach=1e-6),
                           lambda *_: None)
          for g in (True, False)}
    batch = varied(samples, tr[True].target_to_draft, seed=4)[0:6]
    losses = {g: [t.train_step(batch) for _ in range(6)] for g, t in tr.items()}
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)
    assert tr[True].ttt_steps == tr[False].ttt_steps == 3
    st = tr[True].graphs.stats()
    assert st["replays"] == 6 and st["eager_steps"] == 0 and st["graphs"] == 1  # one shape since the last growth
    assert tr[True].graphs.ttt_length == 3
