"""Every sampling parameter is checked at the edge: non-finite, out-of-range and wrongly typed values get a 400
naming the parameter (raw JSON bodies, so NaN and Infinity reach the server as Python's json reads them)."""
import httpx
import pytest

NAN, INF, NINF = "NaN", "Infinity", "-Infinity"
BAD = {  # parameter -> values that must be refused
    "temperature": [NAN, INF, NINF, "-0.1", "2.01", "1e308", '"1"'],
    "top_p": [NAN, INF, "0", "0.0", "-1", "1.0001", "true"],
    "top_k": ["-2", "2147483648", "100000000000000000000", "1.5", NAN],
    "max_tokens": ["0", "-1", "1.0", NAN, INF, '"4"', "100000000000000000000"],
    "seed": ["9223372036854775808", "-9223372036854775809", "1.5", NAN, "100000000000000000000"],
    "n": ["0", "17", "-1", NAN, "2.0"],
    "frequency_penalty": [NAN, INF, "2.5", "-3", "0.5"],   # 0.5: in OpenAI's range, not supported here
    "presence_penalty": [NAN, NINF, "2.0001", "1"],
    "logit_bias": ['{"1": NaN}', '{"1": 101}', '{"1": 5}', "[]"],
    "stop": ['""', '[""]', "[1]", '["\\ud800"]', "[" + ",".join(['"a"'] * 17) + "]"],
    "user": ['"\\udc00"', "1"],
    "model": ['"\\ud800"', "1"],
}
COMPLETIONS_ONLY = {"logprobs": ["1", "6", "-1", NAN], "best_of": ["2", "0", "17"],
                    "suffix": ['"tail"'], "prompt": ["[-1]", "[9223372036854775808]", '"a\\udbffb"', "[]", '""']}
CHAT_ONLY = {"logprobs": ["true"], "top_logprobs": ["21", "-1", "3"], "max_completion_tokens": ["0", NAN]}
OK = {"temperature": ["0", "2", "0.7"], "top_p": ["1", "0.01"], "top_k": ["-1", "0", "2147483647"],
      "seed": ["-9223372036854775808", "9223372036854775807"], "frequency_penalty": ["0"],
      "presence_penalty": ["0.0"], "logit_bias": ["{}"], "n": ["16"], "echo": ["true"]}


def post(h, path, field, raw):
    base = '"prompt": "hello there"' if path == "/v1/completions" else \
        '"messages": [{"role": "user", "content": "hello there"}]'
    data = f'{{{base}, "max_tokens": 3, "{field}": {raw}}}' if field not in ("prompt",) else \
        f'{{"prompt": {raw}, "max_tokens": 3}}'
    return h.post(path, content=data, headers={"content-type": "application/json"})


def cases(extra):
    return [(f, v) for table in (BAD, extra) for f, values in table.items() for v in values]


@pytest.mark.parametrize("path,extra", [("/v1/completions", COMPLETIONS_ONLY), ("/v1/chat/completions", CHAT_ONLY)],
                         ids=["completions", "chat"])
def test_bad_values_are_400_naming_the_parameter(server, path, extra):
    url, service = server
    wrong = []
    with httpx.Client(base_url=url, timeout=30) as h:
        responses = [(field, raw, post(h, path, field, raw)) for field, raw in cases(extra)]
    for field, raw, r in responses:
        param = r.json().get("error", {}).get("param") if r.headers.get("content-type") == "application/json" else None
        if r.status_code != 400 or not (param or "").split(".")[0] == field:
            wrong.append((field, raw, r.status_code, r.text[:200]))
    assert not wrong, wrong
    assert service.engine.started == []  # none of them reached the engine


def test_values_at_the_edges_of_the_ranges_are_served(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        wrong = [(f, v, r.status_code, r.text[:200]) for f, values in OK.items() for v in values
                 for r in [post(h, "/v1/completions", f, v)] if r.status_code != 200]
    assert not wrong, wrong
