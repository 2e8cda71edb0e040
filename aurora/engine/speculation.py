"""How far to speculate, decided per engine step: lookahead d in {0, 1, ..., K} (0 = plain decoding).

A round of depth d yields E_d = 1 + sum_{j<=d} prod_{i<=j} a_i tokens per row (a_i: the live draft's
acceptance at position i given positions < i were accepted) and costs c(B, d) seconds at batch bucket B.
The controller picks the d that maximises E_d / c(B, d) from two things it measures itself:

- round costs, per (batch bucket, depth), timed by the engine around each round: the mean of the last
  `cost_window` timings, each clipped at 5x their median. A mean, because under a trainer's load on the same GPU
  round times are bimodal (most fast, some very slow) and throughput follows the mean, which a median misjudges;
  clipped, because a round that overlaps a stall elsewhere in the process (e.g. a checkpoint write) can take a
  hundred times its cost. Rounds that captured a CUDA graph are not timed, nor a speculative round that first
  caught the draft up over the positions plain rounds skipped (a cost of switching, paid once, not of its
  depth). A depth not yet timed at a bucket
  is interpolated between the nearest timed depths on either side (a round of depth d runs d-1 more draft
  steps and verifies d+1 tokens, so cost grows about linearly in d once speculating); beyond the deepest timed
  one it is extrapolated from the two deepest speculating depths only (the step from plain decoding to depth 1
  carries a fixed cost, the draft's and the verify's set-up, that deeper depths do not add again: SGLang's
  depth-1 round costs about two plain steps and its depth-4 round not much more). Without that it is unknown
  and gets probed when even a free round of that depth would beat the best known choice.
- acceptance per position, per draft version: a prior from the trainer's held-out replay of the new
  version (`guard.simulated_acceptance`'s served-greedy walk), which lets the decision turn speculation on
  before a speculative round has been paid for, updated by what the version's rounds realise.

Hysteresis: a bucket leaves its current depth only for one predicted `switch_margin` faster, and not within
`min_dwell` rounds of its last switch; and only on timings of both depths taken one after the other just before:
the new depth is timed for `probe_rounds` rounds, then the current one, the older timings of both dropped, and the
switch is decided on those alone. A round's cost moves by more than the margins at stake (a server's first rounds
run slow; a trainer step beside serving slows every round while it runs; the rows' lengths and the machine's speed
move), and a switch is considered exactly when the two depths' timings disagree, so timings from different moments
would switch on the difference in conditions, not in depths. Every `reprobe_every` rounds of a bucket the
neighbours of its depth (among the depths the engine runs) are timed again for a round (their costs drift as caches
grow), when they are predicted within `reprobe_window` of the current choice.

A guard rail on what serving delivers: every round also reports its committed tokens and the wall time from its
start to the next round's start with everything in between (admissions' prefill included), decayed over about
`served_window` rounds per (bucket, depth). Once a speculating depth has `veto_after` such rounds and depth 0 a
quarter as many (while a bucket speculates, its re-probes include a few plain rounds for this), and the depth
delivered fewer tokens per second than plain decoding did (by `switch_margin`), it is vetoed at that bucket for
`veto_rounds` rounds (or until the next draft version): the round timings and the acceptance model can both be
right and the server still slower, when speculation costs something outside the rounds (the trainer's share of
the process, the front, prefill).

With no acceptance at all (a day-0 draft's prediction, or nothing accepted since) every depth yields one token a
row, so a plain bucket stays plain without weighing the costs: the decision runs before every round, and at day 0
that is every round of the server.

Pure Python, no device state: the engine calls `choose(bucket)` before a round and `observe(...)` after.
"""
import statistics
import threading
from collections import deque
from dataclasses import dataclass


