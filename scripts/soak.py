"""A soak of `aurora serve` under the traffic a production front sees, with the service's books checked at the end.

  python scripts/soak.py --requests 20000 --clients 64 --out results/soak/run \
      --serve-args "--engine sglang --draft scratch --sglang-args='--attention-backend triton --sampling-backend pytorch'"

Starts `aurora serve` (the shipped defaults plus --serve-args) as a process and sends --requests chat requests from
--clients concurrent clients over HTTP:
  - prompt lengths log-uniform from 16 tokens up to the server's max_model_len (less the request's max_tokens),
    each ending in a chat question (AlpacaEval, MT-bench, IFEval, Arena-Hard) after filler text from other questions;
  - --prefix-frac of them start with one shared preamble of min(600, max_model_len / 4) tokens (prefix-cache hits);
  - --too-long-frac whose prompt exceeds max_model_len: they must get a 400 naming the context length;
  - --stream-frac streamed, of which --disconnect-frac close the connection after a few chunks (aborted streams);
  - max_tokens uniform in --max-tokens LO,HI, greedy or temperature 0.8 at random.
Every request must end in time (--request-timeout-s) with the outcome its kind expects: anything else is a failure.
With --kill-scheduler-after N, SGLang's scheduler gets SIGKILL once N requests have finished: requests then may
answer 503 until /health is "ok" again (counted apart), and the report gives the time to recover and whether swaps
resumed. --env K=V passes a variable to the server (e.g. AURORA_FAULT=trainer_oom:3@20 for a fault drill).

Every --sample-s seconds it records /health, the host RSS of Aurora's process and of its children (SGLang), the capture
buffer's bytes (the samples waiting in host memory, bounded by --buffer-gib), and the
GPU memory in use (nvidia-smi), into memory.csv; memory.png plots them against finished requests. At the end it
waits (up to --settle-s) for captured requests and the trainer's fresh queue to drain, then checks the books:
  SGLang capture: admitted = samples + dropped by reason + in flight   (/v1/draft capture)
  trainer:        captured = trained + held out + dropped by reason + waiting + in training   (/v1/draft trainer)
and writes soak.json. Exit status 1 when a request failed or a book does not balance.
"""
import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx

from aurora.prompts import load_prompts

POOL = ("chat", "instruct", "arena")


def tokenizer_of(target: str):
    from transformers import AutoTokenizer

    from aurora.models import hub
    return AutoTokenizer.from_pretrained(hub.resolve(target))


