"""OpenAI parameters on the SGLang engine for real (GPU machine only): SGLang serves SmolLM2 with an Aurora
day-0 EAGLE3 draft, the real `openai` client asks through Aurora's HTTP API, and each answer is checked
against Hugging Face (fp32) on the same target: log-probabilities against its log-softmax, a frequency /
presence penalty against a plain-torch penalised greedy decode (OpenAI's formula), logit_bias against its
definition, JSON mode output parsed against the schema. SGLang computes in bf16: logprobs are compared with a
bf16 tolerance, and the penalised decode token by token along SGLang's own output (its token ids read from the
per-token logprob entries) up to a bf16 near-tie.
  AURORA_SGLANG_ARGS="--attention-backend triton --sampling-backend pytorch" python -m pytest tests/sglang -s
"""
import importlib.util
import json
import os

import openai
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None,
    reason="needs SGLang 0.5.17 (the `sglang` extra) and a CUDA GPU: run tests/sglang on the GPU machine")

from server_fakes import live_server  # noqa: E402

from aurora.models import hub  # noqa: E402
from aurora.server.app import create_app  # noqa: E402
from aurora.server.config import ServeConfig  # noqa: E402
from aurora.service import Service  # noqa: E402

EXTRA = os.environ.get("AURORA_SGLANG_ARGS", "") + " --cuda-graph-max-bs 8 --cuda-graph-backend-prefill disabled"
MESSAGES = [{"role": "user", "content": "List three colours of the rainbow."}]
TOKENS = 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = ServeConfig(target="smollm2", draft="scratch", engine="sglang", max_batch=8, max_model_len=1024,
                      run_dir=str(tmp_path_factory.mktemp("sglang")), wandb="disabled",
                      sglang_args=EXTRA + " --mem-fraction-static 0.3")
    service = Service.from_config(cfg)
    try:
        with live_server(create_app(service, cfg)) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300), service
    finally:
        service.shutdown()


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = hub.resolve("smollm2")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def prompt_ids(tok):
    return tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)


def served_ids(tok, content) -> list[int]:
    """The token ids SGLang generated, from the response's per-token logprob entries: re-tokenising the text can
    merge or split tokens differently (a penalty pushes the model to unusual splits), which shifts every later
    position against the reference. A token's text names its id uniquely except for partial UTF-8 bytes."""
    by_text = {}
    for i in range(len(tok)):
        by_text.setdefault(tok.decode([i]), []).append(i)
    ids = []
    for c in content:
        cands = by_text.get(c.token, [])
        assert len(cands) == 1, f"token text {c.token!r} names {len(cands)} ids: pick another prompt"
        ids.append(cands[0])
    return ids


def test_logprobs_equal_huggingface_log_softmax(stack, hf):
    client, service = stack
    model, tok = hf
    r = client.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, max_tokens=TOKENS,
                                       temperature=0, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    out = served_ids(tok, content)
    assert tok.decode(out) == r.choices[0].message.content
    ids = prompt_ids(tok)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].double(), -1)
    # bf16 logits near 25 are quantised in steps of 0.125 and a logprob carries that error twice (logit and
    # log-sum-exp): every logprob is held to 0.25 (a logprob of another position or token is off by nats)
    for j, c in enumerate(content):
        assert c.logprob == pytest.approx(logp[j, out[j]].item(), abs=0.25)
        assert c.top_logprobs[0].token == c.token                            # greedy: the top token
        ref_top = logp[j].topk(5)
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(ref_top.values.tolist(), abs=0.25)


def penalised_logits(model, ids, out, frequency=0.0, presence=0.0, bias=None) -> list:
    """Per generated position t, the target's fp32 logits after out[:t] with OpenAI's penalties and bias applied:
    logit - frequency * count - presence * (count > 0) + bias, counts over the tokens generated so far."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:].double()
    rows = []
    for t in range(len(out)):
        counts = torch.bincount(torch.tensor(out[:t], dtype=torch.long), minlength=logits.shape[-1]).double()
        row = logits[t] - frequency * counts - presence * (counts > 0).double()
        for k, b in (bias or {}).items():
            row[k] += b
        rows.append((logits[t], row))
    return rows


NEAR_TIE = 0.5  # fp32 logits: below it, a bf16 engine may order two tokens either way


def test_penalties_match_a_plain_torch_reference(stack, hf):
    """Along SGLang's own output, every token is the penalised argmax of the fp32 reference (up to a bf16 near-tie),
    and somewhere the penalty decided the token: without it the reference clearly prefers another."""
    client, service = stack
    model, tok = hf
    ids = prompt_ids(tok)
    for kw in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):
        r = client.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, max_tokens=48,
                                           temperature=0, logprobs=True, **kw)
        out = served_ids(tok, r.choices[0].logprobs.content)
        rows = penalised_logits(model, ids, out, kw.get("frequency_penalty", 0.0), kw.get("presence_penalty", 0.0))
        gaps = [float(pen.max() - pen[o]) for (_, pen), o in zip(rows, out)]
        decided = [t for t, ((raw, pen), o) in enumerate(zip(rows, out)) if float(raw.max() - raw[o]) > 1.0]
        assert max(gaps) < NEAR_TIE, (kw, r.choices[0].message.content, gaps)
        assert decided, (kw, "the penalty never changed a token: this prompt cannot tell it from no penalty")


def test_logit_bias_forces_a_token(stack, hf):
    client, service = stack
    _, tok = hf
    token = tok(" banana", add_special_tokens=False)["input_ids"][0]
    r = client.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, max_tokens=4,
                                       temperature=0, logit_bias={str(token): 100})
    assert r.choices[0].message.content == tok.decode([token] * 4)


def test_json_schema_output_parses_and_matches(stack):
    client, service = stack
    schema = {"type": "object", "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    r = client.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, max_tokens=64,
                                       temperature=0, response_format={"type": "json_schema", "json_schema": {
                                           "name": "answer", "schema": schema, "strict": True}})
    out = json.loads(r.choices[0].message.content)
    assert set(out) == {"colour", "count"} and isinstance(out["colour"], str) and isinstance(out["count"], int)
    r = client.chat.completions.create(model=service.engine.model_name, messages=MESSAGES, max_tokens=64,
                                       temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
