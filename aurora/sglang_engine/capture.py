"""Aurora's side of capture from SGLang: wire frames in, one Sample per finished request out.

Rows arrive per request in serving order: prefill chunks (from the first uncached position on: a radix-cache
hit means the cached prefix was never recomputed, so the sample starts after it; attention in the draft only
sees relative positions, so the shorter context is the only loss), then one verified block per decode
round, of which the first accept_len rows are the target's states at accepted tokens. The HTTP side calls
`finish` with the request's final token ids; the sample is emitted once rows cover every fed position
(frames can trail the response by a step), or the request is dropped after `timeout_s` and counted.
Frames lost in the sender (a gap in `seq`) invalidate the requests in flight: dropped, counted.

With `final_state` (SGLang started with wire.FINAL_ENV) every row also carries the target's final normed hidden
state, and samples carry it as target_hidden: the trainer recomputes the target's whole distribution at every
position, prompt positions included, as on the built-in engine. Without it samples carry no target_hidden: the
trainer learns from the target's own tokens (aurora/sample.py), or from the target's top K at the verified
positions where the decode frames carry it (`sglang_capture_topk`; prefill rows have none).
"""
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from typing import Callable

import torch

from aurora.sample import Sample
from aurora.sglang_engine import wire

log = logging.getLogger(__name__)


@dataclass
class _Partial:
    start: int = -1                                   # token index of the first row
    rows: list = field(default_factory=list)          # tensors [n_i, 3H]
    dists: list = field(default_factory=list)         # per rows entry: (topk_ids, topk_logits, lse) or None
    n: int = 0
    rounds: list = field(default_factory=list)        # (round_start relative to start, proposals, accepted)
    broken: str | None = None
    touched: float = field(default_factory=time.monotonic)
    finish: tuple | None = None                       # (token_ids, prompt_len, greedy, draft_version)


