"""Tiny random models for fast tests: a Llama target with a character-level tokenizer."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = [chr(c) for c in range(32, 127)]  # 95 printable characters + <eos>


def make_tiny_target(out: str, hidden: int = 64, layers: int = 6, seed: int = 0) -> str:
    vocab = {"</s>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0,
                      bos_token_id=None, pad_token_id=None, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peakier logits than the default init, so sampling tests see structure
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
