"""Replay: with replay_passes > 1 the trainer reuses samples while no fresh one waits. The buffer must hand
every sample out exactly that many times, fresh samples first, evict replays (counted apart) before dropping
fresh samples; and on the same stream of samples, replay must teach the draft more than one pass does."""
import dataclasses

from aurora.training import OnlineTrainer, TrainConfig
from aurora.training.buffer import SampleBuffer
from aurora.training.guard import simulated_acceptance
from conftest import generate_samples, make_draft


def _named(samples, prefix):
    return [dataclasses.replace(s, request_id=f"{prefix}{i}") for i, s in enumerate(samples)]


def test_each_sample_served_replay_passes_times_fresh_first(samples):
    buf = SampleBuffer(100, 1 << 30, heldout_every=0, replay_passes=3)
    old, new = _named(samples[:6], "old"), _named(samples[6:9], "new")
    for s in old:
        buf.put(s)
    seen = [s.request_id for s in buf.get_batch(10 ** 6, timeout=0)]  # all six fresh ones
    assert seen == [s.request_id for s in old] and buf.replay_size == 6
    for s in new:
        buf.put(s)
    assert [s.request_id for s in buf.get_batch(10 ** 6, timeout=0)] == [s.request_id for s in new]  # fresh first
    while (batch := buf.get_batch(samples[0].num_tokens, timeout=0)):
        seen += [s.request_id for s in batch]
    seen += [s.request_id for s in new]
    counts = {r: seen.count(r) for r in seen}
    assert all(counts[s.request_id] == 3 for s in old + new), counts
    assert buf.replay_size == 0 and buf.bytes == 0 and buf.dropped == 0


def test_replays_make_room_for_fresh_samples(samples):
    nbytes = samples[0].nbytes()
    buf = SampleBuffer(100, 4 * nbytes, heldout_every=0, replay_passes=2)
    for s in samples[:4]:
        buf.put(s)
    buf.get_batch(10 ** 6, timeout=0)          # four replays now hold the whole byte budget
    for s in samples[4:7]:
        assert buf.put(s)                       # fresh samples evict replays, never the other way round
    assert buf.replay_evicted == 3 and buf.dropped == 0 and buf.size == 3 and buf.replay_size == 1


def test_replay_teaches_more_from_the_same_requests(target):
    stream, heldout = generate_samples(target, 96, seed=7), generate_samples(target, 16, seed=2)
    result = {}
    for passes in (1, 3):
        tr = OnlineTrainer(make_draft(target, stream), target.lm_head.weight,
                           TrainConfig(lr=1e-2, warmup_steps=5, ttt_length=3, replay_passes=passes, heldout_every=0,
                                       batch_tokens=16 * stream[0].num_tokens), lambda sd, v, acc: None)
        for s in stream:  # the requests arrive once; the trainer drains what the buffer hands it
            tr.add_sample(s)
        trained = 0
        while (batch := tr.buffer.get_batch(tr.config.batch_tokens, timeout=0)):
            tr.train_step(batch)
            trained += len(batch)
        assert trained == passes * len(stream)
        assert tr.status()["tokens_trained"] == passes * sum(s.num_tokens for s in stream)
        result[passes] = (tr.steps, simulated_acceptance(tr.master, heldout, tr.lm_head, 3, tr.target_to_draft))
    (s1, a1), (s3, a3) = result[1], result[3]
    print(f"\nsame 96 requests: 1 pass {s1} steps, greedy accept {a1['greedy_accept_length']:.3f}; "
          f"3 passes {s3} steps, {a3['greedy_accept_length']:.3f}")
    assert a3["greedy_accept_length"] > a1["greedy_accept_length"] + 0.05
    assert a3["accept_length"] > a1["accept_length"]


def test_replays_are_drawn_from_the_whole_ring(samples):
    """Idle-time replays revisit earlier traffic, not only the latest requests: the first replay batch
    mixes the ring's older and newer halves, and every sample still comes back exactly once more."""
    buf = SampleBuffer(100, 1 << 30, heldout_every=0, replay_passes=2, seed=1)
    stream = _named((samples * 4)[:40], "r")
    for s in stream:
        buf.put(s)
    assert len(buf.get_batch(10 ** 9, timeout=0)) == 40  # every fresh one, in arrival order
    first = [int(s.request_id[1:]) for s in buf.get_batch(8 * stream[0].num_tokens, timeout=0)]
    assert len(first) == 8 and len(set(first)) == 8
    assert first != list(range(8)) and min(first) < 20 <= max(first), first
    seen = list(first)
    while (batch := buf.get_batch(8 * stream[0].num_tokens, timeout=0)):
        seen += [int(s.request_id[1:]) for s in batch]
    assert sorted(seen) == list(range(40)) and buf.replay_size == 0 and buf.bytes == 0