class CaptureCollector:
    def __init__(self, address: str, on_sample: Callable[[Sample], None], timeout_s: float = 30.0,
                 train_on_prompt: bool = False, final_state: bool = False):
        self.address, self.on_sample, self.timeout_s = address, on_sample, timeout_s
        self.train_on_prompt, self.final_state = train_on_prompt, final_state
        self._parts: dict[str, _Partial] = {}
        self._done: OrderedDict = OrderedDict()  # rids already emitted or dropped: trailing frames are ignored
        self._lock = threading.Lock()
        self._seq = 0
        # admitted = samples + dropped_* + in flight (in_flight(): 0 once every admitted request has ended)
        self.counts = {"admitted": 0, "frames": 0, "samples": 0, "dropped_incomplete": 0, "dropped_gap": 0,
                       "dropped_cached": 0, "dropped_aborted": 0, "sender_dropped": 0, "frame_errors": 0, "bytes": 0}
        self._listener = Listener(address, family="AF_UNIX")
        self._stop = False
        threading.Thread(target=self._accept, name="aurora-capture-rx", daemon=True).start()

    # ------------------------------------------------------------- receiving (one thread per sender)
    def _accept(self) -> None:
        while not self._stop:
            try:
                conn = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._receive, args=(conn,), daemon=True).start()

    def _receive(self, conn) -> None:
        try:
            while True:
                head = conn.recv_bytes()
                frames = [head] + [conn.recv_bytes() for _ in range(wire.num_tensors(head))]
                try:
                    self.feed(frames)
                except Exception:  # one bad frame must not end capture: the requests it touched are dropped
                    log.exception("capture: a frame could not be used")
                    with self._lock:
                        self.counts["frame_errors"] += 1
                        for p in self._parts.values():
                            p.broken = p.broken or "gap"
        except (EOFError, OSError):
            log.info("capture sender disconnected")

    def feed(self, frames: list[bytes]) -> None:
        header, t = wire.decode(frames)
        with self._lock:
            self.counts["frames"] += 1
            self.counts["bytes"] += sum(len(f) for f in frames)
            self.counts["sender_dropped"] = header.get("dropped", 0)
            if self._seq and header["seq"] != self._seq + 1:  # frames were lost: rows in flight are unreliable
                for p in self._parts.values():
                    p.broken = p.broken or "gap"
            self._seq = header["seq"]
            if header["kind"] == "prefill":
                self._prefill(header, t["hidden"])
            else:
                self._decode(header, t)
            self._sweep()

    def _part(self, rid: str) -> _Partial | None:
        if rid in self._done:
            return None
        p = self._parts.get(rid)
        if p is None:  # not setdefault: a _Partial per frame and request is most of a frame's cost otherwise
            p = self._parts[rid] = _Partial()
        p.touched = time.monotonic()
        return p

    def _prefill(self, h: dict, hidden: torch.Tensor) -> None:
        off = 0
        for rid, prefix, n in zip(h["rids"], h["prefix"], h["lens"]):
            rows, off = hidden[off:off + n], off + n
            p = self._part(rid)
            if p is None or p.broken:
                continue
            if p.start < 0:
                p.start = prefix
            elif prefix != p.start + p.n:
                p.broken = "gap"
                continue
            p.rows.append(rows)
            p.dists.append(None)
            p.n += n
            self._try_emit(rid, p)

    def _decode(self, h: dict, t: dict) -> None:
        k = h["ndt"]
        hidden = t["hidden"].view(len(h["rids"]), k, -1)
        draft = t["draft"].view(len(h["rids"]), k) if "draft" in t else None
        dist = None
        if "topk_ids" in t:
            bs = len(h["rids"])
            dist = (t["topk_ids"].view(bs, k, -1), t["topk_logits"].view(bs, k, -1), t["lse"].view(bs, k))
        if "accept" in t:
            accept = t["accept"].tolist()
        elif k == 1:  # a depth-0 round: one verified token per request, nothing proposed (wire.py)
            accept = [1] * len(h["rids"])
        else:
            raise ValueError(f"a decode frame of width {k} without accept lengths")
        for b, (rid, a) in enumerate(zip(h["rids"], accept)):
            p = self._part(rid)
            if p is None or p.broken or p.start < 0:
                continue
            if draft is not None:
                p.rounds.append((p.n, draft[b, 1:].tolist(), a - 1))
            p.rows.append(hidden[b, :a])
            p.dists.append(None if dist is None else tuple(x[b, :a] for x in dist))
            p.n += a
            self._try_emit(rid, p)

    # ------------------------------------------------------------- request side
    def finish(self, rid: str, token_ids: list[int], prompt_len: int, greedy: bool, draft_version: int) -> None:
        """Called when the HTTP response for `rid` is complete; the sample follows once its rows are in."""
        with self._lock:
            p = self._part(rid)
            if p is None:
                return
            p.finish = (token_ids, prompt_len, greedy, draft_version)
            self._try_emit(rid, p)
            self._sweep()

    def admit(self, rid: str) -> None:
        """`rid` was sent to SGLang marked for capture: it ends as a sample or as a drop counted by reason."""
        with self._lock:
            self.counts["admitted"] += 1

    def discard(self, rid: str) -> None:
        """An aborted or failed request leaves no sample (counted, unless it was already dropped)."""
        with self._lock:
            if rid not in self._done:
                self._drop(rid, "dropped_aborted")

    def in_flight(self) -> int:
        """Admitted requests that have not yet become a sample or a counted drop."""
        with self._lock:
            self._sweep()
            c = self.counts
            return c["admitted"] - c["samples"] - sum(v for k, v in c.items() if k.startswith("dropped_"))

    def _try_emit(self, rid: str, p: _Partial) -> None:
        if p.finish is None:
            return
        ids, prompt_len, greedy, version = p.finish
        need = len(ids) - 1 - p.start  # rows for positions start .. T-2
        if p.broken:
            return self._drop(rid, "dropped_gap")
        if p.start < 0 or p.n < need:
            return  # rows still on their way (the sweep drops the request after timeout_s)
        if need < 2:
            return self._drop(rid, "dropped_cached")
        tokens = torch.tensor(ids[p.start:], dtype=torch.long)
        mask = torch.ones(tokens.numel(), dtype=torch.bool)
        if not self.train_on_prompt:
            mask[:max(0, prompt_len - p.start)] = False
        # a depth-0 round proposed nothing (plain decoding); rounds of other depths are padded to the deepest
        # with -1, "not proposed" (aurora/sample.py): SGLang's depth can change between one request's rounds
        rounds = [r for r in p.rounds if r[0] < tokens.numel() - 1 and r[2] >= 0 and r[1]]
        k = max((len(r[1]) for r in rounds), default=0)
        hidden = torch.cat(p.rows)[:need]
        aux, final = wire.split_final(hidden) if self.final_state else (hidden, None)
        sample = Sample(rid, tokens, prompt_len - p.start, aux, final, mask,
                        round_start=torch.tensor([r[0] for r in rounds], dtype=torch.long),
                        proposals=torch.tensor([r[1] + [-1] * (k - len(r[1])) for r in rounds],
                                               dtype=torch.long).view(len(rounds), k),
                        accepted=torch.tensor([r[2] for r in rounds], dtype=torch.long),
                        draft_version=version, greedy=greedy, **self._topk(p, need))
        self._forget(rid)
        self.counts["samples"] += 1
        try:
            self.on_sample(sample)
        except Exception:
            log.exception("on_sample failed")

    @staticmethod
    def _topk(p: _Partial, need: int) -> dict:
        """The sample's target_topk_* fields from the rows' distributions (-1 ids where a row had none), or {}."""
        k = next((d[0].shape[1] for d in p.dists if d is not None), 0)
        if not k:
            return {}
        ids, logits, lse = [], [], []
        for rows, d in zip(p.rows, p.dists):
            n = rows.shape[0]
            if d is None or d[0].shape[1] != k:
                d = (torch.full((n, k), -1, dtype=torch.int32), torch.zeros(n, k), torch.zeros(n))
            ids.append(d[0])
            logits.append(d[1])
            lse.append(d[2])
        return {"target_topk_ids": torch.cat(ids)[:need], "target_topk_logits": torch.cat(logits)[:need],
                "target_lse": torch.cat(lse)[:need]}

    def _drop(self, rid: str, why: str) -> None:
        self.counts[why] += 1
        self._forget(rid)

    def _forget(self, rid: str) -> None:
        self._parts.pop(rid, None)
        self._done[rid] = None
        while len(self._done) > 65536:
            self._done.popitem(last=False)

    def _sweep(self) -> None:
        now = time.monotonic()
        for rid, p in list(self._parts.items()):
            if now - p.touched > self.timeout_s:
                self._drop(rid, "dropped_incomplete")

    def pending(self) -> int:
        with self._lock:
            return len(self._parts)

    def close(self) -> None:
        self._stop = True
        self._listener.close()

