"""DeviceShare: serving first. On a CPU serving and training take turns (never both at once) and a busy server
gives the trainer at most its duty of the wall time; an idle one lets it train freely. On a GPU the trainer's
stream lives in a green context of a few SMs."""
import threading
import time

import pytest
import torch

from aurora.sharing import DeviceShare


def _run(share: DeviceShare, serve: bool, seconds: float = 1.2):
    stop, spans = threading.Event(), {"serve": [], "train": []}

    def engine():
        while not stop.is_set():
            with share.serving():
                t0 = time.monotonic()
                time.sleep(0.002)  # a step
                spans["serve"].append((t0, time.monotonic()))

    def trainer():
        while not stop.is_set():
            with share.training():
                a = time.monotonic()
                time.sleep(0.01)  # an optimiser step
                spans["train"].append((a, time.monotonic()))
            share.rest(stop)

    threads = [threading.Thread(target=trainer)] + ([threading.Thread(target=engine)] if serve else [])
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return spans, sum(b - a for a, b in spans["train"]) / seconds


def test_turns_never_overlap_and_keep_to_the_duty():
    spans, trained = _run(DeviceShare(duty=0.2, turns=True, busy_window_s=0.05), serve=True)
    assert 0.1 < trained < 0.3, trained
    assert len(spans["serve"]) > 100
    for a, b in spans["train"]:  # no engine step ran inside a training turn
        assert not any(s < b and e > a for s, e in spans["serve"])


def test_side_by_side_without_turns_overlaps():  # the same check can fail: without turns the two run together
    spans, _ = _run(DeviceShare(duty=1.0, turns=False, busy_window_s=0.05), serve=True, seconds=0.5)
    assert any(s < b and e > a for a, b in spans["train"] for s, e in spans["serve"])


def test_idle_serving_lets_the_trainer_train_freely():
    _, trained = _run(DeviceShare(duty=0.2, turns=True, busy_window_s=0.05), serve=False, seconds=0.6)
    assert trained > 0.8, trained


