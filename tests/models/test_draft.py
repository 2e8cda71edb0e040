"""EAGLE3 draft head: checkpoint format (REFERENCE.md §1), MiniMax-M2.5 shapes, forward vs plain torch."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig

from aurora.models.draft import DraftConfig, Eagle3Draft, load_draft, new_draft, save_draft
from aurora.models.vocab import build_vocab_map, count_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def tiny_cfg(vd=40):
    tc = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    return DraftConfig.from_target(tc, draft_vocab_size=vd)


def expected_tensors(c: DraftConfig):
    H, I, hd, Vd = c.hidden_size, c.intermediate_size, c.head_dim, c.draft_vocab_size
    return {"midlayer.self_attn.q_proj.weight": (c.num_attention_heads * hd, 2 * H),
            "midlayer.self_attn.k_proj.weight": (c.num_key_value_heads * hd, 2 * H),
            "midlayer.self_attn.v_proj.weight": (c.num_key_value_heads * hd, 2 * H),
            "midlayer.self_attn.o_proj.weight": (H, c.num_attention_heads * hd),
            "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
            "midlayer.mlp.down_proj.weight": (H, I), "midlayer.input_layernorm.weight": (H,),
            "midlayer.hidden_norm.weight": (H,), "midlayer.post_attention_layernorm.weight": (H,),
            "fc.weight": (H, 3 * c.target_hidden_size), "norm.weight": (H,), "lm_head.weight": (Vd, H),
            "d2t": (Vd,), "t2d": (c.vocab_size,)}


def test_save_load_roundtrip_is_bit_exact_and_in_engine_format(tmp_path):
    c = tiny_cfg()
    d = new_draft(c, dtype=torch.bfloat16, seed=3)
    d2t, t2d = build_vocab_map(torch.arange(96).flip(0), 40)
    d.set_vocab_map(d2t, t2d)
    save_draft(d, str(tmp_path / "ck"))
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == expected_tensors(c)  # exactly these names: no model. prefix, no embed_tokens
    cfg = json.load(open(tmp_path / "ck" / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                "rms_norm_eps", "hidden_act", "rope_theta", "rope_scaling", "max_position_embeddings", "vocab_size",
                "draft_vocab_size", "target_hidden_size"):
        assert key in cfg, key
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    assert "eagle_aux_hidden_state_layer_ids" not in json.dumps(cfg) and "norm_output" not in cfg
    back = load_draft(str(tmp_path / "ck"), dtype=torch.bfloat16)
    a, b = d.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # saving again over an existing checkpoint replaces it atomically
    save_draft(back, str(tmp_path / "ck"))
    assert not os.path.exists(tmp_path / "ck.tmp") and not os.path.exists(tmp_path / "ck.old")


def test_minimax_m25_draft_shapes_on_meta():
    cfg = DraftConfig.from_hf_dict(json.load(open(os.path.join(ROOT, "configs", "minimax-m2.5.draft.json"))))
    with torch.device("meta"):
        d = Eagle3Draft(cfg)
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert shapes == expected_tensors(cfg)
    assert shapes["fc.weight"] == (3072, 9216) and shapes["midlayer.self_attn.q_proj.weight"] == (3072, 6144)
    assert shapes["midlayer.self_attn.k_proj.weight"] == (1024, 6144) and shapes["lm_head.weight"] == (32000, 3072)
    n = sum(p.numel() for p in d.parameters())
    assert 242e6 < n < 244e6, n  # ≈243M without the embedding
    assert "embed" not in " ".join(shapes)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x [T, n, hd]
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    f = pos[:, None].double() * inv
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_step(sd, c, emb, g, pos, past_k, past_v):
    """One draft position, plain float64 torch, written from REFERENCE.md §1 (no Aurora code)."""
    W = {k: v.double() for k, v in sd.items()}
    e = c.rms_norm_eps
    x = torch.cat([_rms(emb, W["midlayer.input_layernorm.weight"], e), _rms(g, W["midlayer.hidden_norm.weight"], e)])
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q = _rope((W["midlayer.self_attn.q_proj.weight"] @ x).view(1, nh, hd), pos[None], c.rope_theta)[0]
    k = _rope((W["midlayer.self_attn.k_proj.weight"] @ x).view(1, nkv, hd), pos[None], c.rope_theta)[0]
    v = (W["midlayer.self_attn.v_proj.weight"] @ x).view(nkv, hd)
    K, Vv = torch.stack(past_k + [k]), torch.stack(past_v + [v])  # [S, nkv, hd]
    rep = nh // nkv
    out = []
    for h in range(nh):
        s = K[:, h // rep] @ q[h] / hd ** 0.5
        out.append(torch.softmax(s, 0) @ Vv[:, h // rep])
    h1 = g + W["midlayer.self_attn.o_proj.weight"] @ torch.cat(out)
    m = _rms(h1, W["midlayer.post_attention_layernorm.weight"], e)
    h2 = h1 + W["midlayer.mlp.down_proj.weight"] @ (F.silu(W["midlayer.mlp.gate_proj.weight"] @ m) * (W["midlayer.mlp.up_proj.weight"] @ m))
    return h2, W["lm_head.weight"] @ _rms(h2, W["norm.weight"], e), k, v


def test_forward_matches_plain_torch_step_by_step():
    from aurora.engine.kv_cache import SlotKVCache, block_mask

    torch.manual_seed(0)
    c = tiny_cfg()
    d = new_draft(c, dtype=torch.float64, seed=1)
    embed = torch.nn.Embedding(96, 32).double()
    d.share_embedding(embed)
    sd = d.state_dict()
    T = 5
    aux = torch.randn(1, T, 96, dtype=torch.float64)
    ids = torch.randint(0, 96, (1, T + 2))
    cache = SlotKVCache(1, 1, 16, c.num_key_value_heads, c.head_dim, torch.float64, "cpu")
    # step 0 over T positions from fc(aux): position t reads x[t+1]
    pos = torch.arange(T)[None]
    tree = torch.ones(1, T, T, dtype=torch.bool).tril()
    h, logits = d(ids[:, 1:T + 1], d.project(aux), pos, cache.attend(0, pos, block_mask(torch.tensor([0]), tree, 16)))
    past_k, past_v = [], []
    for t in range(T):
        g = sd["fc.weight"].double() @ aux[0, t]
        rh, rl, k, v = reference_step(sd, c, embed.weight[ids[0, t + 1]], g, torch.tensor(t), past_k, past_v)
        past_k.append(k), past_v.append(v)
        torch.testing.assert_close(h[0, t], rh)
        torch.testing.assert_close(logits[0, t], rl)
    # a later step at position T reads its own pre-norm hidden state from position T-1 and the draft token
    nxt = logits[0, -1].argmax()
    one = torch.ones(1, 1, 1, dtype=torch.bool)
    p = torch.tensor([[T]])
    h2, l2 = d(nxt.view(1, 1), h[:, -1:], p, cache.attend(0, p, block_mask(torch.tensor([T]), one, 16)))
    rh, rl, _, _ = reference_step(sd, c, embed.weight[nxt], h[0, -1], torch.tensor(T), past_k, past_v)
    torch.testing.assert_close(h2[0, 0], rh)
    torch.testing.assert_close(l2[0, 0], rl)


def test_vocab_map_top_n_and_identity():
    counts = count_tokens([[5, 5, 5, 7, 7, 1, 9], [9, 9, 9, 9]], 12)
    d2t, t2d = build_vocab_map(counts, 3)
    kept = torch.arange(3) + d2t
    assert kept.tolist() == [5, 7, 9]  # the three most frequent, ascending
    assert t2d.nonzero().flatten().tolist() == [5, 7, 9]
    d2t, t2d = build_vocab_map(counts, 12)
    assert torch.equal(d2t, torch.zeros(12, dtype=torch.long)) and bool(t2d.all())
    with pytest.raises(ValueError):
        build_vocab_map(counts, 0)


def test_minimax_m25_draft_checkpoint_written_as_sglang_loads(tmp_path):
    """The full-size MiniMax-M2.5 draft (243M parameters, bf16) on disk: SGLang's tensor names and shapes,
    a pruned 32k vocabulary map, the config fields SGLang reads; the aux layers SGLang captures for L=62
    are distinct (engine sglang refuses targets where they are not)."""
    from aurora.models.target import default_aux_layers

    cfg = DraftConfig.from_hf_dict(json.load(open(os.path.join(ROOT, "configs", "minimax-m2.5.draft.json"))))
    assert default_aux_layers(62) == [2, 31, 59]  # MiniMax M2.5 has 62 decoder layers (REFERENCE.md §4)
    draft = new_draft(cfg, dtype=torch.bfloat16)
    d2t, t2d = build_vocab_map(torch.randint(0, 1000, (cfg.vocab_size,)), cfg.draft_vocab_size)
    draft.set_vocab_map(d2t, t2d)
    save_draft(draft, str(tmp_path / "minimax-draft"))
    with safe_open(str(tmp_path / "minimax-draft" / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_slice("fc.weight").get_dtype() == "BF16" and f.get_slice("d2t").get_dtype() == "I64"
    assert shapes == expected_tensors(cfg)
    hf = json.load(open(tmp_path / "minimax-draft" / "config.json"))
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["draft_vocab_size"] == 32000
    assert hf["hidden_size"] == 3072 and hf["vocab_size"] == 200064 and hf["num_hidden_layers"] == 1
    back = load_draft(str(tmp_path / "minimax-draft"), dtype=torch.bfloat16)
    assert torch.equal(back.d2t, d2t) and torch.equal(back.lm_head.weight, draft.lm_head.weight)
