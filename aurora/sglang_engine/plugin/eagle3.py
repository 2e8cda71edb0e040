"""SGLang's EAGLE3 draft class with Aurora's capture installed (runs inside SGLang's scheduler processes).

SGLang 0.5.17's EAGLEWorkerV2 already moves everything capture needs through two eager methods of its
draft worker, so capture wraps them instead of touching the CUDA-graphed forwards:
  _draft_extend_for_prefill(batch, target_hidden_states, ...)  aux states of every prefilled token
  _draft_extend_for_decode(batch, batch_result)                 aux states of the verified block, the
                                                                 block's tokens and the accept lengths
Each wrapper enqueues asynchronous device->host copies on the scheduler's stream plus an event, and returns;
a sender thread waits for the event and ships wire frames to Aurora (AURORA_CAPTURE_ADDR). Only TP rank 0
sends: after the target's all-reduce every rank holds the same aux states. Only requests whose id starts with
CAPTURE_PREFIX are sent (Aurora marks the requests it will train on). A full queue drops the frame and counts
it; the receiver sees the gap in `seq` and discards the requests it touched, so nothing is silently wrong.
"""
import logging
import os
import queue
import threading

import torch
from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3 as _SGLangEagle3

from aurora.sglang_engine import wire

log = logging.getLogger("aurora.sglang.capture")
ADDR_ENV, CAPTURE_PREFIX = "AURORA_CAPTURE_ADDR", "c-"
_sender = None


class LlamaForCausalLMEagle3(_SGLangEagle3):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install()


EntryClass = LlamaForCausalLMEagle3


class _Sender:
    def __init__(self, address: str, max_pending: int = 1024):
        self.address, self.q = address, queue.Queue(max_pending)
        self.seq, self.dropped = 0, 0
        threading.Thread(target=self._run, name="aurora-capture", daemon=True).start()

    def put(self, header: dict, tensors: dict) -> None:
        event = torch.cuda.Event()
        event.record()
        self.seq += 1
        try:
            self.q.put_nowait((dict(header, seq=self.seq), tensors, event))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        from multiprocessing.connection import Client
        conn = Client(self.address, family="AF_UNIX")
        while True:
            header, tensors, event = self.q.get()
            event.synchronize()
            for frame in wire.encode(dict(header, dropped=self.dropped), tensors):
                conn.send_bytes(frame)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", non_blocking=True)  # pinned staging, ordered on the current stream


def _captured(batch) -> list[int]:
    return [i for i, r in enumerate(batch.reqs) if str(r.rid).startswith(CAPTURE_PREFIX)]


def _on_prefill(batch, hidden: torch.Tensor) -> None:
    if batch.forward_mode.is_idle() or hidden is None or not _captured(batch):
        return
    lens = [int(n) for n in batch.extend_lens]
    _sender.put({"kind": "prefill", "rids": [r.rid for r in batch.reqs], "lens": lens,
                 "prefix": [int(p) for p in batch.prefix_lens]}, {"hidden": _host(hidden[:sum(lens)])})


def _on_decode(batch, result, ndt: int) -> None:
    hidden = result.logits_output.hidden_states
    if hidden is None or not batch.reqs or not _captured(batch):
        return
    draft = getattr(batch.spec_info, "draft_token", None)
    tensors = {"hidden": _host(hidden[:len(batch.reqs) * ndt]), "accept": _host(result.accept_lens.to(torch.int64))}
    if draft is not None:
        tensors["draft"] = _host(draft[:len(batch.reqs) * ndt].to(torch.int64))
    _sender.put({"kind": "decode", "rids": [r.rid for r in batch.reqs], "ndt": ndt}, tensors)


def install() -> None:
    """Wrap the draft worker's two extend methods once per process (TP rank 0, capture address set)."""
    global _sender
    address = os.environ.get(ADDR_ENV)
    if not address or _sender is not None:
        return
    from sglang.srt.distributed import get_tensor_model_parallel_rank
    if get_tensor_model_parallel_rank() != 0:
        return
    from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker as W
    for name in ("_draft_extend_for_prefill", "_draft_extend_for_decode"):
        if not hasattr(W, name):
            raise RuntimeError(f"aurora capture: this SGLang has no EagleDraftWorker.{name} (built for 0.5.17)")
    if getattr(W, "_aurora_capture", False):
        return
    _sender = _Sender(address)
    prefill, decode = W._draft_extend_for_prefill, W._draft_extend_for_decode

    def draft_extend_for_prefill(self, batch, target_hidden_states, *args, **kwargs):
        _on_prefill(batch, target_hidden_states)  # before the call: it rewrites batch.input_ids
        return prefill(self, batch, target_hidden_states, *args, **kwargs)

    def draft_extend_for_decode(self, batch, batch_result):
        _on_decode(batch, batch_result, self.speculative_num_draft_tokens)
        return decode(self, batch, batch_result)

    W._draft_extend_for_prefill, W._draft_extend_for_decode = draft_extend_for_prefill, draft_extend_for_decode
    W._aurora_capture = True
    log.info("aurora capture installed (sending to %s)", address)
