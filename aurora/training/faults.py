"""Trainer failures: what kind a failure is, and a fault-injection switch (off unless asked for).

Kinds, as counted in the trainer's status and in /metrics (aurora_trainer_failures_by_kind_total):
  oom        the trainer ran out of (GPU) memory, in a step, in the guard's held-out pass or in a publish
  nan_loss   a step's loss or gradient norm was not finite (the step is skipped: no optimiser update)
  guard_error the swap guard raised something other than an OOM
  exception  anything else

Fault injection, for tests and for fault drills on a real deployment: `AURORA_FAULT` (or
TrainConfig.faults) is a comma-separated list of `kind:N` or `kind:N@M` entries; the kind's N events after the
first M fail, then it behaves normally again. Kinds that can be injected:
  trainer_oom  a train step raises torch.OutOfMemoryError
  nan_loss     a train step's loss is multiplied by NaN before backward (the real non-finite path runs)
  guard_error  the guard's held-out pass raises RuntimeError
  guard_oom    the guard's held-out pass raises torch.OutOfMemoryError
  publish_error the publish callback raises RuntimeError
Example: AURORA_FAULT=trainer_oom:3@10,guard_error:1 fails steps 11-13 and the first guard pass.
"""
import os
import threading

import torch

KINDS = ("oom", "nan_loss", "guard_error", "exception")
INJECTABLE = ("trainer_oom", "nan_loss", "guard_error", "guard_oom", "publish_error")
ENV = "AURORA_FAULT"


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradient norm is NaN/inf; raised before any optimiser update."""


def failure_kind(e: BaseException, where: str) -> str:
    """where: "step", "guard" or "publish"."""
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "oom"
    if isinstance(e, NonFiniteLoss):
        return "nan_loss"
    if where == "guard":
        return "guard_error"
    return "exception"


class FaultInjector:
    def __init__(self, spec: str | None):
        self.spec = spec or ""
        self._plan: dict[str, list[int]] = {}  # kind -> [events to let pass, events to fail]
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        for entry in filter(None, (e.strip() for e in self.spec.split(","))):
            kind, _, count = entry.partition(":")
            n, _, skip = count.partition("@")
            if kind not in INJECTABLE or not n.isdigit() or (skip and not skip.isdigit()):
                raise ValueError(f"{ENV}: bad entry {entry!r}; expected kind:N or kind:N@M with kind in {INJECTABLE}")
            self._plan[kind] = [int(skip or 0), int(n)]

    @classmethod
    def from_env(cls, spec: str | None = None) -> "FaultInjector":
        return cls(spec if spec is not None else os.environ.get(ENV))

    @property
    def active(self) -> bool:
        return bool(self._plan)

    def fires(self, kind: str) -> bool:
        """Counts one event of `kind`; True when this one is to fail."""
        plan = self._plan.get(kind)
        if plan is None:
            return False
        with self._lock:
            if plan[0] > 0:
                plan[0] -= 1
                return False
            if plan[1] > 0:
                plan[1] -= 1
                return True
            return False

    def check(self, kind: str) -> None:
        """Raise the injected fault of `kind` if this event is to fail."""
        if not self.fires(kind):
            return
        if kind.endswith("_oom"):
            raise torch.OutOfMemoryError(f"injected fault {kind} ({ENV}={self.spec})")
        raise RuntimeError(f"injected fault {kind} ({ENV}={self.spec})")
