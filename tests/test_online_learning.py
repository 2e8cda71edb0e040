"""The product's loop on the CPU, end to end: SmolLM2 served from a day-0 (random) draft, samples captured
from live requests, the trainer thread learning, hot swaps every few requests under concurrent load, and
the accept length that the engine itself measures on later requests rising clearly above 1.0 — while every
greedy output stays identical to target-only decoding, before, during and after the swaps. The trained draft
then drafts chains and trees at batch 1 and 8, on the prompts it learned and on two domains it never saw,
equal to target-only greedy."""
import asyncio
import time

import torch
from transformers import AutoModelForCausalLM

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.prompts import load_prompts
from aurora.server.config import ServeConfig
from aurora.service import Service
from aurora.training.checkpoint import load_served_draft
from aurora.training.guard import simulated_acceptance
from tests.greedy import check_sample, run_all, two_domain_prompts

DEVICE = "cpu"  # the service and every engine compared with it (fp32), also on a machine with a GPU


def test_accept_length_rises_after_swaps(tmp_path):
    cfg = ServeConfig(target="smollm2", draft="scratch", draft_vocab_size=2048, vocab_warmup_requests=8,
                      sync_every=8, lookahead=3, max_batch=8, max_model_len=512, lr=1e-3, device=DEVICE,
                      run_dir=str(tmp_path), wandb="disabled", adaptive_depth=False,
                      trainer_duty=1.0)  # learning is tested here, not the trainer's share of a busy server
    t_start = time.monotonic()
    service = Service.from_config(cfg)
    tok = service.engine.tokenizer
    # a small, recurring workload (a service's traffic repeats): 8 coding prompts asked again and again
    prompts = [tok.apply_chat_template([{"role": "user", "content": p[-300:]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in load_prompts("code", 8)]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    reference_engine = LLMEngine(service.engine.engine.target_path, None,
                                 EngineConfig(max_batch=8, max_model_len=512, device=DEVICE))
    reference = [reference_engine.add_request(p, params) for p in prompts]
    while reference_engine.has_work():
        reference_engine.step()
    expected = {tuple(p): s.output_ids for p, s in zip(prompts, reference)}
    results, mismatches, failures = [], [], []

    async def one(ids):
        async for o in service.engine.generate(ids, params):
            if o.finished:
                results.append((o.draft_version, o.verify_tokens, o.verify_rounds))
                if o.finish_reason not in ("stop", "length"):
                    failures.append(o)
                if o.output_ids != expected[tuple(ids)]:
                    mismatches.append((o.draft_version, o.output_ids))

    async def drive():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 480:  # a bound for a slow machine; here it ends on the learning
            await asyncio.gather(*(one(p) for p in prompts))
            st = service.draft_status()  # the trainer starts once the vocabulary warm-up's samples are handed over
            if (st["trainer"] or {}).get("swaps", 0) >= 2 and _recent(results[-8:]) > 1.5:
                break

    try:
        asyncio.run(drive())
        status = service.draft_status()
    finally:
        service.shutdown()
    assert status["trainer"]["swaps"] >= 2, status["trainer"]
    assert not failures and not mismatches, (failures[:1], mismatches[:1])
    first = _recent([r for r in results if r[0] == 0])
    late = _recent(results[-8:])
    print(f"accept length: day-0 draft {first:.3f}, last 8 requests {late:.3f}, versions {status['draft_version']}, "
          f"by version {status['accept_length_by_version']}")
    assert first < 1.15
    assert late > 1.5, (late, status["accept_length_by_version"])
    assert (tmp_path / "checkpoint" / "draft" / "model.safetensors").exists()
    print(f"learning phase {time.monotonic() - t_start:.0f} s")
    # the trained draft as chain and tree (top-3, 8 nodes) at batch 1 and 8, on the prompts it learned (accepted
    # drafts, and accepted tree paths through the KV compaction) and on two domains it never saw: token for
    # token target-only greedy every time
    learned = len(prompts)
    many, short = prompts + two_domain_prompts(tok, 1), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    target = service.engine.engine.target_path
    want, _ = run_all(LLMEngine(target, None, EngineConfig(max_batch=8, max_model_len=1024, device=DEVICE)),
                      many, short)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    for batch, topk, nodes in ((1, 1, 4), (8, 1, 4), (1, 3, 8), (8, 3, 8)):
        eng = LLMEngine(target, load_served_draft(str(tmp_path / "checkpoint")),
                        EngineConfig(max_batch=batch, max_model_len=1024, lookahead=3, topk=topk,
                                     num_draft_tokens=nodes, device=DEVICE, adaptive=False))
        captured = []
        eng.on_sample = captured.append
        got, seqs = run_all(eng, many, short)
        assert got == want, (batch, topk)
        accept = _recent([(0, s.verify_tokens, s.verify_rounds) for s in seqs[:learned]])
        print(f"trained draft, batch {batch}, topk {topk}: accept length {accept:.3f} on the learned prompts, "
              f"{_recent([(0, s.verify_tokens, s.verify_rounds) for s in seqs[learned:]]):.3f} on unseen ones")
        assert accept > 1.3
        if topk == 1:  # the trainer's replay of greedy serving (guard.py) counts what the engine counted
            sim = simulated_acceptance(eng.draft, captured, eng.target.lm_head.weight, 3, eng.draft.target_to_draft())
            rounds = sum(s.verify_rounds for s in seqs)
            print(f"  replayed from the samples: {sim['served_greedy_accept_length']:.3f} ({sim['rounds']} rounds, "
                  f"engine {rounds}); position-averaged {sim['greedy_accept_length']:.3f}")
            assert sim["completion_tokens"] == sum(len(s.output_ids) for s in seqs)
            assert abs(sim["rounds"] - rounds) <= 2  # a near-tie argmax may flip between two fp32 code paths
        # what those requests left for the trainer: HF's hidden states, truthful rounds (every 4th sample)
        assert len(captured) == len(many)
        assert sum(check_sample(s, hf, eng.target.aux_layers, atol=2e-3) for s in captured[::4]) > 0
    print(f"whole test {time.monotonic() - t_start:.0f} s")


def _recent(rows):
    return sum(r[1] for r in rows) / max(1, sum(r[2] for r in rows))
