"""AsyncEngine hands a request's outputs to its event loop every `stream_interval` tokens: the first at once, then
merged outputs of at least that many tokens, then the last. The tokens, their order, the finish and the counts
are those of the token-by-token stream; a stop string still cuts at the same token."""
import asyncio

import pytest

from aurora.engine.async_engine import AsyncEngine
from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_target_dir):
    eng = AsyncEngine(LLMEngine(tiny_target_dir, None, EngineConfig(max_batch=4, max_model_len=128, device="cpu",
                                                                    cuda_graphs=False)), "tiny")
    yield eng
    eng.shutdown()


def outputs(engine, params, prompt=(5, 6, 7, 8)):
    async def run():
        return [o async for o in engine.generate(list(prompt), params)]
    return asyncio.run(run())


@pytest.mark.parametrize("interval", [4, 7, 64])
def test_outputs_arrive_in_chunks_of_the_interval_with_the_same_tokens(engine, interval):
    base = dict(max_tokens=23, temperature=0.0, ignore_eos=True)
    single = outputs(engine, SamplingParams(**base))
    chunked = outputs(engine, SamplingParams(**base, stream_interval=interval))
    assert len(single) == 23 and all(len(o.new_token_ids) == 1 for o in single)
    tokens = [t for o in chunked for t in o.new_token_ids]
    assert tokens == [t for o in single for t in o.new_token_ids] == chunked[-1].output_ids
    assert len(chunked[0].new_token_ids) == 1  # the first token (time to first token) is not held back
    assert all(len(o.new_token_ids) >= interval for o in chunked[1:-1])
    assert len(chunked) == 1 + -(-22 // interval)  # the first, then ceil(22 / interval) chunks
    assert [o.finished for o in chunked] == [False] * (len(chunked) - 1) + [True]
    assert chunked[-1].finish_reason == single[-1].finish_reason == "length"


def test_a_stop_string_cuts_a_chunked_output_at_the_same_token(engine):
    free = outputs(engine, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    text = engine.tokenizer.decode(free[-1].output_ids)
    stop = text[10:12]  # two characters the greedy output reaches after ten (the tiny tokenizer: a token each)
    cut = [outputs(engine, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop],
                                          stream_interval=k)) for k in (1, 16)]
    assert cut[0][-1].output_ids == cut[1][-1].output_ids and len(cut[1][-1].output_ids) < 40
    assert cut[0][-1].finish_reason == cut[1][-1].finish_reason == "stop"


def test_the_engine_time_counters_account_for_prefills_rounds_and_idle(engine):
    """engine_time (what scripts/front_cost.py compares between the direct engine and HTTP): requests admitted
    together are prefilled in one call, every decode step is a round, and the step time holds both."""
    before = engine.stats()["engine_time"]

    async def run():
        p = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
        return await asyncio.gather(*[collect(engine.generate([5, 6, 7 + i], p)) for i in range(3)])

    async def collect(gen):
        return [o async for o in gen]

    outs = asyncio.run(run())
    t = {k: v - before[k] for k, v in engine.stats()["engine_time"].items()}
    assert all(o[-1].finished and len(o[-1].output_ids) == 9 for o in outs)
    assert t["prefilled"] == 3 and 1 <= t["prefill_calls"] <= 3
    assert t["rounds"] >= 8  # the prefill gives each request its first token, then a round per token
    assert t["step_s"] >= t["prefill_s"] + t["round_s"] * 0.99 > 0 and t["steps"] >= t["rounds"]
    time_idle = engine.stats()["engine_time"]["idle_s"]
    asyncio.run(asyncio.sleep(0.2))
    assert engine.stats()["engine_time"]["idle_s"] >= time_idle + 0.1  # nothing to run: the thread waits, counted
