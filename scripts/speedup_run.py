"""Served tokens/s with Aurora against the same engine without it, as a user measures it: `aurora serve` as a
process, clients over HTTP, distinct prompts, from day 0.

  python scripts/speedup_run.py --requests 2000 --concurrency 16 --window 500 \
      --mode aurora= --mode none="--draft none" --out results/speedup/h200

Each `--mode NAME=ARGS` starts `aurora serve ARGS` (the shipped defaults plus ARGS), or with ARGS starting
`@sglang` plain `python -m sglang.launch_server` on the same target (the embedded default's directory) with the
rest of ARGS and the flags Aurora itself would give it (context length, running requests, bf16), then sends `--warmup` requests
(GSM8K questions, not timed), then the measured stream: `--requests` distinct chat-like prompts (AlpacaEval,
MT-bench, IFEval, Arena-Hard, in a fixed shuffled order; no prompt is sent twice while the stream is shorter than
the pool), greedy, `--max-tokens` each with ignore_eos (every request costs the same tokens in every mode; with
`--max-tokens-spread S` each prompt's own budget, the same in every mode, see `budgets`), from
`--concurrency` clients. tokens/s per window of `--window` finished requests = the window's completion tokens /
the time from the previous window's last finish to this one's. `--concurrency 1,4,16` runs the concurrencies
in that order against one start of each server, each on the next `--requests` prompts of the stream (after its own
warm-up), so a learning draft sees them in that order. Modes run one after the other on the same machine; with
`--blocks K` each mode's stream is cut into K blocks and the modes take turns block by block (a fresh start of each
server per block, Aurora's with `--resume`: it goes on from the draft, optimiser, version and prediction the block
before checkpointed; its capture buffer starts empty), so a machine whose speed drifts over minutes slows every
mode alike; windows then count measured time only. The table gives, per concurrency, each window's tokens/s and
its ratio to the mode named `none` (or the last mode).
Writes <out>/<mode>_c<C>_requests.csv, <out>/summary.json (windows, the server's /v1/draft at the end), and for
engine sglang <out>/<mode>_sglang.log (SGLang's own log, copied out of the mode's run directory).
`--spy MODES` records py-spy (py-spy on PATH) of each such mode's server process and of its SGLang scheduler, every
thread, idle samples kept, `--spy-s` seconds from `--spy-at` seconds into its first measured stream, and writes
<out>/spy_<mode>_<process>.txt (scripts/sglang_profile.py's summary: where each thread's time goes).
"""
import argparse
import asyncio
import csv
import json
import os
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib

import httpx

from aurora.prompts import load_prompts

POOL = ("chat", "instruct", "arena")


def distinct_prompts(seed: int = 0) -> list[str]:
    """The pool's distinct prompts in a fixed shuffled order; a long prompt keeps its last 1,500 bytes, where the
    question is (bytes: CJK text is ~1 token per byte)."""
    pool = list(dict.fromkeys(p for d in POOL for p in load_prompts(d)))  # distinct, first occurrence kept
    random.Random(seed).shuffle(pool)
    return [p.encode()[-1500:].decode(errors="ignore") for p in pool]


