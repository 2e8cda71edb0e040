"""/metrics parses and carries the documented names; the JSONL logger and `aurora report` produce a run record."""
import json
import os

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aurora.cli import main
from aurora.server.wandb_log import MetricsLogger, flatten_status
from server_fakes import test_config

NAMES = ["aurora_accept_length", "aurora_accept_length_by_version", "aurora_accept_rate_by_position",
         "aurora_train_loss", "aurora_samples_captured", "aurora_samples_dropped", "aurora_swaps",
         "aurora_swaps_refused", "aurora_draft_version", "aurora_trainer_tokens_per_second", "aurora_trainer_tokens",
         "aurora_trainer_failures", "aurora_requests", "aurora_generation_tokens",
         "aurora_request_latency_seconds"]


def test_metrics_endpoint(server):
    url, service = server
    for stream in (False, True):
        httpx.post(url + "/v1/completions", json={"prompt": "hello there", "max_tokens": 6, "stream": stream})
    httpx.post(url + "/v1/completions", json={"prompt": "hi", "temperature": 9})
    text = httpx.get(url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert not [n for n in NAMES if n not in families], sorted(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("aurora_requests_total", (("code", "200"), ("route", "/v1/completions")))] == 2
    assert samples[("aurora_requests_total", (("code", "400"), ("route", "/v1/completions")))] == 1
    assert samples[("aurora_request_latency_seconds_count", (("route", "/v1/completions"),))] == 3
    assert samples[("aurora_generation_tokens_total", ())] == 12
    assert samples[("aurora_train_loss", (("ttt_step", "3"),))] == 3.4
    assert samples[("aurora_accept_rate_by_position", (("position", "1"),))] == 0.7
    assert samples[("aurora_accept_length_by_version", (("version", "0"),))] > 1
    assert samples[("aurora_swaps_refused_total", ())] == 1
    assert samples[("aurora_trainer_tokens_total", ())] == 7890
    assert samples[("aurora_buffer_bytes", ())] == 123456
    service.swap_now()
    service.swap_now()
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    heldout = {s.labels["version"]: s.value for s in families["aurora_heldout_accept_length_by_version"].samples}
    assert heldout == {"1": 1.25, "2": 1.5}


def test_metrics_without_trainer(service, tokenizer):
    from aurora.server.app import create_app
    from server_fakes import live_server

    service.trainer = None
    with live_server(create_app(service, test_config())) as url:
        families = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        assert "aurora_accept_length" in families and "aurora_train_loss" not in families
        assert httpx.get(url + "/health").json()["trainer"] is None
        assert httpx.post(url + "/v1/draft/swap").status_code == 403


def test_logger_writes_jsonl_and_config(service, tmp_path):
    cfg = test_config(run_dir=str(tmp_path / "run"))
    logger = MetricsLogger(service, cfg, interval_s=0.05).start()
    service.swap_now()
    logger.stop()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows and rows[-1]["serve/draft_version"] == 1 and rows[-1]["train/loss_step/0"] == 2.5
    assert rows[-1]["train/heldout_accept_length"] == 1.25  # the live version's prediction
    assert os.path.exists(tmp_path / "run" / "config.yaml")
    assert flatten_status(service.draft_status())["serve/accept_rate_by_position/3"] == 0.3


def test_report_from_synthetic_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for i in range(40):
            version = i // 15
            row = {"elapsed_s": 5.0 * i, "serve/requests_finished": 20 * i, "serve/draft_version": version,
                   "serve/accept_length": 1.5 + 0.4 * version + 0.01 * i, "serve/tokens_per_second": 300 + i,
                   "serve/generated_tokens": 1500 * i, "train/tokens_trained": 4500 * i, "train/steps": i,
                   "train/tokens_per_second": 900.0, "train/state": "training",
                   "train/heldout_accept_length": 1.2 + 0.3 * version if version else None,
                   **{f"serve/accept_rate_by_position/{j}": 0.8 - 0.15 * j for j in range(4)},
                   **{f"train/loss_step/{k}": 3.0 - 0.03 * i + 0.2 * k for k in range(4)},
                   **({f"serve/depth/{b}": min(version * 2, 4) for b in (1, 16)} if i >= 5 else {})}
            f.write(json.dumps(row) + "\n")
        f.write('{"torn": ')  # a run killed mid-write
    assert main(["report", str(run), "--out", str(tmp_path / "plots")]) == 0
    paths = capsys.readouterr().out.split()
    assert {os.path.basename(p) for p in paths} == {"accept_length.png", "accept_rate.png", "train_loss.png",
                                                    "throughput.png", "depth.png"}
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    assert main(["report", str(tmp_path / "nothing")]) == 1


def test_report_series_have_no_fake_points_and_idle_is_zero():
    from aurora.server.report import _served, rate

    rows = [{"elapsed_s": 0.0, "serve/generated_tokens": 0, "serve/accept_length": 0.0},     # start: nothing yet
            {"elapsed_s": 5.0, "serve/generated_tokens": 500, "serve/accept_length": 1.8},   # busy
            {"elapsed_s": 10.0, "serve/generated_tokens": 1500, "serve/accept_length": 2.0},
            {"elapsed_s": 15.0, "serve/generated_tokens": 1500, "serve/accept_length": 2.0},  # idle
            {"elapsed_s": 25.0, "serve/generated_tokens": 1500, "serve/accept_length": 2.0}]
    assert rate(rows, "serve/generated_tokens") == ([5.0, 10.0, 15.0, 25.0], [100.0, 200.0, 0.0, 0.0])
    assert [r["elapsed_s"] for r in _served(rows)] == [5.0, 10.0, 15.0, 25.0]


def test_logger_says_how_to_get_wandb(service, tmp_path, monkeypatch, caplog):
    import builtins

    from aurora.server.config import ServeConfig

    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ModuleNotFoundError("No module named 'wandb'", name="wandb")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = ServeConfig(target="smollm2", draft=None, wandb="offline", run_dir=str(tmp_path))
    logger = MetricsLogger(service, cfg, interval_s=60)
    assert logger._init_wandb() is None
    assert "pip install 'aurora-spec[wandb]'" in caplog.text


def test_an_unhandled_error_is_counted_as_500_not_disconnected(server):
    url, service = server

    async def broken(*a, **kw):
        raise TypeError("a bug")
        yield  # an async generator, as the engine's

    service.engine.generate = broken
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples}
    assert samples[("aurora_requests_total", (("code", "500"), ("route", "/v1/completions")))] == 1
    assert ("aurora_requests_total", (("code", "disconnected"), ("route", "/v1/completions"))) not in samples


