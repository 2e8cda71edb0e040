"""The GPU memory budget between SGLang and the trainer (aurora/budget.py) with fake memory numbers: the split
adds up, the user's flag wins, `--trainer-device auto` avoids SGLang's GPUs, and the service's wiring runs the
real trainer probe (one step + one guard pass) on a tiny draft."""
import os

import pytest
import torch

import aurora.service as service_mod
from aurora.budget import (GiB, draft_param_bytes, plan_sglang_fraction, sglang_flag, shares_gpu, trainer_device,
                           trainer_probe, workspace_bytes)
from aurora.models.draft import DraftConfig, Eagle3Draft, new_draft
from aurora.server.config import ServeConfig
from aurora.sglang_engine.launch import server_command
from aurora.training import OnlineTrainer, TrainConfig

H200 = int(139.8 * GiB)


def test_plan_adds_up_and_refuses_too_little():
    for free, trainer in ((H200 - GiB, 6 * GiB), (H200 - 10 * GiB, 30 * GiB), (80 * GiB, 2 * GiB)):
        p = plan_sglang_fraction(H200, free, trainer, None)
        used = p.fraction * H200 + p.trainer + p.sglang_overhead + p.margin
        assert used <= free and free - used < 0.001 * H200 + 1  # everything free is given out, rounded down
        assert p.margin >= p.trainer // 5 and p.sglang_overhead >= 4 * GiB
    p = plan_sglang_fraction(H200, H200, 6 * GiB, trainer_measured=12 * GiB)
    assert p.trainer == 12 * GiB and "measured 12.0" in p.describe() and "--mem-fraction-static" in p.describe()
    assert plan_sglang_fraction(H200, H200, 1).fraction == 0.88  # never more than SGLang's own default
    with pytest.raises(ValueError, match="--trainer-device cuda:N"):
        plan_sglang_fraction(H200, H200, 100 * GiB)


def test_estimate_of_a_real_sized_draft():
    """An EAGLE3 head for an 8B Llama (hidden 4096, vocab 128k, 32k draft vocabulary) beside SGLang on an H200:
    the trainer gets several GiB, SGLang still well over half the GPU (the issue's working run used 0.55)."""
    cfg = DraftConfig(target_hidden_size=4096, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, draft_vocab_size=32000)
    with torch.device("meta"):
        n = sum(p.numel() for p in Eagle3Draft(cfg).parameters())
    trainer = draft_param_bytes(n) + workspace_bytes(2048, 2048, cfg.vocab_size, cfg.draft_vocab_size, 4)
    p = plan_sglang_fraction(H200, H200 - GiB, trainer)
    assert 3 * GiB < trainer < 20 * GiB and 0.55 <= p.fraction < 0.88, (trainer / GiB, p.fraction)


def test_flags_devices_and_command():
    assert sglang_flag("--attention-backend triton --mem-fraction-static 0.6", "--mem-fraction-static") == "0.6"
    assert sglang_flag("--mem-fraction-static=0.5", "--mem-fraction-static") == "0.5"
    assert sglang_flag("--attention-backend triton", "--mem-fraction-static") is None
    assert trainer_device("auto", 1, 2) == "cuda:1" and trainer_device("auto", 1, 1) == "cuda:0"
    assert trainer_device("auto", 2, 2) == "cuda:0" and trainer_device("auto", 2, 4) == "cuda:2"
    assert trainer_device("auto", 1, 2, "--base-gpu-id 1") == "cuda:0"
    assert trainer_device("cuda:0", 1, 8) == "cuda:0" and trainer_device("cpu", 1, 8) == "cpu"
    assert shares_gpu("cuda", 1) and shares_gpu("cuda:1", 2) and not shares_gpu("cuda:1", 1)
    assert not shares_gpu("cpu", 1) and shares_gpu("cuda:1", 1, "--base-gpu-id 1")
    cfg = ServeConfig(engine="sglang", sglang_args="--attention-backend triton", wandb="disabled")
    argv = server_command(cfg, "/m", "/d", 1234, mem_fraction=0.612)
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.612"
    cfg = ServeConfig(engine="sglang", sglang_args="--mem-fraction-static 0.7", wandb="disabled")
    argv = server_command(cfg, "/m", "/d", 1234, mem_fraction=0.612)
    assert argv.count("--mem-fraction-static") == 1 and argv[argv.index("--mem-fraction-static") + 1] == "0.7"
    assert "--mem-fraction-static" not in server_command(cfg.__class__(engine="sglang", wandb="disabled"), "/m", None, 1)


