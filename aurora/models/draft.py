"""The EAGLE3 draft head (REFERENCE.md §1), its construction from a target config, and its checkpoint format.

One Llama decoder layer whose attention reads [input_layernorm(embed(token)), hidden_norm(g)] (width 2H):
  step 0:  g = fc(concat(aux_low, aux_mid, aux_high))      [3*Ht] -> [H]
  step k:  g = the draft's own previous pre-norm hidden state
  out    = decoder layer(...) with residual g;  logits = lm_head(norm(out)) over the draft vocabulary.
The token embedding belongs to the target (shared, frozen); the draft holds a reference, never a copy.
Checkpoints load unchanged in SGLang and vLLM: no `model.` prefix, no `embed_tokens`, `d2t`/`t2d` included.
"""
import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aurora.models.layers import MLP, Attend, Attention, RMSNorm, Rotary


@dataclass
class DraftConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    aux_layers: list[int] | None = None  # target layers whose inputs feed fc (Aurora's convention, = HF
                                         # hidden_states[i]); None: SGLang's default [2, L//2, L-3]

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"EAGLE3 draft supports hidden_act 'silu' only, got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in (0, vocab_size={self.vocab_size}]")
        if self.aux_layers is not None and (len(set(self.aux_layers)) != 3 or min(self.aux_layers) < 1
                                            or list(self.aux_layers) != sorted(self.aux_layers)):
            # ascending: SGLang concatenates the captured states in layer order, whatever the list's order
            raise ValueError(f"aux_layers must be 3 ascending target layers >= 1, got {self.aux_layers}")

    @classmethod
    def from_target(cls, tcfg, draft_vocab_size: int | None = None) -> "DraftConfig":
        """Day-0 draft shaped like the target's layers (what SpecForge and Aurora build)."""
        rope = dict(getattr(tcfg, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(tcfg, "rope_theta", 10000.0)
        scaling = rope if rope and rope.get("rope_type", "default") != "default" else None
        H = tcfg.hidden_size
        return cls(hidden_size=H, num_attention_heads=tcfg.num_attention_heads,
                   num_key_value_heads=tcfg.num_key_value_heads,
                   head_dim=getattr(tcfg, "head_dim", None) or H // tcfg.num_attention_heads,
                   intermediate_size=tcfg.intermediate_size, vocab_size=tcfg.vocab_size,
                   draft_vocab_size=draft_vocab_size or tcfg.vocab_size, target_hidden_size=H,
                   rms_norm_eps=tcfg.rms_norm_eps, rope_theta=float(theta), rope_scaling=scaling,
                   max_position_embeddings=tcfg.max_position_embeddings)

    def to_hf_dict(self) -> dict:
        """config.json as SGLang/vLLM read it; no norm_output (REFERENCE §1). No aux layer ids either unless
        aux_layers is set (a target whose default layers collapse, e.g. a reduced-depth one): then SGLang's
        `eagle_config.eagle_aux_hidden_state_layer_ids`, which SGLang 0.5.17 turns into capture layers id+1
        (`set_eagle3_layers_to_capture`), so the ids written are aux_layers - 1. vLLM does not read that
        nested key and keeps its default layers."""
        d = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
                "hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size, "rms_norm_eps": self.rms_norm_eps,
                "hidden_act": self.hidden_act, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "max_position_embeddings": self.max_position_embeddings, "vocab_size": self.vocab_size,
                "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        if self.aux_layers is not None:
            d["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in self.aux_layers],
                                 "use_aux_hidden_state": True}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DraftConfig":
        H = d["hidden_size"]
        theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(hidden_size=H, num_attention_heads=d["num_attention_heads"],
                   num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                   head_dim=d.get("head_dim") or H // d["num_attention_heads"],
                   intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                   draft_vocab_size=d.get("draft_vocab_size") or d["vocab_size"],
                   target_hidden_size=d.get("target_hidden_size") or H, rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                   hidden_act=d.get("hidden_act", "silu"), rope_theta=float(theta),
                   rope_scaling=d.get("rope_scaling"), max_position_embeddings=d.get("max_position_embeddings", 4096),
                   aux_layers=_aux_layers_from_hf(d))

    def rotary_config(self):
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope.setdefault("rope_type", rope.get("type", "default"))
        return LlamaConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                           head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
                           rope_parameters=rope)


def _aux_layers_from_hf(d: dict) -> list[int] | None:
    ids = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return None if ids is None else [int(i) + 1 for i in ids]  # SGLang captures the input of layer id+1


class MidLayer(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(0, 2 * c.hidden_size, c.hidden_size, c.num_attention_heads,
                                   c.num_key_value_heads, c.head_dim)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)


class Eagle3Draft(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = c = config
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        # target_id = draft_id + d2t[draft_id]; t2d marks target ids inside the draft vocabulary
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool) if c.draft_vocab_size == c.vocab_size
                             else torch.zeros(c.vocab_size, dtype=torch.bool))
        self.rotary = Rotary(c.rotary_config())
        self.embed: nn.Embedding | None = None  # the target's, attached with share_embedding

    def share_embedding(self, embedding: nn.Embedding) -> "Eagle3Draft":
        if embedding.weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"target embedding {tuple(embedding.weight.shape)} does not fit the draft "
                             f"(vocab {self.config.vocab_size}, hidden {self.config.hidden_size})")
        object.__setattr__(self, "embed", embedding)  # not registered: not a draft parameter, never saved
        return self

    def project(self, aux: torch.Tensor) -> torch.Tensor:
        """Step-0 input: aux [B,T,3Ht] (concatenated target hidden states) -> g [B,T,H]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, g: torch.Tensor, positions: torch.Tensor, attend: Attend,
                with_logits: bool = True):
        """input_ids [B,T] (token x_{t+1} at position t), g [B,T,H] -> (pre-norm hidden [B,T,H], logits [B,T,Vd]).
        The trainer passes with_logits=False: its fused loss kernel applies the LM head itself."""
        m = self.midlayer
        emb = self.embed(input_ids).to(g.dtype)
        cos, sin = self.rotary(positions, g.dtype)
        x = torch.cat([m.input_layernorm(emb), m.hidden_norm(g)], dim=-1)
        h = g + m.self_attn(x, cos, sin, attend)
        h = h + m.mlp(m.post_attention_layernorm(h))
        return h, (self.logits(h) if with_logits else None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden -> logits over the draft vocabulary."""
        return self.lm_head(self.norm(h))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def target_to_draft(self) -> torch.Tensor:
        """[vocab_size] long: the draft id of each target id, -1 outside the draft vocabulary (on the CPU)."""
        Vd = self.config.draft_vocab_size
        out = torch.full((self.config.vocab_size,), -1, dtype=torch.long)
        out[torch.arange(Vd) + self.d2t.cpu()] = torch.arange(Vd)
        return out

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)


