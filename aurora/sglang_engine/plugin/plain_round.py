"""A depth-0 round as SGLang's plain decode step (engine sglang, Aurora driving the depth, TP 1).

SGLang's own depth 0 (steps 0 of its adaptive mode) still takes the speculative path: a one-token TARGET_VERIFY
forward built by `_build_trivial_verify_input`, `eagle_prepare_for_verify` with the verify attention metadata,
and `eagle_sample`. Where a target step is short, that path's host time sets the pace, not the GPU
(results/sglang/h200_splitkv_2026-12-04: most of the depth-0 scheduler time sits in `run_eagle_verify`). A day-0
draft serves at depth 0, so day 0 paid that path on every token.

Here a depth-0 round runs the target in DECODE mode through a decode CUDA graph of its own, the kind that
`--draft none` replays, captured at start-up with the EAGLE3 aux states kept (CaptureHiddenMode.FULL, as the
verify forward keeps them), and samples with SGLang's own sampler (logit bias added by the same
`apply_logits_bias` that the verify path's `eagle_sample` mirrors). What it returns has the shape of a depth-0
verify result (every request accepts its one token), so the scheduler's speculative bookkeeping, the draft's stub
extend, capture and step swaps (eagle3.py) see no difference.

A prefill that runs while no batch size speculates (a day-0 draft, or one whose prediction does not pay) skips the
draft's prefill extend too (eagle3.py asks `draft_idle()`): the draft gets the same zeroed next-round state as
SGLang's stub after a skipped decode extend, and its KV cache is left unwritten for those positions. A request
prefilled or decoded at depth 0 that is still running when speculation turns on drafts from that stale cache until
it ends ("cold recovery", as SGLang's own skipped decode extend; depth.py keeps such requests out of the decision's
acceptance); requests admitted after that are extended as usual, and so are those admitted at depth 0 while some
other batch size speculates. Rejection sampling and DSA index seeding read the extend's outputs, so with either the
prefill extend always runs.

A round falls back to SGLang's own depth 0 where the two could differ: grammars (SGLang advances them inside its
verify), presence/frequency/repetition penalties, log-probabilities or hidden states asked back, custom logit
processors, sampled (not greedy) requests while the target's top K is captured, an idle batch, a batch larger than
the graphs. `AURORA_PLAIN_DEPTH0=1` turns it on
(launch.server_env); the counts of plain and fallback rounds are in depth.json (/v1/draft's `speculation`).
"""
import logging
import os

import torch

from aurora.sglang_engine import wire

log = logging.getLogger("aurora.sglang.plain_round")
ENV = "AURORA_PLAIN_DEPTH0"
_rounds: dict = {}  # id(EAGLEWorkerV2) -> PlainRounds, in this scheduler process
STATS = {"plain": 0, "reasons": {}, "disabled": None, "prefills": 0}  # plain rounds; fallbacks by reason; prefill
_draft_idle = [False]  # inside a prefill forward while no batch size speculates: the draft's extend is skipped


def snapshot() -> dict:
    return {"plain_rounds": STATS["plain"], "fallback_rounds": sum(STATS["reasons"].values()),
            "fallback_reasons": dict(STATS["reasons"]), "plain_disabled": STATS["disabled"],
            "prefills_without_draft": STATS["prefills"]}


def draft_idle() -> bool:
    """True inside a prefill forward that runs while no batch size speculates (eagle3.py then skips the draft)."""
    return _draft_idle[0]


def prefill_stub(draft_worker, next_token_ids: torch.Tensor):
    """What SGLang's prefill extend returns, with the draft not run: the prefill's sampled tokens for the next
    round, zeros where the draft's state would be (the shapes SGLang's _stub_skipped_draft_extend gives)."""
    from sglang.srt.speculative.eagle_info import EagleDraftInput
    from sglang.srt.speculative.eagle_utils import get_draft_recurrent_hidden_state_spec

    bs, dev = next_token_ids.shape[0], next_token_ids.device
    size, dtype = get_draft_recurrent_hidden_state_spec(draft_worker.draft_runner)
    STATS["prefills"] += 1
    return EagleDraftInput(
        topk_p=torch.zeros((bs, draft_worker.topk), dtype=torch.float32, device=dev),
        topk_index=torch.zeros((bs, draft_worker.topk), dtype=torch.int64, device=dev),
        hidden_states=None if size is None else torch.zeros((bs, size), dtype=dtype, device=dev),
        bonus_tokens=next_token_ids, num_tokens_per_req=1, num_tokens_for_logprob_per_req=1)


