"""The SGLang backend with tensor parallelism 2 (two GPUs of one host; skipped elsewhere with the reason):
a tiny random Llama (SmolLM2's 9 heads do not divide by 2), capture from rank 0, every swap applied by both
ranks in place, requests served throughout. Run on a 2-GPU machine:
  AURORA_SGLANG_ARGS="--attention-backend triton --sampling-backend pytorch" python -m pytest tests/sglang/test_sglang_tp2.py -s
"""
import asyncio
import importlib.util
import os
import time

import httpx
import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("sglang") is None,
    reason="needs SGLang 0.5.17 and two CUDA GPUs: run tests/sglang/test_sglang_tp2.py on a 2-GPU machine")

from server_fakes import live_server  # noqa: E402 (tests/sglang/conftest.py puts tests/server on the path)
from tests.tiny import make_tiny_target  # noqa: E402

from aurora.server.app import create_app  # noqa: E402
from aurora.server.config import ServeConfig  # noqa: E402
from aurora.service import Service  # noqa: E402

EXTRA = os.environ.get("AURORA_SGLANG_ARGS", "") + (" --cuda-graph-max-bs 16 --cuda-graph-backend-prefill disabled"
                                                    " --mem-fraction-static 0.5")
PROMPTS = [f"def f{i}(x): return x * {i} + {i % 7}" for i in range(16)]


@pytest.mark.parametrize("swap", ["pause", "step"])
def test_tp2_capture_and_swap_on_both_ranks(tmp_path, swap):
    # 8 layers: SGLang's default aux layers [2, L//2, L-3] must be distinct (it captures each layer once)
    target = make_tiny_target(str(tmp_path / f"tiny-{swap}"), hidden=256, layers=8)
    cfg = ServeConfig(target=target, draft="scratch", engine="sglang", tp_size=2, sync_every=20, lr=1e-3,
                      max_batch=16, max_model_len=256, run_dir=str(tmp_path / "run"), wandb="disabled",
                      trainer_device="cuda:1", sglang_args=EXTRA, sglang_swap=swap)
    service = Service.from_config(cfg)
    service.trainer.config.min_samples_before_train = 4
    failures = []

    async def client(h, jobs):
        while not jobs.empty():
            p = PROMPTS[jobs.get_nowait() % len(PROMPTS)]
            r = await h.post("/v1/completions", json={"model": service.engine.model_name, "prompt": p,
                                                      "max_tokens": 32, "temperature": 0, "ignore_eos": True})
            if r.status_code != 200:
                failures.append(r.text)

    async def run(n):
        jobs = asyncio.Queue()
        for i in range(n):
            jobs.put_nowait(i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as h:
            await asyncio.gather(*(client(h, jobs) for _ in range(8)))

    try:
        with live_server(create_app(service, cfg)) as url:
            t0 = time.time()
            while service.engine.swaps < 4 and time.time() - t0 < 180:
                asyncio.run(run(80))
    finally:
        service.shutdown()  # waits for a swap in flight, so the counts below are final
    st = service.engine.stats_.snapshot()  # SGLang has exited: the engine's own counters
    st.update(swaps=service.engine.swaps, swap_failures=service.engine.swap_failures,
              capture=dict(service.engine.collector.counts))
    acks = None if swap == "pause" else service.engine._publisher.ctl[1:3].tolist()
    log = open(tmp_path / "run" / "sglang.log").read()
    per_rank = [log.count(f"[aurora] tp rank {r}: draft updated in place") for r in (0, 1)]
    print(f"\ntp 2, {swap} swaps: {st['swaps']} ({list(service.engine.swap_ms)} ms), loader lines per rank {per_rank}, "
          f"step acks per rank {acks}, capture {st['capture']}, accept length by version "
          f"{st['accept_length_by_version']}")
    assert not failures and st["swaps"] >= 4 and st["swap_failures"] == 0
    if swap == "pause":
        assert per_rank[0] == per_rank[1] == st["swaps"]  # every swap reached both ranks' drafts
    else:
        assert acks == [st["swaps"], st["swaps"]]  # both ranks applied every published version
    assert st["capture"]["samples"] > 0 and service.trainer.steps > 0
