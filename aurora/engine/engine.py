"""LLMEngine: the step loop of the built-in engine. step() = apply a pending draft swap -> admit and
prefill -> one decoding round for every running sequence -> append tokens, check stops -> finish.

A finished request leaves a training Sample through `on_sample` (set by the service), one step later: its states'
copy (to the host, or on the device for a trainer on the same GPU) is queued at finish and handed over after the
next step's device sync (LLMEngine.finish). The engine never imports the trainer. New draft weights arrive through
`swap_draft`, copied in place between steps, so no request waits for a drain and CUDA graphs stay valid.
"""
import importlib.util
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from aurora.engine.model_runner import ModelRunner
from aurora.engine.scheduler import Scheduler
from aurora.engine.sequence import RequestOutput, SamplingParams, Sequence
from aurora.engine.speculation import DepthController, SpeculationConfig
from aurora.engine.stats import EngineStats
from aurora.models.draft import Eagle3Draft
from aurora.models.target import TargetModel
from aurora.sample import Sample, sampled

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward (batch x longest prompt)
log = logging.getLogger(__name__)


FAULT_ENV = "AURORA_FAULT_INJECT_SEED"  # tests only: a request with this sampling seed raises inside the engine


def _fault_seed() -> int | None:
    value = os.environ.get(FAULT_ENV)
    if value:
        log.warning("%s=%s: requests with this seed will fail inside the engine (fault injection)", FAULT_ENV, value)
    return int(value) if value else None


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass
class EngineConfig:
    lookahead: int = 4            # the deepest draft chain per round (SGLang's speculative_num_steps)
    adaptive: bool = True         # choose each round's depth in 0..lookahead by measured cost and acceptance
                                  # (aurora.engine.speculation); False: every round at full lookahead
    initial_acceptance: list[float] | None = None  # the served draft's per-position acceptance, if known
                                  # (a day-0 head: zeros, so serving starts as plain decoding); None: observe it
    topk: int = 1                 # branches per draft step: 1 = chain, > 1 = tree
    num_draft_tokens: int | None = None  # verified per round incl. the root; = lookahead + 1 for a chain
    max_batch: int = 32
    admission_wait: int = 0       # steps a small waiting group may wait for more arrivals while others decode
                                  # (aurora.engine.scheduler); 0: admitted at the next step
    max_model_len: int = 2048
    device: str = "auto"
    dtype: str = "auto"           # bf16 on CUDA, fp32 on CPU
    cuda_graphs: bool = True
    capture_graphs_at_start: bool = True  # every greedy round shape up front: none is captured mid-serving
    capture: bool = True          # keep aux/final hidden states per position for training samples
    train_on_prompt: bool = True  # prompt positions also enter the sample's loss mask
    fused_kernels: bool | None = None  # the target's rotary + KV-cache write, residual add + RMSNorm and SiLU * up
                                  # as Triton kernels (aurora_kernels.serving). None: on for CUDA when triton is
                                  # installed: faster on the GPU (docs/measurements.md, results/engine/)
    samples_on_device: bool = False  # a finished request's captured states stay on the engine's device (its trainer
                                  # trains there: the service sets it once it knows); else copied to the host
    priority_stream: bool = True  # CUDA: engine steps run on a high-priority stream, so a trainer sharing the GPU
                                  # (default-priority stream) yields SMs to serving whenever both have work.
                                  # Measured: serving no slower, the trainer faster (docs/measurements.md)

    def __post_init__(self):
        if self.lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        if self.topk < 1:
            raise ValueError("topk must be >= 1")
        if self.num_draft_tokens is None:
            self.num_draft_tokens = self.lookahead + 1
        if self.topk == 1 and self.num_draft_tokens != self.lookahead + 1:
            raise ValueError("with topk 1 (a chain), num_draft_tokens must equal lookahead + 1")
        if not self.lookahead + 1 <= self.num_draft_tokens <= self.topk * self.lookahead + 1:
            raise ValueError(f"num_draft_tokens must be in [lookahead+1, topk*lookahead+1] = "
                             f"[{self.lookahead + 1}, {self.topk * self.lookahead + 1}]")
        if self.fused_kernels and not _triton_installed():
            raise ValueError("fused_kernels needs triton (pip install 'aurora-spec[triton]')")
        if self.max_batch < 1 or self.max_model_len < 16:
            raise ValueError("max_batch must be >= 1 and max_model_len >= 16")
        if self.admission_wait < 0:
            raise ValueError("admission_wait must be >= 0")

    def torch_device(self) -> torch.device:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)

    def use_fused_kernels(self, device: torch.device) -> bool:
        return self.fused_kernels if self.fused_kernels is not None else device.type == "cuda" and _triton_installed()

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[self.dtype]


