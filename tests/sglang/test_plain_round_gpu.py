"""A depth-0 round as the target's own decode step inside SGLang (plugin/plain_round.py), for real (GPU machine
only): Aurora at its shipped defaults serves SmolLM2 with a day-0 draft, so its depth decision holds depth 0 and
every decode round takes the plain path. Independent references: a second SGLang serving the target alone
(greedy outputs, with and without a frequency penalty) and Hugging Face's hidden states (the aux states captured
from plain rounds). Run there (see README, "GPU machine"):
  AURORA_SGLANG_ARGS="--attention-backend triton --sampling-backend pytorch" python -m pytest tests/sglang -s
"""
import importlib.util
import os
import time

import httpx
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None,
    reason="needs SGLang 0.5.17 (the `sglang` extra) and a CUDA GPU: run tests/sglang on the GPU machine")

from aurora.server.config import ServeConfig  # noqa: E402
from tests.sglang.test_sglang_backend import TIE, NearTie, _prompts, _reference, beside_target_only  # noqa: E402

EXTRA = os.environ.get("AURORA_SGLANG_ARGS", "") + " --cuda-graph-max-bs 32 --cuda-graph-backend-prefill disabled"
TOKENS = 48


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    run = tmp_path_factory.mktemp("plain")
    cfg = ServeConfig(target="smollm2", draft="scratch", engine="sglang", max_batch=32, max_model_len=2048,
                      run_dir=str(run), wandb="disabled", sglang_args=EXTRA + " --mem-fraction-static 0.4")
    assert cfg.adaptive_depth and cfg.sglang_plain_depth0  # the shipped defaults are what this file checks
    with beside_target_only(cfg, EXTRA + " --mem-fraction-static 0.2", run) as stack:
        yield stack


def _speculation(service, url, model) -> dict:
    """The depth snapshot SGLang's scheduler writes (every 2 s while rounds complete): one more request flushes it."""
    time.sleep(2.5)
    httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}, timeout=120)
    return service.engine.stats()["speculation"]


def _complete(url, model, prompts, max_tokens=TOKENS, **params) -> dict:
    out = {}
    with httpx.Client(base_url=url, timeout=300) as h:
        for p in prompts:
            r = h.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": max_tokens,
                                                "temperature": 0, **params})
            assert r.status_code == 200, r.text
            out[p] = r.json()
    return out


def test_day0_rounds_are_plain_decode_steps_and_greedy_equals_target_only(stack):
    service, ref, url, captured = stack
    tok, model = service.engine.tokenizer, service.engine.model_name
    prompts = _prompts(tok, 10, 6)
    expected = _reference(ref, tok, prompts, max_tokens=TOKENS, concurrency=1)
    got = _complete(url, model, prompts)
    spec = _speculation(service, url, model)
    print(f"depth snapshot: plain {spec.get('plain_rounds')}, fallback {spec.get('fallback_rounds')} "
          f"{spec.get('fallback_reasons')}")
    assert spec["plain_rounds"] >= len(prompts) * (TOKENS // 2)  # the decode rounds went through the plain path
    assert spec["fallback_rounds"] == 0
    ties = NearTie(tok)
    retok = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    parts = []
    for p in prompts:
        text, want = got[p]["choices"][0]["text"], tok.decode(expected[p], skip_special_tokens=True)
        if text != want:
            parts.append((p, *ties.gap(p, retok(text), retok(want))))
    print(f"greedy equal to SGLang target-only: {len(prompts) - len(parts)}/{len(prompts)}; the others part at "
          f"{[(t, round(g, 3)) for _, t, g in parts]}")
    # where a continuation parts from target-only SGLang, both tokens are a bf16 near-tie of the target's fp32
    # logits (SGLang's own target-only outputs part this way when only batching or KV layout changes:
    # test_sglang_backend.py's control); a wrong round would pick tokens the target ranks far lower
    assert all(g < TIE for _, _, g in parts), [(p[-60:], t, g) for p, t, g in parts if g >= TIE]

    # the aux states of plain rounds are the target's layers 2, 15 and 27 at the served tokens (HF fp32)
    deadline = time.time() + 30
    while not captured and time.time() < deadline:
        time.sleep(0.1)
    assert captured, service.engine.stats().get("capture")
    worst = 1.0
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    checked = 0
    for s in captured:
        head = s.token_ids[:s.prompt_len].tolist()  # the sample starts after SGLang's cached prefix
        full = next((pid[:len(pid) - s.prompt_len] + s.token_ids.tolist() for pid in prompt_ids
                     if len(pid) >= s.prompt_len and pid[len(pid) - s.prompt_len:] == head), None)
        if full is None or s.num_tokens <= s.prompt_len + 8:
            continue
        off = len(full) - s.num_tokens
        with torch.no_grad():
            out = ties.hf(torch.tensor([full], device="cuda"), output_hidden_states=True)
        want = torch.cat([out.hidden_states[i] for i in (2, 15, 27)], -1)[0, off:-1]
        assert s.aux_hidden.shape == (s.num_tokens - 1, 3 * 576)
        decoded = slice(s.prompt_len, None)  # the rows written by plain decode rounds
        cos = torch.nn.functional.cosine_similarity(s.aux_hidden[decoded].cuda().float(), want[decoded], dim=-1)
        worst, checked = min(worst, float(cos.min())), checked + 1
        if checked == 4:
            break
    print(f"aux states of plain rounds vs HF fp32: worst row cosine {worst:.4f} over {checked} samples")
    assert checked > 0 and worst > 0.99


def test_penalised_and_logprob_batches_take_sglangs_own_depth_0(stack):
    """Batches with a frequency penalty or log-probabilities keep SGLang's depth-0 verify (its results against
    independent references: test_openai_params_gpu.py); other batches stay on the plain path."""
    service, _, url, _ = stack
    tok, model = service.engine.tokenizer, service.engine.model_name
    prompts = _prompts(tok, 2, 0)
    before = _speculation(service, url, model)
    assert _complete(url, model, prompts, frequency_penalty=1.0)[prompts[0]]["choices"][0]["text"]
    r = _complete(url, model, prompts[:1], logprobs=2)[prompts[0]]
    assert len(r["choices"][0]["logprobs"]["tokens"]) > 0
    after = _speculation(service, url, model)
    reasons = lambda s, k: s["fallback_reasons"].get(k, 0)  # noqa: E731
    assert reasons(after, "penalties") >= len(prompts) * (TOKENS // 2) > reasons(before, "penalties")
    assert reasons(after, "logprobs") >= TOKENS // 2 > reasons(before, "logprobs")
    assert after["plain_rounds"] > before["plain_rounds"]  # the flushing requests between them went plain


def test_sampled_requests_take_plain_rounds_within_the_targets_top_k(stack):
    """Sampling (temperature 1, top_k 5) through plain rounds: every generated token after the first is among the
    target's 5 most likely at its position (Hugging Face fp32 along the served token ids, up to a bf16 near-tie at
    the fifth), so the sampler sees the target's logits of the right position; the rounds ran plain. The requests
    go to the SGLang server under Aurora (its /generate returns the token ids)."""
    service, _, url, _ = stack
    tok, model = service.engine.tokenizer, service.engine.model_name
    prompts = _prompts(tok, 6, 0)
    before = _speculation(service, url, model)
    served = {}
    with httpx.Client(base_url=service.engine.server.url, timeout=300) as h:
        for p in prompts:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            r = h.post("/generate", json={"input_ids": ids, "sampling_params": {
                "max_new_tokens": 16, "temperature": 1.0, "top_k": 5}})
            assert r.status_code == 200, r.text
            served[p] = (ids, r.json()["output_ids"])
    after = _speculation(service, url, model)
    assert after["plain_rounds"] >= before["plain_rounds"] + len(prompts) * 8
    assert after["fallback_rounds"] == before["fallback_rounds"]
    hf = NearTie(tok).hf
    outside = []
    for p, (ids, out) in served.items():
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out], device="cuda")).logits[0].float()
        for j in range(1, len(out)):  # token j came from a decode round at position len(ids) + j - 1
            row = logits[len(ids) + j - 1]
            fifth = row.topk(5).values[-1]
            if row[out[j]] < fifth - TIE:
                outside.append((p[-40:], j, float(fifth - row[out[j]])))
    assert not outside, outside


