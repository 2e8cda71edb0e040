"""How serving and the trainer share one device, so that learning never costs serving more than it is allowed.

Serving comes first. The engine thread wraps each step in `serving()`; the trainer wraps its device work (each
optimiser step, the guard's held-out pass) in `training()` and calls `rest()` before and after it:

- `duty`: while serving is busy (a step ran within the last `busy_window_s`), the trainer rests after each step
  in proportion to it, so it takes at most `duty` of the wall time; while serving is idle it trains freely.
  When serving turns busy after an idle spell, the trainer first rests as if it had just trained for as long as
  its last step took: the duty then holds over every busy stretch from its start, not only on average (without
  it a burst of requests opens with a training step: seconds on a CPU, where serving waits for it).
- `turns` (a CPU): serving and training take turns on the cores instead of running side by side. Two OpenMP
  teams on the same cores slow each other far more than their share (trainer.py's module doc has the
  numbers), so the trainer's step waits for the engine's step to end, and the engine's next step waits for
  the trainer's; with `duty` that costs serving that fraction of its time and no more.
- `sms` (a GPU): the trainer's kernels run in a CUDA green context of that many SMs, so serving's many small
  kernels always find the rest of the SMs free instead of queueing behind a training GEMM's blocks.
- `floor` with `speedup` (a callable: what speculation gives serving now, 1 at day 0): the duty while serving is
  busy becomes min(`duty`, max(1 - floor, 1 - floor / speedup)), so that serving keeps `floor` of its speed
  without Aurora as long as each training second costs it one: 1 - floor at day 0, more once the draft pays.
- `drain` (a GPU that another process serves from, SGLang's scheduler): two processes' kernels never run side by
  side there (without MPS the GPU time-slices between their contexts), so while the trainer has kernels queued,
  each of serving's launches may wait out a time slice. `drain_after_modules(model)` makes every module of the
  trainer's model synchronise the trainer's stream after its forward and its backward: the trainer then keeps
  about one module's kernels queued, not a whole step's.

This module knows neither the engine nor the trainer; the service hands one DeviceShare to both.
"""
import logging
import threading
import time
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


