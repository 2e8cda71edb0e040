"""SGLangEngine: the AsyncEngine interface (generate, abort, swap_draft, stats, shutdown) over a running SGLang
server, so the HTTP service and the trainer work against SGLang exactly as against the built-in engine.

generate   POST /generate (token ids in, streamed cumulative `output_ids` out) with an Aurora-made request
           id: "c-..." when the request is captured for training, "n-..." when not (the plugin sends rows
           only for "c-"); SGLang's per-request spec stats (verify rounds, accept length, correct-draft
           histogram) feed EngineStats.
finish     the collector turns the request's captured rows into a Sample -> on_sample (the trainer's buffer).
swap_draft "step" (the service's default): no pause at all; SGLang's schedulers copy the new weights in
           between two steps themselves (plugin/step_swap.py). "pause": pause_generation(in_place) ->
           update_weights_from_tensor (draft-only in-place loader, no cache flush) -> continue_generation, in a
           thread of its own; requests stay in SGLang's batch, but decoding stops for the ~0.1 s the three
           calls take. Both verified on the GPU (1 and 2 TP ranks).
           The weights travel as one flat tensor: one CUDA IPC handle (trainer on a GPU of this host) or one
           shared-memory segment (CPU), whatever the number of weights.
"""
import asyncio
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from typing import AsyncIterator

import httpx

from aurora.engine.sequence import (JSON_SCHEMA, LOGIT_BIAS, LOGPROBS, PENALTIES, RequestOutput, SamplingParams,
                                     accept_length)
from aurora.engine.stats import EngineStats
from aurora.sample import sampled
from aurora.sglang_engine.capture import CaptureCollector
from aurora.sglang_engine.launch import LOADER, SGLangServer
from aurora.sglang_engine.plugin.loader import flatten
from aurora.sglang_engine.plugin.depth import read_snapshot
from aurora.sglang_engine.plugin.step_swap import Publisher

log = logging.getLogger(__name__)
_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


class SGLangUnavailable(RuntimeError):
    """SGLang cannot answer (crashed, hung, restarting): the HTTP layer answers 503 (a RuntimeError)."""


