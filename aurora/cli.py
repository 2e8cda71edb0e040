"""`aurora` command line: `aurora serve` (OpenAI-compatible server with online draft training) and
`aurora report RUN_DIR` (PNG plots of a run's metrics.jsonl).

Every `ServeConfig` field is a `serve` flag (`--max-batch 16`); a YAML file (`--config x.yaml`) sets fields
first and the flags given override it. With no arguments `aurora serve` serves the embedded SmolLM2 with a
fresh draft. SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish for up to --drain-timeout-s
seconds (those still running then end with an error saying the server shut down), then the service shuts down
(stops training, checkpoints the draft).
"""
import argparse
import logging
import signal
import sys
import threading
import time
import types
from dataclasses import MISSING, fields

from aurora.engine.sequence import SHUTDOWN_ERROR
from aurora.server.config import DEVICE_DEFAULTS, ServeConfig, redact

log = logging.getLogger("aurora")

_HELP = {  # one line per ServeConfig field (a test checks that none is missing)
    "target": "target model: 'smollm2' (embedded), a local directory or a hub id",
    "draft": "'scratch' (new EAGLE3 head), a draft checkpoint directory, or 'none' to serve the target alone",
    "engine": "'local' (built-in engine) or 'sglang'",
    "lookahead": "draft steps per verify round (SGLang's speculative_num_steps)",
    "topk": "draft branches per step: 1 drafts a chain, more draft a tree (SGLang's speculative_eagle_topk)",
    "num_draft_tokens": "tokens verified per round, the root included (default lookahead+1, a chain)",
    "sglang_hang_timeout_s": "engine sglang: seconds without any response bytes while requests are in flight "
                             "before SGLang counts as hung and is restarted",
    "sglang_max_restarts": "engine sglang: restarts of a crashed or hung SGLang before Aurora gives up",
    "adaptive_depth": "choose each step's speculation depth (0..lookahead; on SGLang among 0, 1, 2 and lookahead, "
                      "with topk 1 and tp 1) by measured cost and acceptance; false: always the full lookahead",
    "max_batch": "most requests decoded together",
    "admission_wait": "built-in engine: steps a waiting group smaller than the free rows may wait for more "
                      "arrivals while others decode, so that they share one prefill call (0: admit at once)",
    "max_model_len": "context length (prompt + completion) in tokens",
    "device": "auto, cpu, cuda or cuda:N",
    "fused_kernels": "built-in engine: Triton kernels for rotary + KV write, add + RMSNorm, SiLU * up "
                     "(default: on for CUDA when triton is installed)",
    "priority_stream": "built-in engine on CUDA: run serving on a high-priority stream, ahead of the trainer's kernels",
    "tp_size": "tensor-parallel ranks (engine sglang)",
    "trust_remote_code": "allow a target's custom modelling code (engine sglang)",
    "sglang_swap": "engine sglang: 'step' copies new draft weights between two scheduler steps (no pause); "
                   "'pause' uses SGLang's pause -> update -> continue",
    "sglang_warmup": "engine sglang: before reporting ready (and after each restart), send SGLang one batch of "
                     "mixed-length requests so that first-use kernel compiles do not fall on the first users",
    "sglang_splitkv_verify": "engine sglang with the triton attention backend and topk 1: run the verify forward's "
                             "attention through SGLang's split-KV kernel instead of its prefill kernel",
    "sglang_plain_depth0": "engine sglang with Aurora's depth decision: run a depth-0 round (plain decoding, a day-0 "
                           "draft's) as the target's own decode step instead of SGLang's one-token verify",
    "sglang_capture_topk": "engine sglang: capture the target's K most likely tokens at every verified position and "
                           "train on that distribution instead of the final state's (0: off)",
    "sglang_capture_final": "engine sglang: capture the target's final normed hidden state beside its aux states and "
                            "train on its whole distribution at every position, prompt included (default: on unless "
                            "--sglang-capture-topk is given; --no-sglang-capture-final trains on next tokens only)",
    "sglang_args": "extra flags for SGLang's server, verbatim, e.g. '--mem-fraction-static 0.6' (engine sglang)",
    "objective": "divergence the draft is trained with: fkl, rkl or tv",
    "train_precision": "the trainer's compute: bf16 (autocast, fp32 master weights), fp32, or auto (bf16 on CUDA, "
                       "fp32 on a CPU)",
    "train_graphs": "CUDA: replay each trainer step's forward and backward as a CUDA graph per batch shape (samples "
                    "with the target's final states; a trainer on one of SGLang's GPUs steps eagerly regardless; "
                    "--no-train-graphs: eager steps)",
    "lr": "draft learning rate (AdamW peak, after warm-up)",
    "sync_every": "finished requests between draft hot-swaps",
    "sample_rate": "fraction of finished requests captured for training, in (0, 1]",
    "capture_pacing": "capture fewer requests while the trainer leaves over 128 captured samples unread (or half "
                      "the buffer's bytes); sample_rate is the ceiling, the rate is in /v1/draft",
    "buffer_samples": "capture buffer capacity in samples (the oldest are dropped first)",
    "buffer_gib": "capture buffer's memory bound in GiB (host memory; the GPU's when the built-in engine's trainer "
                  "trains on the engine's GPU)",
    "replay_passes": "times each captured sample is trained on (fresh samples first)",
    "reject_weight": "weight of the loss term that lowers the draft's probability of rejected proposals",
    "train_batch_tokens": "tokens per trainer step (at least one sample)",
    "train_ttt_steps": "TTT steps trained per position: auto (default) trains one step, and one more each time the "
                       "share of rounds that would reach the next position (the product of the trained steps' "
                       "accuracies) passes 0.1; N in 1..lookahead trains N; 0 trains the lookahead (EAGLE3's "
                       "training). Fewer steps make a trainer step cheaper; the guard still predicts every position",
    "trainer_device": "where the trainer runs: auto (the engine's device), cpu, cuda or cuda:N",
    "trainer_duty": "while serving is busy, the most of the wall time the trainer spends training, in (0, 1]: it "
                    "rests after each step (idle serving lets it train freely). Default 0.1; on a CPU serving and "
                    "training take turns on the cores",
    "trainer_sms": "CUDA, the trainer on the engine's GPU: SMs its kernels may use (a CUDA green context), serving "
                   "keeps the rest; default a quarter of the GPU's SMs; 0: every SM",
    "serving_floor": "F in (0, 1): while serving is busy the trainer takes at most what keeps serving at F of its "
                     "speed without Aurora: 1 - F while the draft does not pay, more as its speedup S grows "
                     "(1 - F / S, at most --trainer-duty); 0 (default): --trainer-duty alone",
    "trainer_drain": "engine sglang, the trainer on one of SGLang's GPUs: synchronise the trainer's stream after every "
                     "module's forward and backward, so that few of its kernels wait while SGLang's rounds need the GPU "
                     "(two processes' kernels time-slice)",
    "gil_switch_ms": "built-in engine: Python's GIL switch interval in ms (the engine thread wins the GIL back from "
                     "the event loop and the trainer thread within it after every device sync)",
    "draft_vocab_size": "prune a day-0 draft's vocabulary to the N most frequent tokens of the first "
                        "requests (0: the target's full vocabulary)",
    "vocab_warmup_requests": "requests whose tokens choose a pruned draft vocabulary before training starts",
    "resume": "continue from RUN_DIR/checkpoint: draft, optimiser state and version",
    "run_dir": "directory for checkpoints, metrics.jsonl and wandb files (default runs/<timestamp>)",
    "host": "address to listen on (0.0.0.0 for every interface)",
    "port": "TCP port to listen on",
    "api_key": "require 'Authorization: Bearer KEY' on inference routes (or set AURORA_API_KEY, or --api-key-file: "
               "a key on the command line is visible to other users of the machine)",
    "admin_key": "enable /v1/draft/{swap,save,rollback} with this bearer key (or AURORA_ADMIN_KEY, --admin-key-file)",
    "api_key_file": "read the API key from this file",
    "admin_key_file": "read the admin key from this file",
    "wandb": "offline (default without WANDB_API_KEY), online or disabled",
    "max_concurrent_requests": "in-flight inference requests beyond which requests get 429",
    "max_body_bytes": "request bodies larger than this get 413",
    "drain_timeout_s": "on SIGTERM/Ctrl-C, seconds in-flight requests may take to finish; the rest then fail "
                       "with an error saying the server shut down",
}


