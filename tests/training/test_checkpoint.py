"""Checkpoint/resume round trip, and kill -9 during checkpoint writes leaves a loadable checkpoint."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from aurora.training import OnlineTrainer, TrainConfig
from aurora.training.checkpoint import atomic_torch_save, load_served_draft, read_trainer_state
from conftest import make_draft


def test_checkpoint_resume_round_trip(target, samples, tmp_path):
    published = []
    cfg = TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path), heldout_every=0)
    tr = OnlineTrainer(make_draft(target, samples), target.lm_head.weight, cfg, lambda sd, v, acc: published.append(v))
    for i in range(3):
        tr.train_step(samples[i * 8:(i + 1) * 8])
    tr.share.step_s = 2.5  # what serving is owed travels with the checkpoint (aurora/sharing.py)
    tr.share.owe(1.5)
    assert tr.swap_now() == 1  # publish checkpoints
    served = load_served_draft(str(tmp_path))
    with open(tmp_path / "draft" / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLMEagle3"]
    assert torch.equal(served.fc.weight, tr.master.fc.weight.detach())  # engine dtype (fp32 here)
    assert torch.equal(served.d2t, tr.master.d2t)

    got = []
    cfg2 = TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path), resume=True, heldout_every=0)
    tr2 = OnlineTrainer(make_draft(target, samples, seed=5), target.lm_head.weight, cfg2,
                        lambda sd, v, acc: got.append((v, sd)))
    for k, v in tr.master.state_dict().items():
        assert torch.equal(v, tr2.master.state_dict()[k]), k
    o1, o2 = tr.optimizer.state_dict(), tr2.optimizer.state_dict()
    for pid, st in o1["state"].items():
        assert torch.equal(st["exp_avg"], o2["state"][pid]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], o2["state"][pid]["exp_avg_sq"])
    assert tr2.scheduler.last_epoch == tr.scheduler.last_epoch == 3
    assert (tr2.version, tr2.steps, tr2.swaps) == (1, 3, 1)
    assert tr2.share.step_s > 0 and tr2.share.owed_s >= 1.5  # the guard's pass at the swap adds to both
    assert (tr2.share.step_s, tr2.share.owed_s) == (tr.share.step_s, tr.share.owed_s)
    tr2.start()  # hands the engine the restored weights under the restored version
    tr2.stop()
    assert got[0][0] == 1 and torch.equal(got[0][1]["fc.weight"], tr.master.fc.weight.detach().to(torch.float32))
    # training continues identically from the restored state
    a, b = tr.train_step(samples[40:48]), tr2.train_step(samples[40:48])
    assert abs(a - b) < 1e-6


def test_a_resumed_trainer_hands_the_engine_its_versions_prediction(target, samples, tmp_path):
    """The held-out prediction published with a version is checkpointed with it: a restarted server decides how
    far to speculate from it at once instead of first speculating at full depth to find out."""
    published = []
    cfg = TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path), heldout_every=2)
    tr = OnlineTrainer(make_draft(target, samples), target.lm_head.weight, cfg,
                       lambda sd, v, acc: published.append((v, acc)))
    for s in samples[:16]:
        tr.add_sample(s)  # every second one is held out for the guard's replay
    assert tr.buffer.heldout()
    tr.train_step(samples[16:24])
    assert tr.swap_now() == 1
    (version, predicted), = published
    assert version == 1 and len(predicted) == 3 and all(0.0 <= p <= 1.0 for p in predicted)
    assert read_trainer_state(str(tmp_path))["acceptance"] == predicted

    got = []
    tr2 = OnlineTrainer(make_draft(target, samples, seed=5), target.lm_head.weight,
                        TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path), resume=True, heldout_every=2),
                        lambda sd, v, acc: got.append((v, acc)))
    tr2.start()
    tr2.stop()
    assert got == [(1, predicted)]

    state = read_trainer_state(str(tmp_path))  # a checkpoint written before the prediction was kept
    del state["acceptance"]
    atomic_torch_save(state, str(tmp_path / "trainer.pt"))
    old = []
    tr3 = OnlineTrainer(make_draft(target, samples, seed=6), target.lm_head.weight,
                        TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path), resume=True, heldout_every=2),
                        lambda sd, v, acc: old.append((v, acc)))
    tr3.start()
    tr3.stop()
    assert old == [(1, None)]  # no prediction: the engine observes the draft at full depth first


def test_a_resumed_head_that_never_published_is_served_as_unguarded(target, samples, tmp_path):
    """Version 0 checkpointed without a swap (trained, never guarded): resumed, it is handed to the engine with
    the caller's prior for unguarded weights (zeros for a scratch head), not as unknown (full-depth probing)."""
    cfg = TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path))
    tr = OnlineTrainer(make_draft(target, samples), target.lm_head.weight, cfg, lambda sd, v, acc: None)
    tr.train_step(samples[:8])
    tr.save()
    for unguarded, want in (([0.0] * 3, [0.0] * 3), (None, None)):
        got = []
        tr2 = OnlineTrainer(make_draft(target, samples, seed=5), target.lm_head.weight,
                            TrainConfig(ttt_length=3, checkpoint_dir=str(tmp_path), resume=True),
                            lambda sd, v, acc: got.append((v, acc)))
        tr2.start(unguarded=unguarded)
        tr2.stop()
        assert got == [(0, want)]


