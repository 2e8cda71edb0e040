"""Step swap (no pause) across real processes on the CPU: Aurora publishes versions into two shared buffers,
a stand-in for an SGLang rank polls once per "step" and loads them into its model in place; every version
arrives whole, in order, in the same parameter storage, and publishing never overwrites a buffer a rank may
still read."""
import multiprocessing as mp

import torch

from aurora.sglang_engine.plugin.step_swap import Applier, Publisher


class FakeDraft(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4, bias=False)
        self.norm = torch.nn.Parameter(torch.zeros(4))

    def load_weights(self, named):  # what SGLang's draft does: copy into the existing parameters
        params = dict(self.named_parameters())
        for k, v in named:
            params[{"fc.weight": "fc.weight", "norm.weight": "norm"}[k]].data.copy_(v)


def rank_process(directory, rank, versions, out):
    torch.multiprocessing.set_sharing_strategy("file_system")
    model, seen, app = FakeDraft(), [], Applier(directory, rank)
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    while app.applied < versions or app.pending is not None:  # until the last version is applied and acked
        before = app.applied
        app.poll(model)  # one scheduler step
        if app.applied != before:
            seen.append((app.applied, model.fc.weight.detach().clone(), model.norm.detach().clone()))
    out.put(([(v, w.tolist(), n.tolist()) for v, w, n in seen],
             all(p.data_ptr() == ptrs[k] for k, p in model.named_parameters())))


def test_versions_arrive_whole_in_order_in_place(tmp_path):
    ctx = mp.get_context("spawn")
    pub = Publisher(str(tmp_path), tp_size=2)
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_process, args=(str(tmp_path), r, 5, out)) for r in range(2)]
    for p in procs:
        p.start()
    for v in range(1, 6):
        named = [("fc.weight", torch.full((4, 6), float(v))), ("norm.weight", torch.full((4,), -float(v)))]
        assert pub.publish(named, timeout_s=60) == v  # waits for both ranks to have applied v - 1
    pub.wait_applied(5, timeout_s=60)
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    for seen, in_place in results:
        assert in_place
        versions = [v for v, _, _ in seen]
        assert versions == sorted(versions) and versions[-1] == 5
        for v, w, n in seen:  # never a mix of two versions
            assert w == [[float(v)] * 6] * 4 and n == [-float(v)] * 4


def test_engine_step_swap_needs_no_http(tmp_path):
    """SGLangEngine in step mode: swap_draft publishes, a rank applies at its next step, the version goes live,
    and SGLang's HTTP API is never called (the stub server has no URL that answers)."""
    import threading

    from aurora.sglang_engine.engine import SGLangEngine

    class Stub:
        url, proc = "http://127.0.0.1:9", None

        def alive(self):
            return True

        def stop(self):
            pass

    eng = SGLangEngine(Stub(), None, "m", 64, 4, tp_size=1, swap_mode="step", swap_dir=str(tmp_path))
    model, app, stop = FakeDraft(), Applier(str(tmp_path), 0), threading.Event()

    def scheduler():  # one poll per "step"
        while not stop.is_set():
            app.poll(model)
            stop.wait(0.002)
    threading.Thread(target=scheduler, daemon=True).start()
    try:
        for v in (1, 2, 3):
            state = {"fc.weight": torch.full((4, 6), float(v)), "norm.weight": torch.full((4,), 1.0 + v),
                     "d2t": torch.zeros(3, dtype=torch.long)}
            assert eng.swap_draft(state, v + 10).wait(30)
            assert eng.draft_version == v + 10 and eng.swap_failures == 0
            assert torch.equal(model.fc.weight, state["fc.weight"]) and torch.equal(model.norm, state["norm.weight"])
    finally:
        stop.set()


def test_pending_step_swap_at_shutdown_is_abandoned_not_failed(tmp_path):
    """An idle server applies a step swap at its next step; shutdown meanwhile neither hangs on it nor counts a
    failure, and the live version stays the last one applied."""
    from aurora.sglang_engine.engine import SGLangEngine

    class Stub:
        url, proc = "http://127.0.0.1:9", None

        def alive(self):
            return True

        def stop(self):
            pass

    eng = SGLangEngine(Stub(), None, "m", 64, 4, tp_size=1, swap_mode="step", swap_dir=str(tmp_path))
    done = eng.swap_draft({"fc.weight": torch.ones(4, 6), "norm.weight": torch.ones(4)}, 1)  # no rank polls
    assert not done.wait(0.3)
    eng.shutdown(timeout=10)
    assert done.wait(5) and eng.swap_failures == 0 and eng.draft_version == 0 and eng.error is None