class _BoolFlag(argparse.Action):
    """`--resume` (true), `--no-resume` (false), or `--resume false` as before."""

    def __init__(self, option_strings, dest, **kwargs):
        name = option_strings[0][2:]
        super().__init__(option_strings + [f"--no-{name}"], dest, nargs="?", metavar="BOOL", type=_parse_bool,
                         **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        else:
            setattr(namespace, self.dest, True if values is None else values)


class _Formatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action):
        if isinstance(action, _BoolFlag):
            return f"{action.option_strings[0]} [BOOL], {action.option_strings[1]}"
        return super()._format_action_invocation(action)


def _flag_type(t):
    if isinstance(t, types.UnionType):  # `int | None` -> int: None comes from the default or 'none'
        args = [a for a in t.__args__ if a is not type(None)]
        if set(args) == {int, str}:  # a count or a word (`--train-ttt-steps auto`)
            return _int_or_word
        t = args[0]
    return _parse_bool if t is bool else t


def _int_or_word(s: str) -> int | str:
    try:
        return int(s)
    except ValueError:
        return s


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
    from aurora import __version__

    parser = argparse.ArgumentParser(prog="aurora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"aurora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a target with an EAGLE3 draft trained online",
                           formatter_class=_Formatter)
    serve.add_argument("--config", help="YAML file of ServeConfig fields (flags override it)")
    for f in fields(ServeConfig):
        t = _flag_type(f.type)
        nullable = isinstance(f.type, types.UnionType) and type(None) in f.type.__args__
        flag = f"--{f.name.replace('_', '-')}"
        shown = "" if f.default in (MISSING, None, "") else f" [default: {f.default}]"
        if f.name in DEVICE_DEFAULTS["cpu"]:
            shown = " [default: " + ", ".join(f"{d[f.name]} on {device}" for device, d in DEVICE_DEFAULTS.items()) + "]"
        if t is _parse_bool:
            serve.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, action=_BoolFlag,
                               help=_HELP[f.name] + shown)
            continue
        serve.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=_none_or(t) if nullable else t,
                           help=_HELP[f.name] + shown)
    report = sub.add_parser("report", help="plot a run's metrics.jsonl to PNG files")
    report.add_argument("run_dir")
    report.add_argument("--out", help="output directory (default: RUN_DIR)")
    return parser


