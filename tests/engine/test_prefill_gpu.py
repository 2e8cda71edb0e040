"""A prefill's attention must not pay a per-shape plan: the built-in engine admits requests in groups whose padded
shapes rarely repeat (GPU only; on a CPU PyTorch has no cuDNN attention to choose)."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from aurora.engine.engine import EngineConfig, LLMEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="a prefill chooses its attention kernels on a GPU only (no cuDNN on a CPU)")
QUESTIONS = ("What is a prime number?", "Name three rivers in Europe, please.", "Write a haiku about the sea.")


def _prefill(engine, ids):
    for row in range(len(ids)):
        engine.runner.set_row(row, 0.0, 1.0, 0, 0)
    return engine.runner.prefill(0, ids, True, False)


def test_prefill_of_new_shapes_runs_no_cudnn_attention(smollm2_dir):
    eng = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024))  # bf16, as served
    ids = [eng.tokenizer.encode(t) for t in QUESTIONS]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for n in (1, 2, 3):  # three new (batch, length) shapes
            _prefill(eng, ids[:n])
    names = [e.key for e in prof.key_averages()]
    assert any("scaled_dot_product" in n for n in names), names  # attention did run through SDPA
    assert not [n for n in names if "cudnn" in n.lower() and "attention" in n.lower()], names


def test_prefill_first_tokens_equal_hugging_face(smollm2_dir):
    """The attention kernel a prefill now runs gives the target's own next token (fp32 on both sides)."""
    eng = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024, dtype="float32"))
    ids = [eng.tokenizer.encode(t) for t in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [int(hf(torch.tensor([p])).logits[0, -1].argmax()) for p in ids]
    assert _prefill(eng, ids) == expected
