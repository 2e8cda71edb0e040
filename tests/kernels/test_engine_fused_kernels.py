"""The engine with `fused_kernels` (the target's rotary + KV-cache write, add + RMSNorm and SiLU * up in Triton)
computes what the unfused engine computes: the same greedy tokens and the same target hidden states at every position (captured
samples), target-only and speculative, with requests joining and leaving a batch.
On a machine without CUDA the kernel runs in Triton's interpreter (tests/kernels/conftest.py)."""
import pytest
import torch
from transformers import AutoConfig

import aurora.engine.kv_cache as kv_cache
import aurora.models.layers as layers
from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.models.draft import DraftConfig, new_draft

pytest.importorskip("triton")


def _serve(engine, prompts, params):
    samples = {}
    engine.on_sample = lambda s: samples.__setitem__(s.request_id, s)
    seqs = [engine.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs], [samples[str(i)] for i in range(len(prompts))]


def _count(monkeypatch, module, name, calls):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(name), real(*a, **k))[1])


def test_fused_kernels_engine_equals_unfused(tiny_target_dir, monkeypatch):
    calls = []
    _count(monkeypatch, kv_cache, "rope_cache_write", calls)
    for name in ("add_rms_norm", "silu_mul"):
        _count(monkeypatch, layers.fused_ops, name, calls)
    prompts = [[(5 * i + j) % 90 + 1 for j in range(2 + 3 * i % 9)] for i in range(6)]  # 6 requests, batch 4
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    cfg = dict(max_batch=4, max_model_len=64, lookahead=3, dtype="float32")  # fp32 on a GPU too: exact comparison
    ref_ids, ref_samples = _serve(LLMEngine(tiny_target_dir, None, EngineConfig(**cfg, fused_kernels=False)), prompts,
                                  params)
    assert not calls
    draft_cfg = DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir))
    for draft in (None, new_draft(draft_cfg, seed=4)):
        ids, samples = _serve(LLMEngine(tiny_target_dir, draft, EngineConfig(**cfg, fused_kernels=True)), prompts, params)
        assert ids == ref_ids
        for got, want in zip(samples, ref_samples):  # every position's target states, prompt and completion
            torch.testing.assert_close(got.aux_hidden, want.aux_hidden, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.target_hidden, want.target_hidden, rtol=1e-5, atol=1e-5)
    assert set(calls) == {"rope_cache_write", "add_rms_norm", "silu_mul"}  # the fused kernels served those steps
