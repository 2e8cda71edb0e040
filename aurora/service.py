"""The service: builds the engine and the trainer from a ServeConfig and wires the one-way data path

  request -> AsyncEngine -> Sample (engine.on_sample) -> OnlineTrainer buffer -> training thread
          -> publish(state, version) -> AsyncEngine.swap_draft (copied in place between steps)

Engine and trainer never import each other; this module is the only place that knows both.
"""
import logging
import os

import torch

from aurora.engine.async_engine import AsyncEngine
from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.models import hub
from aurora.models.draft import DraftConfig, load_draft, new_draft
from aurora.training.checkpoint import load_served_draft
from aurora.server.config import ServeConfig
from aurora.training.trainer import OnlineTrainer, TrainConfig

log = logging.getLogger(__name__)


class Service:
    def __init__(self, engine: AsyncEngine, trainer: OnlineTrainer | None, config: ServeConfig | None = None):
        self.engine, self.trainer, self.config = engine, trainer, config
        eng = engine.engine
        if trainer is not None:
            eng.on_sample = trainer.add_sample
            eng.on_finished = lambda seq: trainer.request_finished()
            trainer.start()

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Service":
        if cfg.engine == "sglang":
            raise NotImplementedError("engine 'sglang' is not available in this build: serve with --engine local")
        target_dir = hub.resolve(cfg.target)
        ckpt = os.path.join(cfg.run_dir, "checkpoint")
        draft = None
        if cfg.draft is not None:
            from transformers import AutoConfig

            if cfg.resume and os.path.exists(os.path.join(ckpt, "trainer.pt")):
                draft = load_served_draft(ckpt)
                log.info("resuming the draft from %s", ckpt)
            elif cfg.draft == "scratch":  # day 0: random head, full vocabulary map (no tokens seen yet)
                draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(target_dir)))
            else:
                draft = load_draft(hub.resolve(cfg.draft))
        econf = EngineConfig(lookahead=cfg.lookahead, topk=cfg.topk, num_draft_tokens=cfg.num_draft_tokens,
                             max_batch=cfg.max_batch, max_model_len=cfg.max_model_len, device=cfg.device,
                             capture=draft is not None)
        engine = LLMEngine(target_dir, draft, econf)
        name = cfg.target if cfg.target != hub.EMBEDDED_DEFAULT else "SmolLM2-135M-Instruct"
        aengine = AsyncEngine(engine, name)
        trainer = None
        if draft is not None:
            dev = engine.runner.device if cfg.trainer_device == "auto" else torch.device(cfg.trainer_device)
            tconf = TrainConfig(objective=cfg.objective, lr=cfg.lr, ttt_length=cfg.lookahead,
                                sync_every=cfg.sync_every, sample_rate=cfg.sample_rate,
                                buffer_samples=cfg.buffer_samples, reject_weight=cfg.reject_weight,
                                checkpoint_dir=ckpt, resume=cfg.resume, device=str(dev))
            trainer = OnlineTrainer(engine.draft, engine.target.lm_head.weight, tconf, aengine.swap_draft)
        return cls(aengine, trainer, cfg)

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
        """Finish in-flight requests, stop training, checkpoint the latest draft."""
        self.engine.shutdown(drain=True)
        if self.trainer is not None:
            self.trainer.stop(timeout=30)
            try:
                self.trainer.save()
            except Exception:
                log.exception("final checkpoint failed")
