"""Load with the real service (tiny random target, day-0 draft, trainer on): 32 concurrent HTTP clients,
a hot swap every 10 finished requests, zero failed requests, and every greedy completion identical to
target-only decoding whichever draft version served it. Reports p50/p99 latency and tokens/s."""
import asyncio
import statistics
import time

import httpx

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.server.app import create_app
from aurora.server.config import ServeConfig
from aurora.service import Service
from server_fakes import live_server

CLIENTS, REQUESTS, MAX_TOKENS = 32, 192, 24
PROMPTS = [f"def f{i}(x): return x * {i} + {i % 7}" for i in range(16)]


def test_load_with_swaps(tiny_target_dir, tmp_path, capsys):
    ref_engine = LLMEngine(tiny_target_dir, None, EngineConfig(max_batch=16, max_model_len=256))
    seqs = [ref_engine.add_request(ref_engine.tokenizer(p)["input_ids"],
                                   SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
            for p in PROMPTS]
    while ref_engine.has_work():
        ref_engine.step()
    expected = {p: ref_engine.tokenizer.decode(s.output_ids) for p, s in zip(PROMPTS, seqs)}

    cfg = ServeConfig(target=tiny_target_dir, draft="scratch", sync_every=10, max_batch=32, max_model_len=256,
                      lr=1e-3, device="cpu", run_dir=str(tmp_path), wandb="disabled",
                      trainer_duty=1.0)  # swaps under load are tested here, not the trainer's share
    service = Service.from_config(cfg)
    service.trainer.config.min_samples_before_train = 4
    latencies, tokens, wrong, errors = [], [], [], []

    async def client(url, jobs):
        async with httpx.AsyncClient(timeout=60) as h:
            while not jobs.empty():
                i = jobs.get_nowait()
                prompt = PROMPTS[i % len(PROMPTS)]
                t0 = time.perf_counter()
                r = await h.post(url + "/v1/completions", json={"model": service.engine.model_name, "prompt": prompt,
                                                                "max_tokens": MAX_TOKENS, "temperature": 0,
                                                                "ignore_eos": True})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                latencies.append(time.perf_counter() - t0)
                body = r.json()
                tokens.append(body["usage"]["completion_tokens"])
                if body["choices"][0]["text"] != expected[prompt]:
                    wrong.append((prompt, body["choices"][0]["text"]))

    try:
        with live_server(create_app(service, cfg)) as url:
            async def run():
                jobs = asyncio.Queue()
                for i in range(REQUESTS):
                    jobs.put_nowait(i)
                await asyncio.wait_for(asyncio.gather(*(client(url, jobs) for _ in range(CLIENTS))), 240)

            t0 = time.perf_counter()
            asyncio.run(run())
            wall = time.perf_counter() - t0
            status = service.draft_status()
    finally:
        service.shutdown()
    assert not errors, errors[:2]
    assert not wrong, wrong[:2]
    assert len(latencies) == REQUESTS
    assert status["trainer"]["swaps"] >= 3, status["trainer"]
    latencies.sort()
    with capsys.disabled():
        print(f"\nload (real engine, tiny target, CPU): {REQUESTS} requests, {CLIENTS} clients, {wall:.1f} s, "
              f"{status['trainer']['swaps']} swaps; p50 {statistics.median(latencies) * 1e3:.0f} ms "
              f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1e3:.0f} ms; {sum(tokens) / wall:.0f} tok/s")
