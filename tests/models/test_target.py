"""The target wrapper against the plain Hugging Face model (independent reference), SmolLM2, fp32 CPU."""
import torch
from transformers import AutoModelForCausalLM

from aurora.engine.kv_cache import SlotKVCache, block_mask
from aurora.models.target import TargetModel, default_aux_layers

IDS = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 440, 5, 77, 99, 100, 2048, 7]])


def _run(t, ids, start, cache, row=0):
    T = ids.shape[1]
    pos = torch.arange(start, start + T)[None]
    tree = torch.ones(1, T, T, dtype=torch.bool).tril()
    return t(ids, pos, cache.attend(row, pos, block_mask(torch.tensor([start]), tree, cache.max_len)))


def test_aux_and_logits_equal_hf(smollm2_dir):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    t = TargetModel.from_pretrained(smollm2_dir)
    assert t.aux_layers == default_aux_layers(30) == [2, 15, 27]
    c = t.config
    with torch.no_grad():
        ref = hf(IDS, output_hidden_states=True)
        cache = SlotKVCache(c.num_hidden_layers, 2, 64, c.num_key_value_heads, t.head_dim, torch.float32, "cpu")
        h, aux = _run(t, IDS, 0, cache, row=1)
        logits = t.logits(h)
        torch.testing.assert_close(logits, ref.logits, atol=2e-4, rtol=1e-4)
        H = c.hidden_size
        for i, layer in enumerate(t.aux_layers):
            torch.testing.assert_close(aux[..., i * H:(i + 1) * H], ref.hidden_states[layer], atol=2e-4, rtol=1e-4)
        # incremental: the KV cache continues a prefix exactly (prefill 9, then 5 more tokens)
        cache2 = SlotKVCache(c.num_hidden_layers, 1, 64, c.num_key_value_heads, t.head_dim, torch.float32, "cpu")
        h1, _ = _run(t, IDS[:, :9], 0, cache2)
        h2, aux2 = _run(t, IDS[:, 9:], 9, cache2)
        torch.testing.assert_close(t.logits(torch.cat([h1, h2], 1)), ref.logits, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(aux2[..., :H], ref.hidden_states[2][:, 9:], atol=2e-4, rtol=1e-4)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config
    import pytest

    with pytest.raises(ValueError, match="not supported"):
        TargetModel(GPT2Config())


def test_load_embedding_alone_equals_the_models(smollm2_dir):
    from aurora.models import hub
    emb = hub.load_embedding(smollm2_dir)  # in the cache's dtype
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=emb.weight.dtype)
    assert torch.equal(emb.weight, hf.get_input_embeddings().weight) and not emb.weight.requires_grad


def test_load_lm_head_alone_equals_the_models(smollm2_dir, tmp_path):
    import json

    from safetensors.torch import save_file

    from aurora.models import hub
    head = hub.load_lm_head(smollm2_dir)  # SmolLM2 ties its LM head to the input embedding
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=head.dtype)
    assert torch.equal(head, hf.get_output_embeddings().weight)
    # an untied checkpoint: its own lm_head.weight, not the embedding
    untied = tmp_path / "untied"
    untied.mkdir()
    (untied / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "lm_head.weight": torch.ones(8, 4)},
              str(untied / "model.safetensors"))
    assert torch.equal(hub.load_lm_head(str(untied)), torch.ones(8, 4))
