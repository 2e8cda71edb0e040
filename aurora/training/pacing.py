"""How much of the served traffic to capture: as much as the trainer will read, not what the buffer will drop.

Capturing a request costs serving: on SGLang the aux-state copies and the wire (per-token bytes at MiniMax M2.5's
shape: results/minimax_dummy/), on the built-in engine its states' copies when it finishes. When traffic outruns the
trainer, the fresh queue fills and the buffer drops what it cannot hold, so those captures bought nothing. The pacer
watches the fresh queue's fill, the fuller of its sample count and its bytes against the buffer's bounds. Once a
second, above `high` it lowers the capture fraction by `step`, down to `floor`; below `low` it raises it by the same
step, up to 1. A trainer that keeps up leaves the queue near empty, and everything is captured. A trainer that rests
while serving is busy, or cannot keep up, settles the fraction near what it reads.

The queue's count is also measured against `backlog` samples (default 256: at the default trainer duty on a GPU,
roughly half a minute of the trainer's reading), whichever bound is nearer: the buffer's own bounds (4,096 samples,
2 GiB) are there to hold a burst, and measured against them alone capture would stay at 1 through the first
thousands of requests of a day-0 server whose trainer reads a tenth of them, paying for samples nobody reads.

The engine multiplies its `sample_rate` by `rate()` when it admits a request (capture is decided at admission).
The pacer reads the buffer's counts only; it never touches samples.
"""
import threading
import time


class CapturePacer:
    def __init__(self, buffer, floor: float = 0.02, low: float = 0.25, high: float = 0.5, step: float = 0.7,
                 interval_s: float = 1.0, backlog: int = 256, clock=time.monotonic):
        if not 0 < floor <= 1 or not 0 <= low < high <= 1 or not 0 < step < 1 or interval_s <= 0 or backlog < 1:
            raise ValueError("need 0 < floor <= 1, 0 <= low < high <= 1, 0 < step < 1, interval_s > 0 and "
                             "backlog >= 1")
        self.buffer, self.floor, self.low, self.high, self.step = buffer, floor, low, high, step
        self.backlog = backlog
        self.interval_s, self.clock = interval_s, clock
        self._rate, self._next = 1.0, clock()
        self._lock = threading.Lock()
        self.lowered = self.raised = 0  # adjustments made, for /v1/draft and the report

    def rate(self) -> float:
        """The fraction of requests to capture now, in [floor, 1]; adjusts at most once per interval."""
        now = self.clock()
        if now < self._next:
            return self._rate
        with self._lock:
            if now >= self._next:
                self._next = now + self.interval_s
                fill = self.fill()
                if fill > self.high and self._rate > self.floor:
                    self._rate, self.lowered = max(self.floor, self._rate * self.step), self.lowered + 1
                elif fill < self.low and self._rate < 1.0:
                    self._rate, self.raised = min(1.0, self._rate / self.step), self.raised + 1
            return self._rate

    def fill(self) -> float:
        """The fresh queue against the nearer of the buffer's bounds and `backlog` samples."""
        return max(self.buffer.fresh_fill(), self.buffer.size / self.backlog)

    def status(self) -> dict:
        return {"capture_rate": self._rate, "fresh_fill": self.fill(), "lowered": self.lowered,
                "raised": self.raised}
