"""The trainer cannot die silently: injected OOMs, NaN losses and guard/publish errors are counted by kind,
backed off (smaller batches, growing sleeps), recovered from when the fault stops, and end in state "failed"
after repeats; /health and /metrics say so over real HTTP while serving goes on. Also the memory bounds:
windows of long samples, padded-size packing, and the guard's chunked held-out pass (equal to one batch)."""
import os
import sys
import time

import httpx
import openai
import pytest
import torch

from aurora.training import OnlineTrainer, TrainConfig
from aurora.training.bounds import bound_samples, pack, split_sample
from aurora.training.faults import FaultInjector, NonFiniteLoss, failure_kind
from aurora.training.guard import simulated_acceptance
from conftest import generate_samples, make_draft

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))


def make_trainer(target, samples, heldout=(), **kw):
    kw.setdefault("backoff_initial_s", 0.05)
    cfg = TrainConfig(ttt_length=3, heldout_every=1 if heldout else 0, heldout_size=16, **kw)
    published = []
    tr = OnlineTrainer(make_draft(target, samples), target.lm_head.weight, cfg,
                       lambda state, version, acceptance: published.append(version))
    for s in heldout:
        tr.add_sample(s)
    tr.buffer.heldout_every = 0  # later samples train
    return tr, published


def wait_for(cond, timeout=60.0, what=""):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.01)


def test_fault_spec_and_kinds():
    f = FaultInjector("trainer_oom:2@1,guard_error:1")
    assert [f.fires("trainer_oom") for _ in range(5)] == [False, True, True, False, False]
    with pytest.raises(RuntimeError, match="injected fault guard_error"):
        f.check("guard_error")
    f.check("guard_error")  # spent
    assert not FaultInjector(None).active and not FaultInjector("").fires("nan_loss")
    for bad in ("oom:1", "trainer_oom", "trainer_oom:x", "trainer_oom:1@y"):
        with pytest.raises(ValueError, match="AURORA_FAULT"):
            FaultInjector(bad)
    with pytest.raises(ValueError, match="AURORA_FAULT"):
        TrainConfig(faults="nope:1")  # refused when configured, not later in the thread
    assert failure_kind(torch.OutOfMemoryError("CUDA out of memory"), "guard") == "oom"
    assert failure_kind(RuntimeError("CUDA error: out of memory"), "step") == "oom"
    assert failure_kind(NonFiniteLoss("nan"), "step") == "nan_loss"
    assert failure_kind(KeyError("x"), "guard") == "guard_error"
    assert failure_kind(KeyError("x"), "publish") == "exception"