def test_no_serving_signal_means_always_busy():  # SGLang serves elsewhere: the duty always applies
    _, trained = _run(DeviceShare(duty=0.25), serve=False, seconds=0.8)
    assert 0.15 < trained < 0.35, trained


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        DeviceShare(duty=0)
    with pytest.raises(ValueError):
        DeviceShare(sms=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (green contexts)")
def test_trainer_stream_in_a_green_context():
    share = DeviceShare(sms=8)
    dev = torch.device("cuda", 0)
    result = {}

    def trainer():  # as the trainer thread does: its stream, then work on it
        torch.cuda.set_stream(share.trainer_stream(dev))
        a = torch.randn(512, 512, device=dev)
        result["err"] = (a @ a - (a.double() @ a.double()).float()).abs().max().item()

    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    assert result["err"] < 1e-1
    from torch.cuda.green_contexts import SUPPORTED
    if SUPPORTED:
        assert getattr(share, "_green", None) is not None


def _serve_steps(share: DeviceShare, stop: threading.Event, step_s: float) -> threading.Thread:
    """An engine thread taking steps of `step_s` until `stop`."""
    def engine():
        while not stop.is_set():
            with share.serving():
                time.sleep(step_s)

    t = threading.Thread(target=engine)
    t.start()
    return t


def test_a_step_longer_than_the_busy_window_keeps_serving_busy():
    """A CPU prefill can take longer than busy_window_s: the trainer must not read that as idle serving."""
    share, stop = DeviceShare(duty=0.1, turns=False, busy_window_s=0.05), threading.Event()
    t = _serve_steps(share, stop, 0.3)
    time.sleep(0.1)
    with share.training():
        time.sleep(0.05)
    t0 = time.monotonic()
    share.rest(stop)
    rested = time.monotonic() - t0
    stop.set()
    t.join()
    assert rested > 0.35, rested  # 0.05 s trained at duty 0.1 owes 0.45 s


def test_a_burst_after_idle_opens_with_a_rest_not_a_step():
    """Serving turns busy after an idle spell: the trainer's next step waits as if it had just taken its last one
    (a CPU step holds serving for seconds), and a step while serving stays busy owes only its own rest."""
    share, stop = DeviceShare(duty=0.1, turns=False, busy_window_s=0.05), threading.Event()
    with share.training():
        time.sleep(0.04)  # a step while idle
    t0 = time.monotonic()
    share.rest(stop)
    assert time.monotonic() - t0 < 0.05  # idle: nothing to rest
    t = _serve_steps(share, stop, 0.002)
    time.sleep(0.02)
    t0 = time.monotonic()
    share.rest(stop)  # before the next step: 0.04 s at duty 0.1 owes 0.36 s
    first = time.monotonic() - t0
    t0 = time.monotonic()
    share.rest(stop)  # the same stretch goes on: nothing more owed
    again = time.monotonic() - t0
    stop.set()
    t.join()
    assert 0.3 < first < 0.5, first
    assert again < 0.05, again


def test_a_stop_ends_the_rest_and_keeps_it_owed():
    share, stop = DeviceShare(duty=0.1), threading.Event()  # no serving signal: always busy
    with share.training():
        time.sleep(0.05)  # owes 0.45 s of rest
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    share.rest(stop)
    assert time.monotonic() - t0 < 0.3
    assert 0.025 < share.owed_s < 0.045, share.owed_s  # ~0.35 s of rest left = ~0.039 s of training
    assert share.step_s == pytest.approx(0.05, abs=0.02)


def test_a_due_swap_ends_the_rest_and_the_rest_stays_owed():
    share, stop, wake = DeviceShare(duty=0.1), threading.Event(), threading.Event()
    with share.training():
        time.sleep(0.05)  # owes 0.45 s of rest
    threading.Timer(0.1, wake.set).start()
    t0 = time.monotonic()
    share.rest(stop, wake)
    assert time.monotonic() - t0 < 0.3  # the swap did not wait out the rest
    wake.clear()
    t0 = time.monotonic()
    share.rest(stop, wake)  # what was not rested is rested after the swap
    assert 0.25 < time.monotonic() - t0 < 0.6


def test_serving_counts_its_waits_for_training_turns():
    share = DeviceShare(duty=1.0, turns=True, busy_window_s=0.05)
    with share.training():
        t = threading.Thread(target=lambda: share.serving().__enter__())  # waits for the turn to end
        t.start()
        time.sleep(0.2)
    t.join()
    assert 0.15 < share.turn_wait_s < 1.0, share.turn_wait_s


def test_a_training_turn_between_rounds_is_no_rounds_cost():
    """The engine keeps the wait out of the round before it: cost and delivered rate as if it had not happened."""
    from aurora.engine.engine import LLMEngine
    from aurora.engine.speculation import DepthController

    eng = LLMEngine.__new__(LLMEngine)  # the timing bookkeeping alone, no model
    eng.speculation, eng._excluded = DepthController(4), 0.0
    eng._last_round = (8, 2, 10.0, 10.1, 16, True)  # bucket 8, depth 2: started at 10.0, ended 10.1, 16 tokens, timed
    eng.exclude_from_round(0.5)               # then the trainer's turn held the cores for 0.5 s
    eng._time_last_round(10.65, 10.70)        # the next step's prefill ran 10.65..10.70
    assert abs(eng.speculation.cost(8, 2) - 0.15) < 1e-9
    served = eng.speculation.snapshot()["buckets"]  # no bucket state yet: the rate is read from the table
    assert served == {} and abs(eng.speculation._served[(8, 2)][1] - 0.20) < 1e-9
    eng.exclude_from_round(0.3)               # a wait before an untimed round (a graph capture) is dropped
    eng._time_last_round(11.0, 11.0)
    assert eng._excluded == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (draining a CUDA stream)")
def test_drain_syncs_after_every_module_and_changes_no_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8)).cuda()
    x = torch.randn(32, 64, device="cuda")

    def grads(share):
        model.zero_grad()
        model(x).square().sum().backward()
        torch.cuda.synchronize()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(DeviceShare())
    share = DeviceShare(drain=True)
    share.drain_after_modules(model)
    drained = grads(share)
    assert share.drains == 4  # two Linear modules: once after each forward, once in backward
    for a, b in zip(plain, drained):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    off = DeviceShare()
    off.drain_after_modules(torch.nn.Linear(2, 2).cuda())
    assert off.drains == 0 and off.status()["drain"] is False


def test_a_serving_floor_sets_the_duty_from_what_speculation_gives():
    speedup = [1.0]
    share = DeviceShare(duty=0.5, floor=0.9, speedup=lambda: speedup[0])
    assert share.duty_now() == pytest.approx(0.1)  # day 0: serving keeps 0.9 only if training takes 0.1
    speedup[0] = 1.5
    assert share.duty_now() == pytest.approx(1 - 0.9 / 1.5)  # 0.4: serving at 0.6 x 1.5 = 0.9 of its old speed
    speedup[0] = 3.0
    assert share.duty_now() == 0.5  # never above --trainer-duty
    speedup[0] = 0.8  # speculating at a loss (until the decision turns it off): still the day-0 share, not less
    assert share.duty_now() == pytest.approx(0.1)
    assert DeviceShare(duty=0.5, speedup=lambda: 1.0).duty_now() == 0.5  # no floor: the duty alone

    def unreadable():
        raise OSError("depth.json being replaced")
    assert DeviceShare(duty=0.5, floor=0.9, speedup=unreadable).duty_now() == pytest.approx(0.1)
    with pytest.raises(ValueError):
        DeviceShare(floor=1.0)


def test_the_trainer_keeps_to_the_floors_share_of_a_busy_server():
    speedup = [1.0]
    share = DeviceShare(duty=0.5, floor=0.85, speedup=lambda: speedup[0])  # no serving signal: always busy
    _, trained = _run(share, serve=False, seconds=1.0)
    assert 0.08 < trained < 0.22, trained  # 0.15 of the time
    speedup[0] = 2.0
    _, trained = _run(share, serve=False, seconds=1.0)
    assert 0.38 < trained < 0.52, trained  # min(0.5, 1 - 0.85 / 2) = 0.475