class Traffic:
    """Request specs with exact prompt lengths under the target's chat template."""

    def __init__(self, tok, limit: int, a, rng: random.Random):
        self.tok, self.limit, self.a, self.rng = tok, limit, a, rng
        pool = list(dict.fromkeys(p for d in POOL for p in load_prompts(d)))
        rng.shuffle(pool)
        self.questions = [q.encode()[-1500:].decode(errors="ignore") for q in pool]
        self.filler = self.ids("\n\n".join(pool[:400]))  # other questions: text the model may see as context
        self.preamble_len = min(600, limit // 4)  # one preamble that many prompts share: prefix-cache hits
        self.preamble = self.tok.decode(self.filler[:self.preamble_len])
        self.overhead = len(self.chat_ids("")) + 2

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, content: str) -> list[int]:
        return self.tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)

    def request(self, i: int) -> dict:
        a, rng = self.a, self.rng
        max_tokens = rng.randint(*a.max_tokens)
        question = self.questions[i % len(self.questions)]
        kind = "too_long" if rng.random() < a.too_long_frac else "ok"
        if kind == "too_long":
            n = self.limit + rng.randint(16, 512)
        else:
            room = self.limit - max_tokens - 8  # a re-tokenised cut may grow by a token or two
            n = int(math.exp(rng.uniform(math.log(16), math.log(max(room, 17)))))
        q_ids = self.ids(question)[-max(8, n // 2):]
        share = rng.random() < a.prefix_frac and n >= self.preamble_len + len(q_ids) + self.overhead + 32
        head = self.preamble + "\n\n" if share else ""
        budget = n - self.overhead - len(self.ids(head)) - len(q_ids)
        start = rng.randrange(0, max(1, len(self.filler) - max(budget, 0)))
        for _ in range(4):  # a decoded cut re-tokenises to a few more or fewer tokens: trim until it fits
            filler = self.tok.decode(self.filler[start:start + budget]) + "\n\n" if budget > 0 else ""
            content = head + filler + self.tok.decode(q_ids)
            prompt_tokens = len(self.chat_ids(content))
            if kind == "too_long" or prompt_tokens + max_tokens <= self.limit:
                break
            budget -= prompt_tokens + max_tokens - self.limit + 4
        else:
            raise RuntimeError(f"request {i}: no prompt of {n} tokens fits {self.limit} with {max_tokens} new tokens")
        if kind == "too_long" and prompt_tokens < self.limit:
            kind = "ok"  # the filler ran short: an ordinary request after all
            max_tokens = min(max_tokens, self.limit - prompt_tokens)
        stream = rng.random() < a.stream_frac
        disconnect = stream and kind == "ok" and rng.random() < a.disconnect_frac
        return {"i": i, "kind": "disconnect" if disconnect else kind, "stream": stream, "max_tokens": max_tokens,
                "prompt_tokens": prompt_tokens, "shared_prefix": bool(head),
                "temperature": 0.0 if rng.random() < 0.5 else 0.8,
                "messages": [{"role": "user", "content": content}]}


async def send(client: httpx.AsyncClient, model: str, spec: dict, timeout: float) -> dict:
    body = {"model": model, "messages": spec["messages"], "max_tokens": spec["max_tokens"],
            "temperature": spec["temperature"], "stream": spec["stream"]}
    t0 = time.perf_counter()
    out = {k: spec[k] for k in ("i", "kind", "stream", "max_tokens", "prompt_tokens", "shared_prefix")}
    try:
        async with asyncio.timeout(timeout):
            if not spec["stream"]:
                r = await client.post("/v1/chat/completions", json=body)
                out["status"] = r.status_code
                if r.status_code == 200:
                    out["completion_tokens"] = r.json()["usage"]["completion_tokens"]
                else:
                    out["error"] = r.text[:300]
            else:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    out["status"], chunks, done = r.status_code, 0, False
                    if r.status_code != 200:
                        out["error"] = (await r.aread()).decode(errors="replace")[:300]
                    else:
                        stop_after = random.Random(spec["i"]).randint(1, 8) if spec["kind"] == "disconnect" else None
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                data = line[5:].strip()
                                if data == "[DONE]":
                                    done = True
                                    break
                                err = json.loads(data).get("error")
                                if err:  # a stream already under way reports a failure as an error event
                                    out["error"], out["error_code"] = json.dumps(err)[:300], err.get("code")
                                chunks += 1
                                if stop_after is not None and chunks >= stop_after:
                                    break  # the client goes away mid-stream
                        out["chunks"], out["done"] = chunks, done
    except TimeoutError:
        out["status"], out["error"] = "timeout", f"no end within {timeout} s"
    except httpx.HTTPError as e:
        out["status"], out["error"] = "http_error", repr(e)[:300]
    out["seconds"] = time.perf_counter() - t0
    out["outcome"] = outcome(out)
    return out


def outcome(r: dict) -> str:
    """ok | refused (the 400 a too-long prompt expects) | disconnected | unavailable (503) | failed."""
    if r["kind"] == "too_long":
        return "refused" if r["status"] == 400 and "context length" in r.get("error", "") else "failed"
    if r["status"] == 503 or r.get("error_code") == "engine_unavailable":  # SGLang restarting: retry later
        return "unavailable"
    if r["status"] != 200 or "error" in r:
        return "failed"
    if r["kind"] == "disconnect":
        return "disconnected"
    return "ok" if not r["stream"] or r.get("done") else "failed"


def tree_rss(pid: int) -> tuple[float, float]:
    """(Aurora's RSS, its descendants' RSS) in MiB."""
    import psutil

    try:
        p = psutil.Process(pid)
        own = p.memory_info().rss
        kids = 0
        for c in p.children(recursive=True):
            try:
                kids += c.memory_info().rss
            except psutil.Error:
                pass
        return own / 2**20, kids / 2**20
    except psutil.Error:
        return float("nan"), float("nan")


def gpu_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(float(x) for x in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def kill_scheduler(server_pid: int) -> int | None:
    import psutil

    for c in psutil.Process(server_pid).children(recursive=True):
        try:
            if any("sglang::scheduler" in part for part in c.cmdline()):
                c.send_signal(signal.SIGKILL)
                return c.pid
        except psutil.Error:
            continue
    return None


async def run(a, url: str, proc: subprocess.Popen, traffic: Traffic, model: str) -> dict:
    rows, mem, events = [], [], {}
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(a.requests):
        queue.put_nowait(i)
    t0, deadline = time.perf_counter(), time.perf_counter() + a.max_minutes * 60
    limits = httpx.Limits(max_connections=a.clients + 8, max_keepalive_connections=a.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        async def worker():
            while time.perf_counter() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r = await send(client, model, traffic.request(i), a.request_timeout_s)
                r["t"] = time.perf_counter() - t0
                rows.append(r)
                if r["outcome"] == "failed" and sum(x["outcome"] == "failed" for x in rows) <= 5:
                    print(f"failed: {json.dumps(r)[:400]}", flush=True)
                if r["outcome"] == "unavailable":  # as a client that honours 503: retry once the server is back
                    await wait_healthy(client, deadline)
                if a.kill_scheduler_after and len(rows) == a.kill_scheduler_after and "kill_t" not in events:
                    events["kill_t"], events["killed_pid"] = r["t"], kill_scheduler(proc.pid)
                    print(f"SIGKILL to SGLang's scheduler {events['killed_pid']} at {r['t']:.1f} s", flush=True)

        async def monitor():
            while True:
                now = time.perf_counter() - t0
                try:
                    h = await client.get("/health", timeout=10)
                    health = h.json().get("status", h.status_code)
                except (httpx.HTTPError, ValueError):
                    health = "no_answer"
                serving = health in ("ok", "degraded")  # degraded: the trainer's trouble, serving unaffected
                if "kill_t" in events and not serving:
                    events.setdefault("unhealthy_t", now)  # the supervisor noticed
                if "unhealthy_t" in events and "healthy_again_t" not in events and serving:
                    events["healthy_again_t"] = now
                own, kids = tree_rss(proc.pid)
                row = {"t": round(now, 1), "finished": len(rows), "health": health, "aurora_rss_mib": round(own, 1),
                       "children_rss_mib": round(kids, 1), "gpu_used_mib": gpu_used_mib()}
                try:
                    d = (await client.get("/v1/draft", timeout=10)).json()
                    t = d.get("trainer") or {}
                    row["version"], row["trainer_state"] = d.get("draft_version"), t.get("state")
                    if t.get("buffer_bytes") is not None:  # waiting samples: host memory bounded by --buffer-gib
                        row["buffer_mib"] = round(t["buffer_bytes"] / 2**20, 1)
                        row["aurora_rss_less_buffer_mib"] = round(own - row["buffer_mib"], 1)
                except (httpx.HTTPError, ValueError):
                    pass
                mem.append(row)
                write_csv(os.path.join(a.out, "memory.csv"), mem)  # kept if the run is cut short
                await asyncio.sleep(a.sample_s)

        mon = asyncio.create_task(monitor())
        progress = asyncio.create_task(report_progress(rows, a.requests, t0))
        await asyncio.gather(*(worker() for _ in range(a.clients)))
        wall = time.perf_counter() - t0
        progress.cancel()
        settled = await settle(client, a.settle_s)
        mon.cancel()
        draft = (await client.get("/v1/draft")).json()
        metrics = (await client.get("/metrics")).text
    return {"rows": sorted(rows, key=lambda r: r["t"]), "memory": mem, "events": events, "wall_s": wall,
            "settled": settled, "draft": draft,
            "metrics": [m for m in metrics.splitlines() if m.startswith("aurora_") and "_bucket" not in m]}


async def wait_healthy(client: httpx.AsyncClient, deadline: float) -> None:
    while time.perf_counter() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if (await client.get("/health", timeout=10)).json().get("status") in ("ok", "degraded"):
                return
        await asyncio.sleep(2)


async def report_progress(rows: list, total: int, t0: float) -> None:
    while True:
        await asyncio.sleep(30)
        print(f"{time.perf_counter() - t0:6.0f} s: {len(rows)}/{total} finished, "
              f"{sum(r['outcome'] == 'failed' for r in rows)} failed", flush=True)


async def settle(client: httpx.AsyncClient, limit_s: float) -> dict:
    """Wait for admitted captures to end and the trainer's fresh queue to empty (the books then balance exactly)."""
    t0 = time.perf_counter()
    while True:
        d = (await client.get("/v1/draft")).json()
        cap = d.get("capture") or {}
        t = d.get("trainer") or {}
        waiting = t.get("buffer_size", 0) + t.get("samples_in_training", 0)
        if (not cap.get("in_flight") and not waiting) or time.perf_counter() - t0 > limit_s:
            return {"seconds": round(time.perf_counter() - t0, 1), "capture_in_flight": cap.get("in_flight"),
                    "trainer_waiting": waiting}
        await asyncio.sleep(2)


def books(draft: dict) -> dict:
    out = {}
    cap = draft.get("capture")  # engine sglang
    if cap and "admitted" in cap:
        dropped = {k: v for k, v in cap.items() if k.startswith("dropped_")}
        out["capture"] = {"admitted": cap["admitted"], "samples": cap["samples"], "dropped": dropped,
                          "in_flight": cap.get("in_flight"),
                          "balanced": cap["admitted"] == cap["samples"] + sum(dropped.values()) + cap.get("in_flight", 0)}
    t = draft.get("trainer") or {}
    if "samples_captured" in t:
        dropped = t.get("samples_dropped_by_reason") or {}
        right = (t["samples_trained"] + t.get("samples_heldout", 0) + sum(dropped.values()) + t.get("buffer_size", 0)
                 + t.get("samples_in_training", 0))
        out["trainer"] = {"captured": t["samples_captured"], "trained": t["samples_trained"],
                          "held_out": t.get("samples_heldout", 0), "dropped": dropped,
                          "waiting": t.get("buffer_size", 0), "in_training": t.get("samples_in_training", 0),
                          "balanced": t["samples_captured"] == right}
    return out


def drift(mem: list[dict], key: str, after: float) -> dict | None:
    """Change of `key` from the first sample past `after` of the run's requests to the end (MiB and %)."""
    pts = [(m["finished"], m[key]) for m in mem if m.get(key) is not None and not math.isnan(m[key])]
    if len(pts) < 4:
        return None
    cut = after * pts[-1][0]
    tail = [v for f, v in pts if f >= cut]
    if len(tail) < 2:
        return None
    k = max(1, len(tail) // 10)  # means of the first and last tenth of the tail: one sample's noise is no trend
    first, last = sum(tail[:k]) / k, sum(tail[-k:]) / k
    return {"from_mib": round(first, 1), "to_mib": round(last, 1), "change_mib": round(last - first, 1),
            "change_pct": round(100 * (last - first) / first, 2) if first else None, "max_mib": max(tail)}


def plot(mem: list[dict], path: str, swaps: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = [m["finished"] for m in mem]
    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax[0].plot(f, [m["aurora_rss_mib"] for m in mem], label="Aurora process RSS")
    ax[0].plot(f, [m["children_rss_mib"] for m in mem], label="SGLang processes RSS (sum)")
    if any(m.get("buffer_mib") is not None for m in mem):
        nan = float("nan")
        ax[0].plot(f, [m.get("aurora_rss_less_buffer_mib", nan) for m in mem], ls="--",
                   label="Aurora RSS less the capture buffer's samples")
        ax[0].plot(f, [m.get("buffer_mib", nan) for m in mem], label="capture buffer (bounded by --buffer-gib)")
    ax[0].set_ylabel("host MiB")
    ax[0].legend()
    gpu = [m.get("gpu_used_mib") for m in mem]
    if any(g is not None for g in gpu):
        ax[1].plot(f, [g if g is not None else float("nan") for g in gpu], color="C2", label="GPU memory in use")
        ax[1].legend()
    ax[1].set_ylabel("GPU MiB")
    ax[1].set_xlabel("finished requests")
    for x in swaps:
        for axis in ax:
            axis.axvline(x, color="grey", lw=0.5, alpha=0.5)
    fig.suptitle("memory over the soak (grey: draft version changes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def replot(out: str) -> None:
    with open(os.path.join(out, "memory.csv")) as f:
        mem = [{k: (float(v) if v not in ("", None) and k not in ("health", "trainer_state") else (v or None))
                for k, v in row.items()} for row in csv.DictReader(f)]
    with open(os.path.join(out, "soak.json")) as f:
        swaps = json.load(f)["swaps_at_requests"]
    plot(mem, os.path.join(out, "memory.png"), swaps)


def summarize(a, res: dict) -> dict:
    rows, mem = res["rows"], res["memory"]
    counts = dict(Counter(r["outcome"] for r in rows))
    versions, swaps_at = [], []
    for m in mem:
        v = m.get("version")
        if v is not None and (not versions or v != versions[-1]):
            if versions:
                swaps_at.append(m["finished"])
            versions.append(v)
    ev = res["events"]
    recovery = None
    if "kill_t" in ev:
        after = [r for r in rows if r["t"] > ev["kill_t"]]
        unavailable = [r for r in rows if r["outcome"] == "unavailable"]
        later_ok = [r for r in after if r["outcome"] == "ok" and r["t"] > ev.get("healthy_again_t", math.inf)]
        recovery = {"killed_pid": ev.get("killed_pid"), "kill_at_s": round(ev["kill_t"], 1),
                    "unhealthy_seen_after_s": (round(ev["unhealthy_t"] - ev["kill_t"], 1)
                                               if "unhealthy_t" in ev else None),
                    "healthy_again_after_s": (round(ev["healthy_again_t"] - ev["kill_t"], 1)
                                              if "healthy_again_t" in ev else None),
                    "answered_503": len(unavailable),
                    "longest_503_wait_s": round(max((r["seconds"] for r in unavailable), default=0.0), 1),
                    "ok_after_recovery": len(later_ok),
                    "restarts": res["draft"].get("engine_restarts"),
                    "version_at_kill": next((m.get("version") for m in reversed(mem)
                                             if m["t"] <= ev["kill_t"] and m.get("version") is not None), None),
                    "version_at_end": res["draft"].get("draft_version")}
    done = [r for r in rows if r["outcome"] == "ok"]
    tokens = sum(r.get("completion_tokens", 0) for r in done)
    s = {"args": vars(a), "wall_s": round(res["wall_s"], 1), "requests_sent": len(rows), "outcomes": counts,
         "failed": counts.get("failed", 0), "completion_tokens_non_streamed": tokens,
         "latency_p50_s": pct([r["seconds"] for r in done], 50), "latency_p99_s": pct([r["seconds"] for r in done], 99),
         "prompt_tokens_max": max((r["prompt_tokens"] for r in rows if r["kind"] != "too_long"), default=0),
         "shared_prefix_requests": sum(r["shared_prefix"] for r in rows), "versions_seen": versions,
         "swaps": (res["draft"].get("trainer") or {}).get("swaps"), "settled": res["settled"],
         "books": books(res["draft"]), "recovery": recovery,
         "host_rss_aurora": drift(mem, "aurora_rss_mib", 0.25), "host_rss_children": drift(mem, "children_rss_mib", 0.25),
         "host_rss_aurora_less_buffer": drift(mem, "aurora_rss_less_buffer_mib", 0.25),
         "buffer": drift(mem, "buffer_mib", 0.25),
         "gpu_used": drift(mem, "gpu_used_mib", 0.25), "swaps_at_requests": swaps_at,
         "health_samples": dict(Counter(str(m["health"]) for m in mem))}
    t = res["draft"].get("trainer") or {}
    s["trainer_end"] = {k: t.get(k) for k in ("state", "steps", "failures_by_kind", "last_error", "swaps",
                                              "swaps_refused", "swaps_deferred", "tokens_trained", "samples_trained",
                                              "heldout_accept_by_version")}
    s["served_accept_by_version"] = res["draft"].get("accept_length_by_version")
    return s


def pct(xs: list, q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve-args", default="", help="extra `aurora serve` flags (the shipped defaults otherwise)")
    ap.add_argument("--target", default="smollm2", help="the served target, for the prompt lengths' tokenizer")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=(16, 128),
                    help="LO,HI: each request's max_tokens, uniform")
    ap.add_argument("--stream-frac", type=float, default=0.5)
    ap.add_argument("--disconnect-frac", type=float, default=0.05, help="of the streamed requests")
    ap.add_argument("--too-long-frac", type=float, default=0.01)
    ap.add_argument("--prefix-frac", type=float, default=0.25)
    ap.add_argument("--kill-scheduler-after", type=int, default=0, help="SIGKILL SGLang's scheduler after N requests")
    ap.add_argument("--env", action="append", default=[], help="K=V for the server's environment (repeatable)")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--settle-s", type=float, default=90.0)
    ap.add_argument("--request-timeout-s", type=float, default=300.0)
    ap.add_argument("--start-timeout-s", type=float, default=900.0)
    ap.add_argument("--max-minutes", type=float, default=60.0, help="no request is sent after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/soak/run")
    ap.add_argument("--replot", action="store_true", help="only draw --out's memory.png again from its memory.csv")
    a = ap.parse_args()
    if a.replot:
        return replot(a.out)
    os.makedirs(a.out, exist_ok=True)
    from speedup_run import free_port, start_server, stop_server  # scripts/ is on the path of a script run from it

    os.environ.update(kv.split("=", 1) for kv in a.env)  # the server inherits them
    port = free_port()
    proc = start_server(f"--run-dir {shlex.quote(os.path.join(a.out, 'run'))} {a.serve_args}", port,
                        os.path.join(a.out, "server.log"), timeout=a.start_timeout_s)
    url = f"http://127.0.0.1:{port}"
    try:
        card = httpx.get(url + "/v1/models").json()["data"][0]
        traffic = Traffic(tokenizer_of(a.target), int(card["max_model_len"]), a, random.Random(a.seed))
        res = asyncio.run(run(a, url, proc, traffic, card["id"]))
    finally:
        stop_server(proc)
    s = summarize(a, res)
    write_csv(os.path.join(a.out, "requests.csv"), res["rows"])
    write_csv(os.path.join(a.out, "memory.csv"), res["memory"])
    with open(os.path.join(a.out, "soak.json"), "w") as f:
        json.dump(dict(s, draft=res["draft"], metrics=res["metrics"]), f, indent=1, default=str)
    try:
        plot(res["memory"], os.path.join(a.out, "memory.png"), s["swaps_at_requests"])
    except ImportError:
        print("matplotlib is not installed: no memory.png (draw it elsewhere with --replot)")
    print(json.dumps({k: s[k] for k in ("wall_s", "requests_sent", "outcomes", "swaps", "versions_seen", "settled",
                                        "health_samples", "trainer_end",
                                        "books", "recovery", "host_rss_aurora", "host_rss_aurora_less_buffer",
                                        "buffer", "host_rss_children", "gpu_used", "served_accept_by_version",
                                        "latency_p50_s", "latency_p99_s", "prompt_tokens_max")}, indent=1))
    balanced = all(b["balanced"] for b in s["books"].values())
    sys.exit(0 if s["failed"] == 0 and balanced else 1)


if __name__ == "__main__":
    main()