def save_draft(draft: Eagle3Draft, path: str, dtype=torch.bfloat16) -> None:
    """Write config.json + model.safetensors atomically (a temp dir renamed into place)."""
    tmp = path.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in draft.state_dict().items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(draft.config.to_hf_dict(), f, indent=2)
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(path):
        old = path.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)  # the swap is two renames; load_draft falls back to .old if a crash lands between
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def load_draft(path: str, dtype=torch.float32, device="cpu") -> Eagle3Draft:
    with open(os.path.join(path, "config.json")) as f:
        cfg = DraftConfig.from_hf_dict(json.load(f))
    state = load_file(os.path.join(path, "model.safetensors"))
    state = {k.removeprefix("model."): v for k, v in state.items() if "embed_tokens" not in k}
    with torch.device("meta"):
        draft = Eagle3Draft(cfg)
    if "t2d" not in state:  # published checkpoints may omit t2d (training only): derive it from d2t
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        d2t = state.get("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        t2d[torch.arange(cfg.draft_vocab_size) + d2t] = True
        state["t2d"] = t2d
    state.setdefault("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
    draft.load_state_dict(state, strict=True, assign=True)
    draft.rotary = Rotary(cfg.rotary_config())
    return draft.to(device=device, dtype=dtype)


def new_draft(cfg: DraftConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> Eagle3Draft:
    """Random initialisation for day-0 training (HF Llama init: normal(0, 0.02), norms at 1)."""
    gen = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        if cfg.draft_vocab_size == cfg.vocab_size:
            draft.t2d.fill_(True)
    return draft.to(device=device, dtype=dtype)