class LLMEngine:
    def __init__(self, target_path: str, draft: Eagle3Draft | None, config: EngineConfig, tokenizer=None):
        from transformers import AutoTokenizer

        self.config, self.target_path = config, target_path
        dev = config.torch_device()
        dt = config.torch_dtype(dev)
        self.target = TargetModel.from_pretrained(target_path, dtype=dt, device=dev)
        self.fused_kernels = config.use_fused_kernels(dev)
        self.target.use_fused_kernels(self.fused_kernels)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(target_path)
        tc = self.target.config
        self.max_model_len = min(config.max_model_len, tc.max_position_embeddings)
        eos = tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id]
        self.eos_ids = {e for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        if draft is not None:
            draft = draft.to(device=dev, dtype=dt).requires_grad_(False)
            draft.share_embedding(self.target.embed_tokens)
        self.draft = draft
        self.draft_version = 0
        self.scheduler = Scheduler(config.max_batch, admission_wait=config.admission_wait)
        self.runner = ModelRunner(self.target, draft, config.max_batch, self.max_model_len, config.lookahead,
                                  config.capture, config.cuda_graphs, config.topk, config.num_draft_tokens,
                                  fused_rope=self.fused_kernels,
                                  prefill_rows=min(self.scheduler.max_prefills, config.max_batch))
        self.stats = EngineStats(config.lookahead)
        self.speculation = DepthController(config.lookahead, SpeculationConfig(adaptive=config.adaptive),
                                           self.runner.depths())
        self.speculation.new_version(0, config.initial_acceptance)
        if config.capture_graphs_at_start and self.runner.use_graphs:
            t0 = time.perf_counter()
            depths = self.speculation.depths if config.adaptive else self.speculation.depths[-1:]  # the ones in use
            n = self.runner.capture_all(depths)
            log.info("captured %d CUDA graphs (rounds: batch x context x depth; prefills: rows x length; greedy) "
                     "in %.1f s", n, time.perf_counter() - t0)
        self.on_sample: Callable[[Sample], None] | None = None       # a captured request's training sample
        # which requests leave a sample, decided when each arrives (an unsampled one costs no copy at its finish):
        # sample_rate, times pacer.rate() where the service sets a pacer (aurora/training/pacing.py)
        self.sample_rate, self.pacer = 1.0, None
        self._capture_rng = random.Random(0)
        self.capture_admitted = 0  # requests marked for capture
        self.on_finished: Callable[[Sequence], None] | None = None   # every finished request
        self._samples: list[Sample] = []  # finished requests' samples whose state copies are still in flight
        self._pending_swap: tuple[dict, int, list[float] | None, threading.Event] | None = None
        self._swap_lock = threading.Lock()
        self._by_id: dict[str, Sequence] = {}
        self._aborts: set[str] = set()
        self.request_errors = 0  # requests failed alone by an exception in their own work
        self.fault_seed = _fault_seed()
        self._last_depth = 0  # the first speculative round catches the draft up
        self._last_round: tuple | None = None  # (bucket, depth, start, end, committed tokens, timed), not yet costed
        self._excluded = 0.0  # seconds since the last round that were no round's doing (exclude_from_round)
        # where the engine thread's step time goes (AsyncEngine adds its idle wait), so that a stream served over
        # HTTP and one driven in-process can be told apart by prefill calls, rounds and idle time (front_cost.py)
        self.time = {"steps": 0, "step_s": 0.0, "prefill_calls": 0, "prefilled": 0, "prefill_s": 0.0,
                     "rounds": 0, "round_s": 0.0}

    # ------------------------------------------------------------- requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        V = self.target.config.vocab_size
        if any(not 0 <= t < V for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {V})")
        limit = self.max_model_len - self.runner.span - 1
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; this engine's context allows {limit - 1}")
        seq = Sequence(list(prompt_ids), params, request_id)
        seq.draft_version = self.draft_version
        seq.capture = params.capture and self.runner.capture and sampled(self._capture_rng, self.sample_rate,
                                                                          self.pacer)
        self.capture_admitted += seq.capture
        self._by_id[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        self._aborts.add(request_id)  # applied at the next step, in the engine's own thread

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or self._pending_swap is not None or bool(self._aborts)
                or bool(self._samples))

    # ------------------------------------------------------------- draft swap
    def swap_draft(self, state: dict[str, torch.Tensor], version: int,
                   acceptance: list[float] | None = None) -> threading.Event:
        """Queue new draft weights; they are copied in place before the next step. Returns an Event set once live.
        acceptance: the new draft's predicted per-position acceptance (the trainer's held-out replay), which
        lets the depth decision speculate with it, or stop, before paying for a round."""
        if self.draft is None:
            raise RuntimeError("this engine runs without a draft")
        own = self.draft.state_dict()
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        missing = {n for n, _ in self.draft.named_parameters()} - set(state)
        if bad or missing:  # buffers (d2t/t2d) may be left out; every weight must be there
            raise ValueError(f"draft state does not match the live draft (mismatched {bad[:3]}, "
                             f"missing {sorted(missing)[:3]})")
        done = threading.Event()
        with self._swap_lock:
            self._pending_swap = (state, version, acceptance, done)
        return done

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return
        state, version, acceptance, done = pending
        with torch.no_grad():
            own = self.draft.state_dict()
            for name, t in state.items():
                own[name].copy_(t, non_blocking=True)
        if self.runner.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.draft_version = version
        self.speculation.new_version(version, acceptance)
        log.info("draft version %d is live", version)
        done.set()

    # ------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        t_prefill = time.perf_counter()
        due, self._samples = self._samples, []  # copies queued before this step: complete after its device sync
        self._apply_swap()
        outputs: list[RequestOutput] = []
        for rid in list(self._aborts):
            self._aborts.discard(rid)
            seq = self._by_id.get(rid)
            if seq is not None:
                seq.finish_reason = "abort"
                outputs.append(self.finish(seq))
        admitted = self.scheduler.admit()  # consecutive rows: prefilled together, up to a padded-token budget
        for seq in admitted:
            p = seq.params
            seq.queue_time = time.monotonic() - seq.arrival
            try:
                self.runner.set_row(seq.row, p.temperature, p.top_p, p.top_k,
                                    p.seed if p.seed is not None else random.getrandbits(62))
            except Exception as e:  # this request's values: it fails alone (its row is still prefilled, unused)
                self.runner.set_row(seq.row, 1.0, 1.0, 0, 0)
                self._fail(seq, e)
        while admitted:
            n, longest = 1, len(admitted[0].prompt_ids)
            while n < len(admitted) and (n + 1) * max(longest, len(admitted[n].prompt_ids)) <= PREFILL_TOKENS:
                longest, n = max(longest, len(admitted[n].prompt_ids)), n + 1
            group, admitted = admitted[:n], admitted[n:]
            toks = self.runner.prefill(group[0].row, [s.prompt_ids for s in group],
                                       all(s.params.greedy for s in group), any(s.params.filters for s in group),
                                       with_draft=self._last_depth > 0)
            self.time["prefill_calls"] += 1
            self.time["prefilled"] += len(group)
            outputs += [self._append_guarded(seq, [tok]) for seq, tok in zip(group, toks) if seq.finish_reason is None]
        prefill_s = time.perf_counter() - t_prefill
        self.time["prefill_s"] += prefill_s
        running = [s for s in self.scheduler.running if s.finish_reason is None]
        if running:
            B = len(self.scheduler.running)
            max_cached = max(s.num_tokens for s in self.scheduler.running)
            filtering = any(s.params.filters for s in self.scheduler.running)
            greedy_only = all(s.params.greedy for s in self.scheduler.running)
            bucket = self.runner.bucket(B)
            depth = self.speculation.choose(bucket) if self.draft is not None else 0
            self._last_depth = depth  # admissions prefill the draft too while serving speculates
            t0 = time.perf_counter()
            self._time_last_round(t0 - prefill_s, t0)
            tokens, n_acc, props = self.runner.round(B, max_cached, filtering, greedy_only, depth)
            round_end, committed = time.perf_counter(), 0
            pad = [-1] * (self.config.lookahead - depth)  # a sample's rounds are [R, lookahead]; -1: not proposed
            # as Python lists once: indexing the host tensors row by row cost more than the round's bookkeeping
            n_acc, tokens, props = n_acc.tolist(), tokens.tolist(), props.tolist()
            for seq in running:
                r = seq.row
                n = n_acc[r]
                before = len(seq.output_ids)
                try:  # per-request bookkeeping: an exception here fails this request, not the batch
                    if depth > 0:
                        seq.rounds.append((seq.num_tokens - 1, props[r] + pad, n))
                    outputs.append(self._append(seq, tokens[r][:n + 1]))
                    committed += len(seq.output_ids) - before
                    if depth > 0:  # counted as committed: a stop or max_tokens may cut a round short
                        seq.verify_rounds += 1
                        seq.verify_tokens += len(seq.output_ids) - before
                        for j in range(n):
                            seq.accepted_per_position[j] += 1
                        for j in range(min(n + 1, depth)):
                            seq.tried_per_position[j] += 1
                except Exception as e:
                    self._fail(seq, e)
            if self.draft is not None:
                self.speculation.observe(bucket, depth, None, [n_acc[s.row] for s in running])
                if not self.runner.captured:  # costed once the next round starts (_time_last_round); a round
                    # that caught the draft up counts in what serving delivered, but its time is not the depth's
                    self._last_round = (bucket, depth, t0, round_end, committed, not self.runner.caught_up)
        for seq in [s for s in self.scheduler.running if s.finish_reason is not None]:
            outputs.append(self.finish(seq))
        if not self.scheduler.running:  # no next round follows at once: the last one costs its own time
            self._time_last_round(None, None)
        if due:
            self._hand_over(due, synced=bool(running))
        t, now = self.time, time.perf_counter()
        t["steps"] += 1
        t["step_s"] += now - t_prefill
        if running:
            t["rounds"] += 1
            t["round_s"] += now - t0
        return [o for o in outputs if o is not None]

    def exclude_from_round(self, seconds: float) -> None:
        """Time between two steps that serving spent on nothing of its own (on a CPU: waiting for the trainer's
        turn on the cores). It is the same whatever the depth, so it is kept out of the last round's cost and
        delivered rate; left in, it lands on whichever depth ran before it and the decision follows noise."""
        self._excluded += max(seconds, 0.0)

    def _time_last_round(self, until: float | None, next_start: float | None) -> None:
        """A round costs serving the wall time from its start to the next round's start, less the admissions'
        prefill in between (`until`): the host bookkeeping, token delivery and whatever else the process does
        meanwhile (a trainer's Python and kernels, the HTTP front) are part of what a depth costs, and differ
        by depth. until None: the round's own time (serving went idle after it). What the round delivered, over
        the whole time to `next_start` (prefill included), feeds the controller's guard rail, also for a round
        that caught the draft up (untimed: a cost of switching, which the guard rail must see)."""
        if self._last_round is None:
            self._excluded = 0.0
            return
        bucket, depth, start, end, committed, timed = self._last_round
        self._last_round, gap, self._excluded = None, self._excluded, 0.0
        if timed:
            self.speculation.observe_cost(bucket, depth, max((until if until is not None else end) - start - gap,
                                                             end - start))
        if next_start is not None:
            self.speculation.observe_served(bucket, depth, committed, max(next_start - start - gap, end - start))

    def _hand_over(self, samples: list[Sample], synced: bool) -> None:
        """Samples whose state copies were queued before this step's device work: once this step's round has read
        its results on the host, so have the copies; without a round, wait here (nothing is running: it costs
        serving nothing)."""
        if not synced and self.runner.device.type == "cuda":
            torch.cuda.current_stream(self.runner.device).synchronize()
        for sample in samples:
            try:
                if self.on_sample is not None:
                    self.on_sample(sample)
            except Exception:  # capture must never take serving down
                log.exception("handing over the sample of %s failed", sample.request_id)

    def _fail(self, seq: Sequence, e: Exception) -> None:
        """Per-request work raised: this sequence alone finishes with an error at the end of the step."""
        log.exception("request %s failed in the engine", seq.request_id, exc_info=e)
        seq.finish_reason, seq.error = "error", f"{type(e).__name__}: {e}"
        self.request_errors += 1

    def _append_guarded(self, seq: Sequence, new: list[int]) -> RequestOutput | None:
        try:
            return self._append(seq, new)
        except Exception as e:
            self._fail(seq, e)
            return None

    def _append(self, seq: Sequence, new: list[int]) -> RequestOutput | None:
        """Append committed tokens, cut at the first stop; the sequence finishes at the end of the step."""
        p, kept = seq.params, []
        if self.fault_seed is not None and p.seed == self.fault_seed:
            raise RuntimeError(f"fault injected by {FAULT_ENV} for seed {p.seed}")
        if not seq.accepted_per_position:
            seq.accepted_per_position = [0] * self.config.lookahead
            seq.tried_per_position = [0] * self.config.lookahead
        for t in new:
            kept.append(t)
            seq.output_ids.append(t)
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens + self.runner.span + 1 >= self.max_model_len:
                seq.finish_reason = "length"
            elif p.stop and self._hit_stop_string(seq):
                seq.finish_reason = "stop"
            if seq.finish_reason:
                break
        self.stats.on_tokens(len(kept))
        if seq.finish_reason or not kept:
            return None  # a finishing sequence is reported by _finish, with its final stats
        seq.reported = len(seq.output_ids)
        return RequestOutput(seq.request_id, kept, seq.output_ids, len(seq.prompt_ids), False,
                             verify_rounds=seq.verify_rounds, accept_length=seq.accept_length,
                             verify_tokens=seq.verify_tokens, queue_time=seq.queue_time)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        tail = self.tokenizer.decode(seq.output_ids[-(longest + 8):], skip_special_tokens=False)
        return any(s in tail for s in seq.params.stop)

    def finish(self, seq: Sequence) -> RequestOutput:
        """Take a sequence out (finished, aborted or failed): capture its sample, free its row, report it."""
        rows_used = seq.row >= 0
        if (rows_used and seq.capture and self.on_sample is not None
                and seq.finish_reason != "error"):  # a failed request's rounds may be half-recorded
            try:  # handed over after the next step's sync (_hand_over): no wait for the copy here, between rounds
                self._samples.append(self._make_sample(seq))
            except Exception:  # capture must never take serving down
                log.exception("capturing a sample from %s failed", seq.request_id)
        move = self.scheduler.remove(seq)
        if rows_used:
            if move is not None:
                self.runner.move_row(*move, self.scheduler.running[move[1]].num_tokens)
            self.runner.release_row(len(self.scheduler.running))
        self._by_id.pop(seq.request_id, None)
        self.stats.on_finish(seq.verify_tokens, seq.verify_rounds, seq.accepted_per_position, seq.draft_version,
                             seq.tried_per_position)
        if self.on_finished is not None:
            self.on_finished(seq)
        emitted = seq.output_ids[seq.reported:]
        seq.reported = len(seq.output_ids)
        return RequestOutput(seq.request_id, emitted, seq.output_ids, len(seq.prompt_ids), True,
                             seq.finish_reason or "abort", seq.verify_rounds, seq.accept_length,
                             error=seq.error, draft_version=seq.draft_version, verify_tokens=seq.verify_tokens,
                             queue_time=seq.queue_time)

    def _make_sample(self, seq: Sequence) -> Sample:
        ids = torch.tensor(seq.all_ids, dtype=torch.long)
        aux, hid = self.runner.read_capture(seq.row, ids.numel() - 1, self.config.samples_on_device)
        mask = torch.ones(ids.numel(), dtype=torch.bool)
        if not self.config.train_on_prompt:
            mask[:len(seq.prompt_ids)] = False
        R = len(seq.rounds)
        k = self.config.lookahead
        return Sample(seq.request_id, ids, len(seq.prompt_ids), aux, hid, mask,
                      round_start=torch.tensor([r[0] for r in seq.rounds], dtype=torch.long),
                      proposals=torch.tensor([r[1] for r in seq.rounds], dtype=torch.long).view(R, k),
                      accepted=torch.tensor([r[2] for r in seq.rounds], dtype=torch.long),
                      draft_version=seq.draft_version, greedy=seq.params.greedy)
