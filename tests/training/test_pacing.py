"""CapturePacer over a real SampleBuffer and a fake clock: capture falls while captured samples pile up unread and
comes back once the trainer drains them, measured against the buffer's bounds and against a backlog in samples;
SampleBuffer.fresh_fill counts fresh samples only, by count and by bytes."""
import pytest
import torch

from aurora.sample import Sample
from aurora.training import SampleBuffer
from aurora.training.pacing import CapturePacer


def sample(i, T=10, H=4):
    return Sample(request_id=str(i), token_ids=torch.full((T,), i), prompt_len=1,
                  aux_hidden=torch.zeros(T - 1, 3 * H), target_hidden=torch.zeros(T - 1, H),
                  loss_mask=torch.ones(T, dtype=torch.bool))


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_fresh_fill_counts_the_queue_not_the_replay_ring():
    one = sample(0).nbytes()
    buf = SampleBuffer(10, 4 * one, heldout_every=0, replay_passes=3)
    assert buf.fresh_fill() == 0.0
    for i in range(2):
        buf.put(sample(i))
    assert buf.fresh_fill() == pytest.approx(0.5)  # bytes: 2 of 4 samples' worth (the count says 2 of 10)
    buf.get_batch(10_000, timeout=0)                 # taken: now in the replay ring, bytes still held
    assert buf.bytes == 2 * one and buf.fresh_fill() == 0.0
    for i in range(5):
        buf.put(sample(10 + i))                     # the 5th evicts replays, then the oldest fresh sample
    assert buf.size == 4 and buf.fresh_fill() == pytest.approx(1.0)


def test_capture_falls_while_samples_pile_up_and_recovers_when_drained():
    buf = SampleBuffer(10, 1 << 30, heldout_every=0)
    clock = Clock()
    pacer = CapturePacer(buf, floor=0.05, low=0.25, high=0.5, step=0.5, interval_s=1.0, clock=clock)
    assert pacer.rate() == 1.0
    for i in range(6):                               # 6 of 10: over `high`
        buf.put(sample(i))
    clock.t = 0.5
    assert pacer.rate() == 1.0                       # within the interval: unchanged
    rates = []
    for _ in range(6):
        clock.t += 1.0
        rates.append(pacer.rate())
    assert rates == [0.5, 0.25, 0.125, 0.0625, 0.05, 0.05]  # down by `step`, never below the floor
    buf.put(sample(99))
    buf.get_batch(10_000, timeout=0)                 # the trainer reads them all: fill 0
    back = []
    for _ in range(6):
        clock.t += 1.0
        back.append(pacer.rate())
    assert back == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert pacer.status()["lowered"] == 5 and pacer.status()["raised"] == 5


def test_between_the_marks_the_rate_holds():
    buf = SampleBuffer(10, 1 << 30, heldout_every=0)
    clock = Clock()
    pacer = CapturePacer(buf, interval_s=1.0, clock=clock)
    for i in range(6):
        buf.put(sample(i))
    clock.t = 1.0
    low = pacer.rate()
    assert low == pytest.approx(0.7)
    buf.get_batch(sample(0).num_tokens * 2, timeout=0)  # 4 left: 0.4, between low and high
    for _ in range(3):
        clock.t += 1.0
        assert pacer.rate() == low


def test_a_backlog_far_below_the_buffers_bounds_lowers_capture():
    """A 4,096-sample buffer with 200 samples unread is 5 % full, but 200 samples are most of a 256-sample
    backlog: capture falls; once the trainer reads them it comes back."""
    buf = SampleBuffer(4096, 1 << 30, heldout_every=0)
    clock = Clock()
    pacer = CapturePacer(buf, interval_s=1.0, backlog=256, clock=clock)
    for i in range(200):
        buf.put(sample(i))
    assert buf.fresh_fill() < 0.05 and pacer.fill() == pytest.approx(200 / 256)
    clock.t = 1.0
    assert pacer.rate() == pytest.approx(0.7)
    while buf.size:
        buf.get_batch(10_000, timeout=0)
    clock.t = 2.0
    assert pacer.rate() == 1.0 and pacer.status()["fresh_fill"] == 0.0
    assert CapturePacer(buf, backlog=1 << 30).fill() == 0.0  # a backlog beyond the bounds: the bounds decide


@pytest.mark.parametrize("kw", [{"floor": 0}, {"low": 0.6, "high": 0.5}, {"step": 1.0}, {"interval_s": 0},
                                {"backlog": 0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        CapturePacer(SampleBuffer(4, 1 << 20), **kw)