def test_nan_step_leaves_no_trace(target, samples):
    """A NaN step changes nothing: after it, one good step gives exactly what a trainer that never saw the NaN
    step gives (weights, AdamW moments and the warm-up schedule)."""
    faulty, _ = make_trainer(target, samples, faults="nan_loss:1")
    clean, _ = make_trainer(target, samples)
    before = {k: v.clone() for k, v in faulty.master.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        faulty.train_step(samples[:4])
    assert all(torch.equal(before[k], v) for k, v in faulty.master.state_dict().items())
    assert not faulty.optimizer.state and faulty.steps == 0
    faulty.train_step(samples[4:8])
    clean.train_step(samples[4:8])
    for (k, a), b in zip(faulty.master.state_dict().items(), clean.master.state_dict().values()):
        assert torch.equal(a, b), k


def test_oom_backs_off_recovers_and_restores_batch(target, samples):
    tr, _ = make_trainer(target, samples, faults="trainer_oom:3", batch_tokens=160, min_batch_tokens=40,
                         restore_after=2, min_samples_before_train=1, backoff_initial_s=0.3,
                         max_consecutive_failures=5)
    tr.start()
    seen = []
    try:
        for s in samples[:40]:  # 40 tokens each: 4 per full batch
            tr.add_sample(s)
        wait_for(lambda: seen.append((tr.status()["state"], tr.status()["batch_tokens"])) or tr.status()["steps"] >= 1,
                 what="first good step")
        st = tr.status()
        assert st["failures_by_kind"] == {"oom": 3, "nan_loss": 0, "guard_error": 0, "exception": 0}
        assert "OutOfMemoryError" in st["last_error"] and st["last_failure_kind"] == "oom"
        assert ("backing_off", 80) in seen and ("backing_off", 40) in seen  # halved per failure, floor 40
        wait_for(lambda: tr.status()["batch_tokens"] == 160, what="batch restored")  # 40 -> 80 -> 160
        assert tr.status()["state"] in ("training", "idle") and tr.status()["consecutive_failures"] == 0
        wait_for(lambda: tr.status()["buffer_size"] == 0)
    finally:
        tr.stop()
    st = tr.status()
    dropped = st["samples_dropped_by_reason"]
    assert dropped["step_failed"] == 4 + 2 + 1  # each failed batch's samples (160, 80, 40 tokens): counted
    assert st["samples_trained"] + dropped["step_failed"] == 40 and dropped["too_long"] == 0
    # the books scripts/soak.py checks: every captured sample is trained, held out, dropped by reason or waiting
    assert st["samples_in_training"] == 0
    assert st["samples_captured"] == (st["samples_trained"] + st["samples_heldout"] + sum(dropped.values())
                                      + st["buffer_size"] + st["samples_in_training"])


def test_repeated_failures_end_in_failed_state(target, samples, monkeypatch):
    monkeypatch.setenv("AURORA_FAULT", "trainer_oom:1000")
    tr, _ = make_trainer(target, samples, min_samples_before_train=1, max_consecutive_failures=3,
                         backoff_initial_s=0.01, batch_tokens=80, min_batch_tokens=40)
    tr.start()
    for s in samples[:10]:
        tr.add_sample(s)
    wait_for(lambda: tr.status()["state"] == "failed")
    tr._thread.join(5)
    assert not tr._thread.is_alive()
    st = tr.status()
    assert st["failures_by_kind"]["oom"] == 3 and st["failures"] == 3 and st["steps"] == 0
    assert "injected fault trainer_oom" in st["last_error"]
    tr.stop()
    assert tr.status()["state"] == "failed"


@pytest.mark.parametrize("fault,kind", [("guard_error:2", "guard_error"), ("guard_oom:1", "oom"),
                                        ("publish_error:1", "exception")])
def test_swap_faults_are_retried(target, samples, heldout, fault, kind):
    tr, published = make_trainer(target, samples, heldout, faults=fault, min_samples_before_train=1,
                                 sync_every=1, guard_margin=10.0)
    tr.start()
    try:
        tr.add_sample(samples[0])
        tr.request_finished()  # one sync request: failed n times, then published by the retries
        wait_for(lambda: published == [1], what="published after the retries")
    finally:
        tr.stop()
    st = tr.status()
    n = int(fault.split(":")[1])
    assert st["failures_by_kind"][kind] == n and st["version"] == 1 and st["state"] == "stopped"


def test_admin_swap_failure_is_counted_not_raised(target, samples, heldout):
    tr, published = make_trainer(target, samples, heldout, faults="guard_error:1")
    assert tr.swap_now() is None and published == []
    assert tr.status()["failures_by_kind"]["guard_error"] == 1 and tr.status()["state"] == "backing_off"
    assert tr.swap_now() == 1 and tr.status()["state"] == "idle"


def test_split_windows_cover_every_prediction(target):
    s = generate_samples(target, 1, prompt_len=8, new_tokens=92, seed=5)[0]  # 100 tokens
    s.round_start = torch.tensor([8, 30, 60, 97])
    s.proposals = torch.arange(16).view(4, 4)
    s.accepted = torch.tensor([1, 2, 0, 3])
    wins = split_sample(s, 32)
    assert all(w.num_tokens <= 32 for w in wins) and split_sample(s, 100) == [s]
    a, predicted = 0, []
    for w in wins:
        T = w.num_tokens
        assert torch.equal(w.token_ids, s.token_ids[a:a + T]) and torch.equal(w.aux_hidden, s.aux_hidden[a:a + T - 1])
        assert torch.equal(w.target_hidden, s.target_hidden[a:a + T - 1])
        assert torch.equal(w.loss_mask, s.loss_mask[a:a + T])
        for r, start in enumerate(w.round_start.tolist()):  # rounds keep their proposals, shifted
            orig = s.round_start.tolist().index(start + a)
            assert torch.equal(w.proposals[r], s.proposals[orig]) and w.accepted[r] == s.accepted[orig]
        predicted += list(range(a + 2, a + T))  # step 0 predicts window tokens 2..T-1
        a += T - 2
    assert predicted == list(range(2, 100))  # each token's step-0 prediction exactly once
    items, n_split, n_skip = bound_samples([s, wins[0]], 32)
    assert n_split == 1 and n_skip == 0 and [i for i, _ in items] == [0] * len(wins) + [1]
    assert bound_samples([s, wins[0]], 32, "skip")[1:] == (0, 1)


def test_pack_bounds_padded_size():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 200, (300,), generator=g).tolist()
    groups = pack(lengths, 512, length=lambda n: n)
    assert sorted(n for grp in groups for n in grp) == sorted(lengths)
    assert all(len(grp) * max(grp) <= 512 for grp in groups)


