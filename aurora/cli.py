"""`aurora` command line: `aurora serve` (OpenAI-compatible server with online draft training) and
`aurora report RUN_DIR` (PNG plots of a run's metrics.jsonl).

Every `ServeConfig` field is a `serve` flag (`--max-batch 16`); a YAML file (`--config x.yaml`) sets fields
first and the flags given override it. With no arguments `aurora serve` serves the embedded SmolLM2 with a
fresh draft. SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish, then the service shuts down
(drains the engine, checkpoints the draft).
"""
import argparse
import logging
import signal
import sys
import threading
import time
import types
from dataclasses import MISSING, fields

from aurora.server.config import DEVICE_DEFAULTS, ServeConfig

log = logging.getLogger("aurora")

_HELP = {
    "target": "target model: 'smollm2' (embedded), a local directory or a hub id",
    "draft": "'scratch' (new EAGLE3 head), a draft checkpoint directory, or 'none' to serve the target alone",
    "engine": "'local' (built-in engine) or 'sglang'",
    "num_draft_tokens": "tokens verified per round (default lookahead+1)",
    "run_dir": "directory for checkpoints, metrics.jsonl and wandb files (default runs/<timestamp>)",
    "api_key": "require 'Authorization: Bearer KEY' on inference routes",
    "admin_key": "enable /v1/draft/{swap,save,rollback} with this bearer key",
    "wandb": "offline (default without WANDB_API_KEY), online or disabled",
    "lookahead": "draft steps per verify round",
    "max_batch": "most requests decoded together",
    "max_model_len": "context length (prompt + completion) in tokens",
    "device": "auto, cpu, cuda or cuda:N",
    "objective": "divergence the draft is trained with: fkl, rkl or tv",
    "lr": "draft learning rate",
    "sync_every": "finished requests between draft hot-swaps",
    "sample_rate": "fraction of finished requests captured for training",
    "buffer_samples": "capture buffer capacity in samples",
    "max_concurrent_requests": "in-flight inference requests beyond which requests get 429",
    "max_body_bytes": "request bodies larger than this get 413",
    "priority_stream": "built-in engine on CUDA: run serving on a high-priority stream, ahead of the trainer's kernels",
    "tp_size": "tensor-parallel ranks (engine sglang)",
    "trust_remote_code": "allow a target's custom modelling code (engine sglang)",
    "reject_weight": "weight of the loss term that lowers the draft's probability of rejected proposals",
    "trainer_device": "where the trainer runs: auto (the engine's device), cpu, cuda or cuda:N",
    "draft_vocab_size": "prune a day-0 draft's vocabulary to the N most frequent tokens of the first "
                        "requests (0: the target's full vocabulary)",
    "vocab_warmup_requests": "requests whose tokens choose a pruned draft vocabulary before training starts",
    "resume": "continue from RUN_DIR/checkpoint: draft, optimiser state and version",
}


def _flag_type(t):
    if isinstance(t, types.UnionType):  # `int | None` -> int: None comes from the default or 'none'
        t = next(a for a in t.__args__ if a is not type(None))
    return _parse_bool if t is bool else t


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _none_or(t):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else t(s)
    parse.__name__ = t.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aurora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a target with an EAGLE3 draft trained online")
    serve.add_argument("--config", help="YAML file of ServeConfig fields (flags override it)")
    for f in fields(ServeConfig):
        t = _flag_type(f.type)
        nullable = isinstance(f.type, types.UnionType)
        default = f.default if f.default is not MISSING else "(computed)"
        if f.name in DEVICE_DEFAULTS["cpu"]:
            default = ", ".join(f"{d[f.name]} on {device}" for device, d in DEVICE_DEFAULTS.items())
        serve.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           type=_none_or(t) if nullable else t,
                           help=f"{_HELP.get(f.name, f.name.replace('_', ' '))} [default: {default}]")
    report = sub.add_parser("report", help="plot a run's metrics.jsonl to PNG files")
    report.add_argument("run_dir")
    report.add_argument("--out", help="output directory (default: RUN_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "report":
        from aurora.server.report import make_report

        try:
            paths = make_report(args.run_dir, args.out)
        except (FileNotFoundError, ValueError) as e:
            print(f"aurora report: {e}", file=sys.stderr)
            return 1
        print("\n".join(paths))
        return 0
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        cfg = ServeConfig.load(args.config, **overrides)
    except (ValueError, OSError) as e:
        print(f"aurora serve: {e}", file=sys.stderr)
        return 2
    serve(cfg)
    return 0


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from aurora.server.app import create_app
    from aurora.server.wandb_log import MetricsLogger

    log.info("config: %s", cfg.to_dict())
    service = _start_service(cfg)
    cfg = service.config or cfg  # with the training settings chosen for the device (logged, recorded)
    app = create_app(service, cfg)
    metrics_log = MetricsLogger(service, cfg).start()
    # uvicorn's own SIGTERM/SIGINT handling closes the listener and waits for in-flight requests
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info"))
    log.info("serving %s on http://%s:%d/v1 (run dir %s)", service.engine.model_name, cfg.host, cfg.port,
             cfg.run_dir)
    # uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, with the handlers it found in
    # place: ours only note it, so the process lives on to drain the engine and checkpoint the draft
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: log.info("received %s", signal.Signals(signum).name))
    try:
        server.run()
    finally:
        log.info("shutting down: draining the engine and checkpointing the draft")
        metrics_log.stop()
        service.shutdown()
        log.info("shut down")


def _start_service(cfg: ServeConfig):
    """Service.from_config with a heartbeat: loading a target (and converting the embedded GGUF) takes a while."""
    from aurora.service import Service

    done = threading.Event()
    t0 = time.time()

    def heartbeat():
        while not done.wait(10):
            log.info("still starting (%.0f s): loading %s, draft %s, engine %s", time.time() - t0, cfg.target,
                     cfg.draft, cfg.engine)

    threading.Thread(target=heartbeat, daemon=True).start()
    log.info("starting the service (target %s, draft %s, engine %s, device %s)", cfg.target, cfg.draft,
             cfg.engine, cfg.device)
    try:
        service = Service.from_config(cfg)
    finally:
        done.set()
    log.info("service ready in %.1f s", time.time() - t0)
    return service


if __name__ == "__main__":
    sys.exit(main())
