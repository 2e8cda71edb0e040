"""`ServeConfig`: every knob of `aurora serve` in one dataclass, checked in `__post_init__`.

Sources, later wins: the defaults below, a YAML file (`--config x.yaml`, keys = field names), CLI flags.
The whole config is recorded in the run's wandb config and in `<run_dir>/config.yaml`, so a run can be
reproduced from its directory alone; the two keys never are (they read '***').

Keys need not be on a command line (where `ps` and wandb's record of the arguments would see them): set
AURORA_API_KEY / AURORA_ADMIN_KEY, or point --api-key-file / --admin-key-file at a file holding the key.
"""
import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field, fields

import yaml

ENGINES = ("local", "sglang")
OBJECTIVES = ("fkl", "rkl", "tv")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("offline", "online", "disabled")
KEY_ENV = {"api_key": "AURORA_API_KEY", "admin_key": "AURORA_ADMIN_KEY"}

# Training settings left unset (None) are chosen for the device the draft trains on. A CPU trains a
# hundred-odd tokens a second: over the full vocabulary of a chat model (SmolLM2: 49,152 tokens) its LM head
# learns too slowly to show in the first hundreds of requests, so it prunes the vocabulary to the most
# frequent tokens of the first few requests, swaps often, takes bigger steps (lr) and shorter ones (fewer tokens:
# serving waits out each step while the two take turns on the cores). draft_vocab_size 0 = the target's full
# vocabulary. On a GPU the trainer shares the card with serving and gets `trainer_duty` of a busy server's time,
# so few steps come per request, and lr 1e-3 beat 3e-4 on held-out chat there (results/online/README.md). The GPU
# keeps the full vocabulary: a map chosen from the first 64 chat requests would leave about an eighth of later
# tokens outside a 16,384-token draft vocabulary (docs/design.md).
DEVICE_DEFAULTS = {
    "cpu": {"draft_vocab_size": 2048, "vocab_warmup_requests": 8, "sync_every": 16, "lr": 1e-3,
            "train_batch_tokens": 512},
    "cuda": {"draft_vocab_size": 0, "vocab_warmup_requests": 64, "sync_every": 800, "lr": 1e-3,
             "train_batch_tokens": 2048},
}


def _default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _default_wandb() -> str:
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


