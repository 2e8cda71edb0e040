"""What the first users of a freshly started `aurora serve` see: its start time, then one burst of concurrent chat
requests sent the moment /health answers (their latencies), then one chat request without max_tokens (the
server then fills the context: it must still be answered).

  python scripts/first_requests.py --clients 64 --out results/soak/run \
      --serve-args "--engine sglang --draft scratch --sglang-args='--attention-backend triton --sampling-backend pytorch'"

On a machine whose kernel caches are cold this is where first-use compiles show. Writes <out>/first_requests.json
and <out>/server.log; exit status 1 when a request did not get a 200.
"""
import argparse
import asyncio
import json
import os
import shlex
import sys
import time

import httpx


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: tell me about the history of rivers and " * (1 + i % 40)}]


async def burst(url: str, clients: int) -> tuple[list[dict], dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one(i):
            t = time.perf_counter()
            r = await c.post("/v1/chat/completions", json={"messages": messages(i), "max_tokens": 16 + i % 17,
                                                           "temperature": 0})
            return {"status": r.status_code, "seconds": round(time.perf_counter() - t, 3)}

        rows = await asyncio.gather(*[one(i) for i in range(clients)])
        t = time.perf_counter()
        r = await c.post("/v1/chat/completions", json={"messages": messages(1), "temperature": 0})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
        unbounded = {"status": r.status_code, "seconds": round(time.perf_counter() - t, 3),
                     "completion_tokens": (body.get("usage") or {}).get("completion_tokens"),
                     "error": body.get("error")}
    return rows, unbounded


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve-args", default="", help="extra `aurora serve` flags (the shipped defaults otherwise)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--out", default="results/soak/first_requests")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from speedup_run import free_port, start_server, stop_server  # scripts/ is on the path of a script run from it

    port, t0 = free_port(), time.perf_counter()
    proc = start_server(f"--run-dir {shlex.quote(os.path.join(a.out, 'run'))} {a.serve_args}", port,
                        os.path.join(a.out, "server.log"))
    ready_s = time.perf_counter() - t0
    try:
        rows, unbounded = asyncio.run(burst(f"http://127.0.0.1:{port}", a.clients))
    finally:
        stop_server(proc)
    seconds = sorted(r["seconds"] for r in rows)
    summary = {"args": vars(a), "ready_s": round(ready_s, 1), "statuses": sorted({r["status"] for r in rows}),
               "burst_median_s": seconds[len(seconds) // 2], "burst_max_s": seconds[-1],
               "without_max_tokens": unbounded, "burst": rows}
    with open(os.path.join(a.out, "first_requests.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "burst"}, indent=1))
    sys.exit(0 if summary["statuses"] == [200] and unbounded["status"] == 200 else 1)


if __name__ == "__main__":
    main()
