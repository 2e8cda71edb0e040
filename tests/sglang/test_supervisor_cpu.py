"""The SGLang supervisor against a real child process (fake_sglang_server.py): SIGKILL mid-request and a hang
(SIGSTOP) each fail every in-flight request with 503 within a bounded time, /health says so while SGLang
restarts, SGLang comes back with the current draft, later requests succeed, restarts are counted in /metrics."""
import asyncio
import json
import os
import signal
import sys
import threading
import time

import httpx
import openai
import pytest

from aurora.engine.sequence import SamplingParams
from aurora.server.app import create_app
from aurora.sglang_engine.engine import SGLangEngine, SGLangUnavailable, request_body
from aurora.sglang_engine.launch import SGLangServer, free_port, warm_up_prompts
from server_fakes import live_server, test_config

FAKE = os.path.join(os.path.dirname(__file__), "fake_sglang_server.py")


class Service:
    def __init__(self, engine):
        self.engine, self.trainer = engine, None

    def draft_status(self):
        return {**self.engine.stats(), "trainer": None}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from aurora.models.hub import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2"))


def wait_for(cond, timeout, what):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.02)


def run_requests(engine, n, max_tokens):
    """n concurrent generate() calls on a loop of their own; -> list of (outputs, exception, seconds)."""
    async def one():
        outs, t0 = [], time.monotonic()
        try:
            async for o in engine.generate([1, 2, 3], SamplingParams(max_tokens=max_tokens)):
                outs.append(o)
            return outs, None, time.monotonic() - t0
        except Exception as e:
            return outs, e, time.monotonic() - t0

    async def main():
        return await asyncio.gather(*[one() for _ in range(n)])
    results = []
    thread = threading.Thread(target=lambda: results.extend(asyncio.run(main())))
    thread.start()
    return thread, results


def test_kill_and_hang_restart(tmp_path, tokenizer):
    record = tmp_path / "argv.jsonl"
    # each start takes 2 s, so the restart window outlasts /health's first poll on a loaded CI machine
    env = dict(os.environ, FAKE_SGLANG_RECORD=str(record), FAKE_SGLANG_DELAY="0.05", FAKE_SGLANG_START_DELAY="2")
    port = free_port()
    server = SGLangServer([sys.executable, FAKE, "--port", str(port), "--speculative-draft-model-path", "/start"],
                          env, str(tmp_path / "sglang.log"), port)
    server.wait_ready(60)
    engine = SGLangEngine(server, tokenizer, "aurora-test", max_model_len=256, lookahead=4, speculative=False)
    versions = iter([7, 9])
    engine.supervise(poll_s=0.1, hang_s=1.5, max_restarts=2,
                     draft_for_restart=lambda: (str(tmp_path / "draft-v"), next(versions)))
    try:
        with live_server(create_app(Service(engine), test_config())) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            assert client.completions.create(model="aurora-test", prompt="hi", max_tokens=4).usage.completion_tokens == 4
            assert httpx.get(url + "/health").json()["status"] == "ok"

            # 1. SIGKILL of the server mid-request: every request in flight ends with a clear error, at once
            thread, results = run_requests(engine, 3, 100)  # 5 s each if nothing happened
            wait_for(lambda: engine.stats()["generated_tokens"] >= 6, 10, "tokens streaming")
            http_result = {}

            def over_http():  # one more through the HTTP front: a 503, not a hang
                try:
                    client.completions.create(model="aurora-test", prompt="hello", max_tokens=100)
                except openai.APIStatusError as e:
                    http_result["status"], http_result["body"] = e.status_code, e.body
            h = threading.Thread(target=over_http)
            h.start()
            wait_for(lambda: engine.running_requests() == 4, 10, "4 in flight")
            killed = time.monotonic()
            os.kill(server.proc.pid, signal.SIGKILL)
            health = []
            wait_for(lambda: health.append(httpx.get(url + "/health")) or health[-1].status_code == 503, 5,
                     "/health 503 while restarting")
            assert "restarting" in health[-1].json()["reason"] and health[-1].json()["status"] == "unavailable"
            thread.join(10)
            h.join(10)
            assert time.monotonic() - killed < 5
            assert len(results) == 3 and all(isinstance(e, SGLangUnavailable) for _, e, _ in results), results
            assert all(outs for outs, _, _ in results)  # they had streamed tokens before the kill
            assert http_result["status"] == 503 and "engine unavailable" in json.dumps(http_result["body"])
            # /health can say "restarting" from the dead process before the supervisor has noticed it
            wait_for(lambda: engine.restarts == 1 and engine.state == "ok", 30, "restarted")
            assert engine.restarts == 1 and engine.draft_version == 7
            argv = [json.loads(line) for line in record.read_text().splitlines()]
            assert len(argv) == 2 and argv[1][argv[1].index("--speculative-draft-model-path") + 1].endswith("draft-v")
            out = client.completions.create(model="aurora-test", prompt="hi again", max_tokens=5)
            assert out.usage.completion_tokens == 5  # later requests succeed

            # 2. a hang (the process stops answering, stays alive): the same, after hang_s without progress
            thread, results = run_requests(engine, 2, 100)
            wait_for(lambda: engine.stats()["generated_tokens"] >= 20, 10, "tokens streaming")
            stopped = time.monotonic()
            os.kill(server.proc.pid, signal.SIGSTOP)
            thread.join(15)
            assert all(isinstance(e, SGLangUnavailable) and "hung" in str(e) for _, e, _ in results), results
            # hang_s counts from the last token, which came up to a poll before the stop
            assert 1.0 <= time.monotonic() - stopped < 6
            wait_for(lambda: engine.state == "ok" and engine.restarts == 2, 30, "restarted after the hang")
            assert engine.draft_version == 9
            assert client.completions.create(model="aurora-test", prompt="x", max_tokens=3).usage.completion_tokens == 3
            metrics = httpx.get(url + "/metrics").text
            assert "aurora_engine_restarts_total 2.0" in metrics
            assert 'aurora_engine_state{state="ok"} 1.0' in metrics
            assert "aurora_engine_requests_failed_by_fault_total 6.0" in metrics  # 3 + 1 over HTTP + 2
    finally:
        engine.shutdown(drain=False, timeout=5)
    assert not server.alive()


