"""Prefill on a GPU. Its eager forward (graphs off, or a group larger than the staging rows) must not pay a per-shape
attention plan: the built-in engine admits requests in groups whose padded shapes rarely repeat (on a CPU PyTorch
has no cuDNN attention to choose). Its CUDA graphs must leave every row as the eager forward does, replay after
replay, and give the target's own first tokens."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from aurora.engine.engine import EngineConfig, LLMEngine
from tests.prefill import BACKGROUND, GROUP, compare, runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs and cuDNN attention exist on a GPU only "
                                       "(test_prefill_staged.py checks the staged prefill's steps on a CPU)")
QUESTIONS = ("What is a prime number?", "Name three rivers in Europe, please.", "Write a haiku about the sea.")


def _prefill(engine, ids):
    for row in range(len(ids)):
        engine.runner.set_row(row, 0.0, 1.0, 0, 0)
    return engine.runner.prefill(0, ids, True, False)


def test_prefill_of_new_shapes_runs_no_cudnn_attention(smollm2_dir):
    eng = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024, cuda_graphs=False))  # bf16
    ids = [eng.tokenizer.encode(t) for t in QUESTIONS]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for n in (1, 2, 3):  # three new (batch, length) shapes
            _prefill(eng, ids[:n])
    names = [e.key for e in prof.key_averages()]
    assert any("scaled_dot_product" in n for n in names), names  # attention did run through SDPA
    assert not [n for n in names if "cudnn" in n.lower() and "attention" in n.lower()], names


@pytest.mark.parametrize("graphs", [False, True])
def test_prefill_first_tokens_equal_hugging_face(smollm2_dir, graphs):
    """Eager or replayed, a prefill gives the target's own next token (fp32 on both sides)."""
    eng = LLMEngine(smollm2_dir, None, EngineConfig(max_batch=8, max_model_len=1024, dtype="float32",
                                                    cuda_graphs=graphs))
    ids = [eng.tokenizer.encode(t) for t in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [int(hf(torch.tensor([p])).logits[0, -1].argmax()) for p in ids]
    assert _prefill(eng, ids) == expected
    # graphs on: the prefill graphs were captured at start, with no fallback to the eager prefill
    assert eng.runner.staged_prefill == graphs and any(k[0] == "prefill" for k in eng.runner.graphs) == graphs


def test_graphed_prefill_leaves_rows_as_the_eager_one(tiny_target_dir):
    """Captures, then replays with other rows, lengths, sampling and with or without the draft: every row as eager."""
    other = [[(13 * i + j) % 90 + 3 for j in range(n)] for i, n in enumerate((40, 12))]
    calls = [(0, BACKGROUND, True, False, True), (1, GROUP, True, False, True), (3, other, True, False, True),
             (2, GROUP, True, False, False), (0, other, False, True, True), (4, other, False, True, True),
             (2, [GROUP[0]], True, False, True)]
    eager = compare(lambda: runner(tiny_target_dir, False, "cuda"),
                    lambda: runner(tiny_target_dir, True, "cuda", cuda_graphs=True), calls)
    assert eager["cache_len"].tolist() == [40, 12, 9, 33, 40, 12] and eager["lag"][3] == 33
