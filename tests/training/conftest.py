"""Shared tiny fixtures: a random Llama target (hidden 64, 4 layers, vocab 512), samples it generated, and a
draft with a 256-token vocabulary chosen from those samples. Everything is CPU and fp32."""
import os

import pytest
import torch
from transformers import LlamaConfig

from aurora.models.draft import DraftConfig, new_draft
from aurora.engine.kv_cache import SlotKVCache, block_mask
from aurora.models.layers import sdpa
from aurora.models.target import TargetModel
from aurora.sample import Sample
from aurora.training import vocab_from_samples

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # shared 2-core CI box: oversubscribed OpenMP spins badly

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
def generate_samples(target: TargetModel, n: int, prompt_len=8, new_tokens=32, seed=0):
    """Sample completions from the target (temperature 1) with a slot KV cache; package them as Samples."""
    gen = torch.Generator().manual_seed(seed)
    c = target.config
    T = prompt_len + new_tokens
    cache = SlotKVCache(c.num_hidden_layers, n, T, c.num_key_value_heads, target.head_dim, torch.float32, "cpu")
    ids = torch.randint(0, VOCAB, (n, prompt_len), generator=gen)
    pos = torch.arange(prompt_len).expand(n, prompt_len)
    tree = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril().expand(n, -1, -1)
    hidden, aux = target(ids, pos, cache.attend(0, pos, block_mask(torch.zeros(n, dtype=torch.long), tree, prompt_len)))
    hs, auxs = [hidden], [aux]
    for p in range(prompt_len, T):
        probs = target.logits(hs[-1][:, -1]).softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
        if p == T - 1:
            break  # the last token is never fed (Sample alignment)
        wp = torch.full((n, 1), p)
        mask = block_mask(torch.full((n,), p), torch.ones(n, 1, 1, dtype=torch.bool), p + 1)
        h, a = target(ids[:, -1:], wp, cache.attend(0, wp, mask))
        hs.append(h)
        auxs.append(a)
    hidden, aux = torch.cat(hs, 1), torch.cat(auxs, 1)  # [n, T-1, .]
    mask = torch.arange(T) >= prompt_len
    return [Sample(request_id=f"s{seed}-{i}", token_ids=ids[i].clone(), prompt_len=prompt_len,
                   aux_hidden=aux[i].clone(), target_hidden=hidden[i].clone(), loss_mask=mask.clone())
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


@pytest.fixture(scope="session")
def trained(target):
    """A draft trained on 256 samples of the tiny target (3 epochs): (train samples, state dict, record)."""
    from aurora.training import OnlineTrainer, TrainConfig
    from aurora.training.guard import simulated_acceptance

    train = generate_samples(target, 256, seed=3)
    heldout = generate_samples(target, 16, seed=2)
    tr = OnlineTrainer(make_draft(target, train), target.lm_head.weight,
                       TrainConfig(lr=1e-2, warmup_steps=5, ttt_length=3), lambda sd, v, acc: None)
    score = lambda: simulated_acceptance(tr.master, heldout, tr.lm_head, 3, tr.target_to_draft)  # noqa: E731
    before, losses = score(), []
    for _ in range(3):
        for i in range(0, len(train), 16):
            losses.append(tr.train_step(train[i:i + 16]))
    return train, {k: v.clone() for k, v in tr.master.state_dict().items()}, \
        {"before": before, "after": score(), "losses": losses, "status": tr.status()}
