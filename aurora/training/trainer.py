"""The online trainer: captured samples in, new draft weights out, without ever making serving wait.

Serving threads call `add_sample` (a non-blocking buffer put) and `request_finished` (a counter); a daemon
thread trains an fp32 master copy of the draft (AdamW, linear warm-up, grad clipping) on buffered samples
and, every `sync_every` finished requests, publishes a snapshot in the engine's dtype through the
`publish(state_dict, version, acceptance)` callback after a guard (finite weights; simulated acceptance on
held-out samples not clearly worse than the live draft's). acceptance: the guard's per-position prediction for
the new version (None when nothing is held out yet). Every publish is checkpointed (see checkpoint.py).

Faults: nothing the thread does (a step, the guard's held-out pass, a publish) can end it silently. A step
whose loss or gradient norm is non-finite, or that raises, is skipped (no optimiser update); a guard or
publish that raises refuses the swap (retried after the back-off). Each failure is counted by kind
(faults.py: oom, nan_loss, guard_error, exception) with `last_error`; the thread then backs off: state
"backing_off", batch tokens halved (down to `min_batch_tokens`), the CUDA cache emptied, a sleep that doubles
per consecutive failure (`backoff_initial_s` .. `backoff_max_s`). After `restore_after` good steps the batch
size doubles back. After `max_consecutive_failures` in a row the thread stops in state "failed" (the server's
/health then says "degraded"). Serving never waits on any of it, and the published draft never changes
because of a fault: only a guarded publish changes it.

Bounded memory (bounds.py): every step's padded batch is at most the current batch tokens, and a sample
longer than `max_sample_tokens` (or the current batch tokens) is split into windows or skipped, counted in
`samples_dropped_by_reason` / `samples_split`. The guard scores held-out samples in batches of at most
`guard_chunk_tokens` padded tokens (halved with the batch size while backing off).

Threads: torch.set_num_threads is process-global in name, but with the OpenMP backend it sets the calling
thread's OpenMP/MKL thread count plus a global default read by threads that have not run a parallel op yet.
The trainer thread sets `torch_threads` for itself (after forcing ATen's per-thread lazy init, which would
otherwise re-apply the global default on the thread's first op), then `start` re-applies the caller's count
so threads created later (e.g. the engine's) keep the process default (tested in test_guard_faults.py).
The trade-off, measured on a 2-core CPU box (a 512x512 fp32 matmul standing in for serving, tiny draft
training beside it): serving with 1 thread: 2.36 ms alone, 2.43 ms beside a torch_threads=1 trainer,
3.5-4.1 ms beside a 2-thread trainer. Serving with 2 threads: 1.25 ms alone, 4-16 ms beside a 1-thread
trainer (an OpenMP team needs all its cores). So on a CPU host give serving (cores - torch_threads)
threads; on a GPU host the trainer's CPU threads only feed kernel launches and 1-2 suffice.
"""
import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass

import torch

from aurora.models.draft import Eagle3Draft
from aurora.sample import Sample
from aurora.sharing import DeviceShare
from aurora.training.buffer import SampleBuffer
from aurora.training.bounds import MIN_TOKENS, POLICIES, bound_samples, pack
from aurora.training.checkpoint import read_trainer_state, write_checkpoint
from aurora.training.faults import KINDS, FaultInjector, NonFiniteLoss, failure_kind
from aurora.training.graphed import GraphedSteps, pack_length
from aurora.training.guard import finite_state, predicted_acceptance, simulated_acceptances
from aurora.training.loss import OBJECTIVES
from aurora.training.ttt import collate, ttt_loss

log = logging.getLogger("aurora.training")

