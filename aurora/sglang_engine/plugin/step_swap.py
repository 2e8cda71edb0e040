"""Draft hot swap without pausing SGLang: new weights are copied in place *between two scheduler steps*, in
stream order, by the scheduler itself (engine sglang, `sglang_swap: step`).

Aurora (Publisher) owns two flat weight buffers, shared with every TP rank once (CUDA IPC handles, or
shared-memory files on the CPU), and a small control file of int64s: [0] = latest published version,
[1 + r] = the version TP rank r has applied. Version v lives in buffer v % 2.
  publish(v): wait until every rank has applied v - 1 (so buffer v % 2, last read for v - 2, is free and at
              most one version is in flight), copy the weights into buffer v % 2, finish the copy, then write
              control[0] = v.
The scheduler of each rank (Applier.poll, called from the draft worker's per-step hooks) sees control[0]
move, enqueues `load_weights` from buffer v % 2 on its own stream (so the copy lands after the step that
was already enqueued and before the next one: no torn read, CUDA graphs keep their storage) and records an
event; at a later poll, once the event has completed, it writes control[1 + r] = v.
Cost while serving: one device-to-device copy of the draft per swap and a few microseconds per step for
reading one int. Ranks may apply a version one step apart; verification stays lossless meanwhile.
No SGLang import here: the same code runs in Aurora and in SGLang's schedulers.
"""
import json
import os
import pickle
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401 - registers tensor reductions with ForkingPickler

from aurora.sglang_engine.plugin.depth import write_acceptance
from aurora.sglang_engine.plugin.loader import layout_of, views

SLOTS = 64  # control ints: version + up to 63 ranks


def _control(path: str, create: bool) -> np.memmap:
    if create:
        np.zeros(SLOTS, dtype=np.int64).tofile(path)
    return np.memmap(path, dtype=np.int64, mode="r+", shape=(SLOTS,))


class Publisher:
    """Aurora's side. `directory` is shared with SGLang through AURORA_SWAP_DIR."""

    def __init__(self, directory: str, tp_size: int):
        self.dir, self.tp_size = directory, tp_size
        os.makedirs(directory, exist_ok=True)
        self.ctl = _control(os.path.join(directory, "control"), create=True)
        self.buffers: list[torch.Tensor] | None = None
        self.version = 0

    def _share(self, named: list) -> None:
        layout = layout_of(named)
        n, t = sum(v.numel() for _, v in named), named[0][1]
        self.buffers = [torch.empty(n, dtype=t.dtype, device=t.device) for _ in range(2)]
        if t.device.type == "cpu":  # shared-memory files that any process can open by name
            torch.multiprocessing.set_sharing_strategy("file_system")
            for b in self.buffers:
                b.share_memory_()
        _write(os.path.join(self.dir, "buffers.pkl"), bytes(ForkingPickler.dumps(self.buffers)))
        _write(os.path.join(self.dir, "layout.json"), json.dumps(layout).encode())  # last: the Applier waits for it

    def acked(self) -> int:
        return int(self.ctl[1:1 + self.tp_size].min())

    def publish(self, named: list, timeout_s: float = 30.0, acceptance: list[float] | None = None) -> int:
        """Copy (name, tensor) weights into the next buffer and announce them. Returns the new version; raises
        TimeoutError if the ranks did not apply the previous version in time (nothing is announced then).
        acceptance: the trainer's prediction for the new draft, for the depth decision inside SGLang (depth.py),
        written before the version is announced."""
        if self.buffers is None:
            self._share(named)
        v = self.version + 1
        self.wait_applied(v - 1, timeout_s)
        buf = self.buffers[v % 2]
        torch.cat([t.reshape(-1) for _, t in named], out=buf)
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()  # the bytes are in place before anyone reads them
        write_acceptance(self.dir, v, acceptance)
        self.ctl[0] = v
        self.ctl.flush()
        self.version = v
        return v

    def wait_applied(self, v: int, timeout_s: float | None) -> None:
        """Until every rank applied v (ranks apply at their next step: an idle server applies later)."""
        t0 = time.monotonic()
        while self.acked() < v:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"SGLang ranks applied draft version {self.acked()}, not {v}, within {timeout_s} s")
            time.sleep(0.001)


class Applier:
    """One SGLang rank's side: poll() once per scheduler step with the draft model."""

    def __init__(self, directory: str, rank: int):
        self.dir, self.rank = directory, rank
        self.ctl: np.memmap | None = None
        self.buffers, self.layout = None, None
        self.applied, self.pending = 0, None

    def poll(self, model) -> None:
        if self.ctl is None:
            if not os.path.exists(os.path.join(self.dir, "control")):
                return
            self.ctl = _control(os.path.join(self.dir, "control"), create=False)
        if self.pending is not None:
            v, event = self.pending
            if event is not None and not event.query():
                return  # the copy has not run yet: one version in flight at a time
            self.ctl[1 + self.rank] = v
            self.pending = None
        v = int(self.ctl[0])
        if v <= self.applied:
            return
        if self.buffers is None:
            with open(os.path.join(self.dir, "layout.json")) as f:
                self.layout = json.load(f)
            with open(os.path.join(self.dir, "buffers.pkl"), "rb") as f:
                self.buffers = pickle.loads(f.read())
        buf = self.buffers[v % 2]
        model.load_weights(views(buf, self.layout))  # in place, on this rank's current stream, sharded by its weight loaders
        event = None
        if buf.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.applied, self.pending = v, (v, event)


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