@dataclass
class SpeculationConfig:
    adaptive: bool = True         # False: always the engine's full lookahead (the fixed-depth behaviour)
    switch_margin: float = 0.05   # a bucket changes depth only for a predicted gain of at least this fraction
    min_dwell: int = 16           # rounds a bucket stays at a depth before it may switch again
    probe_rounds: int = 3         # timed rounds of a depth whose cost is unknown, before it is judged
    reprobe_every: int = 256      # rounds of a bucket between re-timings of its neighbour depths
    reprobe_window: float = 0.15  # neighbours predicted within this fraction of the current rate are re-timed
    prior_weight: float = 64.0    # pseudo-rounds the held-out prediction counts for against observed rounds
    cost_window: int = 15         # timings per (bucket, depth) whose (clipped) mean is its cost
    forget: float = 1 / 4096      # per observed row-round: old acceptance evidence fades (traffic drifts)
    served_window: int = 512      # rounds over which the delivered tokens/s per (bucket, depth) is averaged
    veto_after: int = 64          # delivered-rate observations each side needs before a depth can be vetoed
    veto_rounds: int = 4096       # rounds a vetoed depth stays out of the choice at its bucket

    def __post_init__(self):
        if not 0 <= self.switch_margin < 1 or not 0 <= self.forget < 1:
            raise ValueError("switch_margin and forget must be in [0, 1)")
        for name in ("min_dwell", "probe_rounds", "reprobe_every", "cost_window", "served_window", "veto_after",
                     "veto_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prior_weight <= 0 or self.reprobe_window < 0:
            raise ValueError("prior_weight must be > 0 and reprobe_window >= 0")


def served_speedup(snapshot: dict) -> float:
    """What speculation gives serving now, from a decision's snapshot (DepthController.snapshot, or SGLang's
    depth.json in the same shape): each batch bucket's speedup at its current depth (realised where measured,
    else predicted) weighted by the bucket's rounds; 1.0 where nothing has run or nothing speculates."""
    total = weighted = 0.0
    for b in (snapshot or {}).get("buckets", {}).values():
        pred = {int(d): v for d, v in (b.get("predicted_speedup") or {}).items()}
        s = b.get("realised_speedup") or pred.get(int(b.get("depth", 0)), 1.0)
        total, weighted = total + b.get("rounds", 0), weighted + b.get("rounds", 0) * s
    return weighted / total if total else 1.0


def expected_tokens(rates: list[float], depth: int) -> float:
    """Tokens per row from one round of `depth` given conditional per-position acceptance `rates`."""
    total, chain = 1.0, 1.0
    for a in rates[:depth]:
        chain *= a
        total += chain
    return total


def _cost_at(pts: list[tuple[int, float]], depth: int) -> float | None:
    """DepthController.cost from a bucket's timed (depth, cost) pairs, sorted by depth."""
    lo, hi = None, None
    for d, v in pts:
        if d == depth:
            return v
        if d < depth:
            lo = (d, v)
        elif hi is None:
            hi = (d, v)
    if lo is not None and hi is not None:
        (d0, c0), (d1, c1) = lo, hi
        return c0 + (c1 - c0) * (depth - d0) / (d1 - d0)
    spec = [(d, v) for d, v in pts if 0 < d < depth]
    if hi is not None or len(spec) < 2:
        return None
    (d0, c0), (d1, c1) = spec[-2:]
    slope = max((c1 - c0) / (d1 - d0), 0.0)  # a deeper round never costs less
    return max(c1 + slope * (depth - d1), 1e-9)


class _Bucket:
    def __init__(self, depth: int):
        self.depth = depth          # current choice
        self.since_switch = 0       # rounds since the last change of depth
        self.rounds = 0             # rounds decided at this bucket
        self.probe: list[int] = []  # depths queued for timing, one round each
        self.chosen: dict[int, int] = {}  # depth -> rounds run at it
        self.vetoed: dict[int, int] = {}  # depth -> the round of this bucket until which it is not chosen
        self.paired: tuple[int, int] | None = None  # (from, to) just timed one after the other: a switch may follow
        self.switches = 0                 # decided switches (probes and their returns not counted)
        self.last_switch: dict | None = None  # what the last one was decided on (snapshot)


class DepthController:
    def __init__(self, max_depth: int, config: SpeculationConfig | None = None, depths: list[int] | None = None):
        """depths: the depths the engine can run (default 0..max_depth; a tree engine offers [0, max_depth])."""
        self.K, self.config = max_depth, config or SpeculationConfig()
        self.depths = sorted(set(depths if depths is not None else range(max_depth + 1)))
        if not self.depths or self.depths[0] < 0 or self.depths[-1] > max_depth:
            raise ValueError(f"depths must lie in [0, {max_depth}]")
        self._cost: dict[tuple[int, int], float] = {}     # (bucket, depth) -> seconds per round
        self._timings: dict[tuple[int, int], deque] = {}  # the recent timings it is the mean of
        self._stale: set[tuple[int, int]] = set()         # costs with timings since their mean was taken: taken
                                                          # when read (a day-0 bucket decodes plainly without
                                                          # reading its cost, and the engine times every round)
        self._timed: dict[tuple[int, int], int] = {}
        self._yield: dict[int, list[float]] = {}          # depth -> [tokens per row-round EMA, rounds]: realised
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()                     # choose/observe in the engine thread, snapshot anywhere
        self.version = 0
        self._prior: list[float] | None = None
        self._hits = [0.0] * max_depth                    # observed, conditional: hits[j] of tries[j]
        self._tries = [0.0] * max_depth
        self._served: dict[tuple[int, int], list[float]] = {}  # (bucket, depth) -> [tokens, seconds, rounds], decayed
        self.vetoes = 0

    # ------------------------------------------------------------- acceptance
    def new_version(self, version: int, predicted: list[float] | None) -> None:
        """A new draft is live: its acceptance starts from the held-out prediction (None: unknown, so the
        first rounds run at full depth to observe it), and the previous version's observations are dropped."""
        with self._lock:
            self.version = version
            self._prior = None if predicted is None else [min(max(float(a), 0.0), 1.0) for a in
                                                         (list(predicted) + [0.0] * self.K)[:self.K]]
            self._hits, self._tries = [0.0] * self.K, [0.0] * self.K
            for b in self._buckets.values():
                b.since_switch = self.config.min_dwell  # free to move at once
                b.vetoed.clear()
                if self._prior is None and self.K not in b.probe and self.K in self.depths:
                    b.probe.extend([self.K] * self.config.probe_rounds)
            for key in [k for k in self._served if k[1] > 0]:  # the old version's speculative rounds say nothing now
                del self._served[key]

    def rates(self) -> list[float]:
        with self._lock:
            return self._rates()

    def speculating(self) -> bool:
        """Whether any batch bucket's current choice speculates."""
        with self._lock:
            return any(b.depth > 0 for b in self._buckets.values())

    def _rates(self) -> list[float]:
        w = self.config.prior_weight
        out = []
        for j in range(self.K):
            if self._prior is None:  # no prediction: observed only (0 until something was observed)
                out.append(self._hits[j] / self._tries[j] if self._tries[j] else 0.0)
            else:
                out.append((self._prior[j] * w + self._hits[j]) / (w + self._tries[j]))
        return out

    # ------------------------------------------------------------- costs
    def cost(self, bucket: int, depth: int) -> float | None:
        """Measured; else interpolated between the nearest timed depths around it; else, beyond the deepest
        timed depth, extrapolated from the two deepest timed speculating depths; else None."""
        with self._lock:
            return _cost_at(self._timed_costs(bucket), depth)

    def _costs(self, bucket: int) -> dict[int, float]:
        """cost(bucket, d) of every depth that has one, from one pass over the timings (the decision runs before
        every round: one pass per depth was a visible share of the engine thread's Python)."""
        pts = self._timed_costs(bucket)
        return {d: c for d in self.depths if (c := _cost_at(pts, d)) is not None}

    def _timed_costs(self, bucket: int) -> list[tuple[int, float]]:
        return sorted((key[1], self._fresh(key)) for key in list(self._cost) if key[0] == bucket)

    def _fresh(self, key: tuple[int, int]) -> float:
        if key in self._stale:
            self._stale.discard(key)
            recent = self._timings[key]
            cap = 5 * statistics.median(recent)
            self._cost[key] = sum(min(t, cap) for t in recent) / len(recent)
        return self._cost[key]

    # ------------------------------------------------------------- the decision
    def choose(self, bucket: int) -> int:
        with self._lock:
            b = self._buckets.get(bucket)
            if b is None:
                start = 0 if 0 in self.depths else self.depths[0]
                b = self._buckets[bucket] = _Bucket(start)
                b.since_switch = self.config.min_dwell
                if self._prior is None and self.K in self.depths and self.K != start:
                    b.probe.extend([self.K] * self.config.probe_rounds)
            if not self.config.adaptive:
                return self.depths[-1]
            b.rounds += 1
            if b.probe:
                return b.probe.pop(0)
            rates = self._rates()
            if b.depth == 0 and not any(rates) and (bucket, 0) in self._cost:
                b.since_switch += 1  # nothing can be accepted: every depth yields one token a row, plain is cheapest
                return 0
            known = self._costs(bucket)
            if 0 in self.depths and 0 not in known:
                return 0  # time plain decoding first: every other choice is judged against it
            speed = {d: expected_tokens(rates, d) / c for d, c in known.items()
                     if b.vetoed.get(d, 0) <= b.rounds}
            best = max(speed, key=speed.get)
            # an untimed depth is worth a probe if even a free round of it (costing the cheapest known round)
            # would beat the best known choice
            cheapest, bar = min(known.values()), speed[best] * (1 + self.config.switch_margin)
            for d in self.depths:
                if d not in known and b.vetoed.get(d, 0) <= b.rounds and expected_tokens(rates, d) / cheapest > bar:
                    b.probe.extend([d] * self.config.probe_rounds)
                    return b.probe.pop(0)
            cur = b.depth if b.depth in speed else best
            if cur and self._delivers_less(bucket, cur):
                b.vetoed[cur] = b.rounds + self.config.veto_rounds
                self.vetoes += 1
                del speed[cur]
                cur = best = max(speed, key=speed.get)
                b.since_switch = 0
            if best != cur and b.since_switch >= self.config.min_dwell and \
                    speed[best] > speed[cur] * (1 + self.config.switch_margin):
                if b.paired != (cur, best):
                    # the two depths' timings come from different moments (a server's first rounds, a trainer
                    # step beside serving, the rows' lengths): drop both, time the new depth and then the current
                    # one, and decide on those alone
                    for d in (best, cur):
                        self._timings.get((bucket, d), []).clear()
                    b.probe.extend([best] * self.config.probe_rounds + [cur] * self.config.probe_rounds)
                    b.paired = (cur, best)
                    return b.probe.pop(0)
                b.switches += 1
                b.last_switch = {"round": b.rounds, "from": cur, "to": best,
                                 "round_ms": {d: round(known[d] * 1e3, 4) for d in (cur, best)},
                                 "acceptance": [round(a, 4) for a in rates],
                                 "predicted_gain": round(speed[best] / speed[cur], 4)}
                cur = best
                b.since_switch = 0
            b.paired = None
            b.depth = cur
            b.since_switch += 1
            if b.rounds % self.config.reprobe_every == 0:
                i = self.depths.index(cur)
                for d in self.depths[max(0, i - 1):i] + self.depths[i + 1:i + 2]:  # the neighbours it can run
                    if d in speed and speed[d] >= speed[cur] * (1 - self.config.reprobe_window):
                        b.probe.append(d)
                plain = self._served.get((bucket, 0))
                if cur and 0 in self.depths and (plain is None or plain[2] < self.config.veto_after):
                    b.probe.extend([0] * self.config.probe_rounds)  # the guard rail's reference
            return cur

    def pinned(self, bucket: int, depth: int) -> int:
        """A round run at a depth fixed from outside (a benchmark's sweep): counted at its bucket, not decided."""
        with self._lock:
            b = self._buckets.setdefault(bucket, _Bucket(depth))
            b.rounds += 1
            b.depth = depth  # observe() counts the round in rounds_by_depth
            return depth

    def observe_cost(self, bucket: int, depth: int, seconds: float) -> None:
        """A round's wall time: what serving it cost, from its start to the next round's (see LLMEngine.step)."""
        if not seconds > 0:
            return
        with self._lock:
            key = (bucket, depth)
            self._timings.setdefault(key, deque(maxlen=self.config.cost_window)).append(seconds)
            self._cost.setdefault(key, seconds)
            self._stale.add(key)
            self._timed[key] = self._timed.get(key, 0) + 1

    def observe_served(self, bucket: int, depth: int, tokens: int, seconds: float) -> None:
        """A round's committed tokens (all rows) and the wall time to the next round's start, everything included."""
        if not seconds > 0:
            return
        with self._lock:
            keep = 1 - 1 / self.config.served_window
            s = self._served.setdefault((bucket, depth), [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] * keep + tokens, s[1] * keep + seconds, s[2] + 1

    def _delivers_less(self, bucket: int, depth: int) -> bool:
        mine, plain = self._served.get((bucket, depth)), self._served.get((bucket, 0))
        n = self.config.veto_after
        if mine is None or plain is None or mine[2] < n or plain[2] < n // 4:  # plain: few rounds once speculating
            return False
        return mine[0] / mine[1] < plain[0] / plain[1] * (1 - self.config.switch_margin)

    def observe(self, bucket: int, depth: int, seconds: float | None, accepted: list[int]) -> None:
        """After a round: its wall time (None: timed apart through observe_cost, or not at all, e.g. it
        captured a CUDA graph) and each row's accepted draft count."""
        if seconds is not None:
            self.observe_cost(bucket, depth, seconds)
        with self._lock:
            c = self.config
            b = self._buckets.get(bucket)
            if b is not None:
                b.chosen[depth] = b.chosen.get(depth, 0) + 1
            if depth == 0 or not accepted:
                return
            keep = (1 - c.forget) ** len(accepted)
            self._hits = [h * keep for h in self._hits]
            self._tries = [t * keep for t in self._tries]
            for n in accepted:
                for j in range(min(n + 1, depth)):  # position j was tried; accepted if j < n
                    self._tries[j] += 1
                    if j < n:
                        self._hits[j] += 1
            y = self._yield.setdefault(depth, [0.0, 0])
            per_row = 1 + sum(accepted) / len(accepted)
            y[0] = per_row if y[1] == 0 else 0.98 * y[0] + 0.02 * per_row
            y[1] += 1

    # ------------------------------------------------------------- what /v1/draft and /metrics show
    def snapshot(self) -> dict:
        with self._lock:
            rates = self._rates()
            buckets = {}
            for bucket, b in sorted(self._buckets.items()):
                costs = self._costs(bucket)
                c0 = costs.get(0)
                pred = {d: expected_tokens(rates, d) / c * c0 for d, c in costs.items() if c is not None and c0}
                realised = None
                if c0 and b.depth in self._yield and costs.get(b.depth) and b.depth:
                    realised = self._yield[b.depth][0] / costs[b.depth] * c0
                buckets[bucket] = {
                    "depth": b.depth, "rounds": b.rounds, "rounds_by_depth": dict(sorted(b.chosen.items())),
                    "round_ms": {d: round(c * 1e3, 4) for d, c in costs.items() if c is not None},
                    "timed": {d: self._timed.get((bucket, d), 0) for d in self.depths},
                    "predicted_speedup": {d: round(v, 4) for d, v in pred.items()},
                    "delivered_tok_s": {d: round(v[0] / v[1], 1) for (bb, d), v in sorted(self._served.items())
                                        if bb == bucket and v[1] > 0},
                    "vetoed": {d: until - b.rounds for d, until in b.vetoed.items() if until > b.rounds},
                    "switches": b.switches, "last_switch": b.last_switch,
                    "realised_speedup": None if realised is None else round(realised, 4)}
            return {"adaptive": self.config.adaptive, "version": self.version, "depths": self.depths,
                    "predicted_acceptance": None if self._prior is None else [round(a, 4) for a in self._prior],
                    "acceptance": [round(a, 4) for a in rates], "vetoes": self.vetoes, "buckets": buckets}