_HINTS = {  # what the user can do, by failure kind
    "oom": "The trainer ran out of GPU memory: lower --train-batch-tokens, leave SGLang less memory (its "
           "--mem-fraction-static in --sglang-args), or put the trainer on another GPU (--trainer-device cuda:N).",
    "nan_loss": "The loss was not finite (the step was skipped, the draft is unchanged): lower --lr if it repeats.",
    "guard_error": "The swap guard's held-out pass failed; the swap is retried after the back-off.",
    "exception": "See the traceback above.",
    None: "",
}


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    objective: str = "fkl"
    lr: float = 3e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ttt_length: int = 4
    step_decay: float = 0.8
    ttt_position_step: int = 1            # TTT step k at rotary position t + k (as served); 0 only for A/B sweeps
    train_steps: int | str = 0            # TTT steps trained per position, 1..ttt_length; 0 = ttt_length; "auto" =
                                          # one at first, grown with the draft (OnlineTrainer._grow). The guard
                                          # still predicts all ttt_length positions
    grow_reach: float = 0.1               # "auto": step k+1 joins once this share of rounds would reach it
    grow_after: int = 20                  # "auto": optimiser steps at k steps before k+1 may join (the per-step
                                          # accuracies are EMAs that settle in about 10 steps)
    reject_weight: float = 0.1
    batch_tokens: int = 2048
    sync_every: int = 800                 # finished requests between publishes
    min_samples_before_train: int = 16
    guard_margin: float = 0.05            # refuse if candidate accept_length < live's - margin (tokens/round)
    guard_share: float = 0.25             # the most of the trainer's time its guard passes may take: a due swap
                                          # waits, training on, until the steps since the last swap took
                                          # (1 - share) / share times the last guard pass; 1 = never wait
    buffer_samples: int = 4096
    buffer_bytes: int = 2 << 30
    buffer_policy: str = "drop_oldest"
    replay_passes: int = 1                # times each sample is trained on (replays only when no fresh one waits)
    heldout_every: int = 20
    heldout_size: int = 32
    keep_versions: int = 3                # published versions kept in memory for rollback
    max_consecutive_failures: int = 10   # failures in a row before the trainer stops in state "failed"
    backoff_initial_s: float = 1.0        # sleep after a failure; doubles per consecutive failure
    backoff_max_s: float = 60.0
    min_batch_tokens: int = 128           # back-off halves the batch tokens down to this
    restore_after: int = 10               # good steps at a reduced batch size before it doubles back
    max_sample_tokens: int | None = None  # longer samples are split or skipped; None = batch_tokens
    long_sample_policy: str = "split"     # "split" into windows or "skip"
    guard_chunk_tokens: int = 2048        # padded tokens per batch of the guard's held-out pass
    predict_pseudo_rounds: float = 16.0   # a version's predicted acceptance per position counts this many
                                          # held-out rounds that accepted nothing beside the real ones
                                          # (guard.predicted_acceptance)
    faults: str | None = None             # fault injection (faults.py); None = the AURORA_FAULT variable
    checkpoint_dir: str | None = None
    resume: bool = False
    device: str = "cpu"
    precision: str = "auto"               # "bf16": forward and backward under bf16 autocast (fp32 master weights and
                                          # optimiser; tensor-core GEMMs and the fused kernel's bf16 path), "fp32",
                                          # or "auto": bf16 on CUDA, fp32 elsewhere (bf16 is fast only on CPUs with
                                          # bf16 instructions, and at a CPU's duty serving saw no difference)
    graphs: bool = True                   # CUDA, samples with the target's final states: each step's forward and
                                          # backward replayed as a CUDA graph per batch shape (training/graphed.py)
    torch_threads: int = 1
    duty: float = 1.0                     # while serving is busy, the most of the wall time spent training (it rests
                                          # after each step); below 1 leaves the device (and the GIL) to serving
    seed: int = 0

    @property
    def steps_trained(self) -> int:
        """The TTT steps a fresh trainer trains (with "auto", the trainer grows them)."""
        return 1 if self.train_steps == "auto" else self.train_steps or self.ttt_length

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("lr", "grad_clip", "batch_tokens", "sync_every", "ttt_length", "torch_threads",
                     "max_consecutive_failures", "replay_passes", "restore_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("warmup_steps", "weight_decay", "reject_weight", "min_samples_before_train", "guard_margin",
                     "predict_pseudo_rounds", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 < self.duty <= 1:
            raise ValueError("duty must be in (0, 1]")
        if self.train_steps != "auto" and not (isinstance(self.train_steps, int)
                                               and 0 <= self.train_steps <= self.ttt_length):
            raise ValueError(f"train_steps must be auto or in [0, ttt_length={self.ttt_length}] (0: ttt_length)")
        if not 0 < self.grow_reach <= 1 or self.grow_after < 1:
            raise ValueError("grow_reach must be in (0, 1] and grow_after >= 1")
        if not 0 < self.guard_share <= 1:
            raise ValueError("guard_share must be in (0, 1]")
        if not 0 < self.step_decay <= 1:
            raise ValueError("step_decay must be in (0, 1]")
        if self.keep_versions < 2:
            raise ValueError("keep_versions must be >= 2 (rollback needs the previous version)")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")
        bounded = ("min_batch_tokens", "guard_chunk_tokens") + (("max_sample_tokens",) if self.max_sample_tokens else ())
        for name in bounded:
            if getattr(self, name) < MIN_TOKENS:
                raise ValueError(f"{name} must be >= {MIN_TOKENS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.long_sample_policy not in POLICIES:
            raise ValueError(f"long_sample_policy must be one of {POLICIES}, got {self.long_sample_policy!r}")
        FaultInjector.from_env(self.faults)  # a bad spec fails here, not in the thread


class OnlineTrainer:
    def __init__(self, draft: Eagle3Draft, target_lm_head: torch.Tensor | None, config: TrainConfig, publish,
                 share: DeviceShare | None = None):
        """target_lm_head None: samples carry no target_hidden and train on the target's top K where they carry
        it, else on one-hot targets (SGLang backend; aurora/sample.py).
        share: how training shares the device with serving (aurora/sharing.py); default: `config.duty` alone."""
        if draft.embed is None:
            raise ValueError("draft has no embedding: call draft.share_embedding(target.embed_tokens) first")
        self.config = c = config
        self.device = torch.device(c.device)
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if bf16 else "fp32"
        self.engine_dtype = draft.fc.weight.dtype
        self._publish_fn = publish
        self.share = share or DeviceShare(duty=c.duty)
        self.master = self._fp32_copy(draft)
        self._scratch = self._fp32_copy(draft).requires_grad_(False)  # scores the live draft in the guard
        self.lm_head = None if target_lm_head is None else target_lm_head.detach().to(self.device)
        self.target_to_draft = draft.target_to_draft()
        # samples with the target's final states on a GPU: a step replays a CUDA graph. Not the top-K/one-hot
        # targets (their batch assembly reads the device), nor a CPU, nor a drained share (it synchronises per module)
        self.ttt_steps, self._grown_at = c.steps_trained, 0  # TTT steps trained now; optimiser steps when they grew
        self.graphs = None
        if c.graphs and self.device.type == "cuda" and self.lm_head is not None and not self.share.drain:
            self.graphs = GraphedSteps(self.master, self._loss, self.ttt_steps, self.target_to_draft, self.device)
        self.optimizer = torch.optim.AdamW(self.master.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
        self.buffer = SampleBuffer(c.buffer_samples, c.buffer_bytes, c.buffer_policy, c.heldout_every, c.heldout_size,
                                   c.replay_passes, c.seed)
        self._model_lock = threading.RLock()    # master weights + optimiser
        self._publish_lock = threading.RLock()  # one publish/rollback at a time
        self._stats_lock = threading.Lock()     # counters read by status()
        self._stop, self._sync = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.version, self.steps, self.swaps, self.swaps_refused, self.failures = 0, 0, 0, 0, 0
        self._steps_at_swap = 0  # optimiser steps when the last due swap was tried (see _wake)
        self._last_guard_s, self._step_s_since_swap = 0.0, 0.0  # see _guard_paid_for
        self.swaps_deferred, self._deferring = 0, False
        self.requests_since_swap, self.finished_requests, self.samples_invalid = 0, 0, 0
        self._consecutive_failures, self._state, self.last_error, self.last_guard = 0, "idle", None, None
        self.failures_by_kind = dict.fromkeys(KINDS, 0)
        self.last_failure_kind: str | None = None
        self.samples_trained, self.samples_split = 0, 0  # fresh samples trained (replays not counted again)
        self.samples_in_training = 0  # fresh samples of the batch being trained (taken from the buffer, not yet done)
        self.samples_dropped_trainer = {"too_long": 0, "step_failed": 0}
        self._batch_tokens, self._good_steps = c.batch_tokens, 0  # current (backed-off) batch size
        self.faults = FaultInjector.from_env(c.faults)
        if self.faults.active:
            log.warning("trainer fault injection is on: %s", self.faults.spec)
        self.loss_per_step, self.acc_per_step = [0.0] * self.ttt_steps, [0.0] * self.ttt_steps
        self.tokens_per_second, self.tokens_trained = 0.0, 0  # tokens_trained: replays included, since start
        self.acceptance: list[float] | None = None  # the held-out prediction of the version last published
        # accept length each published version was predicted on the held-out samples at its guard pass (the
        # learning curve while serving decodes plainly and served accept length says nothing); last 8 versions
        self.heldout_accept_by_version: dict[int, float] = {}
        self._resumed = bool(c.resume and self._restore())
        self._history = [(self.version, self._snapshot())]  # (version, engine-dtype params) published, newest last
        self._steps_published = self.steps  # optimiser steps in the version last published

    # ---- serving-side API: cheap, never blocks on training ----
    def add_sample(self, sample: Sample) -> bool:
        """Offer a finished request's sample (the engine chose which requests leave one, when they arrived:
        aurora.sample.sampled). Returns False if invalid, or dropped by the buffer."""
        cfg = self.master.config
        one_hot = self.lm_head is None  # then samples must come without final states, else with matching ones
        if sample.aux_hidden.shape[-1] != 3 * cfg.target_hidden_size or (sample.target_hidden is None) != one_hot \
                or (not one_hot and sample.target_hidden.shape[-1] != self.lm_head.shape[1]):
            with self._stats_lock:
                self.samples_invalid += 1
            return False
        return self.buffer.put(sample)

    def request_finished(self) -> None:
        with self._stats_lock:
            self.finished_requests += 1
            self.requests_since_swap += 1
            if self.requests_since_swap >= self.config.sync_every:
                self._sync.set()  # the trainer thread publishes between steps

    # ---- lifecycle ----
    def start(self, unguarded: list[float] | None = None) -> None:
        """unguarded: the prediction to hand the engine with restored weights of version 0, which never passed a
        guard (a scratch head: zeros, plain decoding until a version's prediction says speculation pays)."""
        if self._thread is not None:
            raise RuntimeError("trainer already started")
        if self._resumed:  # the engine may hold other weights: hand it the restored ones first, with their prediction
            acceptance = unguarded if self.acceptance is None and self.version == 0 else self.acceptance
            self._publish_fn(self._history[-1][1], self.version, acceptance)
        # the master copy was made on the caller's stream (the engine's, for a day-0 pruned vocabulary): finish it
        # before the thread works on it from its own stream
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        caller_threads, ready = torch.get_num_threads(), threading.Event()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="aurora-trainer", daemon=True)
        self._thread.start()
        ready.wait()
        torch.set_num_threads(caller_threads)  # restore the default for threads created later

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self.buffer.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._state != "failed":
            self._state = "stopped"

    def _run(self, ready: threading.Event) -> None:
        torch.get_num_threads()  # runs ATen's once-per-thread lazy init now, so it cannot later undo the next line
        torch.set_num_threads(self.config.torch_threads)  # this thread's OpenMP/MKL count only
        if self.device.type == "cuda":  # its own stream: serving's syncs never wait on training kernels
            torch.cuda.set_stream(self.share.trainer_stream(self.device))
        self.share.drain_after_modules(self.master)
        ready.set()
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as e:  # nothing may end this thread unseen (see the module doc)
                where = getattr(e, "aurora_where", "step")
                self._record_failure(failure_kind(e, where), f"{where}: {type(e).__name__}: {e}",
                                     exc_info=not isinstance(e, NonFiniteLoss))
                if not self._back_off():
                    return
            except BaseException as e:  # not an Exception (e.g. SystemExit from a library): record it, then go
                self._record_failure("exception", f"{type(e).__name__}: {e}")
                self._give_up()
                raise

    def _wake(self) -> threading.Event | None:
        """What may cut a rest short: a due swap, only when an optimiser step came since the last swap and the
        guard is paid for. After a swap the rest is taken in full (the rest it cut stays owed): were every due
        swap to cut the rest, the duty would not hold wherever swaps fall due faster than a step's rest ends (a
        CPU: a step of seconds, a rest of nine times that, a swap every 16 requests), and serving would lose half
        its time, not a tenth."""
        return self._sync if self.steps > self._steps_at_swap and self._guard_paid_for() else None

    def _guard_paid_for(self) -> bool:
        """Whether the steps since the last swap took long enough that another guard pass (timed as the last
        one) keeps the guard within `guard_share` of the trainer's time. Where swaps fall due faster than the
        trainer steps (a CPU: a held-out pass over the target's whole vocabulary costs several optimiser
        steps, and swaps are due every 16 requests), guarding every due swap would leave the trainer's duty to
        the guard and next to nothing to learning; the swap instead waits for the training that makes it worth
        a guard. On a GPU at 800 requests per swap the steps outweigh the guard and nothing waits."""
        share = self.config.guard_share
        paid = share >= 1 or self._step_s_since_swap * share >= (1 - share) * self._last_guard_s
        if not paid and self._sync.is_set() and not self._deferring:
            self._deferring = True
            with self._stats_lock:
                self.swaps_deferred += 1
            log.info("swap due, deferred: %.1f s of training since the last swap against a %.1f s guard pass "
                     "(guard_share %.2f)", self._step_s_since_swap, self._last_guard_s, share)
        return paid

    def _iteration(self) -> None:
        if self._sync.is_set() and self.steps == self._steps_published:
            # nothing learnt since the last version (no samples yet, or all of them failed): the same weights
            # again would cost a guard pass and a swap, and the engine would re-observe an unchanged draft
            self._sync.clear()
            with self._stats_lock:
                self.requests_since_swap = 0
        if self._sync.is_set() and self._guard_paid_for():
            self._sync.clear()
            self._steps_at_swap, self._step_s_since_swap, self._deferring = self.steps, 0.0, False
            try:
                self._swap()
            except Exception:
                self._sync.set()  # the swap is retried after the back-off, without waiting to pay for a guard
                self._last_guard_s = 0.0
                raise
            finally:
                self.share.rest(self._stop, self._wake())  # the guard's pass counts against the duty like a step
            self._succeeded(step=False)
        if self.buffer.captured < self.config.min_samples_before_train:
            self._state = "idle"
            self._stop.wait(0.05)
            return
        samples = self.buffer.get_batch(self._batch_tokens, timeout=0.1)
        if not samples:
            self._state = "idle"
            return
        self._state = "training"
        self._train_batch(samples, fresh=self.buffer.last_batch_fresh)

    def _train_batch(self, samples: list[Sample], fresh: bool) -> None:
        """Bounded steps over one buffer batch: samples split (or skipped) to the bound, packed so every step's
        padded size is at most the current batch tokens. On a failure the rest of the batch is dropped
        (counted) and the error propagates to the back-off."""
        c = self.config
        bound = min(c.max_sample_tokens or c.batch_tokens, self._batch_tokens)
        items, split, skipped = bound_samples(samples, bound, c.long_sample_policy)
        if fresh:  # replays were counted when they were fresh
            with self._stats_lock:
                self.samples_split += split
                self.samples_dropped_trainer["too_long"] += skipped
            if skipped:
                log.warning("skipped %d sample(s) longer than %d tokens (long_sample_policy skip)", skipped, bound)
        pending = {}  # original sample -> its windows not yet trained
        for j, (i, _) in enumerate(items):
            pending.setdefault(i, set()).add(j)
        if fresh:
            with self._stats_lock:
                self.samples_in_training = len(pending)
        try:
            size = pack_length(self._batch_tokens) if self.graphs is not None else (lambda n: n)
            for group in pack(list(enumerate(items)), self._batch_tokens, length=lambda it: size(it[1][1].num_tokens)):
                self.share.rest(self._stop, self._wake())  # owed from before a restart or a burst (sharing.py)
                spent = self.share.trained_s
                with self.share.training():
                    self.train_step([s for _, (_, s) in group])
                self._step_s_since_swap += self.share.trained_s - spent  # a turn's wait included, as in the guard's
                self.share.rest(self._stop, self._wake())  # serving first (aurora/sharing.py); a due swap ends it
                for j, (i, _) in group:
                    pending[i].discard(j)
                self._succeeded()
        finally:
            if fresh:
                lost = sum(1 for w in pending.values() if w)
                with self._stats_lock:
                    self.samples_dropped_trainer["step_failed"] += lost
                    self.samples_trained += len(pending) - lost
                    self.samples_in_training = 0

    def _succeeded(self, step: bool = True) -> None:
        """A good step or swap: the failure streak ends; after restore_after good steps the batch size doubles
        back."""
        with self._stats_lock:
            if self._consecutive_failures:
                log.info("trainer recovered after %d failure(s); batch tokens %d", self._consecutive_failures,
                         self._batch_tokens)
            self._consecutive_failures = 0
        if step and self._batch_tokens < self.config.batch_tokens:
            self._good_steps += 1
            if self._good_steps >= self.config.restore_after:
                self._batch_tokens, self._good_steps = min(self.config.batch_tokens, 2 * self._batch_tokens), 0
                log.info("trainer batch tokens back up to %d", self._batch_tokens)

    def _back_off(self) -> bool:
        """After a failure (already recorded): smaller batches, freed cache, a growing sleep. False: give up."""
        c, n = self.config, self._consecutive_failures
        if n >= c.max_consecutive_failures:
            self._give_up()
            return False
        self._state = "backing_off"
        self._batch_tokens = max(min(c.min_batch_tokens, c.batch_tokens), self._batch_tokens // 2)
        self._good_steps = 0
        if self.device.type == "cuda":
            if self.graphs is not None and self.last_failure_kind == "oom":
                self.graphs.reset()  # their pool too; shapes of the smaller batches are captured again
            torch.cuda.empty_cache()  # the failed step's blocks go back to the device (serving may need them)
        delay = min(c.backoff_max_s, c.backoff_initial_s * 2 ** (n - 1))
        log.warning("trainer backing off %.1f s (failure %d of %d in a row), batch tokens now %d; serving is not "
                    "affected. %s", delay, n, c.max_consecutive_failures, self._batch_tokens,
                    _HINTS[self.last_failure_kind])
        self._stop.wait(delay)
        return True

    def _give_up(self) -> None:
        self._state = "failed"
        log.error("trainer stopped after %d consecutive failures (last, %s: %s). Serving continues with draft "
                  "version %d, which no longer learns. %s Restart the server (with --resume to keep the trained "
                  "draft) once the cause is fixed.", self._consecutive_failures, self.last_failure_kind,
                  self.last_error, self.version, _HINTS[self.last_failure_kind])

    def _record_failure(self, kind: str, msg: str, exc_info: bool = False) -> None:
        log.warning("trainer failure (%s): %s", kind, msg, exc_info=exc_info)
        with self._stats_lock:
            self.failures += 1
            self.failures_by_kind[kind] += 1
            self._consecutive_failures += 1
            self.last_error, self.last_failure_kind = msg, kind

    # ---- training ----
    def train_step(self, samples: list[Sample]) -> float:
        """One optimiser step on these samples; raises (without updating) on a non-finite loss or gradient."""
        c = self.config
        t0 = time.perf_counter()
        self.faults.check("trainer_oom")
        keep_grads = self.graphs is not None  # the graphs write into these .grad tensors: zeroed, never dropped
        with self._model_lock:
            self.master.train()
            graphed = None if self.graphs is None else self.graphs.forward_backward(samples, self._batch_tokens)
            if graphed is not None:
                loss, loss_steps, acc_steps, num_tokens = graphed
            else:
                batch = collate(samples, self.ttt_steps, self.target_to_draft, self.device)
                num_tokens = batch.num_tokens
                loss, loss_steps, acc_steps = self._loss(batch)
                self.optimizer.zero_grad(set_to_none=not keep_grads)
            if self.faults.fires("nan_loss"):
                loss = loss * float("nan")
            if graphed is None:
                loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.master.parameters(), c.grad_clip)
            # the step's one host sync: loss, gradient norm and per-step statistics together (on a GPU shared
            # with serving, every sync waits for the GPU's turn)
            stats = torch.cat([torch.stack([loss.detach().float(), gnorm.float()]), loss_steps.float(),
                               acc_steps.float()]).tolist()
            loss_f, gnorm_f = stats[0], stats[1]
            loss_steps, acc_steps = stats[2:2 + self.ttt_steps], stats[2 + self.ttt_steps:]
            if not math.isfinite(loss_f) or not math.isfinite(gnorm_f):
                self.optimizer.zero_grad(set_to_none=not keep_grads)
                raise NonFiniteLoss(f"non-finite loss {loss_f}" if not math.isfinite(loss_f)
                                    else f"non-finite gradient norm {gnorm_f}")
            self.optimizer.step()
            self.scheduler.step()
        dt = time.perf_counter() - t0
        with self._stats_lock:
            a = 0.1 if self.steps else 1.0  # EMA, seeded by the first step (a step that just joined: by its first)
            ema = lambda old, new: [n if i >= len(old) else (1 - a) * old[i] + a * n  # noqa: E731
                                    for i, n in enumerate(new)]
            self.loss_per_step = ema(self.loss_per_step, loss_steps)
            self.acc_per_step = ema(self.acc_per_step, acc_steps)
            self.tokens_per_second = (1 - a) * self.tokens_per_second + a * num_tokens / dt
            self.tokens_trained += num_tokens
            self.steps += 1
        self._grow()
        return loss_f

    def _grow(self) -> None:
        """train_steps "auto": TTT step k+1 joins once the share of rounds that would reach it (the product of
        steps 1..k's running top-1 accuracies) passes grow_reach. Each trained step costs a draft forward and
        backward per token, and serving's chain stops at the first rejection: while the draft's first positions
        seldom accept, a later position's training is paid in full for rounds that rarely get there, and fewer
        steps learned more per request and per trainer second (results/online/cpu_ttt_steps_120_chat_2026-12-08/).
        Steps only join (a dip in accuracy keeps them): each change recaptures the step's CUDA graphs."""
        c = self.config
        if c.train_steps != "auto" or self.ttt_steps >= c.ttt_length or self.steps - self._grown_at < c.grow_after:
            return
        reach = math.prod(self.acc_per_step[:self.ttt_steps])
        if reach < c.grow_reach:
            return
        self.ttt_steps, self._grown_at = self.ttt_steps + 1, self.steps
        if self.graphs is not None:
            self.graphs.reset(self.ttt_steps)
        log.info("trainer: TTT steps trained now %d of %d (%.2f of rounds would reach step %d, at optimiser step %d)",
                 self.ttt_steps, c.ttt_length, reach, self.ttt_steps, self.steps)

    # ---- publishing ----
    def swap_now(self) -> int | None:
        """Guard and publish the current master now. Returns the new version, or None if refused or failed
        (a failure is counted by kind, with last_error)."""
        try:
            version = self._swap()
        except Exception as e:
            where = getattr(e, "aurora_where", "publish")
            self._record_failure(failure_kind(e, where), f"{where}: {type(e).__name__}: {e}", exc_info=True)
            return None
        self._succeeded(step=False)
        return version

    def _swap(self) -> int | None:
        """Raises what the guard or the publish raised, marked with `aurora_where` ("guard" or "publish")."""
        with self._publish_lock:
            with self._model_lock:
                candidate = self._snapshot()
            with self._stats_lock:
                self.requests_since_swap = 0
            try:
                verdict, prediction, heldout_accept = self._guard(candidate)  # its chunks run as training turns
            except Exception as e:
                e.aurora_where = "guard"
                raise
            if verdict is not None:
                log.warning("swap refused: %s", verdict)
                with self._stats_lock:
                    self.swaps_refused += 1
                    self.last_guard = verdict
                return None
            return self._publish(candidate, prediction, heldout_accept)

    def rollback(self) -> int:
        """Republish the previous good version under a new version number; the master restarts from it with
        fresh optimiser moments (the moments belong to the trajectory that was rolled back)."""
        with self._publish_lock:
            if len(self._history) < 2:
                raise RuntimeError("no previous version to roll back to")
            self._history.pop()
            _, state = self._history.pop()
            with self._model_lock:
                self.master.load_state_dict(state, strict=False)
                self.optimizer.state.clear()
            try:
                return self._publish(state)
            except Exception as e:
                self._record_failure(failure_kind(e, "publish"), f"rollback publish: {type(e).__name__}: {e}")
                raise RuntimeError(f"rollback publish failed: {e!r}") from e

    def _guard(self, candidate: dict) -> tuple[str | None, list[float] | None, float | None]:
        """(why the candidate is refused, or None; its predicted per-position acceptance, which travels with
        its weights if they are published; its held-out accept length), the last two None when nothing is held
        out yet."""
        if not finite_state(candidate):
            return "candidate has non-finite weights", None, None
        heldout = self.buffer.heldout()
        if not heldout:  # nothing held out yet (first sync of a fresh service): only the finiteness check
            return None, None, None
        spent = self.share.trained_s  # the time its chunks held the device, as the duty counts it
        sim, live_sim = self._simulate([candidate, self._history[-1][1]], heldout)
        self._last_guard_s = self.share.trained_s - spent
        cand, live = sim["accept_length"], live_sim["accept_length"]
        self.last_guard = f"held-out accept_length candidate {cand:.3f} vs live {live:.3f}"
        if cand < live - self.config.guard_margin:
            return self.last_guard, None, cand
        return None, predicted_acceptance(sim, self.config.predict_pseudo_rounds), cand

    def _simulate(self, states: list[dict], samples: list[Sample]) -> list[dict]:
        """The states' simulated acceptance on the samples, the target's side computed once for all."""
        self.faults.check("guard_error")
        self.faults.check("guard_oom")
        c = self.config  # the chunk shrinks with the batch size while backing off (an OOM there was the guard's)
        chunk = max(MIN_TOKENS, c.guard_chunk_tokens * self._batch_tokens // c.batch_tokens)
        with self._autocast():
            return simulated_acceptances(self._scratch, states, samples, self.lm_head, c.ttt_length,
                                         self.target_to_draft, self.device, chunk_tokens=chunk,
                                         turn=self.share.training)

    def _publish(self, state: dict, acceptance: list[float] | None = None,
                 heldout_accept: float | None = None) -> int | None:
        """Raises (marked aurora_where "publish") when the engine refused the weights: it still serves the
        previous version. acceptance: the state's predicted per-position acceptance on held-out traffic;
        heldout_accept: its accept length there (both from its guard pass; None for a rollback)."""
        version = self.version + 1
        try:
            self.faults.check("publish_error")
            self._publish_fn(state, version, acceptance)
        except Exception as e:
            e.aurora_where = "publish"
            raise
        with self._stats_lock:
            self.version, self.swaps, self.requests_since_swap = version, self.swaps + 1, 0
            self._steps_published, self.acceptance = self.steps, acceptance
            if heldout_accept is not None:
                by_version = {**self.heldout_accept_by_version, version: heldout_accept}
                self.heldout_accept_by_version = dict(sorted(by_version.items())[-8:])
        self._history = (self._history + [(version, state)])[-self.config.keep_versions:]
        if self.config.checkpoint_dir:
            try:
                self.save()
            except Exception as e:  # serving goes on; the previous checkpoint stays loadable
                log.exception("checkpoint of draft version %d failed", version)
                self._record_failure(failure_kind(e, "publish"), f"checkpoint v{version}: {type(e).__name__}: {e}")
        return version

    def published_draft(self) -> tuple[int, Eagle3Draft]:
        """(version, a draft holding the weights last published), e.g. to restart an engine with them."""
        with self._publish_lock:
            version, state = self._history[-1]
        draft = Eagle3Draft(self.master.config)
        draft.load_state_dict({k: v.detach().cpu() for k, v in self.master.state_dict().items()}, strict=False)
        draft.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=False)
        return version, draft

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Parameters only, in the engine's dtype (d2t/t2d are fixed on day 0 and never re-sent)."""
        state = {k: v.detach().to(self.engine_dtype, copy=True) for k, v in self.master.named_parameters()}
        if self.device.type == "cuda":  # the engine copies these on its own stream: finish them first
            torch.cuda.current_stream(self.device).synchronize()
        return state

    # ---- durability ----
    def save(self, path: str | None = None) -> str:
        path = path or self.config.checkpoint_dir
        if not path:
            raise ValueError("no path and no checkpoint_dir")
        with self._publish_lock, self._model_lock:
            state = {"master": self.master.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "config": asdict(self.config),
                     "acceptance": self.acceptance, "heldout_accept_by_version": self.heldout_accept_by_version,
                     "counters": {k: getattr(self, k) for k in ("version", "steps", "swaps", "swaps_refused",
                                                                 "failures", "finished_requests")},
                     "sharing": {"step_s": self.share.step_s, "owed_s": self.share.owed_s},
                     "ttt_steps": self.ttt_steps}
            write_checkpoint(path, self.master, self.engine_dtype, state)
        return path

    def _restore(self) -> bool:
        state = read_trainer_state(self.config.checkpoint_dir, self.device)
        if state is None:
            log.info("resume: no checkpoint under %s, starting fresh", self.config.checkpoint_dir)
            return False
        self.master.load_state_dict(state["master"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for k, v in state["counters"].items():
            setattr(self, k, v)
        self.acceptance = state.get("acceptance")  # absent in checkpoints written before it was kept
        self.heldout_accept_by_version = dict(state.get("heldout_accept_by_version") or {})
        sharing = state.get("sharing") or {}  # what the trainer before the restart owed serving (sharing.py)
        self.share.step_s = float(sharing.get("step_s", 0.0))
        self.share.owe(sharing.get("owed_s", 0.0))
        if self.config.train_steps == "auto":  # the steps it had grown to (absent before "auto": start again at 1)
            self.ttt_steps = max(1, min(self.config.ttt_length, int(state.get("ttt_steps", 1))))
            self._grown_at = self.steps
            if self.graphs is not None:
                self.graphs.reset(self.ttt_steps)
        return True

    def train_epochs(self, samples: list[Sample], epochs: int, seed: int = 0, max_tokens: int | None = None) -> int:
        """Offline training on a fixed sample set (comparisons and sweeps): `epochs` shuffled passes in batches
        of about `batch_tokens`, stopping early once `max_tokens` are trained. Returns the tokens trained.
        Not for a started trainer (no locking with it)."""
        rng, tokens, budget = random.Random(seed), 0, self.config.batch_tokens
        for _ in range(epochs):
            order = samples[:]
            rng.shuffle(order)
            batch, n = [], 0
            for s in order + [None]:
                if batch and (s is None or n + s.num_tokens > budget):
                    self.train_step(batch)
                    tokens += n
                    batch, n = [], 0
                    if max_tokens is not None and tokens >= max_tokens:
                        return tokens
                if s is not None:
                    batch.append(s)
                    n += s.num_tokens
        return tokens

    def _autocast(self, cache: bool = True):
        """The draft's forward (and so its backward) in bf16 where `precision` says so; a no-op context in fp32.
        cache False: no cast weights kept across the region (a CUDA graph capture)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=cache)

    def _loss(self, batch, cache: bool = True):
        """The master's TTT loss of a batch (loss, per-step loss, per-step accuracy), under `_autocast`."""
        c = self.config
        with self._autocast(cache):
            return ttt_loss(self.master, batch, self.lm_head, c.objective, self.ttt_steps, c.step_decay,
                            c.reject_weight, c.ttt_position_step)

    def _fp32_copy(self, draft: Eagle3Draft) -> Eagle3Draft:
        copy = Eagle3Draft(draft.config)
        copy.load_state_dict(draft.state_dict())
        copy = copy.to(device=self.device, dtype=torch.float32)
        embed = draft.embed
        if embed.weight.device != self.device:  # a frozen copy where the trainer runs
            embed = torch.nn.Embedding.from_pretrained(embed.weight.detach().to(self.device), freeze=True)
        return copy.share_embedding(embed)

    def status(self) -> dict:
        with self._stats_lock:
            state = self._state
            if self._consecutive_failures and state not in ("failed", "stopped"):
                state = "backing_off"  # until a step or swap succeeds again
            dropped = {"buffer_full": self.buffer.dropped, "invalid": self.samples_invalid,
                       **self.samples_dropped_trainer}
            return {"state": state, "version": self.version, "steps": self.steps,
                    "loss_per_step": list(self.loss_per_step), "acc_per_step": list(self.acc_per_step),
                    "ttt_steps": self.ttt_steps, "ttt_length": self.config.ttt_length,
                    "samples_captured": self.buffer.captured, "samples_dropped": self.buffer.dropped,
                    "samples_invalid": self.samples_invalid, "buffer_size": self.buffer.size,
                    "buffer_bytes": self.buffer.bytes, "heldout_size": len(self.buffer.heldout()),
                    "replay_size": self.buffer.replay_size, "replay_evicted": self.buffer.replay_evicted,
                    "swaps": self.swaps, "swaps_refused": self.swaps_refused, "swaps_deferred": self.swaps_deferred,
                    "failures": self.failures,
                    "failures_by_kind": dict(self.failures_by_kind), "last_failure_kind": self.last_failure_kind,
                    "consecutive_failures": self._consecutive_failures,
                    "max_consecutive_failures": self.config.max_consecutive_failures,
                    "batch_tokens": self._batch_tokens, "samples_trained": self.samples_trained,
                    "samples_split": self.samples_split, "samples_dropped_by_reason": dropped,
                    "samples_heldout": self.buffer.heldout_taken, "samples_in_training": self.samples_in_training,
                    "last_error": self.last_error, "last_guard": self.last_guard,
                    "heldout_accept_by_version": dict(self.heldout_accept_by_version),
                    "tokens_per_second": self.tokens_per_second, "tokens_trained": self.tokens_trained,
                    "precision": self.precision,
                    "graphs": None if self.graphs is None else self.graphs.stats(),
                    "requests_since_swap": self.requests_since_swap,
                    "finished_requests": self.finished_requests, "sync_every": self.config.sync_every,
                    "sharing": self.share.status()}
