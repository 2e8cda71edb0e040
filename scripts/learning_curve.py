"""Learning curve of `aurora serve` from day 0, measured alike on both engines: accept length on held-out prompts
the draft never trained on, every N requests of a stream of distinct prompts, over HTTP.

  python scripts/learning_curve.py --requests 5000 --eval-every 500 --heldout 100 \
      --mode builtin= --mode sglang="--engine sglang" --out results/online/curve

Each `--mode NAME=ARGS` starts `aurora serve --no-adaptive-depth ARGS` as a process: a fixed lookahead, so that
accept length measures the draft and not the depth decision (scripts/speedup_run.py measures the decision).
The held-out set is the last `--heldout` prompts of speedup_run's distinct chat-like stream (AlpacaEval, MT-bench,
IFEval, Arena-Hard in a fixed shuffled order); the training stream is the rest, in order, wrapping around when
`--requests` is longer (a note says so), from `--concurrency` clients, greedy, `--max-tokens` each with ignore_eos.
At request 0 and after every `--eval-every` stream requests the stream pauses (its requests in flight finish) and
the held-out prompts are served with `"capture": false` (they never become training samples); the point's accept
length = their committed tokens / their verify rounds (usage.spec_*). Each point also records the draft version,
the trainer's steps, tokens trained and swaps (/v1/draft), and the tokens/s of the stream segment before it.
Modes run one after the other. Writes <out>/<mode>_curve.csv, <out>/summary.json, <out>/curve.png and each
server's log.
"""
import argparse
import asyncio
import csv
import json
import os

import httpx

from speedup_run import distinct_prompts, drive, free_port, start_server, stop_server  # scripts/ is on the path

FIELDS = ["requests", "draft_version", "accept_length", "heldout_tokens", "verify_rounds", "trainer_steps",
          "tokens_trained", "swaps", "stream_tokens_per_s", "failed"]


def serve(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, capture: bool):
    """Every prompt once; (completion tokens, verify rounds, tokens committed by verify rounds, failed, seconds)."""
    rows = asyncio.run(drive(url, prompts, concurrency, max_tokens, model, capture))
    return (sum(r["completion_tokens"] for r in rows), sum(r["verify_rounds"] for r in rows),
            sum(r["accept_length"] * r["verify_rounds"] for r in rows), sum(r["status"] != 200 for r in rows),
            max(r["t"] for r in rows))


def run_mode(a, name: str, extra: str, stream: list[str], heldout: list[str]) -> list[dict]:
    port = free_port()
    run_dir = os.path.join(a.out, name + "_run")
    proc = start_server(f"--run-dir {run_dir} --no-adaptive-depth {extra}", port,
                        os.path.join(a.out, f"{name}_server.log"))
    url, points = f"http://127.0.0.1:{port}", []
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        done, seg_rate, seg_failed = 0, None, 0
        with open(os.path.join(a.out, f"{name}_curve.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            while True:
                toks, rounds, verified, failed, _ = serve(url, model, heldout, a.concurrency, a.max_tokens,
                                                          capture=False)
                d = httpx.get(url + "/v1/draft").json()
                t = d.get("trainer") or {}
                p = {"requests": done, "draft_version": d.get("draft_version"),
                     "accept_length": round(verified / rounds, 4) if rounds else None, "heldout_tokens": toks,
                     "verify_rounds": rounds, "trainer_steps": t.get("steps"),
                     "tokens_trained": t.get("tokens_trained"), "swaps": t.get("swaps"),
                     "stream_tokens_per_s": seg_rate, "failed": failed + seg_failed}
                points.append(p)
                w.writerow(p)
                f.flush()
                print(f"{name}: {done:5d} requests, version {p['draft_version']}, held-out accept length "
                      f"{p['accept_length']}, trainer steps {p['trainer_steps']}, swaps {p['swaps']}, stream "
                      f"{'-' if seg_rate is None else f'{seg_rate:.0f}'} tok/s, failed {p['failed']}", flush=True)
                if done >= a.requests:
                    return points
                seg = stream[done:done + a.eval_every]
                toks, _, _, seg_failed, secs = serve(url, model, seg, a.concurrency, a.max_tokens, capture=True)
                seg_rate, done = round(toks / secs, 1), done + len(seg)
    finally:
        stop_server(proc)
        sglang_log = os.path.join(run_dir, "sglang.log")
        if os.path.exists(sglang_log):
            os.replace(sglang_log, os.path.join(a.out, f"{name}_sglang.log"))


def plot(curves: dict[str, list[dict]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in curves.items():
        pts = [p for p in pts if p["accept_length"] is not None]
        ax.plot([p["requests"] for p in pts], [p["accept_length"] for p in pts], marker="o", label=name)
    ax.set_xlabel("stream requests served")
    ax.set_ylabel("held-out accept length (tokens / verify round)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", action="append", required=True, help="NAME=extra aurora serve args (repeatable)")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default="results/online/curve")
    a = ap.parse_args()
    if a.eval_every < 1 or a.heldout < 1 or a.requests < 1:
        ap.error("--requests, --eval-every and --heldout must be positive")
    os.makedirs(a.out, exist_ok=True)
    pool = distinct_prompts()
    if a.heldout >= len(pool):
        ap.error(f"--heldout {a.heldout}: the pool has {len(pool)} distinct prompts")
    heldout, train = pool[-a.heldout:], pool[:-a.heldout]
    if a.requests > len(train):
        print(f"note: {a.requests} stream requests from {len(train)} distinct prompts: the stream repeats")
    stream = [train[i % len(train)] for i in range(a.requests)]
    summary = {"args": vars(a), "modes": {}}
    try:
        for spec in a.mode:
            name, _, extra = spec.partition("=")
            summary["modes"][name] = {"args": extra, "points": run_mode(a, name, extra, stream, heldout)}
    finally:
        with open(os.path.join(a.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if summary["modes"]:
            plot({n: m["points"] for n, m in summary["modes"].items()}, a.out)


if __name__ == "__main__":
    main()
