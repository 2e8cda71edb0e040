"""Depth-0 rounds leave the draft behind; the first speculative round after them catches it up in one batched
extend from the captured states. What the draft then proposes must equal what a draft extended every round
(the eager path, taken when there are no capture stores) proposes, at every round of a mixed depth schedule."""
import itertools

import pytest
import torch
from transformers import AutoConfig

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.models.draft import DraftConfig, new_draft


def _run(tiny_target_dir, lazy: bool, schedule, topk: int, n_draft: int, budget: int = 8192):
    cfg = DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir))
    eng = LLMEngine(tiny_target_dir, new_draft(cfg, seed=3),
                    EngineConfig(max_batch=4, max_model_len=128, lookahead=3, topk=topk, num_draft_tokens=n_draft))
    eng.runner.lazy_draft = lazy
    catch_up = eng.runner._catch_up
    eng.runner._catch_up = lambda B: catch_up(B, budget)
    depths = itertools.cycle(schedule)
    eng.speculation.choose = lambda bucket: next(depths) if topk == 1 else (next(depths) and 3)
    prompts = [[(5 * i + j) % 90 + 1 for j in range(4 + 7 * i)] for i in range(7)]  # lengths 4..46: uneven lags
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    seqs = [eng.add_request(p, params) for p in prompts]
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
    return [s.rounds for s in seqs], [s.output_ids for s in seqs], eng, steps


@pytest.mark.parametrize("topk,n_draft,budget", [(1, 4, 8192), (2, 5, 8192), (1, 4, 40)])
def test_caught_up_draft_proposes_as_an_eager_one(tiny_target_dir, topk, n_draft, budget):
    """budget 40: the catch-up runs in several forwards over groups of rows."""
    schedule = [0, 0, 0, 2, 0, 3, 3, 0, 0, 0, 0, 1, 2, 0]
    lazy_rounds, lazy_out, eng, steps = _run(tiny_target_dir, True, schedule, topk, n_draft, budget)
    eager_rounds, eager_out, _, _ = _run(tiny_target_dir, False, schedule, topk, n_draft)
    assert lazy_out == eager_out
    assert sum(len(r) for r in lazy_rounds) > 20  # speculative rounds ran, after lags of several tokens
    assert lazy_rounds == eager_rounds  # same proposals and acceptance, round by round
    assert eng.runner.lag == [0] * 4  # released rows carry no lag


def test_depth_zero_leaves_the_draft_untouched(tiny_target_dir):
    """While serving decodes plainly the draft's KV cache is not written at all (it costs serving nothing)."""
    _, _, eng, _ = _run(tiny_target_dir, True, [0], 1, 4)
    assert torch.count_nonzero(eng.runner.dcache.k) == 0
    _, _, eng, _ = _run(tiny_target_dir, False, [0], 1, 4)
    assert torch.count_nonzero(eng.runner.dcache.k) > 0


def test_a_round_that_catches_the_draft_up_is_not_timed_as_its_depth(tiny_target_dir):
    """The catch-up is the cost of switching from plain decoding, not of the depth: the round that pays it is
    left out of the depth's cost (as a round that captured a CUDA graph is), every other round is timed. What
    serving delivered counts every round, the catch-up's included (the guard rail must see switching's cost)."""
    schedule = [0, 0, 2, 2, 2, 0, 0, 1, 1, 0]
    timed, caught, served = [], [], []
    cfg = DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir))
    eng = LLMEngine(tiny_target_dir, new_draft(cfg, seed=3), EngineConfig(max_batch=4, max_model_len=128, lookahead=3))
    depths = itertools.cycle(schedule)
    eng.speculation.choose = lambda bucket: next(depths)
    observe_cost = eng.speculation.observe_cost
    eng.speculation.observe_cost = lambda b, d, s: (timed.append(d), observe_cost(b, d, s))
    observe_served = eng.speculation.observe_served
    eng.speculation.observe_served = lambda b, d, n, s: (served.append(d), observe_served(b, d, n, s))
    run_round = eng.runner.round

    def round_(*a, **k):
        out = run_round(*a, **k)
        caught.append(eng.runner.caught_up)
        return out
    eng.runner.round = round_
    for i in range(4):
        eng.add_request([(3 * i + j) % 90 + 1 for j in range(5 + 3 * i)],
                        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    while eng.has_work():
        eng.step()
    assert sum(caught) >= 4  # every switch from plain to speculating caught up
    rounds = [d for d, _ in zip(itertools.cycle(schedule), caught)]  # the depth each round ran
    assert all(d > 0 for d, c in zip(rounds, caught) if c)
    # each round is timed once the next one starts; the last round is timed at its own end
    assert sorted(timed) == sorted(d for d, c in zip(rounds, caught) if not c)
    assert sorted(served) == sorted(rounds[:-1])  # every round but the last, which no next round follows
