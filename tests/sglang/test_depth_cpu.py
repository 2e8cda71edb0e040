"""Aurora's depth decision inside SGLang (plugin/depth.py), on the CPU: a fake EAGLEWorkerV2 with SGLang's
adaptive-state interface, a fake clock, and the real Publisher / acceptance files the trainer's swaps write.
Day 0 decodes plainly; a version whose held-out prediction pays turns speculation on before any speculative
round was paid for; a depth that costs more than it yields is left. Plus SGLang's launch flags and the
collector's handling of one request whose rounds ran at different depths."""
import json

import torch

from aurora.server.config import ServeConfig
from aurora.sglang_engine.capture import CaptureCollector
from aurora.sglang_engine.launch import adaptive_depths, drives_depth, server_command, server_env, write_adaptive_config
from aurora.sglang_engine.plugin import depth, plain_round
from aurora.sglang_engine.plugin.step_swap import Publisher
from tests.sglang.test_capture_cpu import Sender, _rows, _wait


class FakeController:
    def __init__(self, worker, depths):
        self.worker, self._states = worker, {d: f"state-{d}" for d in depths}
        self.activations = []

    def _activate(self, steps):  # SGLang's: apply that candidate's runtime state
        self.activations.append(steps)
        self.worker.speculative_num_steps = steps


class FakeWorker:
    def __init__(self, depths, start):
        self.speculative_num_steps = start
        self.adaptive_controller = FakeController(self, depths)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _serve(driver, clock, rounds, bs, cost_ms, accept):
    """`rounds` decode forwards at batch size bs: launch, the device works cost_ms[depth], the result arrives
    with `accept(depth)` correct drafts per request."""
    seen = []
    for _ in range(rounds):
        driver.before_decode(bs)
        d = driver.worker.speculative_num_steps
        seen.append(d)
        clock.t += cost_ms[d] / 1e3
        driver.on_result([accept(d)] * bs, bs, d + 1)
    return seen


