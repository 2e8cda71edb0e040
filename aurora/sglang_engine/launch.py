"""Start and stop SGLang's HTTP server as a managed child process.

Why a server process and not the in-process `sglang.Engine`: SGLang's own processes (tokenizer manager,
scheduler per TP rank, detokenizer) then live apart from Aurora's event loop, trainer and CUDA context; a
crashed or hung SGLang is visible and restartable without taking Aurora's HTTP front down; and the process
is the same `sglang.launch_server` a production deployment runs (its flags pass through `sglang_args`).
One loopback HTTP hop per request is the price: well under a millisecond beside a decoding round.
"""
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from aurora.budget import sglang_flag
from aurora.sglang_engine.plugin.depth import DEPTH_ENV
from aurora.sglang_engine.plugin.plain_round import ENV as PLAIN_ENV
from aurora.sglang_engine.plugin.verify_attention import ENV as SPLITKV_ENV
from aurora.sglang_engine.wire import FINAL_ENV, TOPK_ENV

log = logging.getLogger(__name__)
LOADER = "aurora.sglang_engine.plugin.loader.load_draft_only"
PLUGIN = "aurora.sglang_engine.plugin"


def check_sglang_version(swap_mode: str) -> str:
    """The installed SGLang's version, refused where a known change breaks the chosen swap: from 0.5.21 SGLang
    accepts update_weights_from_tensor only between /begin_weight_update and /end_weight_update, which the
    pause swap does not call (results/sglang/later_versions_static_check.md). Run on the GPU: 0.5.17."""
    from importlib.metadata import version

    from packaging.version import Version

    v = version("sglang")
    if swap_mode == "pause" and Version(v) >= Version("0.5.21"):
        raise ValueError(f"sglang_swap pause does not work with SGLang {v} (0.5.21+ wraps weight updates in "
                         f"begin/end calls); use sglang_swap step (the default) or SGLang 0.5.17")
    return v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adaptive_depths(lookahead: int) -> list[int]:
    """The speculative depths SGLang builds a runtime state (and CUDA graphs) for when Aurora drives the depth:
    plain decoding, the two shallowest and the full lookahead (each state costs start-up time and graph memory;
    the decision interpolates costs between depths it timed)."""
    return sorted({0, 1, 2, lookahead} & set(range(lookahead + 1)))


def drives_depth(cfg, draft_dir: str | None) -> bool:
    """Aurora chooses SGLang's depth (plugin/depth.py): adaptive_depth, a chain draft, step swaps (the depth
    prior travels with them) and one TP rank (ranks would each have to choose the same depth every forward)."""
    return (draft_dir is not None and cfg.adaptive_depth and cfg.topk == 1 and cfg.sglang_swap == "step"
            and cfg.tp_size == 1)


def write_adaptive_config(path: str, lookahead: int) -> str:
    """SGLang's --speculative-adaptive-config: one slot for every batch size with Aurora's candidate depths.
    SGLang's own rule is never fed (plugin/depth.py); its warm-up is set beyond reach all the same."""
    with open(path, "w") as f:
        json.dump({"1": {"candidate_steps": adaptive_depths(lookahead)}, "warmup_batches": 2 ** 62}, f)
    return path


def reserved_tokens(cfg) -> int:
    """Token slots SGLang's EAGLE reserves in each request on top of its input: it keeps the draft tokens in the
    output slots and counts them against the context length (sglang.srt.managers.utils.
    compute_num_reserved_tokens, 0.5.17). Unaccounted, a request whose prompt + max_tokens equals the context
    (every chat request without max_tokens) would be refused by SGLang."""
    return max(cfg.topk * cfg.lookahead, cfg.num_draft_tokens)