@dataclass
class ServeConfig:
    # what to serve
    target: str = "smollm2"            # embedded default, a local directory or a hub id
    draft: str | None = "scratch"      # "scratch" (fresh EAGLE3 head), a checkpoint directory, or None: target only
    engine: str = "local"              # "local" (built-in engine) or "sglang"
    # speculative decoding
    lookahead: int = 4                 # the deepest draft chain per verify round
    adaptive_depth: bool = True        # each step speculates 0..lookahead deep, whichever the measured round
                                       # costs and the draft's acceptance make fastest (0 = plain decoding: a
                                       # day-0 draft costs almost nothing); SGLang: among 0, 1, 2 and lookahead,
                                       # with topk 1 and tp_size 1; false: always lookahead
    topk: int = 1
    num_draft_tokens: int | None = None  # tokens verified per round; None = lookahead + 1 (chain)
    max_batch: int = 32
    admission_wait: int = 0            # built-in engine: steps a small group of waiting requests may wait for more
                                       # arrivals while others decode (one prefill call for several; 0: none)
    max_model_len: int = 2048
    device: str = "auto"               # "auto", "cpu", "cuda", "cuda:N"
    fused_kernels: bool | None = None  # built-in engine: Triton serving kernels; None = on for CUDA with triton
    priority_stream: bool = True       # built-in engine on CUDA: serve on a high-priority stream (the trainer
                                       # runs on a default-priority one)
    tp_size: int = 1                   # tensor parallel ranks (engine sglang)
    trust_remote_code: bool = False    # for targets with custom code (MiniMax M2.5; engine sglang)
    sglang_swap: str = "step"          # engine sglang: "step" (the schedulers copy new weights in place between
                                       # two steps; no pause) or "pause" (SGLang's own pause_generation ->
                                       # update_weights_from_tensor -> continue_generation: ~0.1 s stall)
    sglang_hang_timeout_s: float = 120.0  # engine sglang: requests in flight and no response for this long =
                                          # hung: in-flight requests get 503, SGLang is restarted
    sglang_max_restarts: int = 3       # engine sglang: restart attempts in a row before serving stays down
    sglang_warmup: bool = True          # engine sglang: one batch of traffic before ready (launch.warm_up_prompts)
    sglang_splitkv_verify: bool = True  # engine sglang, triton attention, topk 1: verify attention through SGLang's
                                        # split-KV kernel instead of its serial prefill kernel
                                        # (plugin/verify_attention.py); other backends are not touched
    sglang_plain_depth0: bool = True   # engine sglang, Aurora driving the depth: a depth-0 round runs the target's
                                       # plain decode graphs, not SGLang's one-token verify (plugin/plain_round.py)
    sglang_capture_topk: int = 0       # engine sglang: capture the target's K most likely tokens at every verified
                                       # position instead of its final state (aurora/sample.py); 0 = off
    sglang_capture_final: bool | None = None  # engine sglang: capture the target's final normed hidden state with
                                        # its aux states, so the trainer learns the target's whole distribution at
                                        # every position, prompt included, as on the built-in engine
                                        # (plugin/final_state.py). None: on unless sglang_capture_topk is set
    sglang_args: str = ""              # extra flags for SGLang's server, verbatim (engine sglang), e.g.
                                       # "--attention-backend triton --mem-fraction-static 0.6"
    # online training
    objective: str = "fkl"             # divergence the draft is trained with: fkl, rkl, tv
    train_precision: str = "auto"      # the trainer's compute: bf16 autocast over fp32 master weights, fp32, or auto
                                       # (bf16 on CUDA, fp32 on a CPU)
    train_graphs: bool = True          # CUDA, samples with the target's final states: each trainer step's forward and
                                       # backward replayed as a CUDA graph per batch shape (eager, a step alone
                                       # mostly waits on its launches); never for a trainer on SGLang's GPU
    lr: float | None = None            # AdamW peak rate (after warm-up); None = DEVICE_DEFAULTS
    sync_every: int | None = None      # finished requests between draft hot-swaps; None = DEVICE_DEFAULTS
    sample_rate: float = 1.0           # fraction of finished requests captured for training
    capture_pacing: bool = True        # capture less while the trainer leaves captured samples
                                       # unread (training/pacing.py); sample_rate is then the ceiling
    buffer_samples: int = 4096         # capacity of the capture buffer (oldest dropped first)
    buffer_gib: float = 2.0            # and its memory bound (a 4k-token MiniMax sample holds ~74 MB of states): host
                                       # memory, or the GPU's when the built-in engine's trainer shares its GPU
    replay_passes: int = 3             # times each captured sample is trained on; >1 uses the trainer's idle
                                       # time between requests (fresh samples always first); 3 beat 1 in every
                                       # domain window of a 5,000-request GPU run (docs/measurements.md)
    draft_vocab_size: int | None = None  # scratch drafts: 0 = the target's vocabulary; N = the N most frequent
                                         # tokens of the first `vocab_warmup_requests` requests; None =
                                         # DEVICE_DEFAULTS (2048 on a CPU, the full vocabulary on CUDA)
    vocab_warmup_requests: int | None = None
    reject_weight: float = 0.1         # weight of the term that lowers q(x) for drafts the target rejected
    train_ttt_steps: int | str = "auto"  # TTT steps trained per position, 1..lookahead; 0 = lookahead (EAGLE3's
                                         # training); "auto" = one, grown with the draft (OnlineTrainer._grow;
                                         # results/online/cpu_ttt_auto_120_chat_2026-12-08/); the guard still
                                         # predicts every position
    train_batch_tokens: int | None = None  # tokens per trainer step (at least one sample); None = DEVICE_DEFAULTS:
                                           # on a GPU larger steps launch fewer, bigger kernels; on a CPU a step's
                                           # cost grows with its tokens and serving waits out each one: short
                                           # steps keep those waits short
    trainer_device: str = "auto"       # "auto" = the engine's device; "cpu" keeps training off the GPU
    trainer_duty: float = 0.1          # while serving is busy, the most of the wall time the trainer spends training
                                       # (it rests after each step; idle serving lets it train freely). On a CPU,
                                       # serving and training take turns on the cores
    trainer_sms: int | None = None     # CUDA, trainer on the engine's GPU: its kernels get this many SMs (a green
                                       # context), serving the rest; None = a quarter of the GPU's SMs; 0 = all
    serving_floor: float = 0.0         # > 0: the trainer's duty while serving is busy shrinks to what keeps serving at
                                       # this share of its speed without Aurora, from the decision's speedup now
                                       # (aurora/sharing.py `floor`); 0: trainer_duty alone
    trainer_drain: bool = False        # engine sglang, the trainer on one of SGLang's GPUs: the trainer synchronises its
                                       # stream after every module's forward and backward (aurora/sharing.py `drain`)
    gil_switch_ms: float = 5.0         # built-in engine: Python's GIL switch interval (5 ms is Python's own). The
                                       # engine thread gives up the GIL at every device sync and wins it back from
                                       # the event loop and the trainer thread within one interval; 0.5 ms measured
                                       # no different on the GPU (results/speedup/), so the default stays Python's
    resume: bool = False               # continue from <run_dir>/checkpoint (draft, optimiser, version)
    run_dir: str = field(default_factory=_default_run_dir)  # checkpoints, metrics.jsonl, wandb files
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None         # required as `Authorization: Bearer` on inference routes when set
    admin_key: str | None = None       # required on /v1/draft/{swap,save,rollback}; those are off when unset
    api_key_file: str | None = None    # a file holding the API key (surrounding whitespace stripped)
    admin_key_file: str | None = None  # a file holding the admin key
    wandb: str = field(default_factory=_default_wandb)  # offline without WANDB_API_KEY
    max_concurrent_requests: int = 256  # in-flight inference requests; more are answered 429
    max_body_bytes: int = 1 << 20       # larger request bodies are answered 413
    drain_timeout_s: float = 30.0       # on SIGTERM / Ctrl-C: seconds in-flight requests may take to finish;
                                        # those still running then end with an error saying the server shut down

    def __post_init__(self):
        for name in ("api_key", "admin_key"):
            path = getattr(self, f"{name}_file")
            if path is not None:
                _check(getattr(self, name) is None, f"give {name} or {name}_file, not both")
                setattr(self, name, _read_key(path, name))
            _check(getattr(self, name) != "", f"{name} must not be empty")
        if self.draft is not None and self.draft.lower() in ("", "none", "null"):
            self.draft = None
        if self.num_draft_tokens is None:
            self.num_draft_tokens = self.lookahead + 1
        _check(self.engine in ENGINES, f"engine must be one of {ENGINES}, not {self.engine!r}")
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        _check(self.train_precision in PRECISIONS,
               f"train_precision must be one of {PRECISIONS}, not {self.train_precision!r}")
        _check(self.wandb in WANDB_MODES, f"wandb must be one of {WANDB_MODES}, not {self.wandb!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in ("lookahead", "topk", "max_batch", "sync_every", "buffer_samples", "tp_size", "replay_passes",
                     "max_concurrent_requests", "train_batch_tokens", "vocab_warmup_requests"):
            if getattr(self, name) is None and name in DEVICE_DEFAULTS["cpu"]:
                continue
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1,
                   f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        _check(self.draft_vocab_size is None or (_is_int(self.draft_vocab_size) and self.draft_vocab_size >= 0),
               f"draft_vocab_size must be an integer >= 0 (0 = the target's vocabulary), "
               f"got {self.draft_vocab_size!r}")
        _check(self.train_ttt_steps == "auto" or (_is_int(self.train_ttt_steps)
                                                  and 0 <= self.train_ttt_steps <= self.lookahead),
               f"train_ttt_steps must be auto or an integer in [0, lookahead={self.lookahead}] (0: lookahead), "
               f"got {self.train_ttt_steps!r}")
        _check(_is_int(self.admission_wait) and self.admission_wait >= 0,
               f"admission_wait must be an integer >= 0, got {self.admission_wait!r}")
        _check(self.admission_wait == 0 or self.engine != "sglang",
               "admission_wait is a built-in engine setting (SGLang schedules its own admissions)")
        _check(_is_int(self.max_model_len) and self.max_model_len >= 16,
               f"max_model_len must be an integer >= 16, got {self.max_model_len!r}")
        _check(_is_int(self.num_draft_tokens), f"num_draft_tokens must be an integer, got {self.num_draft_tokens!r}")
        if self.topk == 1:
            _check(self.num_draft_tokens == self.lookahead + 1,
                   f"with topk=1 the draft is a chain: num_draft_tokens must be lookahead+1={self.lookahead + 1}, "
                   f"got {self.num_draft_tokens}")
        else:
            _check(self.lookahead + 1 <= self.num_draft_tokens <= self.topk * self.lookahead + 1,
                   f"num_draft_tokens must be in [lookahead+1, topk*lookahead+1] = "
                   f"[{self.lookahead + 1}, {self.topk * self.lookahead + 1}], got {self.num_draft_tokens}")
        _check(self.lr is None or (isinstance(self.lr, (int, float)) and self.lr > 0), f"lr must be > 0, got {self.lr!r}")
        _check(isinstance(self.trainer_duty, (int, float)) and 0 < self.trainer_duty <= 1,
               f"trainer_duty must be in (0, 1], got {self.trainer_duty!r}")
        _check(isinstance(self.serving_floor, (int, float)) and 0 <= self.serving_floor < 1,
               f"serving_floor must be in [0, 1) (0: off), got {self.serving_floor!r}")
        _check(self.trainer_sms is None or (_is_int(self.trainer_sms) and self.trainer_sms >= 0),
               f"trainer_sms must be an integer >= 0 (0: every SM), got {self.trainer_sms!r}")
        _check(isinstance(self.gil_switch_ms, (int, float)) and 0 < self.gil_switch_ms <= 100,
               f"gil_switch_ms must be in (0, 100], got {self.gil_switch_ms!r}")
        _check(isinstance(self.buffer_gib, (int, float)) and self.buffer_gib > 0,
               f"buffer_gib must be > 0, got {self.buffer_gib!r}")
        _check(isinstance(self.sample_rate, (int, float)) and 0.0 < self.sample_rate <= 1.0,  # as the trainer's
               f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        _check(_is_int(self.port) and 0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port!r}")
        _check(isinstance(self.drain_timeout_s, (int, float)) and self.drain_timeout_s >= 0,
               f"drain_timeout_s must be >= 0, got {self.drain_timeout_s!r}")
        _check(_is_int(self.max_body_bytes) and self.max_body_bytes >= 1024,
               f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        _check(bool(self.target), "target must name a model")
        if self.engine == "sglang":
            _check(self.topk == 1 or self.draft is None,
                   "engine sglang captures training samples from chain drafts only: use topk 1")
            _check(self.device in ("auto", "cuda"), "engine sglang runs on CUDA: leave device at auto")
        _check(isinstance(self.sglang_hang_timeout_s, (int, float)) and self.sglang_hang_timeout_s > 0,
               f"sglang_hang_timeout_s must be > 0, got {self.sglang_hang_timeout_s!r}")
        _check(_is_int(self.sglang_capture_topk) and 0 <= self.sglang_capture_topk <= 1024,
               f"sglang_capture_topk must be an integer in [0, 1024], got {self.sglang_capture_topk!r}")
        _check(not (self.sglang_capture_final and self.sglang_capture_topk),
               "sglang_capture_final carries the target's whole distribution: leave sglang_capture_topk at 0")
        _check(self.sglang_capture_final in (None, True, False),
               f"sglang_capture_final must be true or false, got {self.sglang_capture_final!r}")
        if self.sglang_capture_final is None:  # the whole distribution, unless the top K was asked for instead
            self.sglang_capture_final = not self.sglang_capture_topk
        _check(_is_int(self.sglang_max_restarts) and self.sglang_max_restarts >= 0,
               f"sglang_max_restarts must be an integer >= 0, got {self.sglang_max_restarts!r}")
        _check(self.sglang_swap in ("pause", "step"), f"sglang_swap must be pause or step, not {self.sglang_swap!r}")

    def for_device(self, device_type: str) -> tuple["ServeConfig", dict]:
        """This config with its unset training settings chosen for `device_type` ("cpu" or "cuda"), and
        the settings so chosen (for the startup log); settings given explicitly are kept."""
        chosen = {k: v for k, v in DEVICE_DEFAULTS[device_type].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **chosen), chosen

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "ServeConfig":
        """Defaults <- YAML file at `path` <- `overrides` (CLI flags that were given)."""
        values = {}
        if path:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: expected a mapping of ServeConfig fields, got {type(values).__name__}")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        values.update(overrides)
        for name, env in KEY_ENV.items():  # lowest precedence: a key given any other way wins
            if os.environ.get(env) and values.get(name) is None and values.get(f"{name}_file") is None:
                values[name] = os.environ[env]
        return cls(**values)

    def secrets(self) -> list[str]:
        """The values that must appear in no file, log or upload."""
        return [k for k in (self.api_key, self.admin_key) if k]

    def to_dict(self, redact: bool = True) -> dict:
        """All fields; keys are replaced by '***' so configs can be logged and uploaded safely."""
        d = asdict(self)
        if redact:
            for k in ("api_key", "admin_key"):
                if d[k] is not None:
                    d[k] = "***"
        return d

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def redact(args: list[str], secrets: list[str]) -> list[str]:
    """A command line with every occurrence of a secret replaced by '***' (`--api-key K` and `--api-key=K`)."""
    out = []
    for a in args:
        for s in secrets:
            a = a.replace(s, "***")
        out.append(a)
    return out


def _read_key(path: str, name: str) -> str:
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"ServeConfig: {name}_file: cannot read {path!r} ({e.strerror})") from None
    _check(bool(key), f"{name}_file {path!r} is empty")
    return key


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"ServeConfig: {message}")