def test_day0_plain_then_a_paying_version_speculates(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(depth.time, "perf_counter", clock)
    swap = str(tmp_path / "swap")
    depth.write_acceptance(swap, 0, [0.0] * 4)  # what service.py writes for a day-0 head
    worker = FakeWorker([0, 1, 2, 4], start=4)  # SGLang starts at the deepest state (its buffers' size)
    applied = {"v": 0}
    drv = depth.Driver(worker, swap, lambda: applied["v"])
    cost = {0: 10.0, 1: 13.0, 2: 15.0, 4: 17.0}  # ms per round at this batch size
    seen = _serve(drv, clock, 200, 16, cost, lambda d: 0)
    assert set(seen) == {0}, "a day-0 draft must never be paid for"
    assert not drv.speculating()  # so prefills skip the draft (plain_round.py)
    # the trainer publishes version 1 with a held-out prediction that pays: written before it is announced
    pub = Publisher(swap, tp_size=1)
    pub.publish([("w", torch.zeros(4))], timeout_s=0, acceptance=[0.8, 0.7, 0.6, 0.5])
    assert json.load(open(depth.accept_path(swap, 1)))["acceptance"] == [0.8, 0.7, 0.6, 0.5]
    applied["v"] = 1  # the rank applied it (step_swap.Applier)
    # the rounds realise what was predicted: the chain's length is drawn from the per-position rates
    rates, rng = [0.8, 0.7, 0.6, 0.5], torch.Generator().manual_seed(0)

    def accept(d):
        n = 0
        while n < d and torch.rand(1, generator=rng).item() < rates[n]:
            n += 1
        return n
    seen = _serve(drv, clock, 400, 16, cost, accept)
    assert seen[0] > 0, "the prediction alone turns speculation on"
    assert max(set(seen[100:]), key=seen[100:].count) == 4  # E_4/17 ms beats E_2/15, E_1/13 and 1/10 ms
    snap = drv.ctl.snapshot()
    assert snap["version"] == 1 and snap["buckets"][16]["depth"] == 4 and drv.speculating()
    assert snap["buckets"][16]["round_ms"][0] == 10.0


def _serve_requests(driver, clock, rounds, bs, cost_ms, rates, rng, use_cold=True, length=64):
    """`bs` running requests of `length` tokens each, replaced by a new one when done. A round at depth 0 (or a
    prefill while the depth is 0) leaves a request cold: its rows accept nothing once speculating (the draft's cache
    has holes). Warm rows accept a chain drawn from `rates`."""
    reqs = [{"left": length - 5 * i % length, "cold": True} for i in range(bs)]  # running at depth 0 so far
    seen = []
    for _ in range(rounds):
        driver.before_decode(bs)
        d = driver.worker.speculative_num_steps
        seen.append(d)
        clock.t += cost_ms[d] / 1e3
        correct = []
        for r in reqs:
            n = 0
            while not r["cold"] and n < d and torch.rand(1, generator=rng).item() < rates[n]:
                n += 1
            correct.append(n)
        cold = [r["cold"] for r in reqs]
        driver.on_result(correct, bs, d + 1, cold if use_cold else None)
        for i, (r, n) in enumerate(zip(reqs, correct)):
            r["left"] -= n + 1
            r["cold"] = r["cold"] or d == 0
            if r["left"] <= 0:
                reqs[i] = {"left": length, "cold": d == 0}  # prefilled at the depth now running
    return seen


def test_cold_requests_after_an_upshift_do_not_turn_speculation_off(tmp_path, monkeypatch):
    """Requests that ran at depth 0 have holes in the draft's KV cache (plugin/depth.py) and accept next to nothing
    once speculation turns on. Counted as the version's acceptance, their turnover after the first paying swap reads
    as a draft that does not pay, and serving goes back to depth 0, where every new request is cold again. Left out,
    the upshift holds while they drain."""
    rates = [0.8, 0.7, 0.6, 0.5]
    cost = {0: 10.0, 1: 13.0, 2: 15.0, 4: 17.0}
    ends = {}
    for use_cold in (True, False):
        clock = Clock()
        monkeypatch.setattr(depth.time, "perf_counter", clock)
        swap = str(tmp_path / f"swap-{use_cold}")
        depth.write_acceptance(swap, 0, [0.0] * 4)
        applied = {"v": 0}
        drv = depth.Driver(FakeWorker([0, 1, 2, 4], start=4), swap, lambda: applied["v"])
        rng = torch.Generator().manual_seed(0)
        assert set(_serve_requests(drv, clock, 100, 16, cost, rates, rng, use_cold)) == {0}  # day 0
        depth.write_acceptance(swap, 1, rates)  # a paying version arrives
        applied["v"] = 1
        seen = _serve_requests(drv, clock, 600, 16, cost, rates, rng, use_cold)
        assert seen[0] > 0  # its prediction turns speculation on at once, in both
        ends[use_cold] = seen[-200:]
    assert ends[True].count(4) >= 190, ends[True]
    assert ends[False].count(0) >= 190, ends[False]  # without the cold rows set apart: back to depth 0 for good


def test_a_depth_that_does_not_pay_is_left(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(depth.time, "perf_counter", clock)
    swap = str(tmp_path / "swap")
    depth.write_acceptance(swap, 0, [0.9, 0.9, 0.9, 0.9])  # an optimistic prediction ...
    worker = FakeWorker([0, 1, 2, 4], start=4)
    drv = depth.Driver(worker, swap, lambda: 0)
    cost = {0: 10.0, 1: 21.0, 2: 23.0, 4: 26.0}  # ... on a card where a speculative round costs > 2 plain ones
    seen = _serve(drv, clock, 600, 1, cost, lambda d: 0)  # ... and a draft that accepts nothing
    assert seen[-200:].count(0) >= 190
    assert worker.adaptive_controller.activations[0] == 0  # plain decoding is timed first


def test_snapshot_file_and_idle_gaps(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(depth.time, "perf_counter", clock)
    swap = str(tmp_path / "swap")
    depth.write_acceptance(swap, 0, [0.0] * 4)
    drv = depth.Driver(FakeWorker([0, 1, 2, 4], start=4), swap, lambda: 0)
    _serve(drv, clock, 5, 3, {0: 5.0}, lambda d: 0)
    clock.t += 30.0  # serving idle for 30 s: the next round is timed from its own launch, not the last result
    drv.before_decode(3)
    clock.t += 0.005
    drv.on_result([0, 0, 0], 3, 1)
    assert depth.read_snapshot(swap)["buckets"]["4"]["round_ms"]["0"] == 5.0
    assert depth.bucket_of(1) == 1 and depth.bucket_of(3) == 4 and depth.bucket_of(16) == 16


def test_a_pinned_depth_overrides_the_decision_and_is_costed(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(depth.time, "perf_counter", clock)
    monkeypatch.setattr(depth, "FORCE_CHECK_S", 0.0)
    swap = str(tmp_path / "swap")
    depth.write_acceptance(swap, 0, [0.0] * 4)  # day 0: the decision alone would stay at depth 0
    drv = depth.Driver(FakeWorker([0, 1, 2, 4], start=4), swap, lambda: 0)
    cost = {0: 5.0, 1: 9.0, 2: 11.0, 4: 14.0}
    for d in (1, 2, 4, 0):
        depth.write_forced_depth(swap, d)
        assert set(_serve(drv, clock, 40, 16, cost, lambda d: 0)) == {d}
        assert drv.ctl.snapshot()["buckets"][16]["round_ms"][d] == cost[d]  # timed while pinned
    depth.write_forced_depth(swap, 3)  # not a built depth: ignored, the decision runs
    assert set(_serve(drv, clock, 40, 16, cost, lambda d: 0)) == {0}
    depth.write_forced_depth(swap, None)
    assert set(_serve(drv, clock, 40, 16, cost, lambda d: 0)) == {0} and drv.forced is None
    drv.write_snapshot()
    assert depth.read_snapshot(swap)["forced"] is None


def test_launch_flags_for_the_driven_depth(tmp_path):
    cfg = ServeConfig(engine="sglang", target="x", lookahead=4, max_batch=16)
    assert drives_depth(cfg, "/m/draft") and not drives_depth(cfg, None)
    assert not drives_depth(ServeConfig(engine="sglang", target="x", tp_size=2), "/m/draft")
    assert not drives_depth(ServeConfig(engine="sglang", target="x", adaptive_depth=False), "/m/draft")
    assert adaptive_depths(4) == [0, 1, 2, 4] and adaptive_depths(1) == [0, 1]
    path = write_adaptive_config(str(tmp_path / "adaptive.json"), 4)
    assert json.load(open(path))["1"]["candidate_steps"] == [0, 1, 2, 4]
    argv = server_command(cfg, "/m/target", "/m/draft", 31000, adaptive_config=path)
    joined = " ".join(argv)
    assert f"--speculative-adaptive --speculative-adaptive-config {path}" in joined
    assert "--speculative-num-steps 4" in joined  # the deepest candidate: SGLang sizes its buffers for it
    assert "--speculative-adaptive" not in " ".join(server_command(cfg, "/m/target", "/m/draft", 31000))
    env = server_env("/tmp/a.sock", "/tmp/swap", drive_depth=True)
    assert env[depth.DEPTH_ENV] == "1" and env["SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND"] == "1"
    assert depth.DEPTH_ENV not in server_env("/tmp/a.sock", "/tmp/swap")
    assert plain_round.ENV not in env  # the plain depth-0 round only when asked, and only with the depth driven
    assert server_env("/tmp/a.sock", "/tmp/swap", drive_depth=True, plain_depth0=True)[plain_round.ENV] == "1"
    assert plain_round.ENV not in server_env("/tmp/a.sock", "/tmp/swap", plain_depth0=True)


def test_one_request_at_several_depths_is_one_sample(tmp_path):
    """Rounds of depth 4, 0 (plain decoding: nothing proposed) and 1 in one request: the rows follow the accepted
    tokens whatever the depth; the proposals are padded with -1 to the deepest; the depth-0 round is no round."""
    got = []
    col = CaptureCollector(str(tmp_path / "c.sock"), got.append, timeout_s=5)
    tx = Sender(col.address)
    tx.send({"kind": "prefill", "rids": ["c-A"], "prefix": [0], "lens": [5]}, {"hidden": _rows(0, 5, 1)})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 5},
            {"hidden": _rows(5, 5, 1), "accept": torch.tensor([3]), "draft": torch.tensor([50, 51, 52, 53, 54])})
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 1}, {"hidden": _rows(8, 1, 1)})  # as the plugin sends it
    tx.send({"kind": "decode", "rids": ["c-A"], "ndt": 2},
            {"hidden": _rows(9, 2, 1), "accept": torch.tensor([2]), "draft": torch.tensor([59, 60])})
    _wait(lambda: col.counts["frames"] == 4)
    col.finish("c-A", list(range(100, 112)), 5, True, 1)  # 5 prompt + 7 completion: rows 0..10
    _wait(lambda: len(got) == 1)
    s = got[0]
    torch.testing.assert_close(s.aux_hidden, _rows(0, 11, 1))
    assert s.round_start.tolist() == [5, 9]
    assert s.proposals.tolist() == [[51, 52, 53, 54], [60, -1, -1, -1]] and s.accepted.tolist() == [2, 1]
    assert col.counts["frame_errors"] == 0
    # a wider block must say how much of it was accepted: a frame without that breaks its requests, visibly
    tx.send({"kind": "prefill", "rids": ["c-B"], "prefix": [0], "lens": [5]}, {"hidden": _rows(0, 5, 1)})
    tx.send({"kind": "decode", "rids": ["c-B"], "ndt": 3}, {"hidden": _rows(5, 3, 1)})
    _wait(lambda: col.counts["frame_errors"] == 1)
    col.close()


