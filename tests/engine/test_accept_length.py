"""Accept length, SGLang's definition: tokens committed by verify rounds / verify rounds; the prefill's token is
no round's work. Checked on hand-built rounds (the engine's round replaced by a plan of accepted counts) through
the sequence, the request outputs, the engine's rolling stats and their windows."""
import pytest
import torch
from transformers import AutoConfig

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.engine.stats import EngineStats
from aurora.models.draft import DraftConfig, new_draft

K = 3


def planned_engine(tiny_target_dir, plan):
    """An engine whose verify rounds accept plan[i] drafts in round i (committing plan[i] + 1 tokens)."""
    draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=0)
    eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=2, max_model_len=128, lookahead=K, device="cpu",
                                                         cuda_graphs=False, adaptive=False))
    rounds = iter(plan)

    def planned_round(B, *args, **kwargs):
        n = next(rounds)
        return torch.full((B, K + 1), 7), torch.full((B,), n), torch.full((B, K), 7)

    eng.runner.round = planned_round
    return eng


def run(eng, max_tokens):
    seq = eng.add_request([1, 2, 3], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    outs = []
    while eng.has_work():
        outs += eng.step()
    return seq, outs[-1]


@pytest.mark.parametrize("max_tokens, rounds, committed", [
    (11, 4, 10),  # prefill 1, then rounds commit 3, 1, 4, 2 = 10 tokens in 4 rounds: 2.5 (completion/rounds: 2.75)
    (10, 4, 9),   # the last round is cut at max_tokens: it committed 1 of its 2 tokens: 9 / 4
    (2, 1, 1),    # a 2-token request: 1 token from 1 round = 1.0 (completion/rounds said 2.0)
    (1, 0, 0),    # ends at its prefill token: no round, no accept length (0.0)
])
def test_engine_counts_hand_built_rounds(tiny_target_dir, max_tokens, rounds, committed):
    eng = planned_engine(tiny_target_dir, [2, 0, 3, 1])
    seq, final = run(eng, max_tokens)
    assert len(seq.output_ids) == max_tokens and final.finished
    assert (seq.verify_rounds, seq.verify_tokens) == (rounds, committed)
    expected = committed / rounds if rounds else 0.0
    assert seq.accept_length == final.accept_length == pytest.approx(expected)
    assert (final.verify_rounds, final.verify_tokens) == (rounds, committed)
    snap = eng.stats.snapshot()
    assert snap["accept_length_recent"] == pytest.approx(expected)
    assert snap["accept_length_by_version"] == ({0: pytest.approx(expected)} if rounds else {})
    assert (snap["verify_rounds"], snap["verify_tokens"]) == (rounds, committed)
    if rounds:  # conditional: of the rounds that reached position j (accepted >= j drafts), those accepting it
        plan = [2, 0, 3, 1][:rounds]
        reached = [sum(n >= j for n in plan) for j in range(K)]
        assert snap["accept_rate_by_position"] == pytest.approx(
            [sum(n > j for n in plan) / r if r else 0.0 for j, r in zip(range(K), reached)])


def test_stats_windows_are_exactly_as_stated():
    s = EngineStats(lookahead=2, window=2, versions=2)
    s.on_finish(6, 3, [3, 1], version=0)   # 2.0
    s.on_finish(0, 0, [0, 0], version=0)   # ended at its prefill: not in any window
    s.on_finish(4, 1, [1, 1], version=1)   # 4.0
    snap = s.snapshot()
    assert snap["accept_length_recent"] == pytest.approx(10 / 4) and snap["accept_length_window"] == 2
    s.on_finish(2, 2, [0, 0], version=2)   # the window now holds the last two requests with rounds: 4 + 2 over 1 + 2
    snap = s.snapshot()
    assert snap["accept_length_recent"] == pytest.approx(6 / 3)
    # conditional: position 0 accepted in 1 of the 3 rounds, position 1 in the 1 round that reached it
    assert snap["accept_rate_by_position"] == pytest.approx([1 / 3, 1.0])
    assert snap["accept_length_by_version"] == {1: 4.0, 2: 1.0}  # the last 2 versions only
    assert (snap["verify_rounds"], snap["verify_tokens"], snap["requests_finished"]) == (6, 12, 4)


def test_tokens_per_second_is_zero_when_idle():
    import aurora.engine.stats as stats

    now = [100.0]
    s = EngineStats(lookahead=1, clock=lambda: now[0])
    s.on_tokens(50)
    now[0] += 1
    s.on_tokens(50)
    assert s.snapshot()["tokens_per_second"] == pytest.approx(100 / stats.TPS_WINDOW_S)
    now[0] += stats.TPS_WINDOW_S + 1
    assert s.snapshot()["tokens_per_second"] == 0.0
