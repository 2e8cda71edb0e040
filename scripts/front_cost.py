"""What the HTTP front costs the built-in engine: served tokens/s of one prompt stream at one concurrency, straight
into the engine of an `aurora serve` service in this process (AsyncEngine.generate: token ids in, token ids out; no
HTTP, JSON or text) against the same service as `aurora serve` over its OpenAI route (clients in this process, the
server in its own), on the same machine, one after the other: direct, HTTP, direct again.

  python scripts/front_cost.py --requests 800 --concurrency 16 --max-tokens 128 --serve-args "--draft none"

The prompts are speedup_run.py's distinct chat stream (its chat template applied here as the route applies it),
greedy, `--max-tokens` each with ignore_eos, `--warmup` GSM8K questions first and untimed, each part on a fresh
service. Prints tokens/s of each part and the HTTP part's ratio to the mean of the direct ones, and where the
engine thread's time went in each part (the engine's own `engine_time` counters over the timed stream, from
/v1/draft over HTTP): in its steps (prefill calls, rounds) or idle, waiting for requests.
"""
import argparse
import asyncio
import gc
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speedup_run  # noqa: E402  (scripts/speedup_run.py: the prompt stream and the HTTP clients)

from aurora.prompts import chat_ids, load_prompts  # noqa: E402


async def drive_direct(engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> list[dict]:
    from aurora.engine.sequence import SamplingParams
    from aurora.server.protocol import NONSTREAM_INTERVAL

    sem, rows, t0 = asyncio.Semaphore(concurrency), [], time.perf_counter()

    async def one(i, ids):
        async with sem:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    stream_interval=NONSTREAM_INTERVAL)  # as the route asks for a whole response
            last = None
            async for o in engine.generate(ids, params):
                last = o
            rows.append({"request": i, "t": time.perf_counter() - t0, "status": 200 if last.error is None else 500,
                         "completion_tokens": len(last.output_ids)})

    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    return sorted(rows, key=lambda r: r["t"])


def in_process(serve_args: str):
    """`aurora serve` with these arguments as a Service in this process."""
    from aurora.cli import build_parser
    from aurora.server.config import ServeConfig
    from aurora.service import Service

    args = build_parser().parse_args(["serve", *shlex.split(serve_args)])
    cfg = ServeConfig.load(args.config, **{k: v for k, v in vars(args).items() if k not in ("command", "config")})
    return Service.from_config(cfg)


def free_memory() -> None:
    """After a service has shut down and its last reference is gone: its GPU memory back before the next one."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def direct(serve_args: str, texts: list[str], warm: list[str], concurrency: int,
           max_tokens: int) -> tuple[float, dict]:
    service = in_process(serve_args)
    engine = service.engine
    try:
        asyncio.run(drive_direct(engine, chat_ids(engine.tokenizer, warm), concurrency, max_tokens))
        prompts = chat_ids(engine.tokenizer, texts)
        before, t = engine.stats()["engine_time"], time.perf_counter()
        rows = asyncio.run(drive_direct(engine, prompts, concurrency, max_tokens))
        wall = time.perf_counter() - t
        spent = delta(before, engine.stats()["engine_time"], wall)
    finally:
        service.shutdown()
        del service, engine
        free_memory()
    assert all(r["status"] == 200 for r in rows), "a direct request failed"
    return sum(r["completion_tokens"] for r in rows) / wall, spent


def delta(before: dict, after: dict, wall: float) -> dict:
    """The engine thread's counters over one timed stream, and its wall time."""
    return dict({k: after[k] - before[k] for k in after}, wall_s=wall)


def http(serve_args: str, texts: list[str], warm: list[str], concurrency: int, max_tokens: int,
         out: str) -> tuple[float, dict]:
    import httpx

    port = speedup_run.free_port()
    proc = speedup_run.start_server(f"--run-dir {os.path.join(out, 'http_run')} {serve_args}", port,
                                    os.path.join(out, "http_server.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(speedup_run.drive(url, warm, concurrency, max_tokens, model))
        before, t = httpx.get(url + "/v1/draft").json()["engine_time"], time.perf_counter()
        rows = asyncio.run(speedup_run.drive(url, texts, concurrency, max_tokens, model))
        wall = time.perf_counter() - t
        spent = delta(before, httpx.get(url + "/v1/draft").json()["engine_time"], wall)
    finally:
        speedup_run.stop_server(proc)
    assert all(r["status"] == 200 for r in rows), "an HTTP request failed"
    return sum(r["completion_tokens"] for r in rows) / wall, spent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--serve-args", default="--draft none", help="aurora serve's arguments, for both parts")
    ap.add_argument("--out", default="/tmp/aurora_front_cost")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    texts, warm = speedup_run.prompt_stream(a.requests), load_prompts("math")[:a.warmup]
    serve = f"--wandb disabled {a.serve_args}"
    parts = [("direct", *direct(serve + f" --run-dir {os.path.join(a.out, 'direct_run')}", texts, warm,
                                a.concurrency, a.max_tokens))]
    print(f"direct: {parts[-1][1]:.1f} tok/s", flush=True)
    parts.append(("http", *http(serve, texts, warm, a.concurrency, a.max_tokens, a.out)))
    print(f"http: {parts[-1][1]:.1f} tok/s", flush=True)
    parts.append(("direct again", *direct(serve + f" --run-dir {os.path.join(a.out, 'direct_run2')}", texts, warm,
                                          a.concurrency, a.max_tokens)))
    print(f"direct again: {parts[-1][1]:.1f} tok/s", flush=True)
    base = (parts[0][1] + parts[2][1]) / 2
    print(f"\nc{a.concurrency}, {a.requests} requests of {a.max_tokens} tokens, aurora serve {a.serve_args}")
    print(f"{'part':14s} {'tok/s':>9s} {'vs direct':>10s} {'wall s':>7s} {'prefill s':>9s} {'calls':>6s} "
          f"{'per call':>8s} {'rounds s':>8s} {'rounds':>6s} {'per round':>9s} {'idle s':>7s} {'other s':>7s}")
    for name, v, t in parts:
        other = t["wall_s"] - t["step_s"] - t["idle_s"]  # the engine thread outside its steps: inbox, delivery
        print(f"{name:14s} {v:9.1f} {v / base:9.2f}x {t['wall_s']:7.2f} {t['prefill_s']:9.2f} "
              f"{t['prefill_calls']:6d} {1e3 * t['prefill_s'] / max(t['prefill_calls'], 1):6.2f}ms "
              f"{t['round_s']:8.2f} {t['rounds']:6d} {1e3 * t['round_s'] / max(t['rounds'], 1):7.3f}ms "
              f"{t['idle_s']:7.2f} {other:7.2f}")
    with open(os.path.join(a.out, "front_cost.json"), "w") as f:
        json.dump({"args": vars(a), "tokens_per_s": {n: v for n, v, _ in parts},
                   "engine_time": {n: t for n, _, t in parts}, "http_vs_direct": parts[1][1] / base}, f, indent=1)


if __name__ == "__main__":
    main()
