"""The target model: a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM) written for speculative serving.

It returns, for every input position, the final normed hidden state and the concatenated auxiliary hidden
states that EAGLE3 reads (inputs of decoder layers `aux_layers`, i.e. HF `hidden_states[i]`). Logits are
computed only where the caller asks (`logits(hidden)`), so verification and capture never pay for a
[T, V] projection they do not use. KV caching is the caller's: it passes an `attend` callable.
"""
import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

from aurora.models.layers import MLP, Attend, Attention, RMSNorm, Rotary, add_rms_norm

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


def default_aux_layers(num_layers: int) -> list[int]:
    """SGLang's default EAGLE3 capture layers: inputs of decoder layers [2, L//2, L-3]."""
    return [2, num_layers // 2, num_layers - 3]


class DecoderLayer(nn.Module):
    def __init__(self, i: int, cfg):
        super().__init__()
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        qk_eps = cfg.rms_norm_eps if cfg.model_type == "qwen3" else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(i, cfg.hidden_size, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, hd, bias=bias, qk_norm_eps=qk_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=bool(getattr(cfg, "mlp_bias", False)))
        self.fused = False  # residual add + RMSNorm in one Triton kernel (serving)

    def forward(self, x, h, cos, sin, attend: Attend, next_norm: RMSNorm):
        """x: residual stream (this layer's input), h: input_layernorm(x). Returns the stream after this layer
        and next_norm of it (the next layer's input norm, or the final norm)."""
        x, h = add_rms_norm(x, self.self_attn(h, cos, sin, attend), self.post_attention_layernorm, self.fused)
        return add_rms_norm(x, self.mlp(h), next_norm, self.fused)


class TargetModel(nn.Module):
    def __init__(self, config, aux_layers: list[int] | None = None):
        super().__init__()
        if config.model_type not in SUPPORTED:
            raise ValueError(f"target model_type {config.model_type!r} is not supported by the built-in engine "
                             f"(supported: {sorted(SUPPORTED)}); serve it with --engine sglang")
        self.config = config
        L = config.num_hidden_layers
        self.aux_layers = list(aux_layers) if aux_layers is not None else default_aux_layers(L)
        if len(self.aux_layers) != 3 or not all(0 <= i < L for i in self.aux_layers):
            raise ValueError(f"aux_layers must be 3 layer indices in [0, {L}), got {self.aux_layers}")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(i, config) for i in range(L))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend):
        """input_ids, positions [B,T] -> (hidden [B,T,H] after the final norm, aux [B,T,3H])."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        aux = {}
        h = self.layers[0].input_layernorm(x)
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                aux[i] = x
            x, h = layer(x, h, cos, sin, attend, self.layers[i + 1].input_layernorm if i + 1 < len(self.layers)
                         else self.norm)
        # small targets repeat a layer in [2, L//2, L-3]; the draft still reads three slices
        return h, torch.cat([aux[i] for i in self.aux_layers], dim=-1)

    def use_fused_kernels(self, on: bool = True) -> None:
        """Serving: residual add + RMSNorm and SiLU * up as single Triton kernels (aurora_kernels.serving)."""
        for layer in self.layers:
            layer.fused = on
            layer.mlp.fused_act = on and layer.mlp.gate_up_weight is not None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu", aux_layers=None) -> "TargetModel":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config, aux_layers)
        state = {}
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        for f in files:
            for name, t in load_file(os.path.join(path, f)).items():
                state[name.removeprefix("model.")] = t
        if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.embed_tokens.weight
        model.rotary = Rotary(config)  # buffers were on meta
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for layer in model.layers:  # frozen weights: fused projections, fewer kernels per decode step
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return model


def read_config_json(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)
