"""Rolling serving statistics: accept length (SGLang's: tokens committed by verify rounds / verify rounds, the
prefill token excluded; see sequence.py), acceptance per draft position, tokens/s.

Windows, exactly: "recent" = the last `window` finished requests that had at least one verify round
(requests without a draft, or ending at their prefill token, have no accept length and do not enter it);
"by version" = all such requests of each of the `versions` draft versions that most recently finished one;
tokens/s = tokens generated in the last `TPS_WINDOW_S` seconds / that span (0 once nothing was generated for
that long).
"""
import threading
import time
from collections import OrderedDict, deque

from aurora.engine.sequence import accept_length

TPS_WINDOW_S = 10.0


class EngineStats:
    def __init__(self, lookahead: int, window: int = 100, versions: int = 8, clock=time.monotonic):
        self.k, self.window, self.versions, self.clock = lookahead, window, versions, clock
        self.recent: deque = deque(maxlen=window)  # (verify tokens, rounds, accepted / tried per position)
        self.by_version: OrderedDict[int, list[int]] = OrderedDict()  # version -> [verify tokens, rounds]
        self.requests_finished = 0
        self.generated_tokens = 0
        self.verify_rounds = self.verify_tokens = 0  # totals over every finished request
        self._tok_times: deque = deque()  # (time, tokens) over the last TPS_WINDOW_S
        self._lock = threading.Lock()

    def on_tokens(self, n: int) -> None:
        now = self.clock()
        with self._lock:
            self.generated_tokens += n
            self._tok_times.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._tok_times and now - self._tok_times[0][0] > TPS_WINDOW_S:
            self._tok_times.popleft()

    def on_finish(self, verify_tokens: int, rounds: int, per_pos: list[int], version: int,
                  tried: list[int] | None = None) -> None:
        """verify_tokens: the request's output tokens committed by its verify rounds (not its prefill token);
        per_pos[j] / tried[j]: drafts accepted at / rounds that reached depth j."""
        with self._lock:
            self.requests_finished += 1
            if rounds:
                self.verify_rounds += rounds
                self.verify_tokens += verify_tokens
                if tried is None:  # a fixed-depth engine: every round reaches position 0, and j if it accepted j-1
                    tried = [rounds] + per_pos[:-1]
                self.recent.append((verify_tokens, rounds, per_pos, tried))
                v = self.by_version.setdefault(version, [0, 0])
                self.by_version.move_to_end(version)
                v[0] += verify_tokens
                v[1] += rounds
                while len(self.by_version) > self.versions:  # keep the versions that served most recently
                    self.by_version.popitem(last=False)

    def snapshot(self) -> dict:
        now = self.clock()
        with self._lock:
            self._trim(now)
            toks = sum(r[0] for r in self.recent)
            rounds = sum(r[1] for r in self.recent)
            per_pos = []
            for j in range(self.k):  # conditional: accepted at depth j / rounds that reached depth j
                tried = sum(r[3][j] for r in self.recent if len(r[3]) > j)
                per_pos.append(sum(r[2][j] for r in self.recent if len(r[2]) > j) / tried if tried else 0.0)
            # over the window that ends now, so an idle engine reads 0 rather than its last burst's rate
            tps = sum(n for _, n in self._tok_times) / TPS_WINDOW_S
            return {"requests_finished": self.requests_finished, "generated_tokens": self.generated_tokens,
                    "accept_length_recent": accept_length(toks, rounds), "accept_length_window": self.window,
                    "accept_length_by_version": {v: accept_length(t, r) for v, (t, r) in self.by_version.items()},
                    "verify_rounds": self.verify_rounds, "verify_tokens": self.verify_tokens,
                    "accept_rate_by_position": per_pos, "tokens_per_second": tps}
