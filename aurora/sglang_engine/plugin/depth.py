"""Aurora's depth decision inside SGLang's scheduler (engine sglang, `adaptive_depth`, TP 1).

SGLang's adaptive mode (`--speculative-adaptive`) builds a runtime state (attention backends and CUDA graphs)
for each candidate `speculative_num_steps` at start-up and can switch between them before any decode forward.
Its own rule follows an EMA of accepted drafts and cannot know that a better draft is about to be swapped in,
so it is replaced: the built-in engine's DepthController (aurora/engine/speculation.py) decides, through the
two hooks SGLang's EAGLEWorkerV2 already has:
  activate_step_by_batch(bs)                before every decode forward: choose(bucket) -> that depth's state
  on_verify_complete_cpu(correct, bs)       once a decode result is on the host: acceptance and the round's cost
What a round costs is the wall time from the previous decode result (or from its own launch, if serving was
idle) to its own result reaching the host: the scheduler waits on the device there, so with overlap scheduling
too the period is what the round cost serving. A period with a prefill in it feeds only the delivered-rate guard
rail, not the cost. A result is costed at the depth it was verified at (under overlap scheduling it trails the
state by a forward).

The acceptance prior of each draft version is `accept-<v>.json` in the swap directory, written by Aurora
(step_swap.Publisher) before it announces the version; version 0's is written before SGLang starts (zeros for a
day-0 draft: serving starts as plain decoding). Depth 0 is SGLang's trivial verify (plain decoding through the
same graphs) with the draft extend skipped (SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND): capture and step swaps go on
through that path's hook (eagle3.py). What the decision sees is written to `depth.json` for /v1/draft.

A benchmark can pin the depth: `force-depth.json` ({"depth": d}) in the swap directory, looked for every
FORCE_CHECK_S, overrides the decision while it exists (d must be one of the built depths); rounds are costed as
usual, so a sweep over the depths fills the cost table that `scripts/round_cost_model.py` reads.

A request that ran a round or its prefill at depth 0 has holes in the draft's KV cache there (the draft did not
run; SGLang cannot fill them later), so once speculation is back on it drafts worse than the draft can until it
ends. Such requests are marked cold (`mark_cold`, on SGLang's Req); their rows do not count as the version's
acceptance, and a round with any cold row does not count as what its depth delivers: the turnover after an upshift
would otherwise read as a draft that does not pay, and send serving back to depth 0 for good.

TP > 1 is not driven here: every rank would have to choose the same depth at every forward, and the timings are
each rank's own.
"""
import contextlib
import json
import logging
import os
import time
from collections import deque

from aurora.engine.speculation import DepthController, SpeculationConfig
from aurora.sglang_engine.plugin import plain_round

log = logging.getLogger("aurora.sglang.depth")
DEPTH_ENV = "AURORA_DEPTH"       # "1": Aurora drives SGLang's adaptive states (set by launch.server_env)
SNAPSHOT_EVERY_S = 2.0
FORCE_FILE, FORCE_CHECK_S = "force-depth.json", 0.25
COLD = "aurora_cold"  # on SGLang's Req: a depth-0 forward left this request's draft KV cache incomplete


def mark_cold(reqs) -> None:
    for r in reqs:
        setattr(r, COLD, True)


def accept_path(swap_dir: str, version: int) -> str:
    return os.path.join(swap_dir, f"accept-{version}.json")


def write_acceptance(swap_dir: str, version: int, acceptance: list[float] | None) -> None:
    os.makedirs(swap_dir, exist_ok=True)
    tmp = accept_path(swap_dir, version) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": version, "acceptance": acceptance}, f)
    os.replace(tmp, accept_path(swap_dir, version))


def read_acceptance(swap_dir: str, version: int) -> list[float] | None:
    try:
        with open(accept_path(swap_dir, version)) as f:
            return json.load(f)["acceptance"]
    except (OSError, ValueError, KeyError):
        return None


def write_forced_depth(swap_dir: str, depth: int | None) -> None:
    """Pin every scheduler's depth (None: back to Aurora's decision)."""
    path = os.path.join(swap_dir, FORCE_FILE)
    if depth is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    with open(path + ".tmp", "w") as f:
        json.dump({"depth": int(depth)}, f)
    os.replace(path + ".tmp", path)


def bucket_of(bs: int) -> int:
    """Batch sizes share a cost table per power of two (1, 2, 4, 8, ...)."""
    return 1 << max(0, int(bs) - 1).bit_length()