class PlainRounds:
    """The target's own decode graphs and attention backend, built beside SGLang's speculative ones."""

    def __init__(self, worker):
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        class AuxDecodeGraphs(DecodeCudaGraphRunner):
            def capture_prepare(self, *args, **kwargs):  # every captured shape keeps the aux states
                self.capture_hidden_mode = max(self.capture_hidden_mode, CaptureHiddenMode.FULL)
                return super().capture_prepare(*args, **kwargs)

        self.worker = worker
        self.mr = mr = worker.target_worker.model_runner
        self.full = CaptureHiddenMode.FULL
        # built as a server without speculation builds them: DecodeCudaGraphRunner picks TARGET_VERIFY graphs for
        # a speculative model runner, and the backend sizes its decode state from the same switch
        spec, workspace = mr.spec_algorithm, mr.init_new_workspace
        mr.spec_algorithm = SpeculativeAlgorithm.NONE
        try:
            self.attn_backend = mr._get_attention_backend(init_new_workspace=True)
            self.graphs = AuxDecodeGraphs(mr, attn_backend=self.attn_backend, speculative_num_steps=0,
                                          speculative_num_draft_tokens=1)
        finally:
            mr.spec_algorithm, mr.init_new_workspace = spec, workspace
        self.max_bs = self.graphs.max_bs
        # the next round reads the prefill extend's draft probabilities (rejection sampling) or DSA indices
        from sglang.srt.runtime_context import get_spec
        self.skip_prefill = not (get_spec().speculative_use_rejection_sampling
                                 or getattr(worker.draft_worker, "seed_dsa_topk_from_draft_extend", False))
        self.topk_capture = bool(int(os.environ.get(wire.TOPK_ENV) or 0))
        log.info("aurora: depth-0 rounds run the target's decode graphs (batch sizes up to %d)", self.max_bs)

    def why_not(self, batch) -> str | None:
        """None when this batch's depth-0 round can run as a plain decode step, else the reason it cannot."""
        info = batch.sampling_info
        if batch.forward_mode.is_idle():
            return "idle"
        if getattr(batch.spec_info, "bonus_tokens", None) is None:
            return "no previous token"
        if len(batch.seq_lens) > self.max_bs:
            return "batch above the graphs"
        if batch.has_grammar:
            return "grammar"
        if batch.return_logprob:
            return "logprobs"
        if getattr(batch, "return_hidden_states", False):
            return "hidden states"
        if info is None:
            return "no sampling info"
        if getattr(info, "has_custom_logit_processor", False):
            return "custom logit processor"
        # SGLang accumulates penalties from each request's last committed token at decode preparation; whether a
        # plain round sees the same counts as SGLang's verify does at every step is not shown (a frequency
        # penalty run parted from target-only SGLang), so penalised batches keep SGLang's path
        if info.acc_additive_penalties is not None or info.acc_scaling_penalties is not None:
            return "penalties"
        # SGLang's sampler turns the logits into probabilities in place when it samples; capture reads the target's
        # top K from those logits after the round (eagle3.py), SGLang's verify leaves them whole
        if self.topk_capture and not info.is_all_greedy:
            return "sampled, top-K capture"
        return None

    def run(self, batch):
        """The round's result, before anything is published: the forward and the sampling."""
        from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_uniform_func
        from sglang.srt.managers.utils import GenerationBatchResult
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
        from sglang.srt.speculative.eagle_info import EagleDraftInput

        w, mr = self.worker, self.mr
        draft_input, bs = batch.spec_info, len(batch.seq_lens)
        seq_lens, seq_lens_cpu, seq_lens_sum = batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum
        orig_seq_lens, mode = batch.orig_seq_lens, batch.forward_mode
        # the token of the previous round goes in at position seq_lens, into the KV slot SGLang's decode
        # preparation reserved there (the slot a depth-0 verify writes); DECODE counts it in seq_lens
        batch.input_ids = draft_input.bonus_tokens
        batch.out_cache_loc = assign_extend_cache_locs_uniform_func(
            req_pool_indices=batch.req_pool_indices, req_to_token=w.req_to_token_pool.req_to_token,
            start_offset=seq_lens, batch_size=bs, draft_token_num=1, device=batch.device)
        batch.seq_lens = seq_lens + 1
        batch.seq_lens_cpu = None if seq_lens_cpu is None else seq_lens_cpu + 1
        batch.orig_seq_lens = None if orig_seq_lens is None else orig_seq_lens + 1
        batch.seq_lens_sum, batch.forward_mode, batch.spec_info = None, ForwardMode.DECODE, None
        try:
            fb = ForwardBatch.init_new(batch, mr, capture_hidden_mode=self.full, return_hidden_states_before_norm=False)
        finally:  # SGLang's speculative bookkeeping goes on from its own convention (lengths before the round)
            batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens, seq_lens_cpu, seq_lens_sum
            batch.orig_seq_lens, batch.forward_mode, batch.spec_info = orig_seq_lens, mode, draft_input
        held = mr.decode_cuda_graph_runner, mr.attn_backend
        mr.decode_cuda_graph_runner, mr.attn_backend = self.graphs, self.attn_backend
        try:
            out = w.target_worker.forward_batch_generation(batch=None, forward_batch=fb)
        finally:
            mr.decode_cuda_graph_runner, mr.attn_backend = held
        predict = out.next_token_ids.to(torch.int32)
        accept_lens = torch.ones_like(predict)
        return GenerationBatchResult(
            logits_output=out.logits_output, next_token_ids=predict, can_run_cuda_graph=out.can_run_cuda_graph,
            speculative_num_draft_tokens=1, next_draft_input=EagleDraftInput(bonus_tokens=predict),
            accept_lens=accept_lens, new_seq_lens=seq_lens + accept_lens,
            routed_experts_output=out.routed_experts_output, indexer_topk_output=out.indexer_topk_output,
            extra_keep_alive_refs=[fb])


