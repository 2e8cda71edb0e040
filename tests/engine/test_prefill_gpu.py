"""A prefill's attention must not pay a per-shape plan: the built-in engine admits requests in groups whose padded
shapes rarely repeat (GPU only; on a CPU PyTorch has no cuDNN attention to choose)."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from aurora.engine.engine import EngineConfig, LLMEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention exists only on a GPU")


def test_prefill_of_new_shapes_runs_no_cudnn_attention(smollm2_dir):
    eng = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024))
    runner = eng.runner
    for row in range(3):
        runner.set_row(row, 0.0, 1.0, 0, 0)
    ids = [eng.tokenizer.encode(t) for t in ("What is a prime number?", "Name three rivers in Europe, please.",
                                              "Write a haiku about the sea.")]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for n in (1, 2, 3):  # three new (batch, length) shapes
            runner.prefill(0, ids[:n], True, False)
    names = [e.key for e in prof.key_averages()]
    assert any("scaled_dot_product" in n for n in names), names  # attention did run through SDPA
    assert not [n for n in names if "cudnn" in n.lower() and "attention" in n.lower()], names
    # and the engine still decodes what the plain target decodes: the first tokens equal a fresh greedy prefill
    ref = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024))
    for row in range(3):
        ref.runner.set_row(row, 0.0, 1.0, 0, 0)
    assert runner.prefill(0, ids, True, False) == ref.runner.prefill(0, ids, True, False)
