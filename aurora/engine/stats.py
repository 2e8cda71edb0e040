"""Rolling serving statistics: accept length (SGLang's: completion tokens / verify rounds) over recent
requests and per draft version, acceptance per draft position, tokens/s."""
import threading
import time
from collections import deque


class EngineStats:
    def __init__(self, lookahead: int, window: int = 200):
        self.k = lookahead
        self.recent: deque = deque(maxlen=window)  # (verify tokens, rounds, accepted / tried per position)
        self.by_version: dict[int, list[int]] = {}  # version -> [tokens, rounds]
        self.requests_finished = 0
        self.generated_tokens = 0
        self._tok_times: deque = deque()  # (time, tokens) over the last 10 s
        self._lock = threading.Lock()

    def on_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += n
            self._tok_times.append((now, n))
            while self._tok_times and now - self._tok_times[0][0] > 10.0:
                self._tok_times.popleft()

    def on_finish(self, tokens: int, rounds: int, per_pos: list[int], version: int,
                  tried: list[int] | None = None) -> None:
        """tokens: produced by the request's verify rounds; per_pos[j] / tried[j]: accepted / reached at depth j."""
        with self._lock:
            self.requests_finished += 1
            if rounds:
                self.recent.append((tokens, rounds, per_pos, tried or [rounds] * len(per_pos)))
                v = self.by_version.setdefault(version, [0, 0])
                v[0] += tokens
                v[1] += rounds

    def snapshot(self) -> dict:
        with self._lock:
            toks = sum(r[0] for r in self.recent)
            rounds = sum(r[1] for r in self.recent)
            per_pos = []
            for j in range(self.k):  # conditional: accepted at depth j / rounds that reached depth j
                tried = sum(r[3][j] for r in self.recent if len(r[3]) > j)
                per_pos.append(sum(r[2][j] for r in self.recent if len(r[2]) > j) / tried if tried else 0.0)
            span = (time.monotonic() - self._tok_times[0][0]) if len(self._tok_times) > 1 else 0.0
            tps = sum(n for _, n in self._tok_times) / span if span > 0 else 0.0
            return {"requests_finished": self.requests_finished, "generated_tokens": self.generated_tokens,
                    "accept_length_recent": toks / rounds if rounds else 0.0,
                    "accept_length_by_version": {v: t / r for v, (t, r) in self.by_version.items() if r},
                    "accept_rate_by_position": per_pos, "tokens_per_second": tps}
