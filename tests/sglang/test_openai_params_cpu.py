"""OpenAI parameters through the SGLang engine, on the CPU: the real `openai` client -> Aurora's HTTP API ->
SGLangEngine -> a stand-in for SGLang's /generate. Log-probabilities, penalties, logit_bias and
response_format must reach SGLang's request as its own fields (return_logprob / top_logprobs_num,
sampling_params presence_penalty / frequency_penalty / logit_bias / json_schema), and SGLang's logprobs must
come back in OpenAI's two shapes, streamed or not. The stand-in's "model" is a fixed distribution per
position, so every expected number is computed here from its definition. What SGLang itself computes
(logprobs against the target's log-softmax, grammar-constrained JSON) is checked on the GPU
(test_sglang_backend.py)."""
import json

import openai
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from aurora.server.app import create_app
from aurora.sglang_engine.engine import SGLangEngine
from server_fakes import FakeService, live_server, test_config

PLAIN = "Hello there, my friend."
JSON_TEXT = '{"name": "Ada", "age": 36}'
OTHERS = [100, 200, 300, 400, 500]  # the alternatives the stand-in's distribution ranks at every position


def distribution(position: int, chosen: int) -> list[tuple[int, float]]:
    """The stand-in model's log-probabilities at `position`, most likely first: `chosen` (the token it emits)
    and OTHERS, from seeded logits."""
    logits = torch.randn(len(OTHERS) + 1, generator=torch.Generator().manual_seed(position)).sort(descending=True).values
    logp = torch.log_softmax(logits.double(), 0).tolist()
    return list(zip([chosen] + OTHERS, logp))


def fake_sglang(tokenizer, calls: list):
    app = FastAPI()

    @app.post("/generate")
    async def generate(req: Request):
        body = await req.json()
        calls.append(body)
        sp = body["sampling_params"]
        text = JSON_TEXT if "json_schema" in sp else PLAIN  # a grammar-following model, as SGLang's would be
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:sp["max_new_tokens"]]
        top_n = body.get("top_logprobs_num", 0)
        interval = sp.get("stream_interval") or 1
        body["chunks_sent"] = 0

        async def stream():
            for end in range(2, len(ids) + 2, 2):  # two tokens per verify round, cumulative as SGLang streams
                out = ids[:end]
                done = len(out) == len(ids)
                if not done and interval > 1 and len(out) % interval != 1:  # SGLang's rule (output_streamer.py)
                    continue
                body["chunks_sent"] += 1
                meta = {"spec_verify_ct": end // 2, "finish_reason": {"type": "stop"} if done else None}
                if body.get("return_logprob"):
                    dists = [distribution(j, t) for j, t in enumerate(out)]
                    meta["output_token_logprobs"] = [[d[0][1], t, None] for d, t in zip(dists, out)]
                    meta["output_top_logprobs"] = [[[lp, i, None] for i, lp in d[:top_n]] for d in dists]
                yield f"data: {json.dumps({'output_ids': out, 'meta_info': meta})}\n\n"
                if done:
                    break
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")
    return app


class StubServer:
    def __init__(self, url):
        self.url, self.proc, self.log_path = url, None, "sglang.log"

    def alive(self):
        return True

    def stop(self):
        pass


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from aurora.models.hub import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2"))


@pytest.fixture
def sglang(tokenizer):
    calls = []
    with live_server(fake_sglang(tokenizer, calls)) as sgl_url:
        engine = SGLangEngine(StubServer(sgl_url), tokenizer, "aurora-test", max_model_len=256, lookahead=3)
        with live_server(create_app(FakeService(engine, None), test_config())) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30), calls


MESSAGES = [{"role": "user", "content": "Say hello."}]


def expected(tokenizer, text: str, top_n: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for j, t in enumerate(ids):
        d = distribution(j, t)
        out.append((tokenizer.decode([t]), d[0][1], [(tokenizer.decode([i]), lp) for i, lp in d[:top_n]]))
    return out


def test_chat_logprobs_reach_sglang_and_come_back_in_openais_shape(sglang, tokenizer):
    client, calls = sglang
    r = client.chat.completions.create(model="aurora-test", messages=MESSAGES, logprobs=True, top_logprobs=3,
                                       max_tokens=32)
    body = calls[-1]
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 3 and body["logprob_start_len"] == -1
    assert r.choices[0].message.content == PLAIN
    got = [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs]) for c in r.choices[0].logprobs.content]
    assert _close(got, expected(tokenizer, PLAIN, 3))
    assert all(c.bytes == list(c.token.encode()) for c in r.choices[0].logprobs.content)
    assert "".join(c.token for c in r.choices[0].logprobs.content) == PLAIN
    # streamed: each chunk carries its own tokens' logprobs; together they are the whole completion's
    chunks = list(client.chat.completions.create(model="aurora-test", messages=MESSAGES, logprobs=True,
                                                 top_logprobs=3, max_tokens=32, stream=True))
    streamed = [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs])
                for ch in chunks for c in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])]
    assert _close(streamed, got)
    # logprobs without top_logprobs: each token's own, no alternatives
    r = client.chat.completions.create(model="aurora-test", messages=MESSAGES, logprobs=True, max_tokens=32)
    assert calls[-1]["top_logprobs_num"] == 0 and all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=32)
    assert "return_logprob" not in calls[-1] and r.choices[0].logprobs is None


