"""The keys go nowhere: `aurora serve` with an API key on its command line and an admin key from the environment,
wandb offline, real traffic, SIGTERM; then neither key appears in any file under the run's directories (config.yaml,
metrics.jsonl, checkpoint, wandb's run file and metadata) nor in the process's output. The same run checks the
drain limit: with --drain-timeout-s 0 a stream in flight at SIGTERM ends with an error saying the server shut
down, and the process still exits 0."""
import json
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("wandb", reason="the test extra installs wandb")

API_KEY = "sk-test-4f1c9a7e2b5d8e0f"
ADMIN_KEY = "adm-test-9b8c7d6e5f4a3b2c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_secret_in_any_file_or_log(tiny_target_dir, tmp_path):
    port, run = _free_port(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(AURORA_ADMIN_KEY=ADMIN_KEY, WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-data"), HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "aurora.cli", "serve", "--target", tiny_target_dir, "--draft", "scratch",
           "--device", "cpu", "--max-model-len", "256", "--max-batch", "4", "--sync-every", "4", "--port", str(port),
           "--run-dir", str(run), "--wandb", "offline", "--api-key", API_KEY, "--drain-timeout-s", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        ok = {"Authorization": f"Bearer {API_KEY}"}
        body = {"prompt": "hello", "max_tokens": 8}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
        for _ in range(6):
            assert httpx.post(url + "/v1/completions", json=body, headers=ok, timeout=60).status_code == 200
        assert httpx.post(url + "/v1/draft/save", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          timeout=60).status_code == 200
        time.sleep(5.5)  # one periodic metrics row
        long = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=long, headers=ok, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data:")]
        out, _ = proc.communicate(timeout=120)
        errors = [json.loads(x)["error"] for x in rest[:-1] if "error" in json.loads(x)]
        assert rest[-1] == "[DONE]" and errors and "shut down" in errors[0]["message"], rest[-3:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()
    wandb_runs = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_runs, sorted(glob.glob(str(run / "**"), recursive=True))
    assert b"--api-key" in open(wandb_runs[0], "rb").read()  # wandb did record the command line, redacted
    files = [p for p in glob.glob(str(tmp_path / "**"), recursive=True, include_hidden=True) if os.path.isfile(p)]
    assert len(files) > 5 and any(p.endswith("metrics.jsonl") for p in files)
    leaks = [(p, k) for p in files for k in (API_KEY, ADMIN_KEY) if k.encode() in open(p, "rb").read()]
    assert not leaks, leaks
    assert API_KEY.encode() not in out and ADMIN_KEY.encode() not in out
