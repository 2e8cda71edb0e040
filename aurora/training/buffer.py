"""Bounded, thread-safe hand-off of captured samples from serving to the trainer.

Serving calls `put` and must never wait: the lock is held only for O(1) bookkeeping (the trainer waits on
a condition that releases it), and a full buffer drops a sample instead of blocking. Every drop is counted.
Every `heldout_every`-th captured sample goes to a small held-out ring instead of the training queue; the
trainer's swap guard measures candidate drafts on it, so the guard never scores samples it trained on.

Replay (`replay_passes` > 1): a sample the trainer took goes to a replay ring and is handed out again, up to
`replay_passes` times in all, whenever no fresh sample waits; fresh samples always come first. Replays are
drawn at random from the whole ring, not oldest first, so idle-time steps revisit earlier traffic (another
domain, hundreds of requests back) rather than repeating the last few requests. The trainer is
otherwise idle most of the time (it trains tokens far faster than serving makes them: docs/measurements.md), so
replay turns idle time into more optimiser steps per served request. Replay shares `max_bytes` with the
queue and is evicted first (oldest first) when a fresh sample needs room; that is counted apart from
`dropped`, since an evicted replay sample was already trained on.
"""
import random
import threading
from collections import deque

from aurora.sample import Sample

POLICIES = ("drop_oldest", "drop_newest")
REPLAY_DRAW = 256  # ring entries examined per replay batch: bounded work under the lock that serving's put takes


class SampleBuffer:
    def __init__(self, max_samples: int, max_bytes: int, policy: str = "drop_oldest",
                 heldout_every: int = 20, heldout_size: int = 32, replay_passes: int = 1, seed: int = 0):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if heldout_every < 0 or heldout_size < 0:
            raise ValueError("heldout_every and heldout_size must be >= 0 (0 disables the held-out split)")
        if replay_passes < 1:
            raise ValueError("replay_passes must be >= 1 (1 = every sample is trained on once)")
        self.max_samples, self.max_bytes, self.policy = max_samples, max_bytes, policy
        self.replay_passes = replay_passes
        self._replay: list[list] = []  # [sample, nbytes, passes left], oldest first (at most max_samples)
        self._rng = random.Random(seed)
        self.heldout_every = heldout_every
        self._queue: deque[tuple[Sample, int]] = deque()  # (sample, nbytes), oldest first
        self._heldout: deque[Sample] = deque(maxlen=max(heldout_size, 1))
        self._cond = threading.Condition()
        self._bytes = 0
        self._fresh_bytes = 0  # of _bytes, the queue's (fresh samples not yet taken)
        self.captured = 0  # samples offered to put
        self.dropped = 0   # samples lost to the bounds (either policy) or too large to ever fit
        self.replay_evicted = 0  # replayed samples evicted early for fresh ones (already trained on once)
        self.heldout_taken = 0   # samples that went to the held-out ring
        self.last_batch_fresh = False  # get_batch's last batch was fresh samples (not replays)

    def put(self, sample: Sample) -> bool:
        """Never blocks. Returns False when this sample was dropped (drop_newest, or larger than max_bytes)."""
        nbytes = sample.nbytes()
        with self._cond:
            self.captured += 1
            if self.heldout_every and self.captured % self.heldout_every == 0:
                self._heldout.append(sample)
                self.heldout_taken += 1
                return True
            if nbytes > self.max_bytes:
                self.dropped += 1
                return False
            while self._replay and self._bytes + nbytes > self.max_bytes:  # fresh samples before replays
                self._bytes -= self._replay.pop(0)[1]
                self.replay_evicted += 1
            full = len(self._queue) >= self.max_samples or self._bytes + nbytes > self.max_bytes
            if full and self.policy == "drop_newest":
                self.dropped += 1
                return False
            while self._queue and (len(self._queue) >= self.max_samples or self._bytes + nbytes > self.max_bytes):
                _, old = self._queue.popleft()
                self._bytes -= old
                self._fresh_bytes -= old
                self.dropped += 1
            self._queue.append((sample, nbytes))
            self._bytes += nbytes
            self._fresh_bytes += nbytes
            self._cond.notify()
            return True

    def get_batch(self, max_tokens: int, timeout: float | None = 1.0) -> list[Sample]:
        """Oldest fresh samples up to max_tokens in total (always at least one); with none waiting, replays
        drawn at random from the ring (each at most once per batch); [] if neither came within timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._replay, timeout=timeout):
                return []
            batch, tokens = [], 0
            self.last_batch_fresh = bool(self._queue)
            if self._queue:
                while self._queue and (not batch or tokens + self._queue[0][0].num_tokens <= max_tokens):
                    sample, nbytes = self._queue.popleft()
                    self._fresh_bytes -= nbytes
                    tokens += sample.num_tokens
                    batch.append(sample)
                    if self.replay_passes > 1 and len(self._replay) < self.max_samples:
                        self._replay.append([sample, nbytes, self.replay_passes - 1])  # bytes stay counted
                    else:
                        self._bytes -= nbytes
                return batch
            taken = []
            n = len(self._replay)
            for i in self._rng.sample(range(n), min(n, REPLAY_DRAW)):  # O(draw), not a shuffle of the ring
                entry = self._replay[i]
                if batch and tokens + entry[0].num_tokens > max_tokens:
                    continue  # a smaller one further on may still fit
                tokens += entry[0].num_tokens
                batch.append(entry[0])
                entry[2] -= 1
                taken.append(i)
            for i in sorted(taken, reverse=True):  # spent entries leave; the others keep their place
                if self._replay[i][2] == 0:
                    self._bytes -= self._replay.pop(i)[1]
            return batch

    def fresh_fill(self) -> float:
        """How full the fresh queue is, in [0, 1]: the fuller of its samples and its bytes against the bounds."""
        return max(len(self._queue) / self.max_samples, self._fresh_bytes / self.max_bytes)

    def heldout(self) -> list[Sample]:
        with self._cond:
            return list(self._heldout)

    def wake(self) -> None:
        """Wake a waiting get_batch (used by stop())."""
        with self._cond:
            self._cond.notify_all()

    @property
    def size(self) -> int:
        return len(self._queue)

    @property
    def replay_size(self) -> int:
        return len(self._replay)

    @property
    def bytes(self) -> int:
        return self._bytes
