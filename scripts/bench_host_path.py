"""Ceiling of the host path: Aurora's HTTP server over the real AsyncEngine and LLMEngine, with the device
work (prefill and the decoding round) stubbed out, so tokens/s measures only what runs in Python around the
model: the engine step, the engine-thread -> event-loop bridge, FastAPI, detokenization.

  python scripts/bench_host_path.py --concurrency 1 16 32 --requests 128 --max-tokens 128
  python scripts/bench_host_path.py --engine-only --concurrency 1 16 32   # LLMEngine.step() alone, no HTTP
  python scripts/bench_host_path.py --engine-only --draft scratch --max-tokens 128 --concurrency 16  # Aurora's share
  python scripts/bench_host_path.py --direct --device-ms 1.5 --concurrency 16  # AsyncEngine in-process, no HTTP
  python scripts/bench_host_path.py --device-ms 1.5 --switch-interval-ms 5 0.5 --concurrency 16

The server runs in a child process and the clients in this one (they would otherwise share its GIL).
`--device-ms T`: the stubbed round takes T ms in a GIL-free wait (time.sleep), as the engine thread's wait for
the GPU does, so the event loop and the engine thread contend for the GIL the way they do on a GPU host.
`--switch-interval-ms`: the server process's sys.setswitchinterval, one server per value (Python's default
is 5 ms: how long one thread may keep the GIL while another waits for it).
`--draft scratch`: the service with a day-0 draft (capture on, every round plain, as at day 0; the trainer
stopped, so that only the host path is compared); with `--engine-only`, its host work per step against
target-only's. Requests of `--max-tokens` finish and are replaced,
so finishing (row moves, samples) is counted; a finished request's state copy is stubbed too, since on a GPU it is
one launch while on this CPU it is a memory copy.
"""
import argparse
import asyncio
import multiprocessing as mp
import time

import httpx


def stubbed_service(target: str, max_batch: int, device_ms: float = 0.0, draft: str | None = None):
    """The service on the CPU (target-only, or with a day-0 `draft` whose rounds are all plain), its model
    runner's prefill and round answering at once."""
    import torch

    from aurora.server.config import ServeConfig
    from aurora.service import Service

    cfg = ServeConfig(target=target, draft=draft, max_batch=max_batch, device="cpu", wandb="disabled",
                      run_dir=f"/tmp/aurora_bench_host_path_{draft}", max_model_len=1024,
                      draft_vocab_size=0)  # a trainer made at once (a pruned head's waits for requests), then stopped
    service = Service.from_config(cfg)
    if service.trainer is not None:  # the host path alone: samples are captured and handed over, not trained on
        service.trainer.stop()
    runner = service.engine.engine.runner
    k = runner.k
    tokens = torch.randint(100, 20000, (max_batch, k + 1))  # what a round would have returned
    none, props = torch.zeros(max_batch, dtype=torch.long), tokens[:, :k]

    def round_(B, *a, depth=None, **kw):
        if device_ms:
            time.sleep(device_ms / 1e3)  # the GPU's share of a step; the engine thread holds no GIL meanwhile
        if runner.lazy_draft:  # a plain round leaves the draft one more position behind (as ModelRunner.round)
            for r in range(B):
                runner.lag[r] += 1
        return tokens[:B, :1], none[:B], props[:B, :0]

    runner.round = round_
    runner.prefill = lambda row0, prompts, *a, **k: [7] * len(prompts)
    if runner.capture:  # on a GPU one launch each; here it would be a memory copy
        aux, hid = runner.aux_store[0], runner.hid_store[0]
        runner.read_capture = lambda row, n, on_device=False: (aux[:n], hid[:n])
    return service, cfg