def test_plain_depth0_round_is_taken_only_where_it_equals_sglangs_verify():
    """plain_round.PlainRounds.why_not on stand-in batches (the plain round itself runs on the GPU:
    test_plain_round_gpu.py): a plain sampled or greedy batch goes plain; every case SGLang handles inside its
    verify (grammar, penalties, logprobs, hidden states, custom logit processors, sampling while top K is captured)
    or the graphs cannot take stays on SGLang's path, with its reason."""
    from types import SimpleNamespace as NS

    plain = plain_round.PlainRounds.__new__(plain_round.PlainRounds)
    plain.max_bs, plain.topk_capture = 4, False

    def batch(bs=3, idle=False, spec=True, **kw):
        info = NS(has_custom_logit_processor=kw.pop("custom", False), acc_additive_penalties=kw.pop("additive", None),
                  acc_scaling_penalties=kw.pop("scaling", None), is_all_greedy=kw.pop("greedy", True))
        fields = dict(has_grammar=False, return_logprob=False, return_hidden_states=False)
        fields.update(kw)
        return NS(forward_mode=NS(is_idle=lambda: idle), seq_lens=torch.zeros(bs),
                  spec_info=NS(bonus_tokens=torch.zeros(bs)) if spec else None, sampling_info=info, **fields)

    assert plain.why_not(batch()) is None and plain.why_not(batch(bs=4)) is None
    assert plain.why_not(batch(bs=5)) == "batch above the graphs"
    assert plain.why_not(batch(idle=True)) == "idle" and plain.why_not(batch(spec=False)) == "no previous token"
    assert plain.why_not(batch(has_grammar=True)) == "grammar"
    assert plain.why_not(batch(return_logprob=True)) == "logprobs"
    assert plain.why_not(batch(return_hidden_states=True)) == "hidden states"
    assert plain.why_not(batch(custom=True)) == "custom logit processor"
    assert plain.why_not(batch(additive=torch.zeros(3, 8))) == plain.why_not(batch(scaling=torch.ones(3, 8))) == \
        "penalties"
    assert plain.why_not(batch(greedy=False)) is None  # sampled requests go plain while no top K is captured
    plain.topk_capture = True  # with it, the sampler's in-place probabilities would reach capture: not plain
    assert plain.why_not(batch(greedy=False)) == "sampled, top-K capture" and plain.why_not(batch()) is None
    plain.topk_capture = False
    nobonus = batch()
    nobonus.spec_info.bonus_tokens = None
    assert plain.why_not(nobonus) == "no previous token"
    assert set(plain_round.snapshot()) == {"plain_rounds", "fallback_rounds", "fallback_reasons",
                                                 "plain_disabled", "prefills_without_draft"}


