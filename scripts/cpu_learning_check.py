"""`aurora serve` at its defaults learns visibly on a CPU: 8 concurrent `openai` clients send distinct short
chat requests (greedy) and the accept length over the last 16 requests must be at least `--min-gain` above
the first 16's.

The server is the real command line in a child process (`python -m aurora.cli serve`), given only a port, a
run directory and `--wandb disabled`, so every serving and training setting is the one a user gets on this
machine (`--device cpu` is passed only to be sure of the device). Accept length of a window of requests = the
tokens its decoding rounds committed / those rounds, where a plain-decoding round (depth 0: the engine judged
that speculating would not pay) commits one token: from each response's `usage`, rounds = spec_verify_rounds +
the tokens no verify round committed (the prefill's first token excluded). A day-0 server that never speculates
therefore reads 1.0, and only a draft that serving actually speculates with moves it; the result also gives each
version's held-out prediction (the guard's), which moves while serving decodes plainly. Exit status 0 when the
served gain is reached, 1 when not.

    python scripts/cpu_learning_check.py --requests 112 --concurrency 8 --max-tokens 48
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aurora.prompts import load_prompts  # noqa: E402


def distinct_short_prompts(domain: str, n: int, max_chars: int) -> list[str]:
    seen, out = set(), []
    for p in load_prompts(domain):
        key = " ".join(p.split()).lower()
        if len(p) <= max_chars and key not in seen:
            seen.add(key)
            out.append(p)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct {domain} prompts of at most {max_chars} characters; "
                         f"raise --max-chars")
    return out[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, run_dir: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "aurora.cli", "serve", "--device", "cpu", "--port", str(port), "--run-dir", run_dir,
           "--wandb", "disabled", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"),
                                                       os.environ.get("PYTHONPATH", "")]))
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, "serve.log"), "w")
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"aurora serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"aurora serve not ready after {timeout:.0f} s")


def window(rows: list[dict]) -> float:
    """Decoded tokens per decoding round (verify rounds plus plain one-token rounds) over the window's requests."""
    decoded = sum(max(r["tokens"] - 1, 0) for r in rows)  # the first token comes from the prefill
    rounds = sum(r["rounds"] + max(r["tokens"] - 1 - r["verified"], 0) for r in rows)
    return decoded / rounds if rounds else 1.0


async def drive(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    rows, t0 = [], time.time()

    async def worker():
        while not queue.empty():
            i, p = queue.get_nowait()
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                     max_tokens=max_tokens, temperature=0)
            u = r.usage.model_dump()
            rounds = u["spec_verify_rounds"]
            rows.append({"done": len(rows) + 1, "prompt": i, "tokens": u["completion_tokens"], "rounds": rounds,
                         "verified": round((u.get("spec_accept_length") or 0.0) * rounds),
                         "t": round(time.time() - t0, 1)})
            if len(rows) % 16 == 0:
                print(f"t={rows[-1]['t']:6.0f}s requests={len(rows):4d} accept length of the last 16="
                      f"{window(rows[-16:]):.2f}", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=112)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--domain", default="chat", help="prompt set of aurora.prompts")
    ap.add_argument("--max-chars", type=int, default=200, help="a short request's prompt at most this long")
    ap.add_argument("--window", type=int, default=16, help="requests compared at the start and the end")
    ap.add_argument("--min-gain", type=float, default=0.3)
    ap.add_argument("--run-dir", default=None, help="the server's run directory (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the per-request rows and the result as JSON here")
    ap.add_argument("--serve-args", default="", help="extra `aurora serve` flags, verbatim (default: none)")
    args = ap.parse_args()

    prompts = distinct_short_prompts(args.domain, args.requests, args.max_chars)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="aurora-cpu-check-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, run_dir, args.serve_args.split())
    try:
        wait_ready(url, proc, timeout=900)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        t0 = time.time()
        rows = asyncio.run(drive(url, model, prompts, args.concurrency, args.max_tokens))
        draft = httpx.get(url + "/v1/draft").json()
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    first, last = window(rows[:args.window]), window(rows[-args.window:])
    result = {"requests": len(rows), "seconds": round(time.time() - t0, 1), "first": round(first, 3),
              "last": round(last, 3), "gain": round(last - first, 3), "min_gain": args.min_gain,
              "draft_version": draft.get("draft_version"), "accept_length_by_version":
              draft.get("accept_length_by_version"),
              # what each version was predicted on held-out requests at its guard pass: learning that served
              # accept length cannot show while the decision keeps serving at depth 0
              "heldout_accept_by_version": (draft.get("trainer") or {}).get("heldout_accept_by_version"),
              "run_dir": run_dir}
    with open(os.path.join(run_dir, "serve.log")) as f:
        result["device_settings"] = [line.split(": ", 2)[-1].strip() for line in f if "chosen for the" in line]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "rows": rows}, f, indent=1)
    return 0 if last - first >= args.min_gain else 1


if __name__ == "__main__":
    sys.exit(main())