class _Redact(logging.Filter):
    """Replaces the keys in every record a handler writes (a key in an exception message, say)."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            for s in self.secrets:
                message = message.replace(s, "***")
            record.msg, record.args = message, None
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: on engine sglang that is a line per request to SGLang's /generate, which
    # buries Aurora's own lines; its warnings and errors still show
    logging.getLogger("httpx").setLevel(logging.WARNING)
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
    secrets = cfg.secrets()
    if secrets:  # nothing later (wandb's record of the arguments, a log line) sees the keys
        sys.argv[:] = redact(sys.argv, secrets)
        for h in logging.getLogger().handlers:
            h.addFilter(_Redact(secrets))
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
    # uvicorn's own SIGTERM/SIGINT handling closes the listener and waits for in-flight requests; _Server adds
    # the time limit: after drain_timeout_s the engine fails what is left, so those responses end with an error
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                    timeout_graceful_shutdown=cfg.drain_timeout_s + 10),
                     service.engine, cfg.drain_timeout_s)
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


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, engine, drain_timeout_s: float):
            super().__init__(config)
            self.engine, self.drain_timeout_s, self._timer = engine, drain_timeout_s, None

        def handle_exit(self, sig, frame):
            if self._timer is None:
                log.info("received %s: draining in-flight requests for up to %.0f s", signal.Signals(sig).name,
                         self.drain_timeout_s)
                self._timer = threading.Timer(self.drain_timeout_s, self._abort_left)
                self._timer.daemon = True
                self._timer.start()
            super().handle_exit(sig, frame)

        def _abort_left(self):
            abort_all = getattr(self.engine, "abort_all", None)
            if abort_all is not None:
                abort_all(f"{SHUTDOWN_ERROR} (drain limit {self.drain_timeout_s:.0f} s)")

    return Server


def _Server(config, engine, drain_timeout_s):
    return _server_class()(config, engine, drain_timeout_s)


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