def server_command(cfg, target: str, draft_dir: str | None, port: int, mem_fraction: float | None = None,
                   adaptive_config: str | None = None) -> list[str]:
    """SGLang's command line from a ServeConfig (engine sglang). `draft_dir` None serves the target alone.
    `mem_fraction`: Aurora's --mem-fraction-static (aurora/budget.py), used only when sglang_args has none.
    `adaptive_config`: SGLang's adaptive mode with these candidate depths (write_adaptive_config); the startup
    depth is the full lookahead, the largest candidate, so that buffers SGLang sizes once at start (its shared
    logits buffer) hold the deepest state. With a draft, SGLang's context is max_model_len + reserved_tokens, so
    that every request Aurora admits (prompt + max_tokens <= max_model_len) fits SGLang's check."""
    context = cfg.max_model_len + (reserved_tokens(cfg) if draft_dir is not None else 0)
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", target, "--host", "127.0.0.1",
            "--port", str(port), "--tp-size", str(cfg.tp_size), "--max-running-requests", str(cfg.max_batch),
            "--context-length", str(context), "--dtype", "bfloat16"]
    if cfg.trust_remote_code:
        argv.append("--trust-remote-code")
    if draft_dir is not None:
        argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", draft_dir,
                 "--speculative-num-steps", str(cfg.lookahead), "--speculative-eagle-topk", str(cfg.topk),
                 "--speculative-num-draft-tokens", str(cfg.num_draft_tokens), "--custom-weight-loader", LOADER]
        if adaptive_config is not None:
            argv += ["--speculative-adaptive", "--speculative-adaptive-config", adaptive_config]
    if mem_fraction is not None and sglang_flag(cfg.sglang_args, "--mem-fraction-static") is None:
        argv += ["--mem-fraction-static", f"{mem_fraction:.3f}"]
    return argv + shlex.split(cfg.sglang_args)


def server_env(capture_address: str | None, swap_dir: str | None = None, drive_depth: bool = False,
               chain: bool = False, capture_topk: int = 0, plain_depth0: bool = False,
               capture_final: bool = False) -> dict:
    """The plugin package is imported inside SGLang's schedulers; capture is on when an address is given (with
    the target's top `capture_topk` per verified position when > 0, its final normed hidden state with
    capture_final: plugin/final_state.py), step swaps when a swap directory is,
    Aurora's depth decision with drive_depth (a depth-0 round then skips the draft extend, and with plain_depth0
    runs as the target's own decode step: plugin/plain_round.py), split-KV verify attention with chain (a topk-1
    draft: plugin/verify_attention.py)."""
    env = dict(os.environ)
    env["SGLANG_EXTERNAL_MODEL_PACKAGE"] = PLUGIN
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env.pop("AURORA_CAPTURE_ADDR", None)
    env.pop("AURORA_SWAP_DIR", None)
    env.pop(TOPK_ENV, None)
    env.pop(FINAL_ENV, None)
    if capture_address:
        env["AURORA_CAPTURE_ADDR"] = capture_address
        if capture_topk > 0:
            env[TOPK_ENV] = str(capture_topk)
        if capture_final:
            env[FINAL_ENV] = "1"
    if swap_dir:
        env["AURORA_SWAP_DIR"] = swap_dir
    env.pop(DEPTH_ENV, None)
    env.pop(PLAIN_ENV, None)
    env.pop(SPLITKV_ENV, None)
    if chain:
        env[SPLITKV_ENV] = "1"
    if drive_depth:
        env[DEPTH_ENV] = "1"
        env["SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND"] = "1"
        if plain_depth0:
            env[PLAIN_ENV] = "1"
    return env


def warm_up_prompts(max_model_len: int, concurrency: int, vocab_size: int, new_tokens: int,
                    seed: int = 0) -> list[list[int]]:
    """Token ids of the traffic sent to SGLang before it counts as ready (SGLangServer.wait_ready), at start and
    after every restart: `concurrency` prompts of log-uniform length from 16 to 1,024 tokens (one wave fills
    SGLang's batch) and one at `max_model_len` - `new_tokens`. SGLang's own start-up warm-up is one short request;
    on a machine whose Triton cache was cold, the first users of a fresh server once waited over a minute inside
    SGLang (results/soak/README.md). Whatever SGLang first does for a full batch of mixed lengths is done here,
    before users arrive."""
    rng = random.Random(seed)
    longest = max(1, max_model_len - new_tokens)
    lengths = [max(1, min(longest, int(16 * (min(1024, longest) / 16) ** rng.random()))) for _ in range(concurrency)]
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths + [longest]]