def tiny_draft(draft_vocab_size: int = 512):
    cfg = DraftConfig(target_hidden_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=512, draft_vocab_size=draft_vocab_size)
    draft = new_draft(cfg).to(torch.bfloat16)
    return draft.share_embedding(torch.nn.Embedding(512, 64).to(torch.bfloat16).requires_grad_(False))


def test_probe_runs_the_largest_batches(monkeypatch):
    draft = tiny_draft()
    trainer = OnlineTrainer(draft, None, TrainConfig(batch_tokens=256, guard_chunk_tokens=128, ttt_length=3),
                            lambda s, v, acc: None)
    sizes = []
    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda b: sizes.append(sum(s.num_tokens for s in b)) or real(b))
    trainer_probe(trainer, 3 * 64, 512)
    assert sizes == [256] and trainer.steps == 1 and trainer.failures == 0


@pytest.mark.parametrize("draft_vocab", [512, 128], ids=["full-vocabulary", "pruned-vocabulary"])
def test_the_probe_trains_a_copy_and_leaves_the_live_draft_alone(tmp_path, draft_vocab):
    """The service probes the trainer before serving (the SGLang memory split; on a GPU also the kernels' compile)
    with the live draft: one step and one guard pass that must not touch the weights being served. A pruned day-0
    head (`--draft-vocab-size N`) is probed before its vocabulary map is chosen."""
    draft = tiny_draft(draft_vocab)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    tconf = TrainConfig(ttt_length=3, batch_tokens=128, guard_chunk_tokens=64, device="cpu", lr=1e-2,
                        checkpoint_dir=str(tmp_path))
    service_mod._probe_trainer(draft, None, tconf)
    after = draft.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not os.listdir(tmp_path)  # and saved nothing


def test_service_sets_the_fraction_from_the_probe(monkeypatch, tmp_path):
    """The service's split with fake CUDA numbers: the real probe runs (on the CPU), its measured peak and the
    estimate feed the plan; a user flag or a trainer on its own GPU leaves SGLang's choice alone."""
    draft = tiny_draft()
    ran = []
    monkeypatch.setattr(service_mod, "measure_peak", lambda dev, work: (work(), ran.append(dev), 9 * GiB)[2])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (H200 - 2 * GiB, H200))
    tconf = TrainConfig(ttt_length=3, batch_tokens=128, guard_chunk_tokens=64, device="cpu", checkpoint_dir=str(tmp_path))
    cfg = ServeConfig(engine="sglang", wandb="disabled", run_dir=str(tmp_path))
    frac = service_mod._sglang_memory_fraction(cfg, draft, None, tconf, torch.device("cuda:0"))
    n = sum(p.numel() for p in draft.parameters())
    # the probe's peak plus the snapshots it cannot see: 3 kept for rollback + 2 swap buffers, 2 bytes a parameter
    expected = plan_sglang_fraction(H200, H200 - 2 * GiB, 1, 9 * GiB + 2 * n * 5)
    assert ran and abs(frac - expected.fraction) <= 0.001 and not os.listdir(tmp_path)  # the probe saved nothing
    user = ServeConfig(engine="sglang", wandb="disabled", sglang_args="--mem-fraction-static 0.5")
    assert service_mod._sglang_memory_fraction(user, draft, None, tconf, torch.device("cuda:0")) is None
    assert service_mod._sglang_memory_fraction(cfg, draft, None, tconf, torch.device("cuda:1")) is None
    assert len(ran) == 1
