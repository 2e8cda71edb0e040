"""Publishing: guard refusals, thread-driven sync, rollback, and fault injection that leaves serving alone."""
import threading
import time

import pytest
import torch

import aurora.training.trainer as trainer_mod
from aurora.models.draft import new_draft
from aurora.training import OnlineTrainer, TrainConfig
from aurora.training.guard import simulated_acceptance, simulated_acceptances
from conftest import make_draft


class Engine:
    """Stands in for the engine: copies published weights in place, records versions."""

    def __init__(self, draft):
        self.draft, self.versions = draft, []

    def __call__(self, state, version, acceptance=None):
        params = dict(self.draft.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        self.versions.append(version)


def make_trainer(target, samples, heldout=(), **kw):
    draft = make_draft(target, samples).to(torch.bfloat16)
    engine = Engine(draft)
    cfg = TrainConfig(ttt_length=3, heldout_every=1 if heldout else 0, heldout_size=16, **kw)
    tr = OnlineTrainer(draft, target.lm_head.weight, cfg, engine)
    for s in heldout:
        tr.add_sample(s)
    return tr, engine


def wait_for(cond, timeout=20.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.01)


def test_guard_refuses_nan_and_bad_candidates(target, trained, heldout):
    train, state, _ = trained
    tr, engine = make_trainer(target, train, heldout)
    tr.master.load_state_dict(state)
    tr._history = [(0, tr._snapshot())]  # the trained draft is live
    assert tr.swap_now() == 1 and engine.versions == [1]
    alone = make_draft(target, train, seed=3)
    alone.load_state_dict(state, strict=False)
    want = simulated_acceptance(alone.float(), heldout, tr.lm_head, 3, tr.target_to_draft)["accept_length"]
    assert tr.status()["heldout_accept_by_version"] == {1: pytest.approx(want, rel=1e-4)}
    with torch.no_grad():
        tr.master.fc.weight[0, 0] = float("nan")
    assert tr.swap_now() is None
    assert tr.status()["swaps_refused"] == 1 and "non-finite" in tr.status()["last_guard"]
    rnd = new_draft(tr.master.config, seed=7)
    tr.master.load_state_dict({k: v for k, v in rnd.state_dict().items() if k not in ("d2t", "t2d")}, strict=False)
    assert tr.swap_now() is None
    st = tr.status()
    assert st["swaps_refused"] == 2 and st["version"] == 1 and engine.versions == [1]
    print("\n" + st["last_guard"])
    assert list(st["heldout_accept_by_version"]) == [1]  # refused candidates are not versions
    tr.master.load_state_dict(state)
    assert tr.swap_now() == 2
    assert tr.status()["heldout_accept_by_version"] == {1: pytest.approx(want, rel=1e-4),
                                                        2: pytest.approx(want, rel=1e-4)}


@pytest.mark.parametrize("held", [16, 1])
def test_the_published_prediction_counts_its_held_out_rounds(target, trained, heldout, held):
    """What a version brings the depth decision is the served-greedy walk's hits over its tries plus 16 tries
    that accepted nothing: a set of thousands of rounds reads as measured, one request's few rounds predict
    less (after a restart the held-out set holds only that start's samples)."""
    train, state, _ = trained
    published = []
    tr, engine = make_trainer(target, train, heldout[:held])
    tr._publish_fn = lambda sd, v, acc: published.append(acc)
    tr.master.load_state_dict(state)
    tr._history = [(0, tr._snapshot())]
    assert tr.swap_now() == 1
    alone = make_draft(target, train, seed=3)
    alone.load_state_dict(state, strict=False)
    want = simulated_acceptance(alone.float(), heldout[:held], tr.lm_head, 3, tr.target_to_draft)
    raw, tried = want["served_greedy_step_accept"], want["served_greedy_step_tried"]
    assert published[0] == pytest.approx([a * t / (t + 16) for a, t in zip(raw, tried)], rel=1e-4)
    shrink = published[0][0] / raw[0]
    assert raw[0] > 0.1 and (shrink > 0.9 if held == 16 else shrink < 0.7)


def test_sync_every_publishes_from_thread_and_rollback(target, samples):
    tr, engine = make_trainer(target, samples, sync_every=3, min_samples_before_train=4, batch_tokens=200)
    initial = tr._history[-1][1]
    tr.start()
    for s in samples[:12]:
        assert tr.add_sample(s)
    wait_for(lambda: tr.status()["steps"] >= 2)
    for _ in range(3):
        tr.request_finished()
    wait_for(lambda: engine.versions == [1])
    steps = tr.status()["steps"]
    for s in samples[12:24]:  # more traffic: a version is published only when something was learnt since
        assert tr.add_sample(s)
    wait_for(lambda: tr.status()["steps"] > steps)
    for _ in range(3):
        tr.request_finished()
    wait_for(lambda: engine.versions == [1, 2])
    v1 = tr._history[-2][1]
    assert all(v.dtype == torch.bfloat16 for v in v1.values()) and "d2t" not in v1
    assert not torch.equal(v1["fc.weight"], initial["fc.weight"])
    assert tr.rollback() == 3 and engine.versions == [1, 2, 3]
    torch.testing.assert_close(engine.draft.fc.weight, v1["fc.weight"])  # v3 carries v1's weights
    tr.stop()
    st = tr.status()
    assert st["state"] == "stopped" and st["version"] == 3 and st["failures"] == 0 and st["swaps"] == 3
    assert st["requests_since_swap"] == 0 and st["sync_every"] == 3


def test_a_due_swap_with_nothing_learnt_publishes_nothing(target, samples):
    """Requests finish before any sample trained (day 0, or a trainer that fails every step): the same weights
    again would only cost a guard pass and a swap, and restart the engine's observations of an unchanged draft."""
    tr, engine = make_trainer(target, samples, sync_every=2, min_samples_before_train=4, batch_tokens=200)
    tr.start()
    for _ in range(6):
        tr.request_finished()
    time.sleep(0.5)
    assert engine.versions == [] and tr.status()["requests_since_swap"] == 0 and tr.status()["version"] == 0
    for s in samples[:8]:
        assert tr.add_sample(s)
    wait_for(lambda: tr.status()["steps"] >= 1)
    for _ in range(2):
        tr.request_finished()
    wait_for(lambda: engine.versions == [1])
    tr.stop()
    assert tr.status()["failures"] == 0


def test_one_guard_pass_scores_candidate_and_live_as_two_separate_passes(target, trained, heldout):
    """The guard computes the target's side once and scores both weights on it: each figure equals a pass of
    its own over a draft that holds only those weights."""
    train, state, _ = trained
    tr, _ = make_trainer(target, train, heldout)
    live = tr._snapshot()
    tr.master.load_state_dict(state)
    cand = tr._snapshot()
    both = simulated_acceptances(tr._scratch, [cand, live], heldout, tr.lm_head, 3, tr.target_to_draft,
                                 chunk_tokens=80)
    for got, weights in zip(both, (cand, live)):
        alone = make_draft(target, train, seed=3)
        alone.load_state_dict(weights, strict=False)
        want = simulated_acceptance(alone.float(), heldout, tr.lm_head, 3, tr.target_to_draft, chunk_tokens=80)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert both[0]["accept_length"] > both[1]["accept_length"] + 0.05  # trained vs day-0 weights: two answers


def test_a_due_swap_waits_until_training_pays_for_its_guard(target, samples, heldout, monkeypatch):
    """guard_share 0.25: after a guard pass of G seconds the next due swap waits, training on, until the steps
    since the last swap took 3 G; the deferral is counted once per due swap. guard_share 1: no wait."""
    step_s, guard_s = 0.05, 0.4
    real_step, real_sim = OnlineTrainer.train_step, OnlineTrainer._simulate
    log = []  # ("step", seconds) / ("guard", None), in order

    def slow_step(self, batch):
        t0 = time.perf_counter()
        time.sleep(step_s)
        out = real_step(self, batch)
        log.append(("step", time.perf_counter() - t0))
        return out

    def slow_guard(self, states, samples_):
        log.append(("guard", None))
        with self.share.training():  # a slower held-out pass, as the duty sees it
            time.sleep(guard_s)
        return real_sim(self, states, samples_)

    monkeypatch.setattr(OnlineTrainer, "train_step", slow_step)
    monkeypatch.setattr(OnlineTrainer, "_simulate", slow_guard)
    for share, waits in ((0.25, True), (1.0, False)):
        log.clear()
        tr, engine = make_trainer(target, samples, heldout, sync_every=1, min_samples_before_train=1,
                                  batch_tokens=100, guard_share=share, replay_passes=4)
        tr.buffer.heldout_every = 0  # the held-out ring is full: from here every sample trains
        tr.start()
        for s in samples[:40]:
            tr.add_sample(s)
        for n in (1, 2):  # the first swap is due at once; the second as soon as the first is done
            wait_for(lambda: tr.status()["steps"] > tr._steps_at_swap)
            tr.request_finished()
            wait_for(lambda: len(engine.versions) == n, timeout=60)
        tr.stop()
        guards = [i for i, (kind, _) in enumerate(log) if kind == "guard"]
        between = sum(dt for kind, dt in log[guards[0]:guards[1]] if kind == "step")
        st = tr.status()
        print(f"guard_share {share}: {between:.2f} s of steps between the two guards, "
              f"last guard {tr._last_guard_s:.2f} s")
        if waits:
            assert between >= 3 * guard_s, log
            assert st["swaps_deferred"] == 1
        else:
            assert between < 3 * guard_s and st["swaps_deferred"] == 0, log


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_faulty_loss_keeps_published_version(target, samples, monkeypatch, fault):
    seen_threads = []

    def bad_loss(draft, batch, *a):
        seen_threads.append(torch.get_num_threads())
        if fault == "raise":
            raise RuntimeError("injected")
        out = (draft.fc.weight.sum() * float("nan"))
        return out, torch.zeros(3), torch.zeros(3)

    monkeypatch.setattr(trainer_mod, "ttt_loss", bad_loss)
    tr, engine = make_trainer(target, samples, sync_every=2, min_samples_before_train=1, batch_tokens=100,
                              max_consecutive_failures=4, backoff_initial_s=0.01)
    before = {k: v.clone() for k, v in tr.master.state_dict().items()}
    torch.set_num_threads(2)
    try:
        tr.start()
        assert torch.get_num_threads() == 2  # the caller keeps its own thread count
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [2]  # and threads created later (the engine's) get the process default
        for s in samples[:10]:
            tr.add_sample(s)
        for _ in range(2):
            tr.request_finished()
        wait_for(lambda: tr.status()["state"] == "failed")
    finally:
        torch.set_num_threads(1)
    tr.stop()
    st = tr.status()
    assert st["failures"] == 4 and st["state"] == "failed"
    assert ("injected" if fault == "raise" else "non-finite loss") in st["last_error"]
    assert seen_threads and set(seen_threads) == {1}  # the trainer thread ran with torch_threads=1
    # the sync request published the unchanged weights (the guard passed), nothing half-trained or NaN
    assert st["version"] <= 1 and all(torch.equal(before[k], v) for k, v in tr.master.state_dict().items())
