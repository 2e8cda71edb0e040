"""The per-step speculation depth: the decision against a fake cost table and brute-force optimum, and the
engine around it (day 0 decodes plainly but still captures and swaps; any depth sequence stays lossless)."""
import random

import numpy as np
import pytest
from transformers import AutoConfig

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.engine.speculation import DepthController, SpeculationConfig, expected_tokens, served_speedup
from aurora.models.draft import DraftConfig, new_draft
from tests.greedy import run_all

K = 4


def _accepted(rng: random.Random, rates, depth: int, rows: int) -> list[int]:
    """Each row's accepted drafts in a round of `depth`, drawn from the true conditional rates."""
    out = []
    for _ in range(rows):
        n = 0
        while n < depth and rng.random() < rates[n]:
            n += 1
        out.append(n)
    return out


def simulate(ctl: DepthController, rates, cost, rounds: int, bucket: int = 8, rows: int = 8, seed: int = 0):
    """Drive the controller like the engine: choose, 'run' the round (time from the cost table, accepted
    drafts drawn from the true conditional rates), observe. Returns the depth of every round."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(rounds):
        d = ctl.choose(bucket)
        accepted = _accepted(rng, rates, d, rows)
        ctl.observe(bucket, d, cost(d) * (1 + 0.02 * (rng.random() - 0.5)), accepted)
        chosen.append(d)
    return chosen


def best_depth(rates, cost):
    speed = {d: expected_tokens(rates, d) / cost(d) for d in range(K + 1)}
    return max(speed, key=speed.get), speed


def test_expected_tokens_is_the_chain_sum():
    assert expected_tokens([0.5, 0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0, 0.0, 1.0, 1.0], 4) == pytest.approx(2.0)


def test_day0_draft_never_speculates():
    """A fresh head (predicted acceptance 0): not one speculative round is paid for."""
    ctl = DepthController(K)
    ctl.new_version(0, [0.0] * K)
    chosen = simulate(ctl, [0.0] * K, lambda d: 1.0 + 0.3 * d, 500)
    assert set(chosen) == {0}


@pytest.mark.parametrize("rates,slope", [
    ([0.9, 0.85, 0.8, 0.75], 0.1),   # good draft, cheap rounds: full depth
    ([0.6, 0.5, 0.4, 0.3], 0.25),    # middling: a short chain
    ([0.3, 0.2, 0.1, 0.1], 0.5),     # poor draft, costly rounds: plain decoding
    ([0.7, 0.6, 0.5, 0.4], 0.15),
])
def test_converges_to_the_best_fixed_depth(rates, slope):
    cost = lambda d: 1.0 + slope * d + (0.2 if d else 0.0)  # noqa: E731  (a round's fixed overhead)
    best, speed = best_depth(rates, cost)
    ctl = DepthController(K)
    ctl.new_version(1, rates)  # the held-out prediction equals the truth here
    chosen = simulate(ctl, rates, cost, 1500)
    late = chosen[-500:]
    achieved = sum(expected_tokens(rates, d) for d in late) / sum(cost(d) for d in late)
    assert achieved >= 0.95 * speed[best], (best, np.bincount(late, minlength=K + 1), achieved, speed)
    b = ctl.snapshot()["buckets"][8]
    if not best:
        assert b["switches"] == 0 and b["last_switch"] is None
    else:  # a switch is shown with what it was decided on
        last = b["last_switch"]
        assert b["switches"] >= 1 and last["from"] != last["to"]
        assert last["predicted_gain"] > 1 + SpeculationConfig().switch_margin
        assert last["predicted_gain"] == pytest.approx(
            expected_tokens(last["acceptance"], last["to"]) / last["round_ms"][last["to"]]
            / (expected_tokens(last["acceptance"], last["from"]) / last["round_ms"][last["from"]]), rel=1e-3)


def test_wrong_prediction_is_corrected_by_observed_rounds():
    """Predicted good, realised poor: the controller observes its rounds and backs off to plain decoding."""
    truth = [0.05, 0.05, 0.05, 0.05]
    cost = lambda d: 1.0 + 0.2 * d + 0.2 * (d > 0)  # noqa: E731
    ctl = DepthController(K)
    ctl.new_version(1, [0.9] * K)
    chosen = simulate(ctl, truth, cost, 600)
    assert chosen[:5] != [0] * 5          # the prediction turned speculation on at once
    assert set(chosen[-200:]) <= {0, 1}   # then the rounds' evidence turned it off (1: an occasional re-probe)
    assert chosen[-200:].count(0) >= 190


def test_prediction_turns_speculation_on_before_any_round_is_observed():
    ctl = DepthController(K)
    ctl.new_version(0, [0.0] * K)
    cost = lambda d: 1.0 + 0.1 * d  # noqa: E731
    simulate(ctl, [0.0] * K, cost, 50)
    assert ctl.snapshot()["buckets"][8]["rounds_by_depth"] == {0: 50}
    ctl.new_version(1, [0.9, 0.9, 0.9, 0.9])
    assert ctl.choose(8) > 0  # judged on the prediction alone: no round of version 1 has been seen


def test_hysteresis_no_flapping_between_near_equal_depths():
    rates = [0.62, 0.5, 0.4, 0.3]
    cost = lambda d: 1.0 + 0.3 * d  # noqa: E731
    speed = {d: expected_tokens(rates, d) / cost(d) for d in range(K + 1)}
    top = sorted(speed.values())[-2:]
    assert top[1] / top[0] < 1.05  # two depths within the switch margin
    ctl = DepthController(K)
    ctl.new_version(1, rates)
    chosen = simulate(ctl, rates, cost, 2000)
    probes = 2000 // SpeculationConfig().reprobe_every * 2 + 3 * (K + 1)
    switches = sum(a != b for a, b in zip(chosen, chosen[1:]))
    assert switches <= 2 * probes + 4, switches  # each re-probe leaves and returns once; no flapping beyond


def test_untimed_depths_are_interpolated_from_timed_ones():
    ctl = DepthController(K)
    ctl.observe(8, 0, 1.0, [0] * 4)
    ctl.observe(8, 4, 2.0, [0] * 4)
    assert ctl.cost(8, 2) == pytest.approx(1.5)
    assert ctl.cost(16, 2) is None  # per bucket


def test_fixed_mode_always_runs_full_depth():
    ctl = DepthController(K, SpeculationConfig(adaptive=False))
    ctl.new_version(0, [0.0] * K)
    assert set(simulate(ctl, [0.0] * K, lambda d: 1.0 + d, 20)) == {K}


# ----------------------------------------------------------------- the engine around it


def _draft(target_dir, seed):
    return new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(target_dir)), seed=seed)


def test_day0_engine_decodes_plainly_captures_and_swaps(tiny_target_dir):
    prompts = [[(7 * i + j) % 90 + 1 for j in range(3 + i % 9)] for i in range(24)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ref, _ = run_all(LLMEngine(tiny_target_dir, None, EngineConfig(max_batch=8, max_model_len=128)), prompts, params)
    eng = LLMEngine(tiny_target_dir, _draft(tiny_target_dir, 1),
                    EngineConfig(max_batch=8, max_model_len=128, lookahead=3, initial_acceptance=[0.0] * 3))
    samples = []
    eng.on_sample = samples.append
    out, seqs = run_all(eng, prompts[:12], params)
    assert out == ref[:12]
    assert all(s.verify_rounds == 0 for s in seqs)                  # day 0: plain decoding only
    assert len(samples) == 12 and all(s.aux_hidden.shape[0] == s.num_tokens - 1 for s in samples)
    assert all(s.proposals.shape[0] == 0 for s in samples)          # no rounds recorded, states captured
    # a swap while at depth 0, carrying a prediction that speculation pays: the next rounds speculate
    state = {k: v for k, v in _draft(tiny_target_dir, 2).state_dict().items() if k not in ("d2t", "t2d")}
    live = eng.swap_draft(state, 1, acceptance=[0.95, 0.95, 0.95])
    out, seqs = run_all(eng, prompts[12:], params)
    assert live.is_set() and eng.draft_version == 1
    assert out == ref[12:]
    assert sum(s.verify_rounds for s in seqs) > 0
    snap = eng.speculation.snapshot()
    assert snap["version"] == 1 and snap["predicted_acceptance"] == [0.95, 0.95, 0.95]
    assert any(d > 0 for b in snap["buckets"].values() for d in b["rounds_by_depth"])


@pytest.mark.parametrize("topk,nodes", [(1, 4), (3, 7)])
def test_random_depth_every_round_is_greedy_lossless(tiny_target_dir, topk, nodes, monkeypatch):
    prompts = [[(5 * i + j) % 90 + 1 for j in range(2 + i % 11)] for i in range(30)]
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    ref, _ = run_all(LLMEngine(tiny_target_dir, None, EngineConfig(max_batch=8, max_model_len=128)), prompts, params)
    eng = LLMEngine(tiny_target_dir, _draft(tiny_target_dir, 3),
                    EngineConfig(max_batch=8, max_model_len=128, lookahead=3, topk=topk, num_draft_tokens=nodes))
    samples = []
    eng.on_sample = samples.append
    rng = random.Random(0)
    depths = eng.runner.depths()
    monkeypatch.setattr(eng.speculation, "choose", lambda bucket: rng.choice(depths))
    out, seqs = run_all(eng, prompts, params)
    assert out == ref
    assert all(s.proposals.shape[1] == 3 for s in samples if s.proposals.numel())
    assert sum(s.verify_rounds for s in seqs) > 0


def _simulate_served(ctl, rates, round_cost, hidden, rounds, rows=8, seed=0):
    """As simulate, with the delivered rate reported too: each round's wall time is its cost plus `hidden(d)`,
    time the round timings do not see (e.g. a trainer's share of the process while serving speculates)."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(rounds):
        d = ctl.choose(8)
        accepted = _accepted(rng, rates, d, rows)
        ctl.observe(8, d, round_cost(d), accepted)
        ctl.observe_served(8, d, rows + sum(accepted), round_cost(d) + hidden(d))
        chosen.append(d)
    return chosen


@pytest.mark.parametrize("hidden,vetoed", [(3.0, True), (0.0, False)])
def test_a_depth_that_delivers_less_than_plain_decoding_is_vetoed(hidden, vetoed):
    """Day 0 decodes plainly; then a version predicted (and realised) good, whose round timings say speculating
    pays. If its rounds hide time that the timings miss, what serving delivered vetoes each speculating depth
    after veto_after rounds of it; if they hide nothing, the same controller keeps speculating."""
    rates = [0.5] * K
    cost = lambda d: 1.0 + 0.1 * d  # noqa: E731
    ctl = DepthController(K)
    ctl.new_version(0, [0.0] * K)
    assert set(_simulate_served(ctl, rates, cost, lambda d: 0.0, 200)) == {0}
    ctl.new_version(1, rates)
    chosen = _simulate_served(ctl, rates, cost, lambda d: hidden * (d > 0), 1500)
    assert chosen[:50].count(0) < 10  # the prediction turned speculation on at once
    if vetoed:
        assert chosen[-500:].count(0) >= 495 and ctl.vetoes == len(ctl.depths) - 1
        assert set(ctl.snapshot()["buckets"][8]["vetoed"]) == {1, 2, 3, 4}
    else:
        assert ctl.vetoes == 0 and chosen[-500:].count(0) < 25


def test_a_version_without_prediction_is_observed_at_full_depth_on_every_bucket():
    """A loaded draft's version with no held-out prediction: each bucket already in use probes the full depth."""
    ctl = DepthController(K)
    ctl.new_version(0, [0.0] * K)
    for bucket in (1, 8):
        simulate(ctl, [0.0] * K, lambda d: 1.0 + 0.1 * d, 40, bucket=bucket)
    ctl.observe_served(8, 2, 8, 1.0)  # a speculative round of the old version on record
    ctl.new_version(1, None)
    assert [ctl.choose(1) for _ in range(3)] == [K] * 3 and [ctl.choose(8) for _ in range(3)] == [K] * 3


def test_served_speedup_weights_each_buckets_current_depth_by_its_rounds():
    snap = {"buckets": {
        "1": {"depth": 2, "rounds": 300, "predicted_speedup": {"0": 1.0, "2": 1.6}, "realised_speedup": None},
        "16": {"depth": 0, "rounds": 100, "predicted_speedup": {"0": 1.0, "2": 0.7}, "realised_speedup": None},
        "4": {"depth": 1, "rounds": 100, "predicted_speedup": {"0": 1.0, "1": 1.3}, "realised_speedup": 1.1}}}
    assert served_speedup(snap) == pytest.approx((300 * 1.6 + 100 * 1.0 + 100 * 1.1) / 500)
    assert served_speedup({}) == served_speedup({"buckets": {}}) == 1.0  # day 0: nothing has run
    # the decision's own snapshot has the shape SGLang's depth.json has (int keys before JSON)
    ctl = DepthController(4, SpeculationConfig())
    assert served_speedup(ctl.snapshot()) == 1.0


def test_with_nothing_accepted_a_plain_bucket_stays_plain_even_if_a_deeper_round_timed_cheaper():
    """Zero acceptance (a day-0 draft's prediction): every depth yields one token a row, so plain decoding is the
    choice whatever the timings say; a deeper round that happened to time cheaper (noise) does not lure it away."""
    ctl = DepthController(K, SpeculationConfig(min_dwell=1))
    ctl.new_version(1, [0.0] * K)
    assert ctl.choose(8) == 0
    ctl.observe(8, 0, 1e-3, [0] * 8)
    ctl.observe_cost(8, 1, 0.5e-3)  # a noisy timing: depth 1 "cheaper" than plain
    assert [ctl.choose(8) for _ in range(50)] == [0] * 50
    ctl.new_version(2, [0.9] * K)  # a version worth speculating with: the decision moves again
    assert any(ctl.choose(8) > 0 for _ in range(50))


@pytest.mark.parametrize("cold,rounds", [(0.3, 1.0), (0.6, 2.0), (1.0, 3.0)])
def test_a_switch_is_decided_on_both_depths_timed_one_after_the_other(cold, rounds):
    """A server's first rounds run slow (seen on the CPU after a resumed start). A weak draft (9 % at position 1)
    whose depth-1 round costs 12 % more than a plain one never pays. Plain decoding was timed in the first, slow
    rounds; depth 1, probed just after, looked cheaper, the bucket switched and kept speculating until the next
    re-probe of plain decoding 256 rounds later (every round but the first 30 in this simulation, before both
    depths were timed one after the other before a switch)."""
    rates = [0.09, 0.0, 0.0, 0.0]
    base = lambda d: 1.0 + (0.12 + 0.1 * d) * (d > 0)  # noqa: E731
    assert best_depth(rates, base)[0] == 0
    for seed in range(3):
        ctl = DepthController(K)
        ctl.new_version(1, rates)
        rng, chosen = random.Random(seed), []
        for r in range(300):
            slow = 1 + cold * np.exp(-r / rounds)
            d = ctl.choose(8)
            ctl.observe(8, d, base(d) * slow * (1 + 0.02 * (rng.random() - 0.5)), _accepted(rng, rates, d, 8))
            chosen.append(d)
        assert sum(d > 0 for d in chosen[30:]) <= 2 * SpeculationConfig().probe_rounds, chosen


def test_a_stale_cheaper_timing_is_retimed_before_a_switch():
    """A weak draft (about 7 % at position 1) whose speculating rounds cost a little more than they give: plain
    decoding is best throughout. Every 300 rounds a trainer step beside serving doubles every round's cost for 40
    rounds. Plain decoding's recent mean then rises above the speculating depths' timings from before the burst;
    switching on those runs slow speculative rounds through the burst. The decision re-times a depth whose timing
    is stale before switching to it, and so stays plain: inside the bursts only (re-)timing rounds speculate."""
    rates = [0.075, 0.03, 0.0, 0.0]
    base = lambda d: 1.0 + (0.12 + 0.02 * d) * (d > 0)  # noqa: E731
    assert best_depth(rates, base)[0] == 0
    ctl = DepthController(K)
    ctl.new_version(1, rates)
    rng, chosen = random.Random(0), []
    burst = lambda r: r % 300 >= 260  # noqa: E731
    for r in range(3000):
        d = ctl.choose(8)
        ctl.observe(8, d, base(d) * (2.0 if burst(r) else 1.0) * (1 + 0.02 * (rng.random() - 0.5)),
                    _accepted(rng, rates, d, 8))
        chosen.append(d)
    in_bursts = sum(d > 0 for r, d in enumerate(chosen) if burst(r))
    assert in_bursts <= 3 * SpeculationConfig().probe_rounds, in_bursts  # 33 when switches trusted old timings
    assert sum(d > 0 for d in chosen[500:]) <= 0.01 * 2500
