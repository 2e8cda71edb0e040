"""SGLangEngine against a stand-in for SGLang's HTTP API (CPU): the streamed cumulative output_ids become
token deltas, SGLang's spec stats become Aurora's, a captured request's rid is marked, errors map to the right
exceptions, and a swap is pause(in_place) -> update(draft-only loader, no flush) -> continue, in that order,
with one flat tensor. The real server is exercised on the GPU (test_sglang_backend.py)."""
import asyncio
import json

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import aurora.sglang_engine.engine as sgl_engine
from aurora.engine.sequence import SamplingParams
from aurora.sglang_engine.engine import SGLangEngine
from aurora.sglang_engine.launch import LOADER
from server_fakes import live_server


def fake_sglang(calls: list):
    app = FastAPI()

    @app.post("/generate")
    async def generate(req: Request):
        body = await req.json()
        calls.append(("generate", body))
        if body["sampling_params"]["max_new_tokens"] > 100:
            return JSONResponse({"error": {"message": "too long"}}, status_code=400)
        n = body["sampling_params"]["max_new_tokens"]

        async def stream():
            ids, rounds = [], 0
            while len(ids) < n:  # as SGLang: the prefill emits one token (no verify round), then two per round
                if ids:
                    rounds += 1
                ids = ids + ([7, 8] if rounds % 2 else [8, 7])[:1 if not ids else n - len(ids)]
                done = len(ids) == n
                meta = {"spec_verify_ct": rounds, "finish_reason": {"type": "length"} if done else None}
                if done:
                    meta["spec_correct_drafts_histogram"] = [0, rounds]
                yield f"data: {json.dumps({'output_ids': ids, 'meta_info': meta})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    for path in ("/pause_generation", "/continue_generation", "/abort_request"):
        async def control(req: Request, path=path):
            calls.append((path, await req.json()))
            return {"success": True}
        app.post(path)(control)

    @app.post("/update_weights_from_tensor")
    async def update(req: Request):
        calls.append(("/update_weights_from_tensor", await req.json()))
        return {"success": True, "message": ""}
    return app


class StubServer:
    def __init__(self, url):
        self.url, self.proc, self.log_path, self.up = url, None, "sglang.log", True

    def alive(self):
        return self.up

    def stop(self):
        pass


def test_generate_stats_errors_and_swap(monkeypatch):
    calls, finished = [], []
    monkeypatch.setattr(sgl_engine, "serialize", lambda named: json.dumps([[k, list(v.shape)] for k, v in named]))
    with live_server(fake_sglang(calls)) as url:
        eng = SGLangEngine(StubServer(url), tokenizer=None, model_name="m", max_model_len=64, lookahead=4, tp_size=2)
        eng.set_callbacks(on_finished=finished.append)

        async def collect(params):
            return [o async for o in eng.generate([1, 2, 3], params, request_id="r1")]
        outs = asyncio.run(collect(SamplingParams(max_tokens=5, temperature=0.0, stop=["\n"])))
        assert [o.new_token_ids for o in outs] == [[8], [7, 8], [8, 7]] and outs[-1].output_ids == [8, 7, 8, 8, 7]
        assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].verify_rounds == 2
        # SGLang's accept length: 4 tokens committed by 2 verify rounds (the prefill's token is no round's)
        assert outs[-1].verify_tokens == 4 and outs[-1].accept_length == 2.0
        body = calls[0][1]
        assert body["rid"] == "n-r1" and body["input_ids"] == [1, 2, 3] and body["stream"]  # no collector: not captured
        assert body["sampling_params"]["stop"] == ["\n"] and body["sampling_params"]["top_k"] == -1
        assert finished and eng.stats()["accept_length_by_version"] == {0: 2.0}
        assert eng.stats()["accept_rate_by_position"][0] == 1.0  # every round accepted its first draft
        with pytest.raises(ValueError, match="max_model_len"):
            asyncio.run(collect(SamplingParams(max_tokens=62)))
        with pytest.raises(ValueError, match="SGLang 400"):
            eng.max_model_len = 1000
            asyncio.run(collect(SamplingParams(max_tokens=101)))

        state = {"fc.weight": torch.ones(2, 3), "norm.weight": torch.ones(2), "d2t": torch.zeros(4, dtype=torch.long)}
        assert eng.swap_draft(state, 5).wait(10)
        assert eng.draft_version == 5 and eng.swaps == 1 and eng.swap_failures == 0
        names = [c[0] for c in calls]
        i = names.index("/pause_generation")
        assert names[i:i + 3] == ["/pause_generation", "/update_weights_from_tensor", "/continue_generation"]
        assert calls[i][1] == {"mode": "in_place"}
        upd = calls[i + 1][1]
        assert upd["load_format"] == LOADER and upd["flush_cache"] is False
        assert len(upd["serialized_named_tensors"]) == 2  # one per TP rank
        (flat_name, shape), = json.loads(upd["serialized_named_tensors"][0])  # one flat tensor, vocab map left out
        assert flat_name.startswith("aurora.flat:") and shape == [8] and "d2t" not in flat_name

        class Proc:
            returncode = -9
        eng.server.up, eng.server.proc = False, Proc()  # SGLang died: health must say so, requests fail clearly
        with pytest.raises(RuntimeError, match="SGLang exited with code -9"):
            eng.stats()
        with pytest.raises(RuntimeError, match="SGLang exited"):
            asyncio.run(collect(SamplingParams(max_tokens=5)))