def test_a_response_written_once_is_not_streamed_token_by_token(sglang, tokenizer):
    """Every output SGLang streams costs its scheduler, its detokenizer and the HTTP hop a message: a response
    written once at the end asks for one every NONSTREAM_INTERVAL tokens, a streaming one for every token."""
    from aurora.server.protocol import NONSTREAM_INTERVAL

    client, calls = sglang
    n = len(tokenizer(PLAIN, add_special_tokens=False)["input_ids"])
    rounds = -(-n // 2)
    r = client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=32, logprobs=True)
    assert calls[-1]["sampling_params"]["stream_interval"] == NONSTREAM_INTERVAL > 1
    assert calls[-1]["chunks_sent"] == 1 < rounds  # the stand-in's answer is shorter than one interval
    assert r.choices[0].message.content == PLAIN and r.usage.completion_tokens == n
    assert [c.logprob for c in r.choices[0].logprobs.content] == pytest.approx(
        [x for _, x, _ in expected(tokenizer, PLAIN, 0)], abs=1e-9)  # a cumulative chunk: all tokens' logprobs
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="aurora-test", messages=MESSAGES, max_tokens=32, stream=True) if ch.choices)
    assert "stream_interval" not in calls[-1]["sampling_params"] and calls[-1]["chunks_sent"] == rounds
    assert text == PLAIN


def test_stop_strings_matched_here_keep_sglang_streaming_every_token():
    """Without a tokenizer in SGLang, Aurora matches stop strings in its own text stream and aborts: that needs
    every token, so the interval is dropped then (and kept when there is no stop string)."""
    from aurora.engine.sequence import SamplingParams
    from aurora.sglang_engine.engine import sampling_params

    coarse = SamplingParams(max_tokens=8, stop=["\n"], stream_interval=32)
    assert sampling_params(coarse)["stream_interval"] == 32
    assert "stream_interval" not in sampling_params(coarse, stop_strings=False)
    assert sampling_params(SamplingParams(max_tokens=8, stream_interval=32), stop_strings=False)["stream_interval"] == 32
    assert "stream_interval" not in sampling_params(SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="stream_interval"):
        SamplingParams(stream_interval=0)


def _close(a, b) -> bool:
    assert len(a) == len(b)
    for (t1, l1, top1), (t2, l2, top2) in zip(a, b):
        assert t1 == t2 and l1 == pytest.approx(l2, abs=1e-9) and len(top1) == len(top2)
        for (x1, y1), (x2, y2) in zip(top1, top2):
            assert x1 == x2 and y1 == pytest.approx(y2, abs=1e-9)
    return True


def test_completion_logprobs_in_the_legacy_shape(sglang, tokenizer):
    client, calls = sglang
    r = client.completions.create(model="aurora-test", prompt="Say hello.", logprobs=2, max_tokens=32)
    lp = r.choices[0].logprobs
    want = expected(tokenizer, PLAIN, 2)
    assert lp.tokens == [t for t, _, _ in want] and calls[-1]["top_logprobs_num"] == 2
    assert lp.token_logprobs == pytest.approx([x for _, x, _ in want], abs=1e-9)
    assert [list(d.items()) for d in lp.top_logprobs] == [[(t, pytest.approx(x, abs=1e-9)) for t, x in top]
                                                          for _, _, top in want]
    assert lp.text_offset == [sum(len(t) for t, _, _ in want[:i]) for i in range(len(want))]
    chunks = list(client.completions.create(model="aurora-test", prompt="Say hello.", logprobs=2, max_tokens=32,
                                            stream=True))
    assert [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] \
        == lp.tokens
    assert [o for ch in chunks if ch.choices and ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset] \
        == lp.text_offset


def test_penalties_and_logit_bias_reach_sglangs_sampling_params(sglang):
    client, calls = sglang
    client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=8, presence_penalty=0.5,
                                   frequency_penalty=-1.25, logit_bias={"5": 10, "42": -100})
    sp = calls[-1]["sampling_params"]
    assert sp["presence_penalty"] == 0.5 and sp["frequency_penalty"] == -1.25
    assert sp["logit_bias"] == {"5": 10.0, "42": -100.0}
    client.completions.create(model="aurora-test", prompt="x", max_tokens=8, presence_penalty=0, logit_bias={})
    sp = calls[-1]["sampling_params"]
    assert not {"presence_penalty", "frequency_penalty", "logit_bias", "json_schema"} & set(sp)
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI's range, on every engine
        client.chat.completions.create(model="aurora-test", messages=MESSAGES, presence_penalty=5)
    assert e.value.body["param"] == "presence_penalty"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_response_format_becomes_sglangs_json_schema(sglang):
    client, calls = sglang
    r = client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=64,
                                       response_format={"type": "json_object"})
    assert json.loads(calls[-1]["sampling_params"]["json_schema"]) == {"type": "object"}
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=64, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    assert json.loads(calls[-1]["sampling_params"]["json_schema"]) == SCHEMA
    out = json.loads(r.choices[0].message.content)
    assert set(out) == set(SCHEMA["required"]) and isinstance(out["name"], str) and isinstance(out["age"], int)
    client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=8,
                                   response_format={"type": "text"})
    assert "json_schema" not in calls[-1]["sampling_params"]


@pytest.mark.parametrize("route, kw, param", [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"echo": True, "logprobs": 1}, "echo"),
])
def test_what_sglang_is_not_asked_for_is_refused_by_name(sglang, route, kw, param):
    client, calls = sglang
    with pytest.raises(openai.BadRequestError) as e:
        if route == "chat":
            client.chat.completions.create(model="aurora-test", messages=MESSAGES, max_tokens=4, **kw)
        else:
            client.completions.create(model="aurora-test", prompt="x", max_tokens=4, **kw)
    assert e.value.body["param"] == param and not calls