def prompt_stream(n: int, seed: int = 0) -> list[str]:
    pool = distinct_prompts(seed)
    if n > len(pool):
        print(f"note: {n} requests from {len(pool)} distinct prompts: the stream repeats after {len(pool)}")
    return [pool[i % len(pool)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_sglang_command(args: str, port: int) -> list[str]:
    """`@sglang ARGS`: SGLang's own server, started as Aurora starts it without a draft (launch.server_command),
    ARGS appended; on the target Aurora serves by default, or on `--model-path DIR` when ARGS name one (a local
    directory, e.g. MiniMax M2.5's shape with dummy weights)."""
    from aurora.models import hub
    from aurora.server.config import ServeConfig
    from aurora.sglang_engine.launch import server_command

    words = shlex.split(args)
    target = None
    if "--model-path" in words:
        i = words.index("--model-path")
        target = words[i + 1]
        del words[i:i + 2]
    cfg = ServeConfig(engine="sglang", draft=None, sglang_args=shlex.join(words))
    return server_command(cfg, target or hub.resolve(cfg.target), None, port)


def start_server(args: str, port: int, log_path: str, timeout: float = 900.0) -> subprocess.Popen:
    env = None
    if args.startswith("@sglang+env"):  # plain SGLang in the environment Aurora gives it without a draft
        from aurora.sglang_engine.launch import server_env
        cmd, env = plain_sglang_command(args[len("@sglang+env"):], port), server_env(None)
    elif args.startswith("@sglang"):
        cmd = plain_sglang_command(args[len("@sglang"):], port)
    else:
        cmd = [sys.executable, "-m", "aurora.cli", "serve", "--port", str(port), "--wandb", "disabled",
               *shlex.split(args)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                print(f"ready in {time.time() - t0:.0f} s", flush=True)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError(f"aurora serve not ready in {timeout} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def budgets(prompts: list[str], max_tokens: int, spread: float) -> list[int]:
    """Each prompt's max_tokens: `max_tokens` when spread is 0, else uniform in max_tokens * [1 - spread,
    1 + spread], drawn from the prompt's text (every mode and every run sends a prompt the same budget). Requests
    of one length all finish together, and a server that never speculates then admits their successors in full
    groups: a fixed length favours the baseline's prefill in a way real traffic does not."""
    if not 0 <= spread < 1:
        raise ValueError("spread must be in [0, 1)")
    if not spread:
        return [max_tokens] * len(prompts)
    return [max(1, round(max_tokens * (1 - spread + 2 * spread * random.Random(zlib.crc32(p.encode())).random())))
            for p in prompts]


async def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int | list[int], model: str,
                capture: bool = True) -> list[dict]:
    """Every prompt once, greedy, `max_tokens` (one for all, or one per prompt) with ignore_eos; one row per
    request in finishing order (t: seconds from the start). capture False: the requests leave no training
    sample."""
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    sem, rows, t0 = asyncio.Semaphore(concurrency), [], time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i, text):
            async with sem:
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": limits[i],
                    "temperature": 0, "ignore_eos": True, "capture": capture})
                t = time.perf_counter() - t0
                if r.status_code != 200:
                    rows.append({"request": i, "t": t, "status": r.status_code, "completion_tokens": 0,
                                 "verify_rounds": 0, "accept_length": 0.0})
                    return
                u = r.json()["usage"]
                rows.append({"request": i, "t": t, "status": 200, "completion_tokens": u["completion_tokens"],
                             "verify_rounds": u.get("spec_verify_rounds", 0),
                             "accept_length": u.get("spec_accept_length", 0.0)})
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return sorted(rows, key=lambda r: r["t"])


def windows(rows: list[dict], size: int) -> list[dict]:
    out, prev_t = [], 0.0
    for w in range(0, len(rows) - size + 1, size):
        chunk = rows[w:w + size]
        toks = sum(r["completion_tokens"] for r in chunk)
        rounds = sum(r["verify_rounds"] for r in chunk)
        spec = [r for r in chunk if r["verify_rounds"]]
        out.append({"window": f"{w}-{w + size}", "tokens_per_s": toks / (chunk[-1]["t"] - prev_t),
                    "failed": sum(r["status"] != 200 for r in chunk), "spec_rounds": rounds,
                    "accept_length": (sum(r["accept_length"] * r["verify_rounds"] for r in spec) / rounds
                                      if rounds else None)})
        prev_t = chunk[-1]["t"]
    return out


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


METRICS = ("aurora_swaps", "aurora_samples", "aurora_trainer_failures", "aurora_requests", "aurora_engine_",
           "aurora_draft_version", "aurora_accept_length ")  # the /metrics lines kept in summary.json


def spy(a, name: str, proc: subprocess.Popen) -> threading.Thread:
    """py-spy of the server process and its SGLang scheduler, from a.spy_at seconds on (a thread: the load runs)."""
    from sglang_profile import scheduler_pid, spy_summary, start_spies

    out = a.spy_out or a.out

    def record():
        time.sleep(a.spy_at)
        runs = start_spies({"server": proc.pid, "scheduler": scheduler_pid()}, a.spy_s,
                           lambda who: os.path.join(out, f"spy_{name}_{who}.raw"))
        for k, (p, raw) in runs.items():
            p.wait()
            if os.path.exists(raw):
                with open(raw[:-len(".raw")] + ".txt", "w") as f:
                    f.write(spy_summary(raw, threads=True))
                os.remove(raw)
            else:
                print(f"py-spy of {name}'s {k} wrote nothing (exit {p.returncode})", flush=True)

    t = threading.Thread(target=record, daemon=True)
    t.start()
    return t


