"""MiniMax M2.5 at its real shape on the `meta` device (no memory, no weights): the generated target config builds
in Hugging Face's own MiniMaxM2 class with the published sizes, the aux layers of a reduced model are distinct
and map to [2, 31, 59] at the real 62 layers, the draft's config.json names them the way SGLang reads them, and
the draft of configs/minimax-m2.5.draft.json has ~243M parameters over a 32,000-of-200,064 vocabulary."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from aurora.models.draft import DraftConfig, Eagle3Draft
from aurora.models.minimax_dummy import REAL_AUX_LAYERS, REAL_LAYERS, aux_layers_for, draft_config, target_config


def meta_target(layers: int):
    cfg = AutoConfig.for_model(**{k: v for k, v in target_config(layers).items() if k != "architectures"})
    with torch.device("meta"):
        return cfg, AutoModelForCausalLM.from_config(cfg)


def sglang_capture_layers(draft_hf: dict, num_layers: int) -> list[int]:
    """SGLang 0.5.17's rule (MiniMaxM2ForCausalLM.set_eagle3_layers_to_capture): eagle_config's ids + 1, else
    [2, L//2, L-3]; the input of each of those decoder layers is captured."""
    ids = (draft_hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [2, num_layers // 2, num_layers - 3] if ids is None else [i + 1 for i in ids]


def test_target_shape_and_parameter_counts():
    cfg, model = meta_target(4)
    assert cfg.model_type == "minimax_m2" and cfg.num_hidden_layers == 4 and cfg.vocab_size == 200064
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layer = n(model.model.layers[0])
    # attention: q 3072->48*128, k/v 3072->8*128, o 48*128->3072; MoE: 256 experts of gate/up/down 3072x1536
    attn = 3072 * 6144 + 2 * 3072 * 1024 + 6144 * 3072
    experts = 256 * 3 * 3072 * 1536
    assert experts < layer < attn + experts + 256 * 3072 + 10 * 6144 + 4 * 3072  # + router, norms, qk-norms
    assert 7.2e9 < 2 * layer < 7.5e9  # bf16 bytes per layer (DEVICE.md: ~7.4 GB)
    embed = 200064 * 3072
    assert n(model) == 4 * layer + 2 * embed + 3072  # untied head, final norm
    total = REAL_LAYERS * layer + 2 * embed + 3072
    assert abs(total / 229.9e9 - 1) < 0.01  # REFERENCE.md §4: 229.9B total
    shapes = {k: tuple(v.shape) for k, v in model.model.layers[0].named_parameters()}
    assert shapes["self_attn.q_proj.weight"] == (6144, 3072) and shapes["self_attn.k_proj.weight"] == (1024, 3072)


@pytest.mark.parametrize("layers", [4, 5, 6, 7, 10, 31, 62])
def test_aux_layer_mapping(layers):
    aux = aux_layers_for(layers)
    assert len(set(aux)) == 3 and aux == sorted(aux) and 1 <= aux[0] and aux[-1] < layers
    hf = draft_config(layers).to_hf_dict()
    assert sglang_capture_layers(hf, layers) == aux  # what SGLang captures is what Aurora names
    assert DraftConfig.from_hf_dict(json.loads(json.dumps(hf))).aux_layers == aux  # survives a checkpoint
    if layers >= 7:
        assert aux == [2, layers // 2, layers - 3]  # the real model's rule where it does not collapse
    if layers == 4:
        assert sglang_capture_layers({}, 4) == [2, 2, 1]  # SGLang's default collapses: why ids are written


def test_real_depth_keeps_published_layers():
    assert aux_layers_for(REAL_LAYERS) == REAL_AUX_LAYERS == [2, 31, 59]
    with pytest.raises(ValueError, match=">= 4 layers"):
        aux_layers_for(3)


def test_draft_shape_and_parameter_count():
    cfg = draft_config(4)
    with torch.device("meta"):
        draft = Eagle3Draft(cfg)
    assert cfg.vocab_size == 200064 and cfg.draft_vocab_size == 32000 and cfg.aux_layers == [1, 2, 3]
    n = sum(p.numel() for p in draft.parameters())
    assert n == 9216 * 3072 + 6144 * 3072 + 2 * 6144 * 1024 + 3072 * 3072 + 3 * 3072 * 8192 + 32000 * 3072 + 4 * 3072
    assert 242e6 < n < 244e6 and abs(2 * n / 2**20 - 464) < 1  # ~243M parameters, ~464 MiB in bf16
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert shapes["fc.weight"] == (3072, 3 * 3072)  # three captured 3072-wide target states per token
    assert shapes["midlayer.self_attn.q_proj.weight"] == (24 * 128, 2 * 3072)
    assert shapes["lm_head.weight"] == (32000, 3072) and shapes["d2t"] == (32000,) and shapes["t2d"] == (200064,)
    _, target = meta_target(4)
    assert target.model.embed_tokens.weight.shape == (cfg.vocab_size, cfg.hidden_size)  # the draft shares it
