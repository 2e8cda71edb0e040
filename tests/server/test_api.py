"""The OpenAI API over real HTTP with the real `openai` client, against the fake engine."""
import asyncio
import time

import httpx
import openai
import pytest

from aurora.server.app import create_app
from server_fakes import live_server, make_service, test_config

PROMPT = "The quick brown fox jumps over the lazy dog. Stop here, please."


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def echo(tokenizer, text, n):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode([ids[i % len(ids)] for i in range(n)], skip_special_tokens=True)


def test_completion_text_and_usage(server, tokenizer):
    url, service = server
    r = client(url).completions.create(model="aurora-test", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.choices[0].text == echo(tokenizer, PROMPT, 10)
    assert r.choices[0].finish_reason == "length"
    u = r.usage.model_dump()
    n_prompt = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (n_prompt, 10, n_prompt + 10)
    # the prefill's token, then verify rounds of 1, 2, 3 and 3 (cut at max_tokens): 9 tokens in 4 rounds
    assert u["spec_verify_rounds"] == 4 and u["spec_accept_length"] == pytest.approx(9 / 4)


def test_completion_accepts_token_ids_and_target_name(server, tokenizer):
    url, _ = server
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    r = client(url).completions.create(model="smollm2", prompt=ids, max_tokens=4)
    assert r.choices[0].text == echo(tokenizer, "hello world", 4)


def test_token_id_prompts_echo_and_range_with_the_vocabulary_counted_once(server, tokenizer, monkeypatch):
    """Token-id prompts are checked against the vocabulary (added tokens included) and echoed as their text; the
    vocabulary is counted once, not per request (len() of a transformers 5.12 tokenizer rebuilds it each call)."""
    url, service = server
    counted = []
    cls = type(service.engine.tokenizer)
    size = len(service.engine.tokenizer)
    monkeypatch.setattr(cls, "__len__", lambda self: counted.append(1) or size, raising=False)
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    c = client(url)
    for _ in range(3):
        r = c.completions.create(model="aurora-test", prompt=ids, max_tokens=2, echo=True)
        assert r.choices[0].text == tokenizer.decode(ids) + echo(tokenizer, "hello world", 2)
    with pytest.raises(openai.BadRequestError, match=f"vocabulary size {size}"):
        c.completions.create(model="aurora-test", prompt=[1, size], max_tokens=2)
    assert len(counted) <= 1


def test_chat_uses_the_chat_template(server, tokenizer):
    url, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client(url).chat.completions.create(model="aurora-test", messages=messages, max_tokens=12)
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tokenizer.decode(ids[:12], skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"


def test_chat_default_max_tokens_fills_the_context(server):
    url, service = server
    r = client(url).chat.completions.create(model="aurora-test", messages=[{"role": "user", "content": "x"}])
    assert r.usage.total_tokens == service.engine.max_model_len and r.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming(server):
    url, _ = server
    c = client(url)
    full = c.completions.create(model="aurora-test", prompt=PROMPT, max_tokens=14)
    chunks = list(c.completions.create(model="aurora-test", prompt=PROMPT, max_tokens=14, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    assert chunks[-1].usage.model_dump()["spec_verify_rounds"] == full.usage.model_dump()["spec_verify_rounds"]


def test_chat_streaming(server):
    url, _ = server
    c = client(url)
    msgs = [{"role": "user", "content": "Tell me about foxes."}]
    full = c.chat.completions.create(model="aurora-test", messages=msgs, max_tokens=9)
    chunks = list(c.chat.completions.create(model="aurora-test", messages=msgs, max_tokens=9, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[0].object == "chat.completion.chunk"


def test_n_choices(server):
    url, _ = server
    c = client(url)
    r = c.completions.create(model="aurora-test", prompt=PROMPT, max_tokens=5, n=3, seed=7)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    chunks = list(c.completions.create(model="aurora-test", prompt=PROMPT, max_tokens=5, n=3, stream=True))
    texts = {}
    for ch in chunks:
        texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + ch.choices[0].text
    assert texts == {ch.index: ch.text for ch in r.choices}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_cut(server, stream):
    url, _ = server
    kwargs = dict(model="aurora-test", prompt=PROMPT, max_tokens=40, stop=[" lazy", "nowhere"])
    c = client(url)
    if stream:
        chunks = list(c.completions.create(stream=True, **kwargs))
        text, reason = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = c.completions.create(**kwargs)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == "The quick brown fox jumps over the" and reason == "stop"


def test_models_health_draft(server):
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["aurora-test"]
    assert client(url).models.retrieve("aurora-test").id == "aurora-test"
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["trainer"]["state"] == "training"
    d = httpx.get(url + "/v1/draft").json()
    assert d["draft_version"] == 0 and d["trainer"]["requests_since_swap"] == 3


def error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests(server):
    url, _ = server
    c = client(url)
    post = lambda path, **kw: httpx.post(url + path, **kw)
    r = post("/v1/completions", content=b'{"prompt": "hi", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in error(r)["message"]
    r = post("/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400
    r = post("/v1/completions", json={"prompt": "hi", "max_tokens": "ten"})
    assert r.status_code == 400 and error(r)["param"] == "max_tokens"
    r = post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and error(r)["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="aurora-test", prompt="hi", temperature=5.0)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="aurora-test", prompt="hi", n=0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="aurora-test", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="aurora-test", prompt="word " * 400, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="aurora-test", prompt="hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="aurora-test", prompt=[10**9])
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-5", prompt="hi")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-5")
    r = post("/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"
    assert httpx.get(url + "/v1/nowhere").status_code == 404
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_api_key(tokenizer):
    app = create_app(make_service(tokenizer), test_config(api_key="sk-test"))
    with live_server(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(model="aurora-test", prompt="hi")
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert client(url, "sk-test").completions.create(model="aurora-test", prompt="hi", max_tokens=2).choices
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200


def test_admin_routes(server):
    url, service = server
    swap = url + "/v1/draft/swap"
    assert httpx.post(swap).status_code == 401
    assert httpx.post(swap, headers={"Authorization": "Bearer nope"}).status_code == 403
    ok = {"Authorization": "Bearer admin-secret"}
    r = httpx.post(swap, headers=ok)
    assert r.status_code == 200 and r.json()["draft"]["draft_version"] == 1
    assert httpx.post(url + "/v1/draft/save", headers=ok).status_code == 200 and service.trainer.saves == 1
    r = httpx.post(url + "/v1/draft/rollback", headers=ok)
    assert r.status_code == 200 and r.json()["result"] == 0
    r = httpx.post(url + "/v1/draft/rollback", headers=ok)
    assert r.status_code == 409 and "no earlier" in error(r)["message"]


def test_admin_disabled_without_key(tokenizer):
    service = make_service(tokenizer)
    with live_server(create_app(service, test_config())) as url:
        r = httpx.post(url + "/v1/draft/swap", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and error(r)["code"] == "admin_disabled"
        assert service.engine.draft_version == 0


def test_concurrency_limit(tokenizer):
    service = make_service(tokenizer, round_delay=0.05)
    with live_server(create_app(service, test_config(max_concurrent_requests=2))) as url:
        async def go():
            async with httpx.AsyncClient(timeout=30) as h:
                body = {"prompt": PROMPT, "max_tokens": 20}
                return await asyncio.gather(*[h.post(url + "/v1/completions", json=body) for _ in range(6)])

        codes = sorted(r.status_code for r in asyncio.run(go()))
        assert codes.count(200) >= 2 and set(codes) <= {200, 429} and 429 in codes
        # slots are freed: the next request goes through
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("n", [1, 2])
def test_disconnect_aborts_the_stream(tokenizer, n):
    service = make_service(tokenizer, round_delay=0.05)
    with live_server(create_app(service, test_config())) as url:
        body = {"prompt": PROMPT, "max_tokens": 200, "n": n, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
        deadline = time.time() + 5
        while len(service.engine.aborted) < n and time.time() < deadline:
            time.sleep(0.02)
        assert set(service.engine.aborted) == set(service.engine.started) and len(service.engine.started) == n
        assert service.engine.running == 0 or time.time() < deadline


def test_engine_value_error_is_400(tokenizer):
    service = make_service(tokenizer)

    async def refuse(*a, **k):
        raise ValueError("prompt does not fit the KV cache")
        yield  # an async generator, like the engine's

    service.engine.generate = refuse
    with live_server(create_app(service, test_config())) as url:
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "stream": stream})
            assert r.status_code == 400 and "KV cache" in error(r)["message"]


def test_engine_shutting_down_is_503(tokenizer):
    service = make_service(tokenizer)

    async def closed(*a, **k):
        raise RuntimeError("engine is shutting down")
        yield

    service.engine.generate = closed
    with live_server(create_app(service, test_config())) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and error(r)["code"] == "engine_unavailable"