def engine_steps(target: str, batches: list[int], draft: str | None, max_tokens: int, steps: int = 1000) -> None:
    """Microseconds of Python per LLMEngine.step() with `batch` running sequences, each replaced by a new one when
    it finishes (`max_tokens` each; prompts of 40-59 tokens)."""
    from aurora.engine.sequence import SamplingParams

    service, _ = stubbed_service(target, max(batches), draft=draft)
    service.engine.shutdown()  # drive the engine directly, without its thread
    engine = service.engine.engine
    samples = []
    engine.on_sample = samples.append
    added = 0

    def add():
        nonlocal added
        added += 1
        return engine.add_request(list(range(5, 45 + added % 20)),
                                  SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    print(f"{'batch':>5} {'us per step':>12} {'finished':>9}   (draft {draft}, {max_tokens} tokens per request)")
    for B in batches:
        live = {s.request_id for s in (add() for _ in range(B))}
        for _ in range(B):  # stagger the finishes: one new request per step from here on
            engine.step()
        done = 0
        t = time.perf_counter()
        for _ in range(steps):
            for o in engine.step():
                if o.finished:
                    live.discard(o.request_id)
                    live.add(add().request_id)
                    done += 1
        print(f"{B:>5} {(time.perf_counter() - t) / steps * 1e6:>12.0f} {done:>9}", flush=True)
        for rid in live:
            engine.abort(rid)
        while engine.has_work():
            engine.step()


def serve(target: str, max_batch: int, port_q, device_ms: float, switch_ms: float | None,
          draft: str | None = None) -> None:
    import sys

    from aurora.server.app import create_app, serve_in_thread

    if switch_ms is not None:
        sys.setswitchinterval(switch_ms / 1e3)
    service, cfg = stubbed_service(target, max_batch, device_ms, draft)
    with serve_in_thread(create_app(service, cfg)) as url:
        port_q.put(url)
        while True:
            time.sleep(3600)


async def clients(url: str, conc: int, n: int, max_tokens: int, stream: bool) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        model = (await h.get("/v1/models")).json()["data"][0]["id"]
        jobs, done = iter(range(n)), []

        async def worker():
            for i in jobs:
                body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a story (#{i})"}],
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
                if stream:
                    async with h.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for _ in r.aiter_lines():
                            pass
                    done.append(max_tokens)
                else:
                    done.append((await h.post("/v1/chat/completions", json=body)).json()["usage"]["completion_tokens"])

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return sum(done) / (time.perf_counter() - t)


def direct(target: str, concurrencies: list[int], n: int, max_tokens: int, device_ms: float) -> None:
    """The same stubbed service without HTTP: clients in this process call its AsyncEngine.generate (token ids in
    and out, no JSON, no text; front_cost.py's direct clients); the ceiling the HTTP rows are measured against."""
    from front_cost import drive_direct  # scripts/ is on the path of a script run from it

    from aurora.prompts import chat_ids

    service, _ = stubbed_service(target, max(concurrencies), device_ms)
    try:
        print(f"{'concurrency':>11} {'mode':>10} {'tok/s':>10}   (device {device_ms} ms per round, no HTTP)")
        for c in concurrencies:
            count = n if c > 1 else max(8, n // 8)
            prompts = chat_ids(service.engine.tokenizer, [f"Tell me a story (#{i})" for i in range(count)])
            t = time.perf_counter()
            rows = asyncio.run(drive_direct(service.engine, prompts, c, max_tokens))
            tps = sum(r["completion_tokens"] for r in rows) / (time.perf_counter() - t)
            print(f"{c:>11} {'direct':>10} {tps:>10.0f}", flush=True)
    finally:
        service.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engine-only", action="store_true", help="time LLMEngine.step() in this process, no HTTP")
    ap.add_argument("--draft", default=None, help="scratch: a day-0 draft (capture on, every round plain, its "
                    "trainer stopped)")
    ap.add_argument("--direct", action="store_true",
                    help="the stubbed service's AsyncEngine driven by clients in this process, no HTTP")
    ap.add_argument("--device-ms", type=float, default=0.0, help="GIL-free wait per stubbed round (the GPU's time)")
    ap.add_argument("--switch-interval-ms", type=float, nargs="+", default=[None],
                    help="the server's sys.setswitchinterval in ms; one server per value (default: Python's)")
    a = ap.parse_args()
    if a.engine_only:
        return engine_steps(a.target, a.concurrency, a.draft, a.max_tokens)
    if a.direct:
        return direct(a.target, a.concurrency, a.requests, a.max_tokens, a.device_ms)
    print(f"{'switch ms':>9} {'concurrency':>11} {'mode':>10} {'tok/s':>10}   (device {a.device_ms} ms per round)")
    for switch in a.switch_interval_ms:
        q = mp.get_context("spawn").Queue()
        server = mp.get_context("spawn").Process(target=serve, daemon=True,
                                                 args=(a.target, max(a.concurrency), q, a.device_ms, switch,
                                                       a.draft))
        server.start()
        url = q.get(timeout=300)
        try:
            for c in a.concurrency:
                for stream in (False, True):
                    n = a.requests if c > 1 else max(8, a.requests // 8)
                    tps = asyncio.run(clients(url, c, n, a.max_tokens, stream))
                    print(f"{switch if switch is not None else 'default':>9} {c:>11} "
                          f"{'stream' if stream else 'no-stream':>10} {tps:>10.0f}", flush=True)
        finally:
            server.terminate()
            server.join()


if __name__ == "__main__":
    main()
