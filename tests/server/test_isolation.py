"""One bad request never hurts the others, over real HTTP against the real service (tiny random target, EAGLE3
draft): an out-of-range top_k beside ordinary requests, a fault injected into one request inside the engine, a
failed engine step, and what /health and /metrics say about each."""
import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aurora.engine.engine import FAULT_ENV
from aurora.server.app import create_app
from aurora.server.config import ServeConfig
from aurora.service import Service
from server_fakes import live_server

FAULT_SEED = 424242


@pytest.fixture(scope="module")
def real(tiny_target_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, str(FAULT_SEED))  # read when the engine is built
    cfg = ServeConfig(target=tiny_target_dir, draft="scratch", device="cpu", max_model_len=256, max_batch=8,
                      sample_rate=0.01, run_dir=str(tmp_path_factory.mktemp("run")), wandb="disabled",
                      adaptive_depth=False)  # verify rounds from the first request: their metrics are checked
    service = Service.from_config(cfg)
    mp.undo()
    try:
        with live_server(create_app(service, cfg)) as url:
            yield url, service
    finally:
        service.shutdown()


def body(**kw):
    return {"prompt": "hello world", "max_tokens": 12, "temperature": 0.8, "seed": 1, **kw}


async def _concurrent(url, bad: dict, normal: int = 4):
    """The bad request and `normal` ordinary ones, all in flight together."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as h:
        return await asyncio.gather(h.post("/v1/completions", json=bad),
                                    *(h.post("/v1/completions", json=body(seed=i, top_k=5 + i))
                                      for i in range(normal)))


def counts(url) -> dict:
    fams = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples}


def test_huge_top_k_is_refused_and_its_neighbours_succeed(real):
    url, _ = real
    bad, *others = asyncio.run(_concurrent(url, body(top_k=10**20)))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k", bad.text
    assert [r.status_code for r in others] == [200] * 4, [r.text for r in others]
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in others)


def test_fault_inside_the_engine_fails_only_that_request(real):
    url, service = real
    before = service.engine.health()["request_failures"]
    bad, *others = asyncio.run(_concurrent(url, body(seed=FAULT_SEED)))
    assert bad.status_code == 500 and "fault injected" in bad.json()["error"]["message"], bad.text
    assert [r.status_code for r in others] == [200] * 4, [r.text for r in others]
    h = httpx.get(url + "/health")
    # one request's own work failed; the engine itself served on: healthy, the failure counted
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["engine_error"] is None
    assert h.json()["engine"]["request_failures"] == before + 1
    assert counts(url)[("aurora_requests_total", (("code", "500"), ("route", "/v1/completions")))] >= 1
    # streamed: the fault hits at the prefill, before the response starts, so the stream gets the status too
    with httpx.stream("POST", url + "/v1/completions", json=body(seed=FAULT_SEED, stream=True)) as r:
        text = r.read().decode()
    assert r.status_code == 500 and "fault injected" in text, text


def test_failed_step_makes_health_unhealthy_until_a_step_succeeds(real):
    url, service = real
    runner = service.engine.engine.runner
    real_round = runner.round

    def broken(*a, **kw):
        runner.round = real_round  # fails once
        raise RuntimeError("device lost (test)")

    runner.round = broken
    r = httpx.post(url + "/v1/completions", json=body(), timeout=60)
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    h = httpx.get(url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "unhealthy" and "device lost" in h.json()["engine_error"]
    r = httpx.post(url + "/v1/completions", json=body(), timeout=60)
    assert r.status_code == 200
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["engine_error"] is None
    assert h["engine"]["step_failures"] == 1 and "device lost" in h["engine"]["last_error"]


def test_lone_surrogate_is_a_400_on_a_kept_alive_connection(real):
    url, _ = real
    before = counts(url).get(("aurora_requests_total", (("code", "400"), ("route", "/v1/chat/completions"))), 0)
    with httpx.Client(base_url=url, timeout=60) as h:  # one keep-alive connection for all three
        raw = '{"messages": [{"role": "user", "content": "x\\ud800y"}], "max_tokens": 4}'
        r = h.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
        raw = '{"prompt": "ok", "stop": ["\\udfff"], "max_tokens": 4}'
        r = h.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop"), r.text
        assert h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 4}).status_code == 200
    c = counts(url)
    assert c[("aurora_requests_total", (("code", "400"), ("route", "/v1/chat/completions")))] == before + 1
    assert ("aurora_requests_total", (("code", "disconnected"), ("route", "/v1/chat/completions"))) not in c


def test_latency_metrics_are_recorded(real):
    url, _ = real
    before = counts(url)
    r = httpx.post(url + "/v1/completions", json=body(max_tokens=8, ignore_eos=True), timeout=60)
    assert r.status_code == 200
    c = counts(url)
    grew = lambda name: c[(name, ())] - before.get((name, ()), 0)  # noqa: E731
    prompt = r.json()["usage"]["prompt_tokens"]
    assert grew("aurora_time_to_first_token_seconds_count") == 1
    assert grew("aurora_request_queue_time_seconds_count") == 1
    assert grew("aurora_inter_token_latency_seconds_count") >= 1  # the prefill's token, then >= 1 verify round
    assert grew("aurora_prompt_tokens_total") == prompt
    assert grew("aurora_request_prompt_tokens_sum") == prompt
    assert grew("aurora_request_generation_tokens_sum") == 8
    assert c[("aurora_spec_verify_rounds_total", ())] > 0