def install(decided, speculating) -> None:
    """Build each EAGLEWorkerV2's decode graphs after SGLang's own and route its depth-0 decode rounds through
    them. `decided()`: a context inside which SGLang's activate_step_by_batch leaves the depth alone (the wrapper
    below has chosen it for this forward already); `speculating()`: whether the decision speculates at any batch
    size (then a prefill extends the draft, so that the request is not cold when its batch speculates)."""
    from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2 as W

    for name in ("init_cuda_graphs", "forward_batch_generation", "_stub_skipped_draft_extend"):
        if not hasattr(W, name):
            raise RuntimeError(f"aurora plugin: this SGLang has no EAGLEWorkerV2.{name} (built for 0.5.17)")
    init_graphs, forward = W.init_cuda_graphs, W.forward_batch_generation

    def init_cuda_graphs(self):
        init_graphs(self)
        if self.target_worker.model_runner.decode_cuda_graph_runner is None:  # graphs turned off for this server
            log.info("aurora: SGLang's decode CUDA graphs are off; depth 0 runs SGLang's trivial verify")
            return
        try:
            _rounds[id(self)] = PlainRounds(self)
        except Exception:  # serving goes on through SGLang's own depth 0, and says so
            log.exception("aurora: the target's decode graphs could not be built; depth 0 runs SGLang's trivial "
                          "verify")

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None):
        plain = _rounds.get(id(self))
        if plain is None or batch.is_extend_in_batch and not batch.forward_mode.is_extend():
            return forward(self, batch, on_publish=on_publish, grammar_barrier=grammar_barrier)
        if batch.forward_mode.is_extend():  # a prefill: the draft runs only if some batch size speculates
            _draft_idle[0] = plain.skip_prefill and self.speculative_num_steps == 0 and not speculating()
            try:
                return forward(self, batch, on_publish=on_publish, grammar_barrier=grammar_barrier)
            finally:
                _draft_idle[0] = False
        self.activate_step_by_batch(batch.seq_lens.shape[0])
        if self.speculative_num_steps == 0:
            reason = plain.why_not(batch)
            if reason is None:
                try:
                    result = plain.run(batch)
                except Exception as e:  # nothing published yet and the batch's lengths restored: SGLang's path
                    log.exception("aurora: a plain depth-0 round failed; depth 0 runs SGLang's verify from now on")
                    _rounds.pop(id(self), None)
                    STATS["disabled"], reason = f"{type(e).__name__}: {e}", "plain round failed"
                else:
                    STATS["plain"] += 1
                    if on_publish is not None:  # before the draft's part, as SGLang's verify publishes
                        on_publish(result.new_seq_lens)
                    self._stub_skipped_draft_extend(batch, result)  # draft state stubs; capture, step swaps
                    return result
            if reason != "idle":
                STATS["reasons"][reason] = STATS["reasons"].get(reason, 0) + 1
        with decided():
            return forward(self, batch, on_publish=on_publish, grammar_barrier=grammar_barrier)

    W.init_cuda_graphs, W.forward_batch_generation = init_cuda_graphs, forward_batch_generation


def enabled() -> bool:
    return os.environ.get(ENV) == "1"
