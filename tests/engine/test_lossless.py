"""Speculative decoding must be lossless: greedy output equals target-only greedy output token for token,
and sampled tokens follow the target's distribution exactly."""
import random

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.models.draft import DraftConfig, new_draft
from tests.greedy import run_all, two_domain_prompts


@pytest.fixture(scope="module")
def greedy_setup(smollm2_dir):
    target_only = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024))
    tok = target_only.tokenizer
    prompts = two_domain_prompts(tok)
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    reference, _ = run_all(target_only, prompts, params)
    return prompts, params, reference


def test_target_only_equals_hf_generate(smollm2_dir, greedy_setup):
    prompts, params, reference = greedy_setup
    prompts, reference = prompts[::6], reference[::6]
    if torch.cuda.is_available():  # the shared reference ran in bf16 there; HF runs in fp32: compare like with like
        fp32 = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024, dtype="float32"))
        reference, _ = run_all(fp32, prompts, params)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for p, ref in zip(prompts, reference):
        out = hf.generate(torch.tensor([p]), max_new_tokens=14, do_sample=False, min_new_tokens=14)
        assert out[0, len(p):].tolist() == ref


@pytest.mark.parametrize("batch,topk,draft_tokens", [(1, 1, 5), (8, 1, 5), (8, 3, 8)])
def test_greedy_lossless_untrained_draft(smollm2_dir, greedy_setup, batch, topk, draft_tokens):
    prompts, params, reference = greedy_setup
    draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(smollm2_dir)), seed=7)
    eng = LLMEngine(smollm2_dir, draft, EngineConfig(max_batch=batch, max_model_len=1024, lookahead=4, topk=topk, adaptive=False,
                                                     num_draft_tokens=draft_tokens))
    outs, seqs = run_all(eng, prompts if batch > 1 else prompts[::3], params)
    assert outs == (reference if batch > 1 else reference[::3])
    assert all(s.verify_rounds > 0 for s in seqs)


@pytest.mark.parametrize("topk,draft_tokens,random_depth", [(1, 4, False), (3, 7, False), (1, 4, True)])
def test_sampling_is_lossless(tiny_target_dir, topk, draft_tokens, random_depth, monkeypatch):
    """Marginals of the 2nd and 3rd sampled tokens (the first ones drawn by speculation) against exact
    target marginals computed by enumeration with the Hugging Face model; at a fixed depth, and with the
    depth drawn afresh every round (0 = plain decoding)."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float64).eval()
    V = hf.config.vocab_size
    prompt = [5, 17, 33, 60]
    with torch.no_grad():
        p0 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)  # [V]
        ctx1 = torch.tensor([prompt + [a] for a in range(V)])
        p1 = torch.softmax(hf(ctx1).logits[:, -1], -1)  # [V(o0), V(o1)]
        m1 = p0 @ p1
        ctx2 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p2 = torch.cat([torch.softmax(hf(c).logits[:, -1], -1) for c in ctx2.split(2048)]).view(V, V, V)
        m2 = torch.einsum("a,ab,abc->c", p0, p1, p2)
    draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=3)
    with torch.no_grad():
        draft.lm_head.weight.mul_(5.0)  # a confident draft, often wrong: both accept and reject paths run
    eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=32, max_model_len=64, lookahead=3, capture=False,
                                                         adaptive=False, topk=topk, num_draft_tokens=draft_tokens))
    if random_depth:
        rng = random.Random(1)
        monkeypatch.setattr(eng.speculation, "choose", lambda bucket: rng.choice(eng.runner.depths()))
    N = 2000
    seqs = [eng.add_request(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i, ignore_eos=True))
            for i in range(N)]
    while eng.has_work():
        eng.step()
    o = np.array([s.output_ids for s in seqs])
    accepted = sum(sum(s.accepted_per_position) for s in seqs)
    proposed = sum(sum(s.tried_per_position) for s in seqs)
    assert accepted > 50 and proposed - accepted > 50, (accepted, proposed)  # both paths ran
    for col, exact in ((1, m1), (2, m2)):
        emp = np.bincount(o[:, col], minlength=V) / N
        tv = 0.5 * np.abs(emp - exact.numpy()).sum()
        # TV of an N-sample empirical distribution from the truth: E[TV] ≈ 0.5*sum sqrt(2p(1-p)/(pi N))
        expected = 0.5 * np.sum(np.sqrt(2 * exact.numpy() * (1 - exact.numpy()) / (np.pi * N)))
        assert tv < 1.5 * expected + 0.01, (col, tv, expected)
    if random_depth:  # a sample depends on the rounds' depths (as on the draft): reproducible at a fixed depth
        return
    # seeds make requests reproducible whatever they are batched with
    again = [eng.add_request(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i, ignore_eos=True))
             for i in range(5)]
    while eng.has_work():
        eng.step()
    assert [s.output_ids for s in again] == o[:5].tolist()


@pytest.mark.parametrize("topk,draft_tokens", [(1, 4), (2, 5), (4, 10)])
def test_greedy_lossless_tiny_batches_and_swaps(tiny_target_dir, topk, draft_tokens):
    """Tiny target: mixed prompt lengths joining and leaving a batch of 8, a draft swap mid-way; chain and trees."""
    prompts = [[(7 * i + j) % 90 + 1 for j in range(3 + i % 11)] for i in range(40)]
    params = SamplingParams(max_tokens=1 + 3 * (len(prompts) % 7), temperature=0.0, ignore_eos=True)
    ref, _ = run_all(LLMEngine(tiny_target_dir, None, EngineConfig(max_batch=8, max_model_len=128)), prompts, params)
    cfg = DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir))
    eng = LLMEngine(tiny_target_dir, new_draft(cfg, seed=1),
                    EngineConfig(max_batch=8, max_model_len=128, lookahead=3, topk=topk, num_draft_tokens=draft_tokens,
                                 adaptive=False))
    seqs = [eng.add_request(p, params) for p in prompts]
    for i in range(6):
        eng.step()
    other = {k: v for k, v in new_draft(cfg, seed=2).state_dict().items() if k not in ("d2t", "t2d")}
    live = eng.swap_draft(other, 1)
    while eng.has_work():
        eng.step()
    assert live.is_set() and eng.draft_version == 1
    assert [s.output_ids for s in seqs] == ref