def test_the_served_prior_day0_resumed_and_given(tmp_path):
    """What the engine's depth decision starts from: zeros for a fresh head (plain decoding); nothing for a given
    draft, nor for a resumed one, whose prediction arrives with the trainer's republish (test above)."""
    from aurora.server.config import ServeConfig
    from aurora.service import _initial_acceptance

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    cfg = lambda **kw: ServeConfig(lookahead=3, run_dir=str(tmp_path), wandb="disabled", **kw)  # noqa: E731
    assert _initial_acceptance(cfg(draft="scratch"), str(ckpt)) == [0.0] * 3
    atomic_torch_save({"acceptance": [0.6, 0.4, 0.2]}, str(ckpt / "trainer.pt"))
    assert _initial_acceptance(cfg(draft="scratch", resume=True), str(ckpt)) is None
    assert _initial_acceptance(cfg(draft="scratch"), str(ckpt)) == [0.0] * 3  # not resuming: a fresh head
    assert _initial_acceptance(cfg(draft=str(tmp_path / "some-draft")), str(ckpt)) is None


WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from aurora.models.draft import DraftConfig, new_draft
    from aurora.training import OnlineTrainer, TrainConfig
    torch.set_num_threads(1)
    cfg = DraftConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      intermediate_size=256, vocab_size=8192, draft_vocab_size=8192, target_hidden_size=128)
    draft = new_draft(cfg).share_embedding(torch.nn.Embedding(8192, 128))
    tr = OnlineTrainer(draft, torch.zeros(8192, 128), TrainConfig(checkpoint_dir=sys.argv[1]), lambda s, v, acc: None)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            for p in tr.master.parameters():
                p.fill_(float(i))  # every tensor says which save it belongs to
        tr.version = i
        tr.save()
        print(i, flush=True)
""")


def test_kill9_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    here = os.path.dirname(__file__)
    interrupted = 0
    for trial, delay in enumerate([0.0, 0.007]):
        ckpt = tmp_path / f"ckpt{trial}"
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), here], stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(2):  # at least two complete saves, then kill at an arbitrary instant
                assert proc.stdout.readline()
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        interrupted += any(".tmp" in n or n.endswith(".old") for n in os.listdir(ckpt))
        state = read_trainer_state(str(ckpt))
        v = state["counters"]["version"]
        assert v >= 2
        assert all(bool((t == v).all()) for t in state["master"].values() if t.is_floating_point())
        draft = load_served_draft(str(ckpt))
        w = float(draft.fc.weight.detach()[0, 0])
        assert bool((draft.fc.weight == w).all()) and w in (v, v + 1)  # the draft dir may be one save ahead
    print(f"\n{interrupted}/2 kills landed mid-write")
