"""Periodic run log: every few seconds one flat row of engine + trainer numbers, appended as a JSON line to
`<run_dir>/metrics.jsonl` (what `aurora report` plots, no wandb needed) and logged to wandb (offline
without WANDB_API_KEY, skipped when disabled). The wandb run config is the whole `ServeConfig`, keys redacted;
wandb also records the process's command line (its run file, uploaded when online), so the keys are taken out
of `sys.argv` before wandb starts.

Rows are built by `flatten_status` alone; `report.py` reads the same keys.
"""
import json
import logging
import os
import sys
import threading
import time

from aurora.server.config import ServeConfig, redact
from aurora.server.metrics import split_status

log = logging.getLogger(__name__)


def flatten_status(status: dict) -> dict:
    """draft_status() -> one flat row: serve/* from the engine, train/* from the trainer."""
    engine, trainer = split_status(status)
    row = {f"serve/{k}": engine.get(k) for k in ("requests_finished", "running", "waiting", "draft_version",
                                                   "tokens_per_second", "generated_tokens", "verify_rounds",
                                                   "verify_tokens")}
    row["serve/accept_length"] = engine.get("accept_length_recent")
    for version, value in (engine.get("accept_length_by_version") or {}).items():
        row[f"serve/accept_length_by_version/{version}"] = value
    for position, value in enumerate(engine.get("accept_rate_by_position") or []):
        row[f"serve/accept_rate_by_position/{position}"] = value
    for bucket, b in ((engine.get("speculation") or {}).get("buckets") or {}).items():  # the depth decision
        predicted = {str(d): x for d, x in (b.get("predicted_speedup") or {}).items()}  # int keys, or JSON's str
        row[f"serve/depth/{bucket}"] = b.get("depth")                                   # over time, per bucket
        row[f"serve/predicted_speedup/{bucket}"] = predicted.get(str(b.get("depth")))
        row[f"serve/realised_speedup/{bucket}"] = b.get("realised_speedup")
    if trainer is not None:
        for k in ("state", "version", "steps", "samples_captured", "samples_dropped", "buffer_size", "swaps",
                  "swaps_refused", "swaps_deferred", "failures", "last_error", "tokens_per_second", "tokens_trained",
                  "requests_since_swap", "ttt_steps"):
            row[f"train/{k}"] = trainer.get(k)
        by_version = trainer.get("heldout_accept_by_version") or {}  # int keys, or JSON's str
        row["train/heldout_accept_length"] = by_version.get(trainer.get("version"),
                                                            by_version.get(str(trainer.get("version"))))
        for step, value in enumerate(trainer.get("loss_per_step") or []):
            row[f"train/loss_step/{step}"] = value
        for step, value in enumerate(trainer.get("acc_per_step") or []):
            row[f"train/acc_step/{step}"] = value
    return row


class MetricsLogger:
    def __init__(self, service, cfg: ServeConfig, interval_s: float = 5.0):
        self.service, self.cfg, self.interval_s = service, cfg, interval_s
        self.path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self.run = None
        self.last_version = None
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aurora-metrics-log", daemon=True)

    def start(self) -> "MetricsLogger":
        os.makedirs(self.cfg.run_dir, exist_ok=True)
        self.cfg.save(os.path.join(self.cfg.run_dir, "config.yaml"))
        if self.cfg.wandb != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            self.run = self._init_wandb()
        self._thread.start()
        return self

    def _init_wandb(self):
        try:
            import wandb

            # wandb reads sys.argv whenever it describes the run (metadata at start, the job at finish)
            sys.argv[:] = redact(sys.argv, self.cfg.secrets())
            return wandb.init(project=os.environ.get("WANDB_PROJECT", "aurora"), mode=self.cfg.wandb,
                              dir=self.cfg.run_dir, name=os.path.basename(os.path.normpath(self.cfg.run_dir)),
                              config=self.cfg.to_dict())
        except ModuleNotFoundError as e:
            if e.name != "wandb":  # wandb itself is broken: as any other failure below
                log.warning("wandb disabled (%s: %s); metrics still go to %s", type(e).__name__, e, self.path)
                return None
            log.warning("wandb is not installed (pip install 'aurora-spec[wandb]', or --wandb disabled to silence "
                        "this); metrics still go to %s", self.path)
            return None
        except Exception as e:  # the JSONL log goes on without wandb
            log.warning("wandb disabled (%s: %s); metrics still go to %s", type(e).__name__, e, self.path)
            return None

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.log_once()

    def log_once(self) -> dict | None:
        try:
            row = flatten_status(self.service.draft_status())
        except Exception:
            log.exception("draft_status() failed; row skipped")
            return None
        row = {"time": time.time(), "elapsed_s": time.time() - self.t0, **row}
        version = row.get("serve/draft_version")
        row["serve/swap"] = int(self.last_version is not None and version != self.last_version)
        self.last_version = version
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "time"})
            except Exception as e:
                log.warning("wandb log failed (%s); continuing with %s only", e, self.path)
                self.run = None
        return row

    def stop(self) -> None:
        """Stop the thread and write a last row (the state at shutdown)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.log_once()
        if self.run is not None:
            self.run.finish()
            self.run = None
