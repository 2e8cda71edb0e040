"""Bounded, thread-safe hand-off of captured samples from serving to the trainer.

Serving calls `put` and must never wait: the lock is held only for O(1) bookkeeping (the trainer waits on
a condition that releases it), and a full buffer drops a sample instead of blocking. Every drop is counted.
Every `heldout_every`-th captured sample goes to a small held-out ring instead of the training queue; the
trainer's swap guard measures candidate drafts on it, so the guard never scores samples it trained on.
"""
import threading
from collections import deque

from aurora.sample import Sample

POLICIES = ("drop_oldest", "drop_newest")


class SampleBuffer:
    def __init__(self, max_samples: int, max_bytes: int, policy: str = "drop_oldest",
                 heldout_every: int = 20, heldout_size: int = 32):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if heldout_every < 0 or heldout_size < 0:
            raise ValueError("heldout_every and heldout_size must be >= 0 (0 disables the held-out split)")
        self.max_samples, self.max_bytes, self.policy = max_samples, max_bytes, policy
        self.heldout_every = heldout_every
        self._queue: deque[tuple[Sample, int]] = deque()  # (sample, nbytes), oldest first
        self._heldout: deque[Sample] = deque(maxlen=max(heldout_size, 1))
        self._cond = threading.Condition()
        self._bytes = 0
        self.captured = 0  # samples offered to put
        self.dropped = 0   # samples lost to the bounds (either policy) or too large to ever fit

    def put(self, sample: Sample) -> bool:
        """Never blocks. Returns False when this sample was dropped (drop_newest, or larger than max_bytes)."""
        nbytes = sample.nbytes()
        with self._cond:
            self.captured += 1
            if self.heldout_every and self.captured % self.heldout_every == 0:
                self._heldout.append(sample)
                return True
            if nbytes > self.max_bytes:
                self.dropped += 1
                return False
            full = len(self._queue) >= self.max_samples or self._bytes + nbytes > self.max_bytes
            if full and self.policy == "drop_newest":
                self.dropped += 1
                return False
            while self._queue and (len(self._queue) >= self.max_samples or self._bytes + nbytes > self.max_bytes):
                _, old = self._queue.popleft()
                self._bytes -= old
                self.dropped += 1
            self._queue.append((sample, nbytes))
            self._bytes += nbytes
            self._cond.notify()
            return True

    def get_batch(self, max_tokens: int, timeout: float | None = 1.0) -> list[Sample]:
        """Oldest samples up to max_tokens in total (always at least one); [] if none came within timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue, timeout=timeout):
                return []
            batch, tokens = [], 0
            while self._queue and (not batch or tokens + self._queue[0][0].num_tokens <= max_tokens):
                sample, nbytes = self._queue.popleft()
                self._bytes -= nbytes
                tokens += sample.num_tokens
                batch.append(sample)
            return batch

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
    def bytes(self) -> int:
        return self._bytes