def sampling_params(p: SamplingParams, stop_strings: bool = True) -> dict:
    """stop_strings False: SGLang runs without a tokenizer (--skip-tokenizer-init), and its scheduler would
    decode a stop string's tail with none (and fail); the HTTP layer matches stop strings in its own text stream
    and aborts the request instead (aurora/server/generation.py)."""
    sp = {"max_new_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
          "top_k": p.top_k if p.top_k > 0 else -1, "ignore_eos": p.ignore_eos}
    if p.stop and stop_strings:
        sp["stop"] = list(p.stop)
    if p.stop_token_ids:
        sp["stop_token_ids"] = list(p.stop_token_ids)
    if p.seed is not None:
        sp["sampling_seed"] = p.seed
    if p.presence_penalty:
        sp["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        sp["frequency_penalty"] = p.frequency_penalty
    if p.logit_bias:
        sp["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
    if p.json_schema is not None:
        sp["json_schema"] = p.json_schema   # SGLang's grammar backend (xgrammar) constrains the output
    if p.stream_interval > 1 and (stop_strings or not p.stop):  # else the stop strings are matched here, per token
        sp["stream_interval"] = p.stream_interval
    return sp


def request_body(prompt_ids: list[int], p: SamplingParams, rid: str, stop_strings: bool = True) -> dict:
    body = {"input_ids": list(prompt_ids), "sampling_params": sampling_params(p, stop_strings), "stream": True,
            "rid": rid}
    if p.logprobs is not None:  # the output's log-probabilities only (-1: none of the prompt's)
        body.update(return_logprob=True, top_logprobs_num=p.logprobs, logprob_start_len=-1)
    return body


def new_logprobs(meta: dict, reported: int, new: int, top_n: int) -> list:
    """The logprobs of the `new` tokens after the first `reported`, from SGLang's meta_info: its
    output_token_logprobs are (logprob, id, text) per token and output_top_logprobs a list of those per token,
    cumulative over the stream (or only the new tokens', with SGLang's incremental streaming output)."""
    toks = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    start = reported if len(toks) == reported + new else 0
    if len(toks) - start != new:
        raise RuntimeError(f"SGLang returned {len(toks)} token logprobs for {reported} + {new} tokens")
    out = []
    for j in range(start, start + new):
        top = (tops[j] if j < len(tops) else None) or []
        out.append((int(toks[j][1]), float(toks[j][0]), [(int(t[1]), float(t[0])) for t in top[:top_n]]))
    return out


def serialize(named: list) -> str:
    """SGLang's own tensor serializer (CUDA IPC handles / shared memory), as update_weights_from_tensor expects."""
    from sglang.srt.utils import MultiprocessingSerializer  # the `sglang` extra

    return MultiprocessingSerializer.serialize(named, output_str=True)


def accepted_per_position(histogram: list[int] | None, k: int) -> list[int]:
    """SGLang's histogram h[i] = rounds with i correct drafts -> rounds whose draft j was accepted, j < k."""
    h = histogram or []
    return [sum(h[i] for i in range(j + 1, len(h))) for j in range(k)]


class SGLangEngine:
    engine_name = "the SGLang engine"
    features = frozenset({LOGPROBS, PENALTIES, LOGIT_BIAS, JSON_SCHEMA})  # passed through to SGLang's /generate

    def __init__(self, server: SGLangServer, tokenizer, model_name: str, max_model_len: int, lookahead: int,
                 tp_size: int = 1, collector: CaptureCollector | None = None, speculative: bool = True,
                 sample_rate: float = 1.0, swap_mode: str = "pause", swap_dir: str | None = None,
                 stop_strings: bool = True):
        """`collector` must be listening before SGLang starts (its schedulers connect while loading the draft).
        stop_strings False: SGLang has no tokenizer (see sampling_params)."""
        self.server, self.url = server, server.url
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, model_name, max_model_len
        self.lookahead, self.tp_size, self.speculative = lookahead, tp_size, speculative
        self.stop_strings = stop_strings
        self.stats_ = EngineStats(lookahead)
        self.draft_version = 0
        self.on_sample = self.on_finished = None
        self.collector, self.sample_rate = collector, sample_rate
        self.pacer = None  # set by the service: an object whose rate() scales sample_rate (training/pacing.py)
        if swap_mode not in ("pause", "step") or (swap_mode == "step") != (swap_dir is not None):
            raise ValueError("swap_mode is 'pause', or 'step' with the swap_dir SGLang was started with")
        self.swap_mode = swap_mode
        self._publisher = Publisher(swap_dir, tp_size) if swap_mode == "step" else None
        self._rng = random.Random(0)
        if collector is not None:
            collector.on_sample = self._emit
        self.error: str | None = None
        self.swaps, self.swap_failures = 0, 0
        self.swap_ms: deque = deque(maxlen=100)   # wall time of each swap (pause..continue, or publish..acks)
        self.swap_windows: deque = deque(maxlen=1000)  # (start, end) of each swap, time.perf_counter()
        self._swap_lock = threading.Lock()
        self._clients: dict = {}                  # event loop -> httpx.AsyncClient
        self._rids: dict[str, str] = {}           # caller's request id -> SGLang rid
        self._running = 0
        self._stop = False
        # supervision (supervisor.py): state ok / restarting / failed, what went wrong, and the clock a hang is
        # measured by (any response bytes, or a request starting on an idle server, moves it)
        self.state, self.fault, self.restarts, self.requests_failed = "ok", None, 0, 0
        self.last_progress = time.monotonic()
        self._inflight: dict[str, tuple] = {}   # rid -> (event loop, future set on a fault)
        self.supervisor = None

    def supervise(self, **kw) -> None:
        """Start the supervisor (Supervisor's keyword arguments); without one a dead server just fails requests."""
        from aurora.sglang_engine.supervisor import Supervisor

        self.supervisor = Supervisor(self, **kw)

    @property
    def stopping(self) -> bool:
        return self._stop

    def running_requests(self) -> int:
        return self._running

    def on_fault(self, reason: str) -> None:
        """Supervisor: the server is gone or hung. Every in-flight request fails now with `reason`."""
        self.state, self.fault = "restarting", reason
        self.error = f"SGLang fault: {reason}"
        for loop, fut in list(self._inflight.values()):
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(reason))

    def on_restarted(self, version: int) -> None:
        self.draft_version, self.restarts = version, self.restarts + 1
        self.last_progress = time.monotonic()
        self.state = "ok"

    def on_failed(self, reason: str) -> None:
        self.state, self.fault = "failed", reason

    def set_callbacks(self, on_sample=None, on_finished=None) -> None:
        self.on_sample, self.on_finished = on_sample, on_finished

    def _emit(self, sample) -> None:
        if self.on_sample is not None:
            self.on_sample(sample)

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        c = self._clients.get(loop)
        if c is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
            c = self._clients[loop] = httpx.AsyncClient(base_url=self.url, timeout=None, limits=limits)
        return c

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._stop:
            raise RuntimeError("engine is shutting down")
        self._check_alive()
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len {self.max_model_len}")
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        capture = (self.collector is not None and params.capture and self.on_sample is not None
                   and sampled(self._rng, self.sample_rate, self.pacer))
        # decided at admission: an unsampled request's rows are never copied or sent
        rid = ("c-" if capture else "n-") + request_id
        if capture:
            self.collector.admit(rid)
        self._rids[request_id] = rid
        body = request_body(prompt_ids, params, rid, self.stop_strings)
        version, reported, finished = self.draft_version, 0, False
        loop = asyncio.get_running_loop()
        fault = loop.create_future()
        if not self._running:
            self.last_progress = time.monotonic()  # an idle server has had nothing to answer
        self._inflight[rid] = (loop, fault)
        self._running += 1
        response = None
        try:
            request = self._client().build_request("POST", "/generate", json=body)
            response = r = await self._race(self._client().send(request, stream=True), fault)
            if r.status_code != 200:
                detail = (await self._race(r.aread(), fault)).decode(errors="replace")[:500]
                raise (ValueError if r.status_code == 400 else RuntimeError)(f"SGLang {r.status_code}: {detail}")
            lines = r.aiter_lines()
            while True:
                try:
                    line = await self._race(anext(lines), fault)
                except StopAsyncIteration:
                    raise SGLangUnavailable("SGLang closed the stream before the request finished") from None
                self.last_progress = time.monotonic()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"SGLang: {chunk['error']}")
                ids, meta = chunk["output_ids"], chunk["meta_info"]
                new = ids[reported:]
                lps = None if params.logprobs is None else new_logprobs(meta, reported, len(new), params.logprobs)
                reported = len(ids)
                self.stats_.on_tokens(len(new))
                fr = meta.get("finish_reason")
                finished = fr is not None
                reason = _REASONS.get(fr.get("type"), "stop") if finished else None
                rounds = int(meta.get("spec_verify_ct", 0))
                verified = len(ids) - 1 if rounds else 0  # SGLang's prefill emits the first token, no round
                out = RequestOutput(request_id, new, list(ids), len(prompt_ids), finished, reason, rounds,
                                    accept_length(verified, rounds), draft_version=version,
                                    verify_tokens=verified, logprobs=lps)
                if finished:
                    self._finished(rid, prompt_ids, params, meta, out, capture)
                yield out
                if finished:
                    return
        except httpx.HTTPError as e:  # the connection broke: SGLang died under the request
            self.requests_failed += 1
            raise SGLangUnavailable(f"SGLang connection failed ({type(e).__name__}); retry the request") from e
        except SGLangUnavailable:
            self.requests_failed += 1
            raise
        finally:
            self._running -= 1
            self._inflight.pop(rid, None)
            self._rids.pop(request_id, None)
            if response is not None:
                await response.aclose()
            if not finished and capture:
                self.collector.discard(rid)

    @staticmethod
    async def _race(awaitable, fault: asyncio.Future):
        """Await `awaitable` unless the supervisor reports a fault first (then SGLangUnavailable, at once)."""
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task, fault}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise SGLangUnavailable(f"{fault.result()}; the request was aborted, SGLang is being restarted: retry")

    def _finished(self, rid, prompt_ids, params, meta, out: RequestOutput, capture: bool) -> None:
        per_pos = accepted_per_position(meta.get("spec_correct_drafts_histogram"), self.lookahead)
        self.stats_.on_finish(out.verify_tokens, out.verify_rounds, per_pos, out.draft_version)
        if capture:
            if out.finish_reason in ("stop", "length"):
                self.collector.finish(rid, list(prompt_ids) + out.output_ids, len(prompt_ids), params.greedy,
                                      out.draft_version)
            else:
                self.collector.discard(rid)
        if self.on_finished is not None:
            self.on_finished(out)

    def abort(self, request_id: str) -> None:
        rid = self._rids.get(request_id)
        if rid is None:
            return
        threading.Thread(target=self._post, args=("/abort_request", {"rid": rid}), daemon=True).start()

    def _post(self, path: str, body: dict, timeout: float = 60.0) -> httpx.Response:
        r = httpx.post(self.url + path, json=body, timeout=timeout)
        r.raise_for_status()
        return r

    # ------------------------------------------------------------- hot swap
    def swap_draft(self, state: dict, version: int, acceptance: list[float] | None = None) -> threading.Event:
        """Copy new draft weights into SGLang's running draft worker (every TP rank), in place. Returns an
        Event set when done; `draft_version` changes only if the update succeeded. `acceptance` (the
        trainer's prediction) reaches the depth decision inside SGLang with a step swap (plugin/depth.py)."""
        if not self.speculative:
            raise RuntimeError("this engine runs without a draft")
        done = threading.Event()
        threading.Thread(target=self._swap, args=(state, version, done, acceptance), name="aurora-swap",
                         daemon=True).start()
        return done

    def _swap(self, state: dict, version: int, done: threading.Event, acceptance=None) -> None:
        with self._swap_lock:
            try:
                named = [(k, v.detach()) for k, v in state.items() if k not in ("d2t", "t2d")]
                seconds = (self._step_swap(named, acceptance) if self._publisher is not None
                           else self._pause_swap(named))
                end = time.perf_counter()
                self.swap_ms.append(1000 * seconds)
                self.swap_windows.append((end - seconds, end))
                self.draft_version, self.swaps = version, self.swaps + 1
            except Exception as e:
                if self._stop:  # shutting down: a step swap still waiting for an idle server's next step
                    log.info("draft swap to version %d abandoned at shutdown (%s)", version, e)
                    return
                self.swap_failures += 1
                self.error = f"draft swap failed: {type(e).__name__}: {e}"
                log.exception("draft swap to version %d failed", version)
            finally:
                done.set()

    def _pause_swap(self, named: list) -> float:
        """Returns the seconds decoding was paused."""
        payload = serialize(flatten(named))
        t0 = time.perf_counter()
        self._post("/pause_generation", {"mode": "in_place"})
        try:
            r = self._post("/update_weights_from_tensor", {
                "serialized_named_tensors": [payload] * self.tp_size, "load_format": LOADER,
                "flush_cache": False}).json()
        finally:
            self._post("/continue_generation", {"torch_empty_cache": False})
        if not r.get("success", False):
            raise RuntimeError(f"update_weights_from_tensor: {r.get('message')}")
        return time.perf_counter() - t0

    def _step_swap(self, named: list, acceptance=None) -> float:
        """No pause: the ranks apply the weights between two steps. Returns the seconds until all had."""
        t0 = time.perf_counter()
        v = self._publisher.publish(named, acceptance=acceptance)
        while True:  # ranks apply at their next step: an idle server applies when traffic returns
            try:
                self._publisher.wait_applied(v, 1.0)
                return time.perf_counter() - t0
            except TimeoutError:
                if self._stop or not self.server.alive():
                    raise

    # ------------------------------------------------------------- status
    def health(self) -> dict:
        """ok while SGLang's process runs; a failed draft swap leaves serving up and is reported as last_error."""
        alive = self.server.alive()
        error = None if alive else f"SGLang exited with code {self.server.proc.returncode}"
        if self.supervisor is not None and (self.state != "ok" or not alive):  # it restarts SGLang (or gave up)
            return {"ok": False, "state": "failed" if self.state == "failed" else "restarting",
                    "error": self.fault or error, "last_error": self.error}
        return {"ok": alive, "error": error, "last_error": self.error}

    def _check_alive(self) -> None:
        if self.state != "ok":
            raise SGLangUnavailable(f"SGLang is {self.state}: {self.fault}")
        if not self.server.alive() and self.supervisor is None:
            self.error = f"SGLang exited with code {self.server.proc.returncode}; see {self.server.log_path}"
            raise RuntimeError(self.error)

    def speculation(self) -> dict:
        """The depth decision's snapshot inside SGLang's scheduler (plugin/depth.py), {} where Aurora does not
        drive the depth."""
        return (read_snapshot(self._publisher.dir) if self._publisher is not None else None) or {}

    def stats(self) -> dict:
        """Raises once SGLang's process is gone and no supervisor restarts it: /health then answers 503 with the
        reason. Supervised, the state is reported instead (engine_state, engine_fault)."""
        if self.supervisor is None:
            self._check_alive()
        s = self.stats_.snapshot()
        s.update(running=self._running, waiting=0, draft_version=self.draft_version, engine="sglang",
                 swaps=self.swaps, swap_failures=self.swap_failures,
                 swap_ms_last=self.swap_ms[-1] if self.swap_ms else None)
        if self.supervisor is not None:
            s.update(engine_state=self.state, engine_fault=self.fault, engine_restarts=self.restarts,
                     engine_requests_failed=self.requests_failed)
        if self.collector is not None:
            s["capture"] = dict(self.collector.counts, pending=self.collector.pending(),
                                in_flight=self.collector.in_flight(), sample_rate=self.sample_rate)
            if self.pacer is not None:
                s["capture"].update(self.pacer.status())
        if depth := self.speculation():
            s["speculation"] = depth  # the decision inside SGLang's scheduler (plugin/depth.py)
        return s

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        self._stop = True
        if self.supervisor is not None:
            self.supervisor.stop()
        t0 = time.monotonic()
        while drain and self._running and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        if self._swap_lock.acquire(timeout=max(0.0, timeout - (time.monotonic() - t0))):
            self._swap_lock.release()  # a swap in flight has finished (or failed) before SGLang goes
        self.server.stop()
        if self.collector is not None:
            self.collector.close()
