"""AsyncEngine: runs LLMEngine.step() in one background thread and bridges it to asyncio callers.

The engine thread is the only one that touches the device state; other threads hand it requests,
aborts and draft swaps through thread-safe queues and get tokens back on their own event loops.

A request's outputs reach its event loop every `params.stream_interval` tokens (merged), besides its first and its
last: a non-streamed HTTP request asks for 32, since it reads only its final text, and every hand-over costs the
event loop's Python, under the GIL the engine thread needs after each device sync. Stop strings are matched in
the engine itself, so a merged output cuts at the same token as single ones would.
"""
import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

import torch

from aurora.engine.engine import LLMEngine
from aurora.engine.sequence import SHUTDOWN_ERROR, RequestOutput, SamplingParams
from aurora.sharing import DeviceShare

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str, share: DeviceShare | None = None):
        """share: how a trainer shares the device (each step runs inside `share.serving()`)."""
        self.engine = engine
        self.share = share or DeviceShare()
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self._abort_all: str | None = None  # set when a drain runs out of time: the loop fails what is left
        # health: `error` is set while the latest engine step failed (a later successful step clears it);
        # the history stays in step_failures / last_error / last_error_time
        self.error: str | None = None
        self.step_failures = 0
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.idle_s = 0.0  # the engine thread's time with no request to run
        self._thread = threading.Thread(target=self._loop, name="aurora-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stop:
            raise RuntimeError("engine is shutting down")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        accepted: asyncio.Future = loop.create_future()
        self._inbox.put((prompt_ids, params, request_id or "", loop, out, accepted))
        self._wake.set()
        rid = await accepted  # raises ValueError for a bad request
        try:
            while True:
                o: RequestOutput = await out.get()
                yield o
                if o.finished:
                    return
        finally:
            if self._streams.pop(rid, None) is not None:  # caller went away early
                self.abort(rid)

    def set_callbacks(self, on_sample=None, on_finished=None) -> None:
        """on_sample(Sample) per captured finished request; on_finished(seq) per finished request."""
        self.engine.on_sample, self.engine.on_finished = on_sample, on_finished

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def swap_draft(self, state, version: int, acceptance: list[float] | None = None) -> threading.Event:
        done = self.engine.swap_draft(state, version, acceptance)
        self._wake.set()
        return done

    def stats(self) -> dict:
        s = self.engine.stats.snapshot()
        sch = self.engine.scheduler
        s.update(running=len(sch.running), waiting=len(sch.waiting), draft_version=self.engine.draft_version,
                 engine_time=dict(self.engine.time, idle_s=self.idle_s))
        if self.engine.draft is not None:
            s["speculation"] = self.engine.speculation.snapshot()
        if self.engine.on_sample is not None:
            pacer = self.engine.pacer
            s["capture"] = dict(admitted=self.engine.capture_admitted, sample_rate=self.engine.sample_rate,
                                **(pacer.status() if pacer is not None else {}))
        return s

    @property
    def pacer(self):
        return self.engine.pacer

    @pacer.setter
    def pacer(self, pacer) -> None:
        """Capture less while the trainer leaves samples unread (aurora/training/pacing.py); set by the service."""
        self.engine.pacer = pacer

    def health(self) -> dict:
        """ok: the engine thread runs and its latest step did not fail. Per-request failures (one request's
        own work raised; the others went on) are counted, not judged."""
        alive = self._thread.is_alive() or self._stop
        return {"ok": alive and self.error is None,
                "error": self.error if alive else "the engine thread is not running",
                "step_failures": self.step_failures, "request_failures": self.engine.request_errors,
                "last_error": self.last_error, "last_error_time": self.last_error_time}

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the running ones finish for up to `timeout` seconds, then
        abort what is left (those requests end with finish_reason "error" and say why)."""
        if drain:
            self._stop = True  # no new requests; the loop finishes the running ones
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abort_all(f"{SHUTDOWN_ERROR} (drain limit {timeout:.0f} s)")
            self._stop = True
            self._thread.join(10)

    def abort_all(self, message: str) -> None:
        """Fail every running and waiting request with `message` (a drain that ran out of time)."""
        sch = self.engine.scheduler
        log.warning("aborting %d requests: %s", len(sch.running) + len(sch.waiting), message)
        self._abort_all = message
        self._wake.set()

    # ------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        eng = self.engine
        use_serving_stream(eng)
        while True:
            while True:
                try:
                    prompt_ids, params, rid, loop, out, accepted = self._inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    seq = eng.add_request(prompt_ids, params, rid)
                    self._streams[seq.request_id] = _Stream(loop, out, params.stream_interval)
                    loop.call_soon_threadsafe(_resolve, accepted, seq.request_id, None)
                except Exception as e:
                    loop.call_soon_threadsafe(_resolve, accepted, None, e)
            if self._abort_all is not None:  # the drain ran out of time: fail what is left
                message, self._abort_all = self._abort_all, None
                self._deliver(self._fail_all(message))
                continue
            if not eng.has_work():
                if self._stop:
                    return
                t = time.perf_counter()
                self._wake.wait(0.05)
                self._wake.clear()
                self.idle_s += time.perf_counter() - t
                continue
            try:
                waited = self.share.turn_wait_s
                with self.share.serving():
                    eng.exclude_from_round(self.share.turn_wait_s - waited)  # the trainer's turn: no depth's cost
                    outputs = eng.step()
                self.error = None
            except Exception as e:  # a broken step fails its requests, never the process
                log.exception("engine step failed")
                self.error = self.last_error = f"{type(e).__name__}: {e}"
                self.last_error_time, self.step_failures = time.time(), self.step_failures + 1
                outputs = self._fail_all(self.error)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # one wake-up per event loop per step, not one per output: each call_soon_threadsafe writes to the
        # loop's self-pipe, a large share of the engine thread at many streams (py-spy; docs/design.md)
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for o in outputs:
            target = self._streams.get(o.request_id)
            if target is None:
                continue
            o = target.merge(o)
            if o is None:
                continue
            if o.finished:
                self._streams.pop(o.request_id, None)
            batches.setdefault(target.loop, []).append((target.queue, o))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        eng, outs = self.engine, []
        for seq in list(eng.scheduler.running) + list(eng.scheduler.waiting):
            seq.finish_reason, seq.error = "error", message
            o = eng.finish(seq)
            outs.append(o)
        return outs


def use_serving_stream(eng: LLMEngine) -> None:
    """In the calling thread, every engine kernel goes to one high-priority stream (a too-low number maps to the
    highest priority), which first waits for the set-up work queued on the default stream."""
    dev = eng.runner.device
    if dev.type == "cuda" and eng.config.priority_stream:
        stream = torch.cuda.Stream(dev, priority=-100)
        stream.wait_stream(torch.cuda.current_stream(dev))
        torch.cuda.set_stream(stream)


class _Stream:
    """Where a request's outputs go, and the output held back until `interval` tokens are due."""
    __slots__ = ("loop", "queue", "interval", "held", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue, interval: int):
        self.loop, self.queue, self.interval = loop, out, interval
        self.held: RequestOutput | None = None
        self.sent = False  # the first output goes at once (time to first token)

    def merge(self, o: RequestOutput) -> RequestOutput | None:
        """The output to hand over now (this one, merged with what was held back), or None to hold it."""
        if self.held is not None:  # each output is the engine's own, made for this step: merged in place
            h = self.held          # (dataclasses.replace was a large share of the engine thread at 16 streams)
            h.new_token_ids.extend(o.new_token_ids)
            o.new_token_ids = h.new_token_ids
            o.queue_time = h.queue_time if o.queue_time is None else o.queue_time
            o.logprobs = None if o.logprobs is None else (h.logprobs or []) + o.logprobs
            self.held = None
        if o.finished or not self.sent or len(o.new_token_ids) >= self.interval:
            self.sent = True
            return o
        self.held = o
        return None


def _deliver(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for out, o in batch:
        out.put_nowait(o)


def _resolve(fut: asyncio.Future, value, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