def test_the_depth_decision_is_exported_from_either_engine():
    """/metrics carries the decision per batch bucket: from the built-in engine's snapshot (int keys) and from
    SGLang's snapshot file (the same dict through JSON: string keys)."""
    from aurora.engine.speculation import DepthController
    from aurora.server.metrics import StatusCollector

    ctl = DepthController(4, depths=[0, 1, 2, 4])
    ctl.new_version(1, [0.9, 0.8, 0.7, 0.6])
    for _ in range(40):
        d = ctl.choose(16)
        ctl.observe(16, d, {0: 0.010, 1: 0.012, 2: 0.013, 4: 0.015}[d], [min(d, 3)] * 16)
    snap = ctl.snapshot()

    class Stub:
        def __init__(self, spec):
            self.spec = spec

        def draft_status(self):
            return {"speculation": self.spec}

    for spec in (snap, json.loads(json.dumps(snap))):
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in StatusCollector(Stub(spec)).collect() for s in fam.samples}
        assert got[("aurora_spec_depth", (("bucket", "16"),))] == snap["buckets"][16]["depth"] > 0
        assert got[("aurora_spec_round_seconds", (("bucket", "16"), ("depth", "0")))] == 0.010
        assert got[("aurora_spec_predicted_speedup", (("bucket", "16"), ("depth", "0")))] == 1.0
        assert sum(v for (n, _), v in got.items() if n == "aurora_spec_rounds_by_depth_total") == 40
        assert not any(n.startswith("aurora_sglang_depth0") for n, _ in got)  # the built-in engine has none

    # SGLang's snapshot also counts how its depth-0 rounds ran (plugin/plain_round.py)
    sglang = dict(json.loads(json.dumps(snap)), plain_rounds=90, fallback_rounds=7,
                  fallback_reasons={"logprobs": 5, "grammar": 2}, plain_disabled=None)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in StatusCollector(Stub(sglang)).collect() for s in fam.samples}
    rounds = {labels: v for (n, labels), v in got.items() if n == "aurora_sglang_depth0_rounds_total"}
    assert rounds == {(("path", "plain"), ("reason", "")): 90, (("path", "verify"), ("reason", "logprobs")): 5,
                      (("path", "verify"), ("reason", "grammar")): 2}


def test_the_depth_decision_is_logged_over_time():
    snap = {"buckets": {16: {"depth": 2, "predicted_speedup": {0: 1.0, 2: 1.3}, "realised_speedup": 1.2}}}
    for spec in (snap, json.loads(json.dumps(snap))):
        row = flatten_status({"speculation": spec, "requests_finished": 1})
        assert row["serve/depth/16"] == 2 and row["serve/predicted_speedup/16"] == 1.3
        assert row["serve/realised_speedup/16"] == 1.2