class SGLangServer:
    def __init__(self, argv: list[str], env: dict, log_path: str, port: int, warm_up: list[dict] | None = None):
        """warm_up: /generate bodies sent at once before wait_ready returns (warm_up_prompts)."""
        self.port, self.log_path, self.argv, self.env = port, log_path, list(argv), env
        self.warm_up = warm_up
        self.url = f"http://127.0.0.1:{port}"
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        self._spawn()

    def _spawn(self) -> None:
        log.info("starting SGLang: %s", shlex.join(self.argv))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.children: list = []  # SGLang's own processes (schedulers, detokenizer), recorded once ready

    def restart(self, draft_dir: str | None = None) -> None:
        """Kill whatever is left of the server (its whole process group) and start it again, with `draft_dir`
        as the draft when given. Call wait_ready() next."""
        self.stop(timeout_s=10.0)
        if draft_dir is not None and "--speculative-draft-model-path" in self.argv:
            self.argv[self.argv.index("--speculative-draft-model-path") + 1] = draft_dir
        self._spawn()

    def dead_child(self) -> str | None:
        """A description of the first of SGLang's child processes (recorded at ready) that has died: a killed
        scheduler leaves the HTTP process up but every request hanging."""
        for child in self.children:
            try:
                if child.is_running() and child.status() != "zombie":
                    continue
            except Exception:  # psutil.NoSuchProcess and friends: gone
                pass
            return f"SGLang child process {child.pid} died"
        return None

    def wait_ready(self, timeout_s: float = 900.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang exited with code {self.proc.returncode} while starting:\n{self.tail()}")
            try:
                up = httpx.get(self.url + "/model_info", timeout=2).status_code == 200
            except httpx.HTTPError:
                up = False
            if up:
                self.children = _watched_children(self.proc.pid)
                if self.warm_up is not None:
                    self._warm_up(timeout_s - (time.monotonic() - t0))
                return time.monotonic() - t0
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def _warm_up(self, timeout_s: float) -> None:
        """Send the warm-up requests all at once and read every answer; one that fails is SGLang failing."""
        t0, reqs = time.monotonic(), self.warm_up
        deadline = t0 + max(timeout_s, 1.0)

        def one(body):
            r = httpx.post(self.url + "/generate", json=body, timeout=max(1.0, deadline - time.monotonic()))
            if r.status_code != 200:
                raise RuntimeError(f"SGLang answered a warm-up request with {r.status_code}: {r.text[:300]}")

        try:
            with ThreadPoolExecutor(len(reqs)) as pool:
                list(pool.map(one, reqs))
        except Exception as e:
            raise RuntimeError(f"SGLang warm-up failed: {type(e).__name__}: {e}\n{self.tail()}") from e
        log.info("SGLang warm-up: %d requests (%d prompt tokens) in %.1f s", len(reqs),
                 sum(len(b["input_ids"]) for b in reqs), time.monotonic() - t0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group (SIGKILL after timeout_s); also when the leader is gone already, so
        no orphaned scheduler keeps its GPU memory."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped (hung) process only sees SIGTERM when continued
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


def _watched_children(pid: int) -> list:
    """SGLang's long-lived processes under the server: those it names `sglang::...` (schedulers, detokenizer;
    setproctitle rewrites their command line), else the server's direct children. Other descendants come and
    go while it serves: one of them exiting is no crash."""
    try:
        import psutil  # installed with SGLang
    except ImportError:
        return []
    try:
        server = psutil.Process(pid)
        named = []
        for child in server.children(recursive=True):
            try:
                if (child.cmdline() or [""])[0].startswith("sglang::"):
                    named.append(child)
            except psutil.Error:
                continue
        return named or server.children()
    except psutil.Error:
        return []
