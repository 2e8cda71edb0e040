"""SGLang's EAGLE3 draft class with Aurora's capture installed (runs inside SGLang's scheduler processes).

SGLang 0.5.17's EAGLEWorkerV2 already moves everything capture needs through two eager methods of its
draft worker, so capture (and the step swap, step_swap.py) wraps them instead of touching the CUDA-graphed
forwards:
  _draft_extend_for_prefill(batch, target_hidden_states, ...)  aux states of every prefilled token (and with
                                                                 final_state.py the target's final state)
  _draft_extend_for_decode(batch, batch_result)                 aux states of the verified block, the
                                                                 block's tokens and the accept lengths (and
                                                                 with AURORA_CAPTURE_TOPK the target's top K
                                                                 from the verify logits)
With Aurora driving the speculative depth (depth.py, `AURORA_DEPTH`), a depth-0 round skips the draft extend
and reaches EAGLEWorkerV2._stub_skipped_draft_extend instead: capture and step swaps are wrapped there too; a
prefill while no batch size speculates (plain_round.py) captures and polls swaps, then skips the draft's extend.
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
from aurora.sglang_engine.plugin import depth, final_state, plain_round, verify_attention
from aurora.sglang_engine.plugin.step_swap import Applier

log = logging.getLogger("aurora.sglang.capture")
ADDR_ENV, SWAP_ENV, CAPTURE_PREFIX = "AURORA_CAPTURE_ADDR", "AURORA_SWAP_DIR", "c-"
TOPK = int(os.environ.get(wire.TOPK_ENV) or 0)  # the target's top K per verified position (0: none)
_sender, _applier, _installed = None, None, False


class LlamaForCausalLMEagle3(_SGLangEagle3):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        final_state.mark_draft(self.logits_processor)
        install()


EntryClass = LlamaForCausalLMEagle3

# SGLang's model registry imports this module before it builds any model or attention backend
if os.environ.get(verify_attention.ENV) == "1":
    verify_attention.enable()
# ... and before the target's CUDA graphs are captured: they must output the final state's block too
if os.environ.get(wire.FINAL_ENV) == "1":
    final_state.enable()


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
    keep = [] if batch.forward_mode.is_idle() or hidden is None else _captured(batch)
    if not keep:
        return
    lens = [int(n) for n in batch.extend_lens]
    _sender.put({"kind": "prefill", "rids": [batch.reqs[i].rid for i in keep], "lens": [lens[i] for i in keep],
                 "prefix": [int(batch.prefix_lens[i]) for i in keep]},
                {"hidden": _host(wire.segment_rows(keep, lens, hidden))})


def _on_decode(batch, result, ndt: int) -> None:
    hidden = result.logits_output.hidden_states
    keep = [] if hidden is None or not batch.reqs else _captured(batch)
    if not keep:
        return
    ndt = getattr(result, "speculative_num_draft_tokens", None) or ndt  # the width this block was verified at
    bs = len(batch.reqs)
    ix = None if len(keep) == bs else wire.row_index(keep, hidden.device)  # one index for every tensor
    rows = lambda t, width=ndt: wire.request_rows(ix, bs, width, t)  # noqa: E731 - the captured requests' rows
    tensors = {"hidden": _host(rows(hidden))}
    draft = getattr(batch.spec_info, "draft_token", None)
    if ndt > 1:  # a depth-0 round verifies one token and proposes none: nothing to say beyond its aux states
        tensors["accept"] = _host(rows(result.accept_lens, 1).to(torch.int64))
        if draft is not None:
            tensors["draft"] = _host(rows(draft).to(torch.int64))
    # the verify forward's logits, one row per verified position (penalties, logit_bias and grammar masks of the
    # requests that use them already applied in place: the distribution this verify accepted from)
    logits = getattr(result.logits_output, "next_token_logits", None) if TOPK else None
    if logits is not None and logits.dim() == 2 and logits.shape[0] >= bs * ndt:
        tensors.update({k: _host(v) for k, v in wire.target_topk(rows(logits), min(TOPK, logits.shape[1])).items()})
    _sender.put({"kind": "decode", "rids": [batch.reqs[i].rid for i in keep], "ndt": ndt}, tensors)


def install() -> None:
    """Wrap the draft worker's two extend methods once per process: capture on TP rank 0 (capture address
    set), step swaps on every rank (swap directory set)."""
    global _sender, _applier, _installed
    address, swap_dir = os.environ.get(ADDR_ENV), os.environ.get(SWAP_ENV)
    if _installed or not (address or swap_dir):
        return
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank  # 0.5.17-0.5.23
    from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker as W
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2
    for name in ("_draft_extend_for_prefill", "_draft_extend_for_decode"):
        if not hasattr(W, name):
            raise RuntimeError(f"aurora plugin: this SGLang has no EagleDraftWorker.{name} (built for 0.5.17)")
    rank = get_tensor_model_parallel_rank()
    _sender = _Sender(address) if address and rank == 0 else None
    _applier = Applier(swap_dir, rank) if swap_dir else None
    driving = os.environ.get(depth.DEPTH_ENV) == "1" and swap_dir is not None
    if driving:
        depth.install(_applier)
        if plain_round.enabled():
            plain_round.install(depth.decided, depth.speculating)
    prefill, decode = W._draft_extend_for_prefill, W._draft_extend_for_decode
    stub = EAGLEWorkerV2._stub_skipped_draft_extend

    def draft_extend_for_prefill(self, batch, target_hidden_states, next_token_ids, *args, **kwargs):
        if driving:
            depth.mark_prefill()
        if _sender is not None:
            _on_prefill(batch, target_hidden_states)  # before the call: it rewrites batch.input_ids
        target_hidden_states = final_state.aux_only(target_hidden_states)
        if _applier is not None:  # between steps, in stream order: the draft forwards below see the new weights
            _applier.poll(self.draft_runner.model)
        if plain_round.draft_idle():  # no batch size speculates: the next rounds read only the sampled tokens
            depth.mark_cold(batch.reqs)
            return plain_round.prefill_stub(self, next_token_ids)
        return prefill(self, batch, target_hidden_states, next_token_ids, *args, **kwargs)

    def draft_extend_for_decode(self, batch, batch_result, *args, **kwargs):  # 0.5.22 adds kv_loc_plan=
        if _sender is not None:
            _on_decode(batch, batch_result, self.speculative_num_draft_tokens)
        out = batch_result.logits_output
        out.hidden_states = final_state.aux_only(out.hidden_states)
        if _applier is not None:
            _applier.poll(self.draft_runner.model)
        return decode(self, batch, batch_result, *args, **kwargs)

    def stub_skipped_draft_extend(self, batch, batch_output, *args, **kwargs):  # a depth-0 round
        depth.mark_cold(batch.reqs)
        if _sender is not None:
            _on_decode(batch, batch_output, 1)
        if _applier is not None:
            _applier.poll(self.draft_worker.draft_runner.model)
        return stub(self, batch, batch_output, *args, **kwargs)

    W._draft_extend_for_prefill, W._draft_extend_for_decode = draft_extend_for_prefill, draft_extend_for_decode
    EAGLEWorkerV2._stub_skipped_draft_extend = stub_skipped_draft_extend
    _installed = True
    log.info("aurora plugin installed on TP rank %d (capture to %s with the target's top %d, step swaps from %s, "
             "depth %s)", rank, address, TOPK, swap_dir, "Aurora's" if driving else "SGLang's")
