"""Shared tiny fixtures: a random Llama target (hidden 64, 4 layers, vocab 512), samples it generated, and a
draft with a 256-token vocabulary chosen from those samples. Everything is CPU and fp32."""
import os

import pytest
import torch
from transformers import LlamaConfig

from aurora.models.draft import DraftConfig, new_draft
from aurora.models.layers import sdpa
from aurora.models.target import TargetModel
from aurora.sample import Sample
from aurora.training import vocab_from_samples

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB, DRAFT_VOCAB = 512, 256


def causal_attend(layer, q, k, v):
    T = q.shape[1]
    return sdpa(q, k, v, torch.ones(T, T, dtype=torch.bool).tril()[None, None])


def make_target(seed=0) -> TargetModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5)
    target = TargetModel(cfg, aux_layers=[1, 2, 3]).eval().requires_grad_(False)  # default [2,2,1] repeats at L=4
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)  # a peaked target, like a trained LM (default init is nearly uniform)
    return target


@torch.no_grad()
def generate_samples(target: TargetModel, n: int, prompt_len=8, new_tokens=32, seed=0, proposals=None):
    """Sample completions from the target (temperature 1) and package them as aurora Samples."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, prompt_len), generator=gen)
    for _ in range(new_tokens):
        T = ids.shape[1]
        hidden, _ = target(ids, torch.arange(T).expand(n, T), causal_attend)
        probs = target.logits(hidden[:, -1]).softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    T = ids.shape[1]
    hidden, aux = target(ids, torch.arange(T).expand(n, T), causal_attend)
    mask = torch.arange(T) >= prompt_len
    return [Sample(request_id=f"s{seed}-{i}", token_ids=ids[i].clone(), prompt_len=prompt_len,
                   aux_hidden=aux[i, :T - 1].clone(), target_hidden=hidden[i, :T - 1].clone(), loss_mask=mask.clone())
            for i in range(n)]


def make_draft(target: TargetModel, samples, seed=0):
    cfg = DraftConfig.from_target(target.config, draft_vocab_size=DRAFT_VOCAB)
    draft = new_draft(cfg, seed=seed)
    draft.set_vocab_map(*vocab_from_samples(samples, DRAFT_VOCAB, VOCAB))
    return draft.share_embedding(target.embed_tokens)


@pytest.fixture(scope="session")
def target():
    return make_target()


@pytest.fixture(scope="session")
def samples(target):
    return generate_samples(target, 48, seed=1)


@pytest.fixture(scope="session")
def heldout(target):
    return generate_samples(target, 16, seed=2)