def test_capture_drops_and_swap_time_are_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from aurora.server.metrics import StatusCollector

    class Svc:
        def draft_status(self):
            return {"draft_version": 3, "swap_failures": 1, "swap_ms_last": 120.0, "trainer": None,
                    "capture": {"dropped_incomplete": 2, "dropped_gap": 1, "dropped_cached": 0, "sender_dropped": 4,
                                "bytes": 1000, "capture_rate": 0.25, "sample_rate": 0.5}}
    reg = CollectorRegistry()
    reg.register(StatusCollector(Svc()))
    text = generate_latest(reg).decode()
    for line in ('aurora_capture_dropped_total{reason="incomplete"} 2.0', 'aurora_capture_dropped_total{reason="gap"} 1.0',
                 'aurora_capture_dropped_total{reason="sender_queue_full"} 4.0', "aurora_engine_swap_seconds 0.12",
                 "aurora_engine_swap_failures_total 1.0", "aurora_capture_bytes_total 1000.0",
                 "aurora_capture_rate 0.125"):
        assert line in text, line


def test_sglang_refuses_clearly_before_starting_anything(tiny_target_dir, tmp_path, monkeypatch):
    import importlib.util

    from aurora.server.config import ServeConfig
    from aurora.service import Service

    cfg = ServeConfig(engine="sglang", target=tiny_target_dir, run_dir=str(tmp_path))
    if importlib.util.find_spec("sglang") is None:
        with pytest.raises(RuntimeError, match=r"pip install 'aurora-spec\[sglang\]'"):
            Service.from_config(cfg)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "sglang" else real(name, *a))
    import importlib.metadata

    real_version = importlib.metadata.version
    for installed in ("0.5.17", "0.5.23"):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: installed if name == "sglang" else real_version(name))
        with pytest.raises(ValueError, match="repeats an EAGLE3 aux layer"):  # 4 layers: aux layers [2, 2, 1]
            Service.from_config(cfg)
    # SGLang 0.5.21+ refuses weight updates outside begin/end calls, which the pause swap does not make
    with pytest.raises(ValueError, match=r"sglang_swap pause does not work with SGLang 0.5.23"):
        Service.from_config(ServeConfig(engine="sglang", target=tiny_target_dir, run_dir=str(tmp_path),
                                        sglang_swap="pause"))


def test_the_pacer_scales_which_requests_are_captured():
    """Capture is decided at admission from sample_rate x the pacer's rate: the rid SGLang sees says which."""
    class Collector:  # what the engine calls on a CaptureCollector
        on_sample, counts = None, {}

        def pending(self):
            return 0

        def in_flight(self):
            return 0

        def admit(self, rid):
            pass

        def finish(self, *a, **kw):
            pass

        def discard(self, rid):
            pass

    class Pacer:
        value = 1.0

        def rate(self):
            return self.value

        def status(self):
            return {"capture_rate": self.value}

    calls = []
    with live_server(fake_sglang(calls)) as url:
        eng = SGLangEngine(StubServer(url), tokenizer=None, model_name="m", max_model_len=64, lookahead=4,
                           collector=Collector())
        eng.set_callbacks(on_sample=lambda s: None)
        eng.pacer = Pacer()

        def rids(n):
            async def one(i):
                return [o async for o in eng.generate([1, 2], SamplingParams(max_tokens=2), request_id=f"r{i}")]
            start = len(calls)
            for i in range(n):
                asyncio.run(one(i))
            return [body["rid"][:2] for name, body in calls[start:] if name == "generate"]

        assert rids(20) == ["c-"] * 20
        eng.pacer.value = 1e-9
        assert rids(20) == ["n-"] * 20
        eng.pacer.value, eng.sample_rate = 1.0, 0.5
        kept = rids(200).count("c-")
        assert 70 < kept < 130  # sample_rate is the ceiling the pacer scales
        assert eng.stats()["capture"]["capture_rate"] == 1.0 and eng.stats()["capture"]["sample_rate"] == 0.5
