"""Every OpenAI generation parameter on the built-in engine, over real HTTP with the real `openai` client: the
ones it implements (a list of prompts, echo, best_of = n, tool-role messages) against Hugging Face greedy
decoding of the same target, the ones it cannot honour losslessly yet (log-probabilities, penalties,
logit_bias, response_format, tools, suffix, best_of > n) answered 400 with the parameter named, their no-op
values accepted, and values outside OpenAI's ranges answered 400 whichever the engine."""
import httpx
import openai
import pytest
import torch

from aurora.server.app import create_app
from aurora.server.config import ServeConfig
from aurora.service import Service
from server_fakes import live_server

MAX_TOKENS = 8
served = {}  # the tiny service's model name, set by its fixture


@pytest.fixture(scope="module")
def tiny(tiny_target_dir, tmp_path_factory):
    """(base url, tokenizer) of the built-in engine with a speculative (day-0) draft over the tiny target."""
    cfg = ServeConfig(target=tiny_target_dir, draft="scratch", device="cpu", max_model_len=128, max_batch=8,
                      run_dir=str(tmp_path_factory.mktemp("run")), wandb="disabled")
    service = Service.from_config(cfg)
    served["model"] = service.engine.model_name
    try:
        with live_server(create_app(service, cfg)) as url:
            yield url, service.engine.tokenizer
    finally:
        service.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()


def greedy(hf, tok, ids: list[int]) -> str:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=0, pad_token_id=0)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


PROMPTS = ["hello world", "the cat sat", "abc abc abc"]


def test_a_list_of_prompts_is_n_independent_requests_each(tiny, hf):
    url, tok = tiny
    token_prompt = ids_of(tok, "zebra")
    r = client(url).completions.create(model=served["model"], prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:  # prompt by prompt, n choices each
        assert c.text == greedy(hf, tok, ids_of(tok, PROMPTS[c.index // 2])), c.index
    assert r.usage.prompt_tokens == sum(len(ids_of(tok, p)) for p in PROMPTS)
    r = client(url).completions.create(model=served["model"], prompt=[token_prompt, ids_of(tok, "dog")], max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert [c.text for c in r.choices] == [greedy(hf, tok, token_prompt), greedy(hf, tok, ids_of(tok, "dog"))]
    chunks = list(client(url).completions.create(model=served["model"], prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True))
    streamed = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {i: greedy(hf, tok, ids_of(tok, p)) for i, p in enumerate(PROMPTS)}


def test_echo_puts_the_prompt_before_the_completion(tiny, hf):
    url, tok = tiny
    c = client(url)
    r = c.completions.create(model=served["model"], prompt="the cat sat", max_tokens=MAX_TOKENS, temperature=0, echo=True)
    assert r.choices[0].text == "the cat sat" + greedy(hf, tok, ids_of(tok, "the cat sat"))
    ids = ids_of(tok, "abc")
    r = c.completions.create(model=served["model"], prompt=ids, max_tokens=MAX_TOKENS, temperature=0, echo=True)
    assert r.choices[0].text == tok.decode(ids, skip_special_tokens=True) + greedy(hf, tok, ids)
    chunks = list(c.completions.create(model=served["model"], prompt="hello world", max_tokens=MAX_TOKENS, temperature=0,
                                       echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == \
        "hello world" + greedy(hf, tok, ids_of(tok, "hello world"))


def test_best_of_equal_to_n_is_n(tiny, hf):
    url, tok = tiny
    r = client(url).completions.create(model=served["model"], prompt="abc", max_tokens=MAX_TOKENS, temperature=0, n=2, best_of=2)
    assert [c.text for c in r.choices] == [greedy(hf, tok, ids_of(tok, "abc"))] * 2


def test_tool_messages_go_through_the_chat_template(server, tokenizer):
    """SmolLM2's template renders any role, `tool` included; the fake engine echoes the prompt's tokens, so
    the completion is the rendered conversation itself."""
    url, _ = server
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "I will look it up."},
                {"role": "tool", "content": "22 C and sunny", "tool_call_id": "call_1"}]
    rendered = tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} | (
        {"tool_call_id": m["tool_call_id"]} if "tool_call_id" in m else {}) for m in messages], tokenize=False,
        add_generation_prompt=True)
    ids = ids_of(tokenizer, rendered)
    r = client(url).chat.completions.create(model="aurora-test", messages=messages, max_tokens=len(ids))
    assert r.choices[0].message.content == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>tool\n22 C and sunny<|im_end|>" in rendered and r.usage.prompt_tokens == len(ids)
    # an assistant turn's tool_calls: this template would drop them, so the request is refused, not shortened
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="aurora-test", max_tokens=4, messages=[
            messages[0], {"role": "assistant", "content": None, "tool_calls": [call]}, messages[2]])
    assert e.value.body["param"] == "messages.1.tool_calls" and "tool calls" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a tool message must say which call it answers
        client(url).chat.completions.create(model="aurora-test", max_tokens=4,
                                            messages=[{"role": "tool", "content": "22 C"}])
    assert e.value.body["param"].startswith("messages")


CHAT = [{"role": "user", "content": "hello"}]
REFUSED = [  # (route, parameters, the parameter the 400 names)
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),  # OpenAI's rule: top_logprobs needs logprobs
    ("completions", {"logprobs": 0}, "logprobs"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"presence_penalty": -1.0}, "presence_penalty"),
    ("chat", {"frequency_penalty": 1.0}, "frequency_penalty"),
    ("completions", {"frequency_penalty": 2.0}, "frequency_penalty"),
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": -100}}, "logit_bias"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}},
     "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              "tool_choice": "required"}, "tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("completions", {"suffix": "end."}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"best_of": 1, "n": 2}, "best_of"),
]


