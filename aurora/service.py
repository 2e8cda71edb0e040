"""The service: builds the engine and the trainer from a ServeConfig and wires the one-way data path

  request -> AsyncEngine -> Sample (engine.on_sample) -> OnlineTrainer buffer -> training thread
          -> publish(state, version) -> AsyncEngine.swap_draft (copied in place between steps)

Engine and trainer never import each other; this module is the only place that knows both.
"""
import dataclasses
import logging
import os
import sys
import time
from typing import Callable

import torch

from aurora.budget import (draft_param_bytes, kv_cache_bytes, measure_peak, plan_sglang_fraction, sglang_flag, sglang_gpus,
                           shares_gpu, trainer_device, trainer_probe, workspace_bytes)
from aurora.engine.async_engine import AsyncEngine
from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.speculation import served_speedup
from aurora.engine.sequence import SamplingParams
from aurora.models import hub
from aurora.models.draft import DraftConfig, load_draft, new_draft
from aurora.training.checkpoint import load_served_draft
from aurora.server.config import ServeConfig
from aurora.sharing import DeviceShare
from aurora.training.pacing import CapturePacer
from aurora.training.trainer import OnlineTrainer, TrainConfig
from aurora.training.vocab import vocab_from_samples

log = logging.getLogger(__name__)


def _served_name(cfg: ServeConfig) -> str:
    return cfg.target if cfg.target != hub.EMBEDDED_DEFAULT else "SmolLM2-135M-Instruct"


def _scratch_prior(cfg: ServeConfig) -> list[float] | None:
    """The acceptance of weights no guard has scored: a scratch head accepts next to nothing (zeros: serving
    decodes plainly and speculates once a trained version's held-out prediction says it pays); a given draft
    (None) is observed at full depth first."""
    return [0.0] * cfg.lookahead if cfg.draft == "scratch" else None


def _initial_acceptance(cfg: ServeConfig, ckpt: str) -> list[float] | None:
    """The served draft's per-position acceptance before serving has measured any: _scratch_prior, unless resuming.
    A resumed draft's checkpointed prediction comes with the trainer's republish of the restored weights
    (OnlineTrainer.start; the scratch prior again for a version that was never published), which both engines
    apply before their first round."""
    return None if _resuming(cfg, ckpt) else _scratch_prior(cfg)


def _resuming(cfg: ServeConfig, ckpt: str) -> bool:
    return cfg.resume and os.path.exists(os.path.join(ckpt, "trainer.pt"))