def test_chunked_guard_equals_one_batch(target, samples, heldout):
    tr, _ = make_trainer(target, samples)
    mixed = heldout[:6] + generate_samples(target, 3, prompt_len=8, new_tokens=12, seed=9)  # 40 and 20 tokens
    one = simulated_acceptance(tr.master, mixed, tr.lm_head, 3, tr.target_to_draft)
    chunked = simulated_acceptance(tr.master, mixed, tr.lm_head, 3, tr.target_to_draft, chunk_tokens=80)
    for k in ("accept_length", "greedy_accept_length", "served_greedy_accept_length", "positions", "rounds"):
        assert chunked[k] == pytest.approx(one[k], rel=1e-6), k
    assert chunked["step_accept"] == pytest.approx(one["step_accept"], rel=1e-6)
    windows = simulated_acceptance(tr.master, mixed, tr.lm_head, 3, tr.target_to_draft, chunk_tokens=24)
    assert 1.0 <= windows["accept_length"] <= 4.0 and windows["positions"] > 0.8 * one["positions"]


def test_long_samples_train_in_bounded_steps(target, samples, monkeypatch):
    long = generate_samples(target, 2, prompt_len=8, new_tokens=140, seed=6)  # 148 tokens each
    tr, _ = make_trainer(target, samples, batch_tokens=64, min_samples_before_train=1)
    sizes = []
    real = tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda b: sizes.append(len(b) * max(s.num_tokens for s in b)) or real(b))
    tr.start()
    try:
        for s in long + samples[:3]:
            tr.add_sample(s)
        wait_for(lambda: tr.status()["samples_trained"] == 5, what="all trained")
    finally:
        tr.stop()
    st = tr.status()
    assert st["samples_split"] == 2 and st["failures"] == 0 and max(sizes) <= 64


def test_health_and_metrics_over_http(target, samples, heldout, tokenizer_smollm):
    """A real trainer behind the real app: serving answers while the trainer fails; /health says degraded
    with the reason, /metrics counts by kind; once the fault stops, /health is ok again."""
    from prometheus_client.parser import text_string_to_metric_families

    from aurora.server.app import create_app
    from server_fakes import FakeEngine, FakeService, live_server, test_config

    tr, _ = make_trainer(target, samples, faults="trainer_oom:3", min_samples_before_train=1, batch_tokens=80,
                         min_batch_tokens=40, backoff_initial_s=1.0, max_consecutive_failures=10)
    service = FakeService(FakeEngine(tokenizer_smollm), tr)
    tr.start()
    try:
        with live_server(create_app(service, test_config())) as url:
            for s in samples[:8]:
                tr.add_sample(s)
            wait_for(lambda: tr.status()["state"] == "backing_off")
            h = httpx.get(url + "/health").json()
            assert h["status"] == "degraded" and "backing off" in h["reason"] and "OutOfMemoryError" in h["reason"]
            client = openai.OpenAI(base_url=url + "/v1", api_key="x")
            out = client.completions.create(model="aurora-test", prompt="hello there", max_tokens=5)
            assert out.choices[0].finish_reason == "length"  # serving is unaffected
            wait_for(lambda: tr.status()["steps"] >= 1)
            assert httpx.get(url + "/health").json()["status"] == "ok"
            fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
            by_kind = {s.labels["kind"]: s.value for s in fams["aurora_trainer_failures_by_kind"].samples}
            assert by_kind == {"oom": 3.0, "nan_loss": 0.0, "guard_error": 0.0, "exception": 0.0}
            reasons = {s.labels["reason"]: s.value for s in fams["aurora_samples_dropped_by_reason"].samples}
            assert reasons["step_failed"] >= 3 and set(reasons) == {"buffer_full", "invalid", "too_long", "step_failed"}
            tr.faults = FaultInjector("trainer_oom:100")  # now it fails for good
            tr.config.max_consecutive_failures, tr.config.backoff_initial_s = 2, 0.01
            for s in samples[8:16]:
                tr.add_sample(s)
            wait_for(lambda: tr.status()["state"] == "failed")
            h = httpx.get(url + "/health").json()
            assert h["status"] == "degraded" and "no longer learns" in h["reason"]
            assert h["trainer"]["failures_by_kind"]["oom"] == 5
            assert client.completions.create(model="aurora-test", prompt="hi", max_tokens=3).choices[0].text
    finally:
        tr.stop()


@pytest.fixture(scope="module")
def tokenizer_smollm():
    from transformers import AutoTokenizer

    from aurora.models.hub import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2"))


@pytest.mark.parametrize("duty", [1.0, 0.25])
def test_duty_bounds_the_time_spent_training(target, samples, monkeypatch, duty):
    """With duty d (and no engine reporting idle) the thread rests after each step so that steps take at most d
    of the wall time."""
    tr, _ = make_trainer(target, samples, duty=duty, replay_passes=10 ** 6, min_samples_before_train=1)
    busy = []

    def step(samples):  # a step that takes 20 ms, whatever the machine
        busy.append(0.02)
        time.sleep(0.02)

    monkeypatch.setattr(tr, "train_step", step)
    for s in samples:
        tr.add_sample(s)
    tr.start()
    try:
        time.sleep(1.0)
    finally:
        tr.stop(timeout=5)
    share = sum(busy) / 1.0
    assert (share > 0.6) if duty == 1.0 else (0.1 < share < 0.3), share