def create(url, route, **kw):
    c = client(url)
    if route == "chat":
        return c.chat.completions.create(model=served["model"], messages=CHAT, max_tokens=4, **kw)
    return c.completions.create(model=served["model"], prompt="hello", max_tokens=4, **kw)


@pytest.mark.parametrize("route, kw, param", REFUSED, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(REFUSED)])
def test_what_the_builtin_engine_cannot_honour_is_refused_by_name(tiny, route, kw, param):
    url, _ = tiny
    with pytest.raises(openai.BadRequestError) as e:
        create(url, route, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.body["message"]


OUT_OF_RANGE = [
    ("chat", {"presence_penalty": 5}, "presence_penalty"),
    ("completions", {"presence_penalty": -2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": 2.01}, "frequency_penalty"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"best_of": 0}, "best_of"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),
]


@pytest.mark.parametrize("route, kw, param", OUT_OF_RANGE,
                         ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_values_are_400(tiny, route, kw, param):
    url, _ = tiny
    with pytest.raises(openai.BadRequestError) as e:
        create(url, route, **kw)
    assert e.value.body["param"].startswith(param) and param in e.value.body["message"]


def test_no_op_values_are_accepted(tiny):
    url, _ = tiny
    plain_chat = create(url, "chat", temperature=0).choices[0].message.content
    plain = create(url, "completions", temperature=0).choices[0].text
    for kw in ({"presence_penalty": 0, "frequency_penalty": 0.0}, {"logit_bias": {}}, {"logprobs": False},
               {"logprobs": False, "top_logprobs": 0}, {"response_format": {"type": "text"}}, {"tool_choice": "none"},
               {"tools": [], "tool_choice": "auto"}, {"parallel_tool_calls": False}):
        r = create(url, "chat", temperature=0, **kw)
        assert r.choices[0].message.content == plain_chat and r.choices[0].logprobs is None, kw
    for kw in ({"presence_penalty": 0}, {"logit_bias": {}}, {"suffix": ""}, {"best_of": 1}, {"echo": False}):
        assert create(url, "completions", temperature=0, **kw).choices[0].text == plain, kw


def test_prompt_lists_are_bounded(tiny):
    url, _ = tiny
    r = httpx.post(url + "/v1/completions", json={"prompt": ["a"] * 17, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")
    r = httpx.post(url + "/v1/completions", json={"prompt": ["a", ""], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")