def _training_device_type(cfg: ServeConfig) -> str:
    """Where the draft trains, which picks the training settings left unset: SGLang serves on CUDA and fixes
    the draft's vocabulary at its start, so it always takes the CUDA ones."""
    if cfg.engine == "sglang":
        return "cuda"
    device = cfg.trainer_device if cfg.trainer_device != "auto" else cfg.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _for_device(cfg: ServeConfig) -> ServeConfig:
    device = _training_device_type(cfg)
    cfg, chosen = cfg.for_device(device)
    if chosen and cfg.draft is not None:
        log.info("training settings chosen for the %s (flags override them): %s", device,
                 ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return cfg


def _initial_draft(cfg: ServeConfig, target_config, ckpt: str):
    """The draft served first: resumed from the checkpoint, a day-0 head, or the checkpoint directory given
    (returned as well, so an engine that loads from disk can use it as is)."""
    if _resuming(cfg, ckpt):
        log.info("resuming the draft from %s", ckpt)
        return load_served_draft(ckpt), None
    if cfg.draft == "scratch":
        vocab = cfg.draft_vocab_size if 0 < cfg.draft_vocab_size < target_config.vocab_size else None  # None: all
        return new_draft(DraftConfig.from_target(target_config, vocab)), None
    path = hub.resolve(cfg.draft)
    return load_draft(path), path


def _train_config(cfg: ServeConfig, ckpt: str, device) -> TrainConfig:
    """The trainer keeps every sample it is offered: either engine samples requests when they arrive."""
    cfg, _ = cfg.for_device(torch.device(device).type)  # a no-op on a config from_config has completed
    return TrainConfig(objective=cfg.objective, lr=cfg.lr, ttt_length=cfg.lookahead, sync_every=cfg.sync_every,
                       buffer_samples=cfg.buffer_samples,
                       buffer_bytes=int(cfg.buffer_gib * 2**30), replay_passes=cfg.replay_passes,
                       reject_weight=cfg.reject_weight, batch_tokens=cfg.train_batch_tokens, checkpoint_dir=ckpt,
                       train_steps=cfg.train_ttt_steps,
                       duty=cfg.trainer_duty, precision=cfg.train_precision,
                       graphs=cfg.train_graphs, resume=cfg.resume, device=str(device))


def _sglang_train_config(cfg: ServeConfig, ckpt: str, device) -> TrainConfig:
    """The trainer's config beside SGLang (whose engine samples at admission). A trainer on one of SGLang's GPUs
    steps eagerly: a replayed graph queues a whole step at once, and the GPU time-slices between the trainer's
    context and SGLang's processes, so a scheduler's round could wait out the step (not measured either way)."""
    tconf = _train_config(cfg, ckpt, device)
    if tconf.graphs and shares_gpu(str(device), cfg.tp_size, cfg.sglang_args):
        log.info("trainer on one of SGLang's GPUs (%s): eager steps, not CUDA graphs", device)
        tconf = dataclasses.replace(tconf, graphs=False)
    return tconf


def _probe_trainer(draft, lm_head, tconf: TrainConfig) -> None:
    """One step and one guard pass of a throw-away trainer at the largest batches the real one will form (its own
    fp32 copy: the live draft is untouched). On a GPU this also compiles the trainer's kernels (Triton's JIT of the
    fused loss and the guard's) before serving starts: compiled under load instead, the first steps' compile counts
    against the trainer's duty (aurora/sharing.py), which then rests nine times as long, and a day-0 server barely
    trained for its first thousands of requests."""
    # at every TTT step the real trainer may train ("auto" grows to them), so the probe's peak bounds its steps'
    conf = dataclasses.replace(tconf, resume=False, checkpoint_dir=None, faults="",
                               train_steps=0 if tconf.train_steps == "auto" else tconf.train_steps)
    trainer = OnlineTrainer(draft, lm_head, conf, lambda state, version, acceptance: None)
    trainer_probe(trainer, 3 * draft.config.target_hidden_size, draft.config.vocab_size)


def _sglang_memory_fraction(cfg: ServeConfig, draft, lm_head, tconf: TrainConfig, dev: torch.device) -> float | None:
    """SGLang's --mem-fraction-static when the trainer shares its GPU and the user set none (aurora/budget.py);
    None leaves SGLang's own choice (trainer elsewhere, or the user's flag)."""
    user = sglang_flag(cfg.sglang_args, "--mem-fraction-static")
    if not shares_gpu(str(dev), cfg.tp_size, cfg.sglang_args):
        log.info("trainer on %s, apart from SGLang's GPUs %s: no memory split needed", dev,
                 list(sglang_gpus(cfg.tp_size, cfg.sglang_args)))
        return None
    if user is not None:
        log.info("trainer shares %s with SGLang; --mem-fraction-static %s as given", dev, user)
        return None
    c = draft.config
    n_params = sum(p.numel() for name, p in draft.named_parameters() if not name.startswith("embed"))
    estimate = draft_param_bytes(n_params, tconf.keep_versions) + workspace_bytes(
        tconf.batch_tokens, tconf.guard_chunk_tokens, c.vocab_size, c.draft_vocab_size, tconf.ttt_length)
    try:
        measured = measure_peak(dev, lambda: _probe_trainer(draft, lm_head, tconf))
    except torch.OutOfMemoryError:
        raise RuntimeError(f"one trainer step does not fit on {dev} even before SGLang starts: lower "
                           f"--train-batch-tokens or use --trainer-device cuda:N") from None
    # what the probe could not see: the snapshots kept for rollback and the step-swap buffers (2 bytes/param each)
    measured = None if measured is None else measured + 2 * n_params * (tconf.keep_versions + 2)
    free, total = torch.cuda.mem_get_info(dev)
    plan = plan_sglang_fraction(total, free, estimate, measured)
    log.info("trainer shares %s with SGLang: %s", dev, plan.describe())
    return plan.fraction


def _log_local_split(cfg: ServeConfig, engine: LLMEngine, draft, tconf: TrainConfig, dev: torch.device) -> None:
    """The built-in engine sizes its KV cache by max_batch x max_model_len (allocated already): say what the
    trainer sharing its GPU will need on top, and warn when that is more than is free."""
    tc, c = engine.target.config, draft.config
    kv = kv_cache_bytes(tc.num_hidden_layers, tc.num_key_value_heads, engine.target.head_dim, cfg.max_batch,
                        cfg.max_model_len, engine.target.embed_tokens.weight.element_size())
    n = sum(p.numel() for p in draft.parameters())
    need = draft_param_bytes(n, tconf.keep_versions) + workspace_bytes(
        tconf.batch_tokens, tconf.guard_chunk_tokens, c.vocab_size, c.draft_vocab_size, tconf.ttt_length)
    buffered = tconf.buffer_bytes  # captured states wait on this GPU (LLMEngine samples_on_device)
    free, total = torch.cuda.mem_get_info(dev)
    line = (f"{dev}: {total / 2**30:.1f} GiB, {free / 2**30:.1f} free after the engine's KV cache of "
            f"{kv / 2**30:.1f} GiB ({cfg.max_batch} x {cfg.max_model_len}); the trainer needs about "
            f"{(need + buffered) / 2**30:.1f} GiB, its sample buffer's {buffered / 2**30:.1f} included")
    if need + buffered > free:
        log.warning("%s: more than is free; lower --max-batch, --max-model-len, --train-batch-tokens or "
                    "--buffer-gib, or use --trainer-device cuda:N", line)
    else:
        log.info("%s", line)


def _device_share(cfg: ServeConfig, trainer_dev: torch.device, engine_dev: torch.device, duty: float,
                  speedup: Callable[[], float]) -> DeviceShare:
    """Built-in engine: how its trainer shares the device (aurora/sharing.py). A CPU: turns on the same cores.
    The engine's GPU: a green context of `trainer_sms` SMs (default a quarter). Elsewhere: duty alone. `speedup`:
    what speculation gives serving now (the serving floor's input)."""
    same = trainer_dev.type == engine_dev.type and (trainer_dev.index or 0) == (engine_dev.index or 0)
    sms = 0
    if same and trainer_dev.type == "cuda":
        total = torch.cuda.get_device_properties(engine_dev).multi_processor_count
        sms = cfg.trainer_sms if cfg.trainer_sms is not None else max(8, total // 4)
    share = DeviceShare(duty=duty, turns=same and trainer_dev.type == "cpu", sms=sms, busy_window_s=0.25,
                        floor=cfg.serving_floor, speedup=speedup)
    log.info("trainer on %s beside serving on %s: %s", trainer_dev, engine_dev, share.status())
    return share


class Service:
    def __init__(self, engine: AsyncEngine, trainer: OnlineTrainer | None, config: ServeConfig | None = None,
                 make_trainer: Callable[[list], OnlineTrainer] | None = None, warmup_requests: int = 0):
        """Pass a trainer, or `make_trainer(first_samples)` to build one once `warmup_requests` samples
        exist (day 0 with a pruned draft vocabulary: the map comes from the first requests' tokens)."""
        self.engine, self.trainer, self.config = engine, trainer, config
        self._make_trainer, self._warmup, self._first = make_trainer, warmup_requests, []
        if trainer is not None:
            self._attach(trainer)
        elif make_trainer is not None:
            engine.set_callbacks(on_sample=self._collect_day0)

    def _attach(self, trainer: OnlineTrainer) -> None:
        self.trainer = trainer
        if self.config is not None and self.config.capture_pacing:
            self.engine.pacer = CapturePacer(trainer.buffer)
        self.engine.set_callbacks(trainer.add_sample, lambda seq: trainer.request_finished())
        trainer.start(unguarded=None if self.config is None else _scratch_prior(self.config))

    def _collect_day0(self, sample) -> None:  # engine thread; cheap until the warm-up is complete
        self._first.append(sample)
        if len(self._first) >= self._warmup:
            trainer = self._make_trainer(self._first)
            for s in self._first:
                trainer.add_sample(s)
            self._first = []
            self._attach(trainer)

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Service":
        cfg = _for_device(cfg)
        if cfg.engine == "sglang":
            return cls._from_config_sglang(cfg)
        target_dir = hub.resolve(cfg.target)
        ckpt = os.path.join(cfg.run_dir, "checkpoint")
        draft, pruned = None, False
        if cfg.draft is not None:
            from transformers import AutoConfig

            draft, _ = _initial_draft(cfg, AutoConfig.from_pretrained(target_dir), ckpt)
            # a scratch head with a pruned vocabulary waits for the first requests' tokens to fix its map
            pruned = (cfg.draft == "scratch" and not _resuming(cfg, ckpt)
                      and draft.config.draft_vocab_size < draft.config.vocab_size)
        econf = EngineConfig(lookahead=cfg.lookahead, topk=cfg.topk, num_draft_tokens=cfg.num_draft_tokens,
                             max_batch=cfg.max_batch, admission_wait=cfg.admission_wait,
                             max_model_len=cfg.max_model_len, device=cfg.device,
                             fused_kernels=cfg.fused_kernels, priority_stream=cfg.priority_stream,
                             capture=draft is not None, adaptive=cfg.adaptive_depth,
                             initial_acceptance=_initial_acceptance(cfg, ckpt))
        engine = LLMEngine(target_dir, draft, econf)
        # the engine thread shares one GIL with the event loop (and the trainer's thread): the switch interval bounds
        # how long it waits for the GIL after each device sync while another thread runs Python (process-wide)
        sys.setswitchinterval(cfg.gil_switch_ms / 1e3)
        if draft is None:
            return cls(AsyncEngine(engine, _served_name(cfg)), None, cfg)
        dev = engine.runner.device if cfg.trainer_device == "auto" else torch.device(cfg.trainer_device)
        tconf = _train_config(cfg, ckpt, dev)
        engine.sample_rate = cfg.sample_rate
        share = _device_share(cfg, dev, engine.runner.device, tconf.duty,
                              lambda: served_speedup(engine.speculation.snapshot()))
        if share.turns:  # the trainer has the cores to itself during its turns
            tconf = dataclasses.replace(tconf, torch_threads=torch.get_num_threads())
        if dev.type == "cuda" and dev == engine.runner.device:  # the trainer reads captured states where they are made
            engine.config.samples_on_device = True
            _log_local_split(cfg, engine, draft, tconf, dev)
        if dev.type == "cuda":
            t0 = time.perf_counter()
            try:
                _probe_trainer(engine.draft, engine.target.lm_head.weight, tconf)
                log.info("trainer's kernels compiled before serving (one probe step and guard pass): %.1f s",
                         time.perf_counter() - t0)
            except Exception:  # serving starts regardless; the trainer reports its own failures
                log.exception("the trainer's probe step failed; serving starts, the trainer compiles under load")
        aengine = AsyncEngine(engine, _served_name(cfg), share)

        def make_trainer(first_samples=None) -> OnlineTrainer:
            if first_samples:  # day 0: fix the vocabulary map before any training (it is not re-sent later)
                d2t, t2d = vocab_from_samples(first_samples, draft.config.draft_vocab_size, draft.config.vocab_size)
                engine.draft.set_vocab_map(d2t, t2d)  # in the engine thread (on_sample), never during a round
            return OnlineTrainer(engine.draft, engine.target.lm_head.weight, tconf, aengine.swap_draft, share)

        if pruned:
            return cls(aengine, None, cfg, make_trainer, cfg.vocab_warmup_requests)
        return cls(aengine, make_trainer(), cfg)

    @classmethod
    def _from_config_sglang(cls, cfg: ServeConfig) -> "Service":
        """SGLang serves (its own processes, TP ranks); Aurora keeps the HTTP routes, the capture collector
        and the trainer (on `trainer_device`: cuda = SGLang's first GPU, cuda:N = a GPU of its own)."""
        import importlib.util
        import shlex
        import tempfile

        from transformers import AutoConfig, AutoTokenizer

        from aurora.models.draft import save_draft
        from aurora.models.target import default_aux_layers
        from aurora.sglang_engine.capture import CaptureCollector
        from aurora.sglang_engine.engine import SGLangEngine, request_body
        from aurora.sglang_engine.launch import (SGLangServer, check_sglang_version, drives_depth, free_port,
                                                 reserved_tokens, server_command, server_env, warm_up_prompts,
                                                 write_adaptive_config)
        from aurora.sglang_engine.plugin.depth import write_acceptance

        if importlib.util.find_spec("sglang") is None:
            raise RuntimeError("engine sglang needs SGLang: pip install 'aurora-spec[sglang]' (CUDA machines only)")
        log.info("SGLang %s", check_sglang_version(cfg.sglang_swap))
        target_dir = hub.resolve(cfg.target)
        tokenizer = AutoTokenizer.from_pretrained(target_dir, trust_remote_code=cfg.trust_remote_code)
        ckpt = os.path.join(cfg.run_dir, "checkpoint")
        draft, draft_dir = None, None
        if cfg.draft is not None:
            tcfg = AutoConfig.from_pretrained(target_dir, trust_remote_code=cfg.trust_remote_code)
            if (cfg.draft == "scratch" and cfg.draft_vocab_size is not None and 0 < cfg.draft_vocab_size < tcfg.vocab_size
                    and not _resuming(cfg, ckpt)):
                raise ValueError("engine sglang fixes the draft vocabulary when SGLang starts (it copies the map "
                                 "once): a scratch draft uses the full vocabulary (draft_vocab_size 0 or unset) "
                                 "or pass a draft")
            draft, draft_dir = _initial_draft(cfg, tcfg, ckpt)
            L = tcfg.num_hidden_layers  # the draft's config names its aux layers where the defaults collapse
            aux = draft.config.aux_layers or default_aux_layers(L)
            if len(set(aux)) < 3 or max(aux) >= L:  # SGLang captures each layer once
                raise ValueError(f"engine sglang: a {L}-layer target repeats an EAGLE3 aux layer {aux} (or has "
                                 f"none that high); SGLang would feed the draft 2 states: give the draft 3 distinct "
                                 f"aux layers below {L} (DraftConfig.aux_layers, eagle_config in its config.json)")
            longest = min(getattr(tcfg, "max_position_embeddings", None) or 2**31, draft.config.max_position_embeddings)
            reserved = reserved_tokens(cfg)
            if cfg.max_model_len + reserved > longest:  # SGLang's context holds the draft's slots too
                log.warning("max_model_len %d lowered to %d: SGLang's EAGLE reserves %d draft-token slots per request "
                            "within the %d positions the target and draft support", cfg.max_model_len,
                            longest - reserved, reserved, longest)
                cfg = dataclasses.replace(cfg, max_model_len=longest - reserved)
            if draft_dir is None:  # what SGLang loads at start-up: the scratch or resumed draft, written once
                draft_dir = os.path.join(cfg.run_dir, "draft-at-start")
                save_draft(draft, draft_dir)
        ipc = tempfile.mkdtemp(prefix="aurora-")  # a short path: unix socket names are limited to ~100 bytes
        address = os.path.join(ipc, "capture.sock") if draft is not None else None
        swap_dir = os.path.join(ipc, "swap") if draft is not None and cfg.sglang_swap == "step" else None
        # with the target's final states, samples hold its distribution at prompt positions too: train there
        final = cfg.sglang_capture_final
        collector = CaptureCollector(address, on_sample=lambda s: None, train_on_prompt=final,
                                     final_state=final) if address else None
        dev, mem_fraction, tconf, lm_head = None, None, None, None
        if draft is not None:  # the trainer's device and memory are settled before SGLang takes its share
            dev = torch.device(trainer_device(cfg.trainer_device, cfg.tp_size, torch.cuda.device_count(),
                                              cfg.sglang_args))
            draft = draft.to(device=dev, dtype=torch.bfloat16)  # the served dtype: published snapshots match it
            draft.share_embedding(hub.load_embedding(target_dir).to(device=dev, dtype=torch.bfloat16))
            if final:  # the trainer recomputes the target's logits from its final states (aurora/sample.py)
                lm_head = hub.load_lm_head(target_dir).to(device=dev, dtype=torch.bfloat16)
            tconf = _sglang_train_config(cfg, ckpt, dev)
            mem_fraction = _sglang_memory_fraction(cfg, draft, lm_head, tconf, dev)
            if mem_fraction is None and dev.type == "cuda":  # the split probed nothing: compile the kernels anyway,
                # and hand back what the probe reserved: SGLang counts memory held by other processes at its start
                # against --mem-fraction-static, so blocks cached here would come out of its KV cache
                peak = measure_peak(dev, lambda: _probe_trainer(draft, lm_head, tconf))
                log.info("trainer's probe step and guard pass reserved %.1f GiB at peak on %s", peak / 2**30, dev)
        adaptive = None
        if swap_dir is not None and drives_depth(cfg, draft_dir):
            write_acceptance(swap_dir, 0, _initial_acceptance(cfg, ckpt))  # version 0's prior, inside SGLang
            adaptive = write_adaptive_config(os.path.join(ipc, "adaptive.json"), cfg.lookahead)
        elif draft is not None and cfg.adaptive_depth:
            log.info("engine sglang runs the fixed depth %d: Aurora chooses SGLang's depth only with topk 1, "
                     "sglang_swap step and tp_size 1", cfg.lookahead)
        port = free_port()
        env = server_env(address, swap_dir, adaptive is not None,
                         chain=cfg.sglang_splitkv_verify and draft is not None and cfg.topk == 1,
                         capture_topk=cfg.sglang_capture_topk, plain_depth0=cfg.sglang_plain_depth0,
                         capture_final=final)
        warm_up = None
        if cfg.sglang_warmup:  # never captured ("n-" rids); greedy and ignore_eos, so every request runs its length
            params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
            warm_up = [request_body(ids, params, f"n-warmup-{i}") for i, ids in enumerate(
                warm_up_prompts(cfg.max_model_len, cfg.max_batch, len(tokenizer), params.max_tokens))]
        server = SGLangServer(server_command(cfg, target_dir, draft_dir, port, mem_fraction, adaptive), env,
                              os.path.join(cfg.run_dir, "sglang.log"), port, warm_up)
        try:
            log.info("SGLang ready in %.0f s", server.wait_ready())
        except BaseException:
            server.stop()
            raise
        engine = SGLangEngine(server, tokenizer, _served_name(cfg), cfg.max_model_len, cfg.lookahead, cfg.tp_size, collector,
                              speculative=draft is not None, sample_rate=cfg.sample_rate,
                              swap_mode=cfg.sglang_swap if draft is not None else "pause", swap_dir=swap_dir,
                              stop_strings="--skip-tokenizer-init" not in shlex.split(cfg.sglang_args))
        trainer = None
        if draft is not None:
            drain = cfg.trainer_drain and shares_gpu(str(dev), cfg.tp_size, cfg.sglang_args)
            share = DeviceShare(duty=tconf.duty, drain=drain, floor=cfg.serving_floor,
                                speedup=lambda: served_speedup(engine.speculation()))
            trainer = OnlineTrainer(draft, lm_head, tconf, engine.swap_draft, share)
        service = cls(engine, trainer, cfg)
        engine.supervise(hang_s=cfg.sglang_hang_timeout_s, max_restarts=cfg.sglang_max_restarts,
                         draft_for_restart=lambda: service._restart_draft(draft_dir))
        return service

    def _restart_draft(self, start_dir: str | None) -> tuple[str | None, int]:
        """engine sglang, restarting SGLang: the latest published draft, written in SGLang's format."""
        if self.trainer is None or start_dir is None:
            return start_dir, 0
        from aurora.models.draft import save_draft

        version, draft = self.trainer.published_draft()
        if version == 0:
            return start_dir, 0
        path = os.path.join(self.config.run_dir, "draft-restart")
        save_draft(draft, path)
        return path, version

    # ------------------------------------------------------------- what the HTTP layer reads and does
    def draft_status(self) -> dict:
        return {**self.engine.stats(), "trainer": self.trainer.status() if self.trainer else None}

    def _need_trainer(self) -> OnlineTrainer:
        if self.trainer is None:
            raise RuntimeError("no draft is being trained (serving the target alone)")
        return self.trainer

    def swap_now(self):
        v = self._need_trainer().swap_now()
        if v is None:
            raise RuntimeError(f"swap refused: {self.trainer.status()['last_guard'] or self.trainer.status()['last_error']}")
        return {"version": v}

    def save(self):
        return {"path": self._need_trainer().save()}

    def rollback(self):
        return {"version": self._need_trainer().rollback()}

    def shutdown(self) -> None:
        """Finish in-flight requests (for up to drain_timeout_s; the rest then fail), stop training, checkpoint the
        latest draft."""
        self.engine.shutdown(drain=True, timeout=getattr(self.config, "drain_timeout_s", 60.0))
        if self.trainer is not None:
            self.trainer.stop(timeout=30)
            try:
                self.trainer.save()
            except Exception:
                log.exception("final checkpoint failed")
