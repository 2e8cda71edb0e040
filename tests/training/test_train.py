"""Training on samples of a tiny random target lowers the loss and raises simulated acceptance."""
import copy
import functools

import pytest
import torch


def test_training_reduces_loss_and_raises_acceptance(trained):
    _, _, rec = trained
    before, after, losses, st = rec["before"], rec["after"], rec["losses"], rec["status"]
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f}; step accept {before['step_accept']} -> "
          f"{after['step_accept']}; accept_length {before['accept_length']:.3f} -> {after['accept_length']:.3f}; "
          f"greedy {before['greedy_accept_length']:.3f} -> {after['greedy_accept_length']:.3f}; "
          f"{st['tokens_per_second']:.0f} tok/s; train acc {st['acc_per_step']}")
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert after["step_accept"][0] > 1.7 * before["step_accept"][0]  # 0.10 -> 0.22 when measured
    assert after["accept_length"] > before["accept_length"] + 0.08
    assert after["greedy_accept_length"] > before["greedy_accept_length"] + 0.2
    assert st["steps"] == len(losses) and len(st["loss_per_step"]) == 3
    assert torch.isfinite(torch.tensor(st["loss_per_step"])).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: the fused divergence's Triton kernel on bf16 logits"))])
def test_bf16_precision_trains_fp32_master_weights_with_the_fp32_gradient(target, samples, device):
    """precision="bf16" runs the step under bf16 autocast (the GPU default): the gradient it takes agrees with the
    fp32 step's on the same batch, the master weights and optimiser stay fp32, and repeated steps lower the loss."""
    from aurora.training import OnlineTrainer, TrainConfig
    from aurora.training.ttt import collate, ttt_loss

    from conftest import make_draft

    tr = {p: OnlineTrainer(make_draft(target, samples), target.lm_head.weight,
                           TrainConfig(lr=1e-2, warmup_steps=1, ttt_length=3, precision=p, device=device),
                           lambda *_: None)
          for p in ("fp32", "bf16")}
    assert tr["bf16"].status()["precision"] == "bf16"
    auto = OnlineTrainer(make_draft(target, samples), target.lm_head.weight, TrainConfig(device=device),
                         lambda *_: None)
    assert auto.precision == {"cpu": "fp32", "cuda": "bf16"}[device]
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    grads = {}
    for p, t in tr.items():
        batch = collate(samples[:16], 3, t.target_to_draft, device)
        t.master.zero_grad()
        with t._autocast():
            loss, _, _ = ttt_loss(t.master, batch, t.lm_head, "fkl", 3, 0.8, 0.1)
        loss.backward()
        grads[p] = torch.cat([q.grad.flatten() for q in t.master.parameters() if q.grad is not None])
        assert all(q.dtype == torch.float32 for q in t.master.parameters())
    g32, g16 = grads["fp32"], grads["bf16"]
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
    assert cos > 0.98, cos
    assert abs(g16.norm() / g32.norm() - 1) < 0.05
    losses = [tr["bf16"].train_step(samples[:16]) for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(q.dtype == torch.float32 for s in tr["bf16"].optimizer.state.values() for q in s.values()
               if torch.is_tensor(q) and q.dim())


def _fp32_trainer(target, samples, **kw):
    """A trainer of a fresh draft at lr 1e-2 with a one-step warm-up, fp32 (its steps compare exactly)."""
    from aurora.training import OnlineTrainer, TrainConfig

    from conftest import make_draft

    return OnlineTrainer(make_draft(target, samples), target.lm_head.weight,
                         TrainConfig(lr=1e-2, warmup_steps=1, precision="fp32", **kw), lambda *_: None)


def test_training_fewer_ttt_steps_trains_those_steps_only_and_the_guard_still_predicts_every_position(target,
                                                                                                     samples):
    """train_steps=1 with ttt_length 3: a step moves the weights exactly as a trainer whose TTT length is 1 does
    (the same batch, seed and rate); its per-step statistics have one entry; the guard's simulation still scores
    all 3 positions."""
    from aurora.training import TrainConfig

    trainer = functools.partial(_fp32_trainer, target, samples)
    short, one, full = trainer(ttt_length=3, train_steps=1), trainer(ttt_length=1), trainer(ttt_length=3)
    for t in (short, one, full):
        t.train_step(samples[:16])
    for a, b, c in zip(short.master.parameters(), one.master.parameters(), full.master.parameters()):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(short.master.parameters(), full.master.parameters()))
    assert len(short.status()["loss_per_step"]) == 1 and len(full.status()["loss_per_step"]) == 3
    predicted = short._simulate([None], samples[16:24])[0]
    assert len(predicted["step_accept"]) == 3
    with pytest.raises(ValueError, match="train_steps"):
        TrainConfig(ttt_length=3, train_steps=4)


def test_auto_ttt_steps_grow_as_the_trained_steps_accuracies_pass_the_reach(target, samples, tmp_path):
    """train_steps="auto": a fresh trainer trains one TTT step; step k+1 joins once grow_after optimiser steps have
    passed at k and the product of steps 1..k's running accuracies is at least grow_reach; after joining, a step
    moves the weights exactly as a trainer fixed at that many steps does from the same state; at a reach no draft
    attains it stays at one; a resumed trainer keeps the steps it had grown to."""
    from aurora.training import TrainConfig

    trainer = functools.partial(_fp32_trainer, target, samples, ttt_length=3)
    auto = trainer(train_steps="auto", grow_after=2, grow_reach=1e-6, checkpoint_dir=str(tmp_path))
    never = trainer(train_steps="auto", grow_after=1, grow_reach=1.0)
    batch = samples[:16]
    grown = []
    for i in range(6):
        if i == 2:  # auto has just grown to 2 steps: a trainer fixed at 2 from the same state steps the same
            fixed = trainer(train_steps=2)
            fixed.master.load_state_dict(auto.master.state_dict())
            fixed.optimizer.load_state_dict(copy.deepcopy(auto.optimizer.state_dict()))  # else the moments alias
            fixed.train_step(batch)
        auto.train_step(batch)
        never.train_step(batch)
        if i == 2:
            for a, b in zip(auto.master.parameters(), fixed.master.parameters()):
                torch.testing.assert_close(a, b)
        grown.append(auto.ttt_steps)
    assert grown == [1, 2, 2, 3, 3, 3]  # at optimiser steps 2 and 4 (grow_after 2), then capped at ttt_length
    assert len(auto.status()["loss_per_step"]) == 3 and auto.status()["ttt_steps"] == 3
    assert all(a > 0 for a in auto.acc_per_step)  # every step's accuracy was above the tiny reach
    assert never.ttt_steps == 1 and len(never.status()["acc_per_step"]) == 1
    auto.save()
    resumed = trainer(train_steps="auto", checkpoint_dir=str(tmp_path), resume=True)
    assert resumed.ttt_steps == 3 and trainer(train_steps=1, checkpoint_dir=str(tmp_path), resume=True).ttt_steps == 1
    with pytest.raises(ValueError, match="train_steps must be auto"):
        TrainConfig(train_steps="grow")
