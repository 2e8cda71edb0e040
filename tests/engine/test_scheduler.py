"""The scheduler's admission: at once by default; with admission_wait W, a small waiting group waits up to W steps
for more arrivals while others decode, and the engine then serves the same tokens with fewer prefill calls."""
from transformers import AutoConfig

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.scheduler import Scheduler
from aurora.engine.sequence import SamplingParams, Sequence
from aurora.models.draft import DraftConfig, new_draft


def seq(i: int) -> Sequence:
    return Sequence([1, 2, 3], SamplingParams(max_tokens=4), f"r{i}")


def test_without_a_wait_every_step_admits_what_waits():
    s = Scheduler(max_batch=8, max_prefills_per_step=4)
    s.add(seq(0))
    assert [q.request_id for q in s.admit()] == ["r0"]
    s.add(seq(1))
    assert [q.request_id for q in s.admit()] == ["r1"]  # others decode: admitted all the same


def test_a_small_group_waits_while_others_decode_then_goes():
    s = Scheduler(max_batch=8, max_prefills_per_step=4, admission_wait=2)
    s.add(seq(0))
    assert len(s.admit()) == 1  # nothing decodes: no one to spare, admitted at once
    s.add(seq(1))
    assert s.admit() == [] and s.admit() == []  # one arrival while r0 decodes: it waits two steps for company
    s.add(seq(2))
    assert [q.request_id for q in s.admit()] == ["r1", "r2"]  # then the whole group goes in one prefill
    for i in range(3, 7):
        s.add(seq(i))
    assert len(s.admit()) == 4  # a group as large as one step admits goes at once (max_prefills_per_step)


def test_a_group_that_fills_the_free_rows_goes_at_once():
    s = Scheduler(max_batch=3, max_prefills_per_step=4, admission_wait=5)
    s.add(seq(0))
    s.admit()
    s.add(seq(1))
    s.add(seq(2))
    assert len(s.admit()) == 2 and len(s.running) == 3  # two free rows, two waiting: nothing to wait for
    s.add(seq(3))
    assert s.admit() == []  # no free row at all


def test_the_engine_serves_the_same_tokens_with_fewer_prefill_calls(tiny_target_dir):
    def serve(wait: int):
        draft = new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(tiny_target_dir)), seed=5)
        eng = LLMEngine(tiny_target_dir, draft, EngineConfig(max_batch=8, max_model_len=128, lookahead=3,
                                                             dtype="float32", admission_wait=wait))
        out = {}
        eng.add_request([3, 4, 5], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "long")
        for step in range(12):  # one arrival per step while "long" decodes
            eng.add_request([(7 * step + j) % 90 + 1 for j in range(2 + step)],
                            SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), f"r{step}")
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.output_ids
        while eng.has_work():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.output_ids
        return out, eng.time["prefill_calls"]

    at_once, calls_at_once = serve(0)
    waited, calls_waited = serve(3)
    assert waited == at_once and len(waited) == 13  # the same tokens for every request
    assert calls_at_once >= 11 and calls_waited <= calls_at_once // 2  # about one call per arrival without it
