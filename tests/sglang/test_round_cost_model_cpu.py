"""scripts/round_cost_model.py on runs made up from known lines: the fit recovers them, and the projection and
speedups equal the formula worked by hand."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import round_cost_model as rcm  # noqa: E402

# seconds: (fixed, per layer) per concurrency, for the target step and the rounds of depth 0 and 4
LINES = {"target": {1: (1e-3, 1e-4), 16: (2e-3, 2e-4)}, 0: {1: (2e-3, 1.2e-4), 16: (3e-3, 2.4e-4)},
         4: {1: (3e-3, 4e-4), 16: (5e-3, 5e-4)}}
ACCEPT = 1.25


def _run(tmp_path, L):
    t = lambda name, c: LINES[name][c][0] + LINES[name][c][1] * L  # noqa: E731
    sweep = {f"c{c} d{d}": {"depth": d, "failed": 0, "accept_length": ACCEPT, "tokens_per_s": c * ACCEPT / t(d, c)}
             for c in (1, 16) for d in (0, 4)}
    sweep["trainer_stopped_c16"] = {"failed": 0, "tokens_per_s": 1.0}
    log = {"layers": L, "rows": [
        {"mode": "target", "c1": {"tokens_per_s": 1 / t("target", 1)}, "c16": {"tokens_per_s": 16 / t("target", 16)}},
        {"mode": "eagle3", "sweep": sweep}]}
    path = tmp_path / f"minimax_dummy_L{L}.json"
    path.write_text(json.dumps(log))
    return str(path)


def test_the_fit_recovers_the_lines_and_the_projection_is_the_formula(tmp_path):
    paths = [_run(tmp_path, L) for L in (4, 10, 16)]
    mdl = rcm.model(rcm.measurements(paths), K=4)
    for name, per_c in LINES.items():
        for c, (fixed, per_layer) in per_c.items():
            assert mdl["lines"][name][c] == pytest.approx((fixed, per_layer), rel=1e-6)
    proj = rcm.projection(mdl, 4, layers=62, tp=4, weight_scale=0.5, allreduces=2, allreduce_s=20e-6,
                          accepts=[1.0, 2.62, 6.0])
    full = {n: LINES[n][1][0] + 62 * (LINES[n][1][1] * 0.5 / 4 + 2 * 20e-6) for n in LINES}
    assert proj[1]["target_step_ms"] == pytest.approx(1e3 * full["target"])
    r2 = full[0] + 2 * (full[4] - full[0]) / 4  # lookahead 2: two of the four draft steps
    assert proj[1]["speedup"][2][2.62] == pytest.approx(2.62 * full["target"] / r2)
    assert 6.0 not in proj[1]["speedup"][2] and 6.0 in proj[1]["speedup"][5]  # accept <= lookahead + 1
    assert proj[1]["break_even_accept"][2] == pytest.approx(r2 / full["target"])


def test_the_script_writes_its_table_plot_and_json(tmp_path):
    paths = [_run(tmp_path, L) for L in (4, 10)]
    out = tmp_path / "proj"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "round_cost_model.py"), *paths, "--out", str(out)],
                         capture_output=True, text=True, check=True)
    assert "| 4 |" in res.stdout and "break-even" in res.stdout
    assert (out / "projection.png").stat().st_size > 10_000
    assert "weight_scale=0.5" in json.loads((out / "projection.json").read_text())["variants"]


def test_one_layer_count_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="two or more layer counts"):
        rcm.model(rcm.measurements([_run(tmp_path, 4)]), K=4)


def _profile(tmp_path, L, name):
    """A profile.json as scripts/sglang_profile.py writes it, from per-round parts linear in L (ms)."""
    def summary(sched, draft, extend, verify):
        run_batch = draft + extend + verify
        ann = {"scheduler.run_batch": run_batch, "draft": draft, "draft_extend": extend} if draft else \
            {"scheduler.run_batch": run_batch}
        return {"round_ms": sched + run_batch, "gpu_busy_ms": 0.5 * (sched + run_batch), "annotations_ms": ann,
                "launches_per_round": {}}
    res = {}
    for c in (1, 16):
        res[f"plain_c{c}"] = summary(0.5, 0, 0, 1.0 + 0.1 * c * L / 16)
        res[f"d4_c{c}"] = summary(0.8, 4 * 0.3, 0.4, 1.5 + 0.2 * L)
        res[f"eagle_c{c}"] = summary(0.6, 4 * 0.3, 0.4, 1.4 + 0.2 * L)
    res["broken"] = {"error": "RuntimeError('server exited')"}
    path = tmp_path / name
    path.write_text(json.dumps({"result": res}))
    return f"{L}={path}"


def test_the_round_split_recovers_each_part_and_fits_it_in_layers(tmp_path):
    specs = [_profile(tmp_path, L, f"p{L}.json") for L in (4, 6)]
    sm = rcm.split_model(rcm.profiled(specs), "plain", "d4", K=4, native_mode="eagle")
    r = sm["rows"][6][16]
    assert r["draft_step"] == pytest.approx(0.3) and r["draft_extend"] == pytest.approx(0.4)
    assert r["verify"] == pytest.approx(1.5 + 1.2) and r["scheduling"] == pytest.approx(0.8)
    assert r["target_step"] == pytest.approx(0.5 + 1.0 + 0.6)
    assert r["aurora_share"] == pytest.approx(0.2 + 0.1)  # scheduling 0.8 vs 0.6, verify +0.1
    assert r["others_in_target_steps"]["d4"] == pytest.approx(r["round"] / r["target_step"])
    assert sm["lines_ms"]["verify"][16] == pytest.approx((1.5, 0.2))
    assert sm["lines_ms"]["draft_step"][1] == pytest.approx((0.3, 0.0), abs=1e-9)
    out = tmp_path / "split"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "round_cost_model.py"), "--profiles", *specs,
                          "--native-mode", "eagle", "--out", str(out)], capture_output=True, text=True, check=True)
    assert "| 6 | 16 |" in res.stdout and "draft_step" in res.stdout
    assert json.loads((out / "round_split.json").read_text())["lookahead"] == 4


def test_a_lost_profile_is_rebuilt_from_the_lines_the_run_printed(tmp_path):
    import sglang_profile as sp

    s = {"round_ms": 7.452, "gpu_busy_ms": 3.647, "launches_per_round": {"cudaLaunchKernel": 56.0, "cudaGraphLaunch": 3.0},
         "annotations_ms": {"scheduler.run_batch": 6.2704, "draft_extend": 1.5929, "draft": 1.0659},
         "kernels_ms": {f"k{i}": 0.1 * i for i in range(8)}}
    log = tmp_path / "run.log"
    log.write_text("$ aurora serve ...\nready in 90 s\n" + sp.summary_line("d4_c16", s) + "\n"
                   + "bad: FAILED to start: RuntimeError('server exited with 1')\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "sglang_profile.py"), "--from-log", str(log), "--out",
                    str(tmp_path / "p")], capture_output=True, text=True, check=True)
    res = json.loads((tmp_path / "p" / "profile.json").read_text())["result"]
    r = res["d4_c16"]
    assert (r["round_ms"], r["gpu_busy_ms"]) == (7.452, 3.647) and r["launches_per_round"] == {"all": 59.0}
    assert r["annotations_ms"] == s["annotations_ms"] and len(r["kernels_ms"]) == 6  # the six it printed
    assert sp.stages(r) == sp.stages(s) and "error" in res["bad"]
    with pytest.raises(SystemExit, match="no profile summary"):
        sp.from_log("nothing here")
