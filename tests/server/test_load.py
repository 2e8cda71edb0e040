"""Load: 32 concurrent clients, 320 requests (a quarter streamed) against the fake engine over real HTTP;
reports p50/p99 latency and tokens/s. Bounded to 60 s. Checks nothing is lost: every request succeeds,
usage adds up, and the server's in-flight count returns to zero."""
import asyncio
import json
import statistics
import time

import httpx

from aurora.server.app import create_app
from server_fakes import live_server, make_service, test_config

CLIENTS, REQUESTS, MAX_TOKENS, CAP_S = 32, 320, 32, 60.0


async def _client(url: str, jobs: asyncio.Queue, latencies: list, tokens: list):
    async with httpx.AsyncClient(timeout=30) as h:
        while not jobs.empty():
            i = jobs.get_nowait()
            body = {"prompt": f"request {i}: the quick brown fox jumps over the lazy dog", "max_tokens": MAX_TOKENS,
                    "temperature": 0, "stream": i % 4 == 0, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            if body["stream"]:
                async with h.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
                usage = json.loads(lines[-1][6:])["usage"]
            else:
                r = await h.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]
            latencies.append(time.perf_counter() - t0)
            tokens.append(usage["completion_tokens"])


def test_load(tokenizer, capsys):
    service = make_service(tokenizer, round_delay=0.002)
    with live_server(create_app(service, test_config())) as url:
        async def run():
            jobs: asyncio.Queue = asyncio.Queue()
            for i in range(REQUESTS):
                jobs.put_nowait(i)
            latencies, tokens = [], []
            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*[_client(url, jobs, latencies, tokens) for _ in range(CLIENTS)]),
                                   CAP_S)
            return latencies, tokens, time.perf_counter() - t0

        latencies, tokens, wall = asyncio.run(run())
        metrics = httpx.get(url + "/metrics").text
    assert len(latencies) == REQUESTS and all(t == MAX_TOKENS for t in tokens)
    assert service.engine.running == 0 and service.engine.finished == REQUESTS
    assert f'aurora_requests_total{{code="200",route="/v1/completions"}} {float(REQUESTS)}' in metrics
    q = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(f"\nload: {REQUESTS} requests, {CLIENTS} clients, {wall:.2f} s wall; latency p50 {q[49] * 1e3:.1f} ms "
              f"p99 {q[98] * 1e3:.1f} ms; {sum(tokens) / wall:.0f} completion tokens/s; "
              f"{REQUESTS / wall:.1f} requests/s (fake engine, CPU)")
