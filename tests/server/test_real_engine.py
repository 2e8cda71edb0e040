"""The HTTP API over the real `aurora.service.Service` with the embedded SmolLM2 on CPU: greedy text must equal
plain Hugging Face greedy decoding in fp32, both target-only and with an (untrained) EAGLE3 draft, since
verification is lossless. Also: streaming, errors, metrics, draft admin, and `aurora serve` shutting down
gracefully on SIGTERM with a stream in flight."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

os.environ["WANDB_MODE"] = "disabled"

import httpx
import openai
import pytest
import torch

pytest.importorskip("aurora.service", reason="engine not yet available")
from aurora.models.hub import resolve  # noqa: E402
from aurora.server.app import create_app  # noqa: E402
from aurora.server.config import ServeConfig  # noqa: E402
from aurora.service import Service  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_fakes import live_server  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three primary colors are"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def hf_greedy(hf, ids: list[int]) -> str:
    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def config(tmp, draft, **kw) -> ServeConfig:
    # the full draft vocabulary: a pruned one (the CPU's default) would start training only after its warm-up
    return ServeConfig(target="smollm2", draft=draft, device="cpu", max_model_len=512, max_batch=4,
                       run_dir=str(tmp), wandb="disabled", draft_vocab_size=0, **kw)


@pytest.fixture(scope="module", params=[None, "scratch"], ids=["target-only", "eagle3-draft"])
def real(request, tmp_path_factory):
    # a fixed depth: these tests are about the speculative path over HTTP (a day-0 head would decode plainly)
    cfg = config(tmp_path_factory.mktemp("run"), request.param, admin_key="admin", adaptive_depth=False)
    service = Service.from_config(cfg)
    try:
        with live_server(create_app(service, cfg)) as url:
            yield url, service, cfg
    finally:
        service.shutdown()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_greedy_matches_huggingface(real, hf):
    url, service, cfg = real
    tok = hf[1]
    c = client(url)
    chat_ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    r = c.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, max_tokens=NEW_TOKENS,
                                  temperature=0)
    assert r.choices[0].message.content == hf_greedy(hf, chat_ids)
    assert r.usage.prompt_tokens == len(chat_ids)
    r = c.completions.create(model=service.engine.model_name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert r.choices[0].text == hf_greedy(hf, tok(PROMPT, add_special_tokens=False)["input_ids"])
    usage = r.usage.model_dump()
    if cfg.draft is None:
        assert usage["spec_verify_rounds"] == 0 and usage["spec_accept_length"] == 0
    else:
        assert 0 < usage["spec_verify_rounds"] <= usage["completion_tokens"]
        # SGLang's definition: every completion token but the prefill's came from a verify round
        verified = usage["completion_tokens"] - 1
        assert usage["spec_accept_length"] == pytest.approx(verified / usage["spec_verify_rounds"])


def test_streaming_matches_non_streaming(real):
    url, service, _ = real
    c = client(url)
    full = c.completions.create(model=service.engine.model_name, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(c.completions.create(model=service.engine.model_name, prompt=PROMPT, max_tokens=16,
                                       temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sampling_n_and_seed(real):
    url, service, _ = real
    kw = dict(model=service.engine.model_name, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3, n=2)
    a, b = client(url).completions.create(**kw), client(url).completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2


def test_errors(real):
    url, service, _ = real
    c = client(url)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=service.engine.model_name, prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="not-a-model", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, top_p=0)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_metrics_and_draft(real):
    url, service, cfg = real
    names = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    assert {"aurora_accept_length", "aurora_draft_version", "aurora_requests", "aurora_generation_tokens",
            "aurora_request_latency_seconds"} <= names
    d = httpx.get(url + "/v1/draft").json()
    assert "draft_version" in d
    # the engine thread's time, in /v1/draft and as counters: a request is prefilled, then decoded
    r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    t = httpx.get(url + "/v1/draft").json()["engine_time"]
    assert t["prefilled"] >= 1 and t["prefill_calls"] >= 1 and t["rounds"] >= 1 and t["prefill_s"] > 0
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples}
    assert samples[("aurora_engine_time_seconds_total", ("prefill",))] >= t["prefill_s"] > 0
    assert samples[("aurora_engine_time_seconds_total", ("round",))] >= t["round_s"] > 0
    assert samples[("aurora_engine_prefill_calls_total", ())] >= t["prefill_calls"]
    if cfg.draft is not None:
        assert "aurora_train_loss" in names
        # capture is decided when a request arrives; the request above was marked (a trainer reads every sample)
        assert httpx.get(url + "/v1/draft").json()["capture"]["admitted"] >= 1
        assert samples[("aurora_capture_admitted_total", ())] >= 1
        r = httpx.post(url + "/v1/draft/save", headers={"Authorization": "Bearer admin"}, timeout=120)
        assert r.status_code == 200, r.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_sigterm_is_graceful(tmp_path):
    """`aurora serve`, a stream in flight, SIGTERM: the stream completes, the process exits 0."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aurora.cli", "serve", "--draft", "none", "--device", "cpu",
                             "--port", str(port), "--run-dir", str(tmp_path), "--wandb", "disabled",
                             "--max-model-len", "512"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert json.loads(first[6:])["choices"] and rest[-1] == "data: [DONE]"
        assert proc.wait(120) == 0
        assert os.path.exists(tmp_path / "metrics.jsonl") and os.path.exists(tmp_path / "config.yaml")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_request_that_opts_out_of_capture_leaves_no_sample(real):
    url, service, cfg = real
    if cfg.draft is None:
        pytest.skip("target-only serving captures nothing: there is no trainer")

    def captured():
        return httpx.get(url + "/v1/draft").json()["trainer"]["samples_captured"]

    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    before = captured()
    for capture in (False, True):  # the opted-out request first: the second's sample proves the first had time
        r = httpx.post(url + "/v1/completions", json=dict(body, capture=capture), timeout=120)
        assert r.status_code == 200, r.text
    deadline = time.time() + 60
    while captured() < before + 1 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert captured() == before + 1
    r = httpx.post(url + "/v1/completions", json=dict(body, capture="no"), timeout=60)
    assert r.status_code == 400 and "capture" in r.text