def sglang_decode_rate(log_path: str, running: int) -> tuple[float, int] | None:
    """SGLang's own decode throughput at `running` requests: the median 'gen throughput' of its log's decode lines
    at that batch (SGLang times its last 40 decode forwards per line), and how many lines; None without any.
    Beside served tok/s it separates the decode step from everything else a stream pays (prefills, arrivals)."""
    pat = re.compile(r"Decode batch, #running-req: (\d+),.*gen throughput \(token/s\): ([\d.]+)")
    with open(log_path, errors="replace") as f:
        rates = [float(m.group(2)) for line in f for m in [pat.search(line)] if m and int(m.group(1)) == running]
    return (statistics.median(rates), len(rates)) if rates else None


def trainer_line(name: str, draft: dict | None) -> str | None:
    """What the mode's trainer did over its whole run (its /v1/draft at the end), or None without one: a ratio
    measured beside a trainer that hardly trained says little about what learning costs serving."""
    t = (draft or {}).get("trainer")
    if not t:
        return None
    return (f"{name}: {t['steps']} steps, {t['tokens_trained']} tokens trained ({t['samples_trained']} of "
            f"{t['samples_captured']} captured samples), {t['swaps']} swaps, version {t['version']}")


def run_block(a, b: int, name: str, extra: str, segments: list, warm: list, mode: dict, rows_of: dict,
              wall_of: dict) -> None:
    """Block `b` of mode `name` on a fresh start of its server: each concurrency's share of its segment after a
    warm-up. Its rows join rows_of[(name, c)] at the measured time so far (wall_of), so that windows run on."""
    port, plain = free_port(), extra.startswith("@sglang")
    run_dir = os.path.join(a.out, name + "_run")  # a later block resumes the draft the last one left
    log_name = f"{name}_server.log" if a.blocks == 1 else f"{name}_server_b{b}.log"
    proc = start_server(extra if plain else f"--run-dir {run_dir}{' --resume' if b else ''} {extra}", port,
                        os.path.join(a.out, log_name))
    url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        for c, prompts in zip(a.concurrency, segments):
            part = prompts[b * len(prompts) // a.blocks:(b + 1) * len(prompts) // a.blocks]
            asyncio.run(drive(url, warm, c, a.max_tokens, model))
            spying = spy(a, name, proc) if name in a.spy.split(",") and b == 0 and c == a.concurrency[0] else None
            t = time.perf_counter()
            rows = asyncio.run(drive(url, part, c, budgets(part, a.max_tokens, a.max_tokens_spread), model))
            wall = time.perf_counter() - t
            if spying is not None:
                spying.join()
            offset = wall_of.get((name, c), 0.0)
            rows_of.setdefault((name, c), []).extend(dict(r, t=r["t"] + offset, block=b) for r in rows)
            wall_of[(name, c)] = offset + wall
            total = sum(r["completion_tokens"] for r in rows)
            print(f"{name} c{c}{f' block {b}' if a.blocks > 1 else ''}: {total / wall:.1f} tok/s over "
                  f"{len(rows)} requests, {sum(r['status'] != 200 for r in rows)} failed", flush=True)
        if not plain and b == a.blocks - 1:
            mode["draft"] = httpx.get(url + "/v1/draft").json()
            mode["metrics"] = [line for line in httpx.get(url + "/metrics").text.splitlines()
                               if line.startswith(METRICS)]
    finally:
        stop_server(proc)
        sglang_log = os.path.join(run_dir, "sglang.log")  # SGLang's own log (its scheduler's throughput lines)
        if os.path.exists(sglang_log):
            shutil.copy(sglang_log, os.path.join(a.out, f"{name}_sglang.log" if a.blocks == 1 else
                                                 f"{name}_sglang_b{b}.log"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", action="append", required=True, help="NAME=extra aurora serve args (repeatable)")
    ap.add_argument("--requests", type=ints, default=[2000], help="per concurrency (one, or one per concurrency)")
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--concurrency", type=ints, default=[16], help="e.g. 1,4,16: run in this order, one server")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-tokens-spread", type=float, default=0.0,
                    help="S in [0, 1): each measured request's budget uniform in max_tokens * [1-S, 1+S], fixed "
                         "per prompt (0: every request max_tokens)")
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--blocks", type=int, default=1,
                    help="split each mode's stream into this many blocks and run the modes' blocks in turn, each on a "
                         "fresh start of its server (Aurora's resumes the draft the block before left), so that "
                         "the machine's drift over the run touches every mode alike")
    ap.add_argument("--out", default="results/speedup/run")
    ap.add_argument("--spy", default="", help="modes (comma list): py-spy their server and SGLang scheduler (see above)")
    ap.add_argument("--spy-at", type=float, default=30.0)
    ap.add_argument("--spy-s", type=int, default=20)
    ap.add_argument("--spy-out", default="", help="where the py-spy summaries go (default: --out)")
    a = ap.parse_args()
    if len(a.requests) == 1:
        a.requests = a.requests * len(a.concurrency)
    if len(a.requests) != len(a.concurrency):
        ap.error("--requests: one number, or one per --concurrency")
    if a.blocks < 1 or any(n < a.blocks for n in a.requests):
        ap.error("--blocks: at least 1, and at most --requests")
    os.makedirs(a.out, exist_ok=True)
    stream, segments = prompt_stream(sum(a.requests)), []
    for n in a.requests:  # each concurrency gets the next prompts of the one stream: no prompt repeats across them
        segments.append(stream[sum(len(x) for x in segments):][:n])
    warm = load_prompts("math")[:a.warmup]
    summary = {"args": vars(a), "modes": {}}
    rows_of, wall_of = {}, {}  # (mode, concurrency) -> measured rows (time offset over blocks), measured seconds
    try:  # what was measured is written even when a later block or mode fails
        for b in range(a.blocks):
            for spec in a.mode:
                name, _, extra = spec.partition("=")
                run_block(a, b, name, extra, segments, warm, summary["modes"].setdefault(
                    name, {"args": extra, "by_concurrency": {}}), rows_of, wall_of)
    finally:
        for (name, c), rows in rows_of.items():
            with open(os.path.join(a.out, f"{name}_c{c}_requests.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            summary["modes"][name]["by_concurrency"][c] = {
                "windows": windows(rows, min(a.window, len(rows))),
                "tokens_per_s": sum(r["completion_tokens"] for r in rows) / wall_of[(name, c)],
                "failed": sum(r["status"] != 200 for r in rows)}
        with open(os.path.join(a.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    names = [n for n in summary["modes"] if len(summary["modes"][n]["by_concurrency"]) == len(a.concurrency)]
    base = "none" if "none" in names else names[-1]
    lines = [x for n in names if (x := trainer_line(n, summary["modes"][n].get("draft")))]
    if lines:
        print("\ntrainer at the end of each mode's last server start (warm-up included):\n  " + "\n  ".join(lines))
    for c in a.concurrency:
        runs = {n: summary["modes"][n]["by_concurrency"][c] for n in names}
        length = f"{a.max_tokens} tokens" + (f" ± {a.max_tokens_spread:.0%}" if a.max_tokens_spread else "")
        print(f"\ntok/s per window of {a.window} requests (c{c}, {length}, ratio to {base}):")
        print(f"{'window':>12} " + " ".join(f"{n:>22}" for n in names))
        for i, wb in enumerate(runs[base]["windows"]):
            cells = []
            for n in names:
                wn = runs[n]["windows"][i]
                al = f" al {wn['accept_length']:.2f}" if wn["accept_length"] else ""
                cells.append(f"{wn['tokens_per_s']:8.1f} {wn['tokens_per_s'] / wb['tokens_per_s']:5.2f}x{al:>8}")
            print(f"{wb['window']:>12} " + " ".join(f"{x:>22}" for x in cells))
        print(f"{'all':>12} " + " ".join(f"{runs[n]['tokens_per_s']:8.1f} "
                                          f"{runs[n]['tokens_per_s'] / runs[base]['tokens_per_s']:5.2f}x{'':8}"
                                          for n in names))
        if a.blocks > 1 or len(a.concurrency) > 1:  # a log then holds several blocks or concurrencies
            continue
        logs = {n: os.path.join(a.out, f"{n}_sglang.log") for n in names}
        rates = {n: sglang_decode_rate(p, c) for n, p in logs.items() if os.path.exists(p)}
        if rates.get(base):
            print(f"{'decode':>12} " + " ".join(
                f"{rates[n][0]:8.1f} {rates[n][0] / rates[base][0]:5.2f}x{'':8}" if rates.get(n) else f"{'':>22}"
                for n in names))
            print(f"(decode: SGLang's own gen throughput at {c} running, median of its log lines)")


if __name__ == "__main__":
    main()