def test_plain_depth0_dispatch_around_sglangs_worker(monkeypatch):
    """plain_round.install's wrappers on a stand-in for SGLang's EAGLEWorkerV2 (same method names and call
    order): the depth is decided once per decode forward; at depth 0 an eligible batch runs the plain round, then
    publishes and calls the stub extend (capture, step swaps) and never reaches SGLang's forward; an ineligible one
    reaches SGLang's forward, counted by reason, without SGLang deciding again; a failing plain round hands the
    batch to SGLang's forward and turns plain rounds off; prefill and speculating rounds are SGLang's alone, a
    prefill without the draft's extend while no batch size speculates (unless the next round reads the extend)."""
    import sys
    import types
    from types import SimpleNamespace as NS

    calls, draft_idle = [], []

    class Worker:  # SGLang's EAGLEWorkerV2, reduced to what the wrappers touch
        def __init__(self, graphs=True):
            self.speculative_num_steps = 0
            self.target_worker = NS(model_runner=NS(decode_cuda_graph_runner=object() if graphs else None))

        def init_cuda_graphs(self):
            calls.append("sglang graphs")

        def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None):
            if not batch.forward_mode.is_extend():
                self.activate_step_by_batch(len(batch.seq_lens))
            else:  # what the draft's prefill extend (eagle3.py) would be told
                draft_idle.append(plain_round.draft_idle())
            calls.append("sglang forward")
            return "sglang result"

        def _stub_skipped_draft_extend(self, batch, result):
            calls.append(("stub", result.tag))

        def activate_step_by_batch(self, bs):  # depth.install's hook: no decision inside depth.decided()
            if not depth._decided[0]:
                calls.append("decide")

    class Plain:  # PlainRounds without the GPU: why_not and run as the test sets them
        reason, fail, skip_prefill = None, False, True

        def __init__(self, worker):
            calls.append("plain graphs")

        def why_not(self, batch):
            return Plain.reason

        def run(self, batch):
            calls.append("plain run")
            if Plain.fail:
                raise RuntimeError("boom")
            return NS(tag="plain result", new_seq_lens="lens")

    module = types.ModuleType("sglang.srt.speculative.eagle_worker_v2")
    module.EAGLEWorkerV2 = Worker
    monkeypatch.setitem(sys.modules, "sglang.srt.speculative.eagle_worker_v2", module)
    monkeypatch.setattr(plain_round, "PlainRounds", Plain)
    monkeypatch.setattr(plain_round, "_rounds", {})
    monkeypatch.setattr(plain_round, "STATS", {"plain": 0, "reasons": {}, "disabled": None, "prefills": 0})
    speculating = {"now": False}  # depth.speculating: whether the decision speculates at some batch size
    plain_round.install(depth.decided, lambda: speculating["now"])

    def batch(extend=False):
        return NS(forward_mode=NS(is_extend=lambda: extend), is_extend_in_batch=False, seq_lens=torch.zeros(4))

    def step(w, b, **kw):
        calls.clear()
        published = []
        out = w.forward_batch_generation(b, on_publish=published.append, **kw)
        return out, list(calls), published

    assert Worker(graphs=False).init_cuda_graphs() is None and calls == ["sglang graphs"]  # no graphs, no plain
    w = Worker()
    calls.clear()
    w.init_cuda_graphs()
    assert calls == ["sglang graphs", "plain graphs"]
    out, seen, published = step(w, batch())
    assert out.tag == "plain result" and published == ["lens"]
    assert seen == ["decide", "plain run", ("stub", "plain result")]
    assert step(w, batch(extend=True))[:2] == ("sglang result", ["sglang forward"])
    assert draft_idle == [True] and not plain_round.draft_idle()  # a prefill at depth 0 runs without the draft
    Plain.reason = "logprobs"
    assert step(w, batch())[:2] == ("sglang result", ["decide", "sglang forward"])
    w.speculative_num_steps = 4  # speculating: SGLang's round, not a fallback
    Plain.reason = None
    assert step(w, batch())[:2] == ("sglang result", ["decide", "sglang forward"])
    step(w, batch(extend=True))  # a prefill while speculating extends the draft
    w.speculative_num_steps, Plain.skip_prefill = 0, False  # ... as at depth 0 where the next round reads it
    step(w, batch(extend=True))
    w.speculative_num_steps, Plain.skip_prefill, speculating["now"] = 0, True, True  # depth 0 here, not elsewhere
    step(w, batch(extend=True))
    assert draft_idle == [True, False, False, False]
    w.speculative_num_steps, speculating["now"] = 4, False
    assert plain_round.snapshot()["fallback_reasons"] == {"logprobs": 1} and plain_round.snapshot()["plain_rounds"] == 1
    w.speculative_num_steps, Plain.fail = 0, True
    out, seen, published = step(w, batch())
    assert out == "sglang result" and seen == ["decide", "plain run", "sglang forward"] and published == []
    assert plain_round.snapshot()["plain_disabled"] == "RuntimeError: boom"
    assert step(w, batch())[1] == ["decide", "sglang forward"]  # plain rounds off for this worker: SGLang decides
    Plain.reason, Plain.fail = None, False