def test_a_short_lived_descendant_is_no_crash(tmp_path):
    """SGLang's processes come and go below the server while it serves: only its named
    long-lived processes count. On an H200 a recursive watch restarted a healthy SGLang mid-traffic."""
    env = dict(os.environ, FAKE_SGLANG_RECORD=str(tmp_path / "argv.jsonl"), FAKE_SGLANG_CHILDREN="1")
    port = free_port()
    server = SGLangServer([sys.executable, FAKE, "--port", str(port)], env, str(tmp_path / "sglang.log"), port)
    try:
        server.wait_ready(60)
        assert [c.cmdline()[0] for c in server.children] == ["sglang::scheduler_TP0"]
        time.sleep(2.5)  # the unnamed child has exited by now
        assert server.dead_child() is None
        scheduler = server.children[0].pid
        os.kill(scheduler, signal.SIGKILL)
        wait_for(lambda: server.dead_child() is not None, 5, "the scheduler's death seen")
        assert str(scheduler) in server.dead_child()
    finally:
        server.stop(timeout_s=5)


def test_restart_gives_up_after_max_restarts(tmp_path):
    record = tmp_path / "argv.jsonl"
    env = dict(os.environ, FAKE_SGLANG_RECORD=str(record))
    port = free_port()
    server = SGLangServer([sys.executable, FAKE, "--port", str(port)], env, str(tmp_path / "sglang.log"), port)
    server.wait_ready(60)
    engine = SGLangEngine(server, None, "m", max_model_len=256, lookahead=4, speculative=False)

    def broken_draft():
        raise FileNotFoundError("no draft on disk")
    engine.supervise(poll_s=0.1, max_restarts=2, draft_for_restart=broken_draft)
    try:
        os.kill(server.proc.pid, signal.SIGKILL)
        wait_for(lambda: engine.state == "failed", 20, "failed")
        assert "2 restart attempts failed" in engine.stats()["engine_fault"]
        with pytest.raises(SGLangUnavailable, match="SGLang is failed"):
            asyncio.run(anext(engine.generate([1], SamplingParams(max_tokens=2))))
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_warm_up_fills_a_batch_before_ready_and_after_a_restart(tmp_path):
    """SGLang counts as ready only once one wave of `concurrency` mixed-length requests and one at the context
    limit has been answered, token ids inside the vocabulary; a restart warms up again; a failed warm-up request
    fails the start, with SGLang's log."""
    log_path = tmp_path / "generate.jsonl"
    env = dict(os.environ, FAKE_SGLANG_RECORD=str(tmp_path / "argv.jsonl"), FAKE_SGLANG_DELAY="0.2",
               FAKE_SGLANG_GENERATE_LOG=str(log_path))
    port = free_port()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    warm = [request_body(ids, params, f"n-warmup-{i}")
            for i, ids in enumerate(warm_up_prompts(300, concurrency=6, vocab_size=100, new_tokens=3))]
    server = SGLangServer([sys.executable, FAKE, "--port", str(port)], env, str(tmp_path / "sglang.log"), port, warm)
    try:
        server.wait_ready(60)
        seen = [json.loads(line) for line in open(log_path)]
        assert len(seen) == 7 and {r["rid"] for r in seen} == {f"n-warmup-{i}" for i in range(7)}
        assert all(r["max_new_tokens"] == 3 and 0 <= r["max_id"] < 100 for r in seen)
        lengths = sorted(r["prompt_len"] for r in seen)
        assert lengths[-1] == 297 and lengths[0] >= 1 and len(set(lengths)) >= 3  # the limit, and a spread
        assert max(r["in_flight"] for r in seen) >= 3  # sent as one wave, not one by one
        server.restart()
        server.wait_ready(60)
        assert sum(1 for _ in open(log_path)) == 14
    finally:
        server.stop()

    env["FAKE_SGLANG_FAIL_RIDS"] = "n-warmup-3"
    port = free_port()
    server = SGLangServer([sys.executable, FAKE, "--port", str(port)], env, str(tmp_path / "sglang2.log"), port, warm)
    try:
        with pytest.raises(RuntimeError, match="warm-up"):
            server.wait_ready(60)
    finally:
        server.stop()