class DeviceShare:
    def __init__(self, duty: float = 1.0, turns: bool = False, sms: int = 0, busy_window_s: float | None = None,
                 drain: bool = False, floor: float = 0.0, speedup=None):
        """busy_window_s None: no engine reports its steps here (SGLang serves in its own processes), so serving
        counts as always busy and `duty` always applies."""
        if not 0 < duty <= 1:
            raise ValueError("duty must be in (0, 1]")
        if sms < 0:
            raise ValueError("sms must be >= 0 (0: the trainer's kernels may use every SM)")
        if not 0 <= floor < 1:
            raise ValueError("floor must be in [0, 1)")
        self.floor, self.speedup = floor, speedup
        self.duty, self.turns, self.sms, self.busy_window_s, self.drain = duty, turns, sms, busy_window_s, drain
        self.drains = 0  # stream synchronisations drain_after_modules made
        self._cond = threading.Condition()
        self._serving = self._training = self._want = self._waiting = False
        self._last_step = 0.0
        self.rested_s = self.trained_s = 0.0  # trainer seconds resting / inside training(), for /v1/draft
        self.turn_wait_s = 0.0  # serving's seconds waiting for a training turn to end (turns only): the engine
                                # keeps them out of its round costs, which they would blur by depth at random
        self._owed = 0.0  # seconds inside training() not yet rested for
        self.step_s = 0.0  # how long the last training() took: what the next one is expected to cost (a trainer
                           # resuming from a checkpoint sets it, so its first step under load is paid for too)
        self._burst = False  # serving turned busy after an idle spell (engine thread sets, trainer thread clears)

    # ------------------------------------------------------------- engine thread
    @contextmanager
    def serving(self):
        if self.busy_window_s is not None and time.monotonic() - self._last_step >= self.busy_window_s:
            self._burst = True
        if not self.turns:
            self._serving = True
            try:
                yield
            finally:
                self._serving, self._last_step = False, time.monotonic()
            return
        with self._cond:
            self._waiting = True  # serving is busy while it waits for its turn, too
            t0 = time.perf_counter()
            self._cond.wait_for(lambda: not (self._training or self._want))
            self.turn_wait_s += time.perf_counter() - t0
            self._waiting, self._serving = False, True
        try:
            yield
        finally:
            with self._cond:
                self._serving = False
                self._last_step = time.monotonic()
                self._cond.notify_all()

    def busy(self) -> bool:
        return (self.busy_window_s is None or self._waiting or self._serving  # a CPU prefill can outlast the window
                or time.monotonic() - self._last_step < self.busy_window_s)

    # ------------------------------------------------------------- trainer thread
    @contextmanager
    def training(self):
        t0 = time.monotonic()
        if self.turns:
            with self._cond:
                self._want = True  # one turn at a time (an admin's swap_now runs the guard from another thread)
                self._cond.wait_for(lambda: not (self._serving or self._training))
                self._want, self._training = False, True
        try:
            yield
        finally:
            if self.turns:
                with self._cond:
                    self._training = False
                    self._cond.notify_all()
            spent = time.monotonic() - t0
            self.trained_s += spent
            self._owed += spent
            self.step_s = spent

    def rest(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """After training (steps, the guard's held-out pass): rest so that everything done inside `training()`
        since the last rest takes at most `duty` of the time serving is busy; cut short when serving goes idle
        or `stop` is set. `wake` (a swap is due) ends the rest early: the rest not taken stays owed, so the
        duty still holds over time while a swap never waits out a long rest. Called before a step too: with
        nothing owed it returns at once; at the start of a busy stretch it owes one step (see the module doc)."""
        if self._burst:
            self._burst = False
            self._owed = max(self._owed, self.step_s)
        owed, self._owed = self._owed, 0.0
        duty = self.duty_now()
        if duty >= 1:
            return
        ratio = (1 - duty) / duty
        until = time.monotonic() + owed * ratio
        t0 = time.monotonic()
        while self.busy():
            left = until - time.monotonic()
            if left <= 0:
                break
            if stop.is_set() or (wake is not None and wake.is_set()):
                self._owed += left / ratio  # kept: a checkpoint taken at a stop carries it over a restart
                break
            stop.wait(min(left, 0.05))  # short waits: a swap falling due or serving going idle ends the rest
        self.rested_s += time.monotonic() - t0

    @property
    def owed_s(self) -> float:
        """Training seconds not yet rested for."""
        return self._owed

    def owe(self, seconds: float) -> None:
        """A trainer resuming from a checkpoint takes on what the one before it owed."""
        self._owed += max(0.0, float(seconds))

    def duty_now(self) -> float:
        """The duty that applies now: `duty`, or with a floor the share serving can spare at today's speedup."""
        if not self.floor or self.speedup is None:
            return self.duty
        try:
            s = float(self.speedup())
        except Exception:  # the decision's state unreadable for a moment (a file being replaced): day 0's share
            log.debug("speedup unavailable for the serving floor", exc_info=True)
            s = 1.0
        return min(self.duty, max(1 - self.floor, 1 - self.floor / max(s, 1e-6)))

    def trainer_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The trainer thread's CUDA stream: in a green context of `sms` SMs where the driver and torch offer
        one, else an ordinary stream (logged)."""
        if self.sms:
            try:
                from torch.cuda.green_contexts import GreenContext

                index = device.index if device.index is not None else torch.cuda.current_device()
                total = torch.cuda.get_device_properties(index).multi_processor_count
                if self.sms < total:
                    ctx = GreenContext.create(num_sms=self.sms, device_id=index)
                    self._green = ctx  # kept alive for the stream's lifetime
                    if hasattr(ctx, "Stream"):
                        stream = ctx.Stream()
                    else:  # torch < 2.11: a stream made while the green context is current belongs to it
                        ctx.set_context()
                        stream = torch.cuda.Stream(device)
                    log.info("trainer kernels run on %d of the %d SMs of %s (a CUDA green context)", self.sms,
                             total, device)
                    return stream
            except Exception as e:  # an old driver or torch build: share every SM, at the priority streams give
                log.warning("trainer SM partition unavailable (%s: %s): training kernels may use every SM",
                            type(e).__name__, e)
        return torch.cuda.Stream(device)

    def drain_after_modules(self, model: torch.nn.Module) -> None:
        """With `drain`, on a CUDA model: each leaf module synchronises the current stream after its forward and
        after its input gradients are computed in backward (both run on the trainer's stream). No effect on
        the values computed."""
        if not self.drain or next(model.parameters()).device.type != "cuda":
            return

        def sync(*_):
            torch.cuda.current_stream().synchronize()
            self.drains += 1

        def after_forward(module, inputs, output):
            sync()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: sync())  # fires once this output's gradient is computed

        for m in model.modules():
            if next(m.children(), None) is None and any(True for _ in m.parameters(recurse=False)):
                m.register_forward_hook(after_forward)

    def status(self) -> dict:
        return {"duty": self.duty, "duty_now": round(self.duty_now(), 4), "floor": self.floor, "turns": self.turns,
                "sms": self.sms, "drain": self.drain, "drains": self.drains,
                "trained_s": round(self.trained_s, 3), "rested_s": round(self.rested_s, 3)}