class Driver:
    """One scheduler's decision. `worker`: SGLang's EAGLEWorkerV2 with adaptive states built; `applied()`: the
    draft version this rank runs (step_swap.Applier.applied)."""

    def __init__(self, worker, swap_dir: str, applied, config: SpeculationConfig | None = None):
        self.worker, self.swap_dir, self.applied = worker, swap_dir, applied
        self.depths = sorted(worker.adaptive_controller._states)
        self.ctl = DepthController(max(self.depths), config or SpeculationConfig(), self.depths)
        self.version = None
        self._launched: deque = deque(maxlen=8)  # launch times of decode forwards whose results are not in yet
        self._last_result: float | None = None
        self._prefilled = False
        self._written = 0.0
        self.forced: int | None = None
        self._force_checked = 0.0
        self._check_version()
        log.info("aurora drives SGLang's speculative depth among %s", self.depths)

    def _check_version(self) -> None:
        v = self.applied()
        if v != self.version:
            self.version = v
            self.ctl.new_version(v, read_acceptance(self.swap_dir, v))

    def _check_forced(self) -> None:
        now = time.monotonic()
        if now - self._force_checked < FORCE_CHECK_S:
            return
        self._force_checked = now
        try:
            with open(os.path.join(self.swap_dir, FORCE_FILE)) as f:
                d = int(json.load(f)["depth"])
        except (OSError, ValueError, KeyError, TypeError):
            d = None
        if d is not None and d not in self.depths:
            log.warning("aurora: forced depth %d is not one of SGLang's built depths %s: ignored", d, self.depths)
            d = None
        if d != self.forced:
            log.info("aurora: depth %s", "decided again" if d is None else f"pinned at {d}")
            self.forced = d

    def before_decode(self, bs: int) -> None:
        if bs <= 0:
            return
        self._check_version()
        self._check_forced()
        b = bucket_of(bs)
        depth = self.ctl.choose(b) if self.forced is None else self.ctl.pinned(b, self.forced)
        if depth != self.worker.speculative_num_steps:
            self.worker.adaptive_controller._activate(depth)
        self._launched.append(time.perf_counter())

    def on_prefill(self) -> None:
        self._prefilled = True

    def speculating(self) -> bool:
        """Some batch size speculates now (or a depth above 0 is pinned): a prefill should extend the draft."""
        return bool(self.forced) or self.ctl.speculating()

    def on_result(self, correct: list[int], bs: int, num_draft_tokens: int | None,
                  cold: list[bool] | None = None) -> None:
        """`cold`: per row, whether that request's draft cache has depth-0 holes (None: none has)."""
        now = time.perf_counter()
        launched = self._launched.popleft() if self._launched else now
        depth = (num_draft_tokens or 1) - 1
        start = launched if self._last_result is None else max(self._last_result, launched)
        period = now - start
        bucket = bucket_of(bs or len(correct))
        warm = list(correct) if not cold or not any(cold) else [c for c, k in zip(correct, cold) if not k]
        self.ctl.observe(bucket, depth, None if self._prefilled else period, warm)
        if len(warm) == len(correct):
            self.ctl.observe_served(bucket, depth, sum(correct) + len(correct), period)
        self._last_result, self._prefilled = now, False
        if now - self._written > SNAPSHOT_EVERY_S:
            self._written = now
            self.write_snapshot()

    def write_snapshot(self) -> None:
        try:
            tmp = os.path.join(self.swap_dir, "depth.json.tmp")
            with open(tmp, "w") as f:
                json.dump(dict(self.ctl.snapshot(), forced=self.forced, **plain_round.snapshot()), f)
            os.replace(tmp, os.path.join(self.swap_dir, "depth.json"))
        except OSError:
            log.exception("aurora: could not write the depth snapshot")


def read_snapshot(swap_dir: str) -> dict | None:
    try:
        with open(os.path.join(swap_dir, "depth.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_drivers: dict = {}  # id(EAGLEWorkerV2) -> Driver, in this scheduler process
_decided = [False]


@contextlib.contextmanager
def decided():
    """Inside: SGLang's activate_step_by_batch leaves the depth alone (plain_round.py chose it for this forward)."""
    _decided[0] = True
    try:
        yield
    finally:
        _decided[0] = False


def speculating() -> bool:
    """Whether any scheduler's decision speculates at some batch size (plain_round.py: else a prefill skips the
    draft, since every round it will run in is plain until the decision changes)."""
    return any(d.speculating() for d in _drivers.values())


def mark_prefill() -> None:
    """A prefill forward ran (eagle3.py's prefill hook): the period to the next decode result is not a round's."""
    for d in _drivers.values():
        d.on_prefill()


def install(applier) -> None:
    """Take over EAGLEWorkerV2's adaptive hooks (class level, once per scheduler process). A Driver is built at
    a worker's first decode forward, when SGLang has built every candidate's state."""
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor as P
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2 as W

    for cls, name in ((W, "activate_step_by_batch"), (W, "on_verify_complete_cpu"), (P, "_resolve_spec_v2_tokens")):
        if not hasattr(cls, name):
            raise RuntimeError(f"aurora plugin: this SGLang has no {cls.__name__}.{name} (built for 0.5.17)")
    swap_dir = os.environ["AURORA_SWAP_DIR"]
    pending = {"ndt": None, "cold": None}  # of the result being resolved (set just before the hook): its draft-token
    # count, and which rows are cold (speculating rounds only)

    def driver(worker) -> Driver | None:
        if worker.adaptive_controller is None:
            return None
        d = _drivers.get(id(worker))
        if d is None:
            d = _drivers[id(worker)] = Driver(worker, swap_dir, lambda: applier.applied if applier else 0)
        return d

    resolve = P._resolve_spec_v2_tokens

    def resolve_spec_v2_tokens(self, result, batch, *args, **kwargs):
        pending["ndt"] = ndt = getattr(result, "speculative_num_draft_tokens", None)
        pending["cold"] = [getattr(r, COLD, False) for r in batch.reqs] if ndt and ndt > 1 else None
        return resolve(self, result, batch, *args, **kwargs)

    def activate_step_by_batch(self, batch_size):
        d = driver(self)
        if d is not None and not _decided[0]:
            d.before_decode(batch_size)

    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size=0):
        d = driver(self)
        if d is not None:  # SGLang's own EMA rule is not fed: Aurora's decision alone moves the depth
            d.on_result(num_correct_drafts_per_req, batch_size, pending["ndt"], pending["cold"])

    P._resolve_spec_v2_tokens = resolve_spec_v2_tokens
    W.activate_step_by_batch, W.on_verify_complete_cpu = activate_step_by_batch, on_verify_complete_cpu
