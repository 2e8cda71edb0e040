"""MiniMax M2.5's shape without its weights: a target directory SGLang serves with `--load-format dummy`, at a
reduced layer count, and a random EAGLE3 draft of the published draft's shape (configs/minimax-m2.5.draft.json).

  python -m aurora.models.minimax_dummy --layers 4 --out /tmp/minimax-dummy   # -> OUT/target, OUT/draft

OUT/target holds
  config.json      the M2.5 fields (REFERENCE.md §4, DEVICE.md) with num_hidden_layers = L
  tokenizer files  a stand-in tokenizer: token id i is the word "t<i>" (200,064 of them), so Aurora's routes work
                   unchanged: token-id prompts to /v1/completions (a list of ints), or text such as "t5 t17";
                   completions come back as such words. SGLang itself runs with --skip-tokenizer-init.
  model.safetensors  only `model.embed_tokens.weight` and `lm_head.weight` (random): the trainer's draft shares the
                   target's embedding and reads it from there (hub.load_embedding), and a trainer learning from
                   the target's final states reads the LM head (hub.load_lm_head); SGLang's dummy loader reads no
                   file, so SGLang's own weights are other random ones (accept length means nothing here anyway).
OUT/draft: the draft's config.json with the reduced target's aux layers, random weights, a draft vocabulary of
the target ids 0..31999.

Aux layers of the reduced model (Aurora's convention: inputs of decoder layers, = HF hidden_states[i]). The real
model captures [2, 31, 59] = SGLang's default [2, L//2, L-3] at L = 62; the reduced model keeps that rule
where it gives three distinct layers (L >= 7), and below that takes the lowest layer whose input is not the
embedding, the middle one and the last: [1, L//2, L-1] (L = 4: [1, 2, 3]). The layers are always written
explicitly to the draft's config.json (SGLang's eagle_config, see DraftConfig.to_hf_dict), so SGLang captures
exactly them at any L.
"""
import argparse
import json
import os

import torch

REAL_LAYERS = 62
REAL_AUX_LAYERS = [2, 31, 59]

# DEVICE.md "MiniMax M2.5's shape without its weights" (fields from REFERENCE.md §4); num_hidden_layers is set
TARGET_FIELDS = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "hidden_size": 3072,
    "intermediate_size": 1536, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 200064, "num_local_experts": 256, "num_experts_per_tok": 8, "max_position_embeddings": 196608,
    "rms_norm_eps": 1e-6, "rope_theta": 5000000.0, "rotary_dim": 64, "partial_rotary_factor": 0.5,
    "use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 200020, "bos_token_id": 200034,
    "hidden_act": "silu"}

DRAFT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "configs", "minimax-m2.5.draft.json")


def aux_layers_for(num_layers: int) -> list[int]:
    """The reduced model's three aux layers (module docstring); [2, 31, 59] at the real 62."""
    if num_layers < 4:
        raise ValueError(f"a target needs >= 4 layers for 3 distinct aux layers above the embedding, got {num_layers}")
    default = [2, num_layers // 2, num_layers - 3]
    return default if len(set(default)) == 3 else [1, num_layers // 2, num_layers - 1]


def target_config(num_layers: int, **overrides) -> dict:
    """config.json of the target at `num_layers` (overrides: other fields, e.g. smaller sizes for tests)."""
    aux_layers_for(num_layers)
    return {**TARGET_FIELDS, **overrides, "num_hidden_layers": num_layers}


def draft_config(num_layers: int, path: str = DRAFT_CONFIG, **overrides):
    """The published draft's shape with the reduced target's aux layers."""
    from aurora.models.draft import DraftConfig

    with open(path) as f:
        d = json.load(f)
    return DraftConfig.from_hf_dict({**d, **overrides, "eagle_config": {
        "eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux_layers_for(num_layers)]}})


def stand_in_tokenizer(vocab_size: int, eos_id: int):
    """Word-level tokenizer over "t0".."t<V-1>": every id decodes to a word and back; text is whitespace-split
    words (an unknown word becomes the eos id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"t{eos_id}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos_id}")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def write_target(out: str, num_layers: int, embedding: bool = True, seed: int = 0, **overrides) -> str:
    os.makedirs(out, exist_ok=True)
    cfg = target_config(num_layers, **overrides)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    stand_in_tokenizer(cfg["vocab_size"], cfg["eos_token_id"]).save_pretrained(out)
    if embedding:
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(seed)

        def table():
            w = torch.empty(cfg["vocab_size"], cfg["hidden_size"], dtype=torch.bfloat16)
            for i in range(0, w.shape[0], 16384):  # in slices: one fp32 copy of the whole table would be 2.5 GB
                w[i:i + 16384] = torch.randn(min(16384, w.shape[0] - i), w.shape[1], generator=gen) * 0.02
            return w
        save_file({"model.embed_tokens.weight": table(), "lm_head.weight": table()},
                  os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def write_draft(out: str, num_layers: int, seed: int = 0, path: str = DRAFT_CONFIG, **overrides) -> str:
    from aurora.models.draft import new_draft, save_draft

    cfg = draft_config(num_layers, path, **overrides)
    draft = new_draft(cfg, dtype=torch.bfloat16, seed=seed)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[:cfg.draft_vocab_size] = True  # draft id i is target id i (d2t all zero)
    draft.set_vocab_map(torch.zeros(cfg.draft_vocab_size, dtype=torch.long), t2d)
    save_draft(draft, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, required=True, help="decoder layers of the reduced target")
    ap.add_argument("--out", required=True, help="writes OUT/target and OUT/draft")
    ap.add_argument("--no-embedding", action="store_true", help="config and tokenizer only (no 1.2 GB embedding)")
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write_target(os.path.join(a.out, "target"), a.layers, embedding=not a.no_embedding, seed=a.seed)
    if not a.no_draft:
        write_draft(os.path.join(a.out, "draft"), a.layers, seed=a.seed)
    print(json.dumps({"target": os.path.join(a.out, "target"), "draft": None if a.no_draft else
                      os.path.join(a.out, "draft"), "layers": a.layers, "aux_layers": aux_layers_for(a.layers)}))


if __name__ == "__main__":
    main()