def test_requests_prefilled_without_the_draft_stay_lossless_when_speculation_turns_on(stack):
    """Prefills at depth 0 skip the draft's extend (its KV cache stays unwritten there) and the draft starts from
    zeroed state. Requests run at depth 0, then the depth is pinned at the full lookahead while they decode: greedy
    output stays the target's (up to a bf16 near-tie), the rounds at that depth complete, and their rows are not
    counted as the version's acceptance (plugin/depth.py's cold requests)."""
    from concurrent.futures import ThreadPoolExecutor

    from aurora.sglang_engine.plugin.depth import write_forced_depth

    service, ref, url, _ = stack
    tok, model = service.engine.tokenizer, service.engine.model_name
    swap_dir, deepest = service.engine._publisher.dir, service.config.lookahead
    prompts = _prompts(tok, 8, 4)
    n = 240  # long enough to outlast the scheduler's look at the force file (every 0.25 s)
    expected = _reference(ref, tok, prompts, max_tokens=n, concurrency=1)
    before = _speculation(service, url, model)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(_complete, url, model, [p], n) for p in prompts]
            time.sleep(0.1)  # prefilled and decoding at depth 0
            write_forced_depth(swap_dir, deepest)
            got = {p: r for f in futures for p, r in f.result().items()}
        after = _speculation(service, url, model)
    finally:
        write_forced_depth(swap_dir, None)
    print(f"prefills without the draft: {before['prefills_without_draft']} -> {after['prefills_without_draft']}; "
          f"rounds by depth at the end: {after.get('buckets')}")
    assert after["prefills_without_draft"] > before["prefills_without_draft"] > 0
    at_deepest = lambda s: sum(int((b.get("rounds_by_depth") or {}).get(str(deepest), 0))  # noqa: E731
                               for b in (s.get("buckets") or {}).values())
    assert at_deepest(after) > at_deepest(before)  # the pinned depth ran while they decoded
    ties = NearTie(tok)
    retok = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    parts = [(p, *ties.gap(p, retok(got[p]["choices"][0]["text"]), retok(tok.decode(expected[p],
                                                                                 skip_special_tokens=True))))
             for p in prompts if got[p]["choices"][0]["text"] != tok.decode(expected[p], skip_special_tokens=True)]
    print(f"greedy equal to target-only across the switch: {len(prompts) - len(parts)}/{len(prompts)}")
    assert all(g < TIE for _, _, g in parts), [(p[-60:], t, g) for p, t, g in parts if g >= TIE]
