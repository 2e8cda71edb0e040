"""The speculative round's cost at MiniMax M2.5's shape, from minimax_dummy_run.py runs at two or more layer counts,
and the speedup it projects for the full model against accept length (CPU; reads the runs' JSON).

  python scripts/round_cost_model.py results/minimax_dummy/h200_L4_L10_warm_2026-12-04/minimax_dummy_L{4,10}.json \
      --out results/minimax_dummy/h200_L4_L10_warm_2026-12-04/projection

  python scripts/round_cost_model.py --profiles 4=L4/plain/profile.json 4=L4/d4/profile.json 4=L4/eagle/profile.json \
      10=L10/plain/profile.json 10=L10/d4/profile.json 10=L10/eagle/profile.json --native-mode eagle --out OUT

The second form splits the round into its parts from scripts/sglang_profile.py runs at two or more layer counts
(scripts/minimax_round_profile.sh writes one profile.json per mode; modes: `plain`, SGLang alone; `d4`, Aurora at
the fixed lookahead; `eagle`, SGLang's own EAGLE3 at that lookahead): the target step, one draft step, the draft
extend, the verify and scheduling, per round and fitted in L, and Aurora's share of the round (d4 against eagle);
every other profiled mode's round in target steps beside them.

Inputs, per run (L layers) and concurrency c in {1, 16}, all served tok/s through Aurora's HTTP route:
  T(L, c)    = c / tok_s(target only)                      the time of one target decode step
  R_d(L, c)  = c * accept / tok_s(depth d pinned)          the time of one round at depth d (the sweep's phases:
                                                           trainer stopped, capture on, draft random: accept ~1)
Both include what serving this traffic costs besides decoding (each request's prefill, HTTP), shared out per
step: they are the costs of this workload (the run's prompt and completion lengths), not of a bare decode step.

Model: each of T, R_0 and R_K (K the configured lookahead) is linear in the layer count, t(L) = fixed + per_layer*L,
fitted by least squares (two layer counts: the line through both; no error bar). A round of lookahead k between
0 and K costs R_0 + k * (R_K - R_0) / K: each draft step adds its forward and one more verified token per
request. The sweep's depths between 0 and K run on SGLang's adaptive runtime states; they are reported as measured
beside the line, not fitted (see the printed table).

Projection to the full model (--layers, --tp), every assumption a flag:
  per-layer time / tp       decoding at these batch sizes is weight-bandwidth-bound and tensor parallelism splits
                            each layer's weights tp ways (attention heads and experts alike)
  * --weight-scale          1 for bf16 weights as measured; 0.5 for FP8 weights (the real checkpoint), read as half
                            the bytes per layer
  + --allreduces per layer * --allreduce-us   tensor parallelism's cost: two all-reduces per layer (after
                            attention and after the MoE), each a small-message NVLink latency
  fixed part unchanged      embedding, LM head (not split here: conservative), sampling, scheduling, Aurora
The verify's per-layer slope is measured with random weights, whose router spreads tokens over experts uniformly;
a trained router that sends neighbouring tokens to shared experts makes a wide verify cheaper than this.
Speedup of lookahead k at accept length a (tokens per round, bonus token included, a <= k + 1):
  a * T(full) / R_k(full).
Prints the fitted lines, the round costs in target steps, and the projection table; writes projection.json and
projection.png (speedup against accept length, lookahead 1-7, at c1 and c16) under --out.
"""
import argparse
import json
import os

import numpy as np

PUBLISHED = {"accept": 2.62, "speedup": 1.57, "label": "published: MiniMax M2.5, scratch draft, batch 1"}


def measurements(paths: list[str]) -> dict:
    """{L: {"target": {c: tok_s}, "depth": {d: {c: (tok_s, accept)}}}} from minimax_dummy_run.py JSON files."""
    out = {}
    for path in paths:
        with open(path) as f:
            log = json.load(f)
        m = out.setdefault(int(log["layers"]), {"target": {}, "depth": {}})
        for row in log["rows"]:
            if row.get("mode") == "target" and "c1" in row:
                m["target"] = {1: row["c1"]["tokens_per_s"], 16: row["c16"]["tokens_per_s"]}
            for name, ph in (row.get("sweep") or {}).items():
                if "depth" in ph and ph.get("failed") == 0:
                    c = int(name.split()[0][1:])
                    m["depth"].setdefault(int(ph["depth"]), {})[c] = (ph["tokens_per_s"], ph["accept_length"] or 1.0)
    for L, m in out.items():
        if not m["target"] or not m["depth"]:
            raise SystemExit(f"{L} layers: the runs need a target row and a depth sweep (--modes target,eagle3 "
                             "--adaptive-depth --depth-sweep 0,...,K)")
    return out


def step_times(m: dict) -> dict:
    """Seconds per target step and per round at each pinned depth, per concurrency."""
    t = {"target": {c: c / v for c, v in m["target"].items()}}
    for d, per_c in m["depth"].items():
        t[d] = {c: c * acc / v for c, (v, acc) in per_c.items()}
    return t


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(fixed, per_layer) of the least-squares line y = fixed + per_layer * x."""
    per_layer, fixed = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(fixed), float(per_layer)


def model(meas: dict, K: int) -> dict:
    """Fitted lines {name: {c: (fixed_s, per_layer_s)}} for the target step and the rounds of depth 0 and K."""
    layers = sorted(meas)
    if len(layers) < 2:
        raise SystemExit("the cost model needs runs at two or more layer counts")
    times = {L: step_times(meas[L]) for L in layers}
    lines = {}
    for name in ("target", 0, K):
        for c in (1, 16):
            try:
                ys = [times[L][name][c] for L in layers]
            except KeyError:
                raise SystemExit(f"no measurement of {name!r} at c{c} in every run: sweep depth 0 and {K}")
            lines.setdefault(name, {})[c] = fit(layers, ys)
    return {"layers": layers, "times": times, "lines": lines}


def project(line: tuple[float, float], layers: int, tp: int, weight_scale: float, allreduces: int,
            allreduce_s: float) -> float:
    fixed, per_layer = line
    return fixed + layers * (per_layer * weight_scale / tp + allreduces * allreduce_s)


def projection(mdl: dict, K: int, layers: int, tp: int, weight_scale: float, allreduces: int, allreduce_s: float,
               accepts: list[float]) -> dict:
    out = {}
    for c in (1, 16):
        full = {n: project(mdl["lines"][n][c], layers, tp, weight_scale, allreduces, allreduce_s)
                for n in ("target", 0, K)}
        per_step = (full[K] - full[0]) / K
        rounds = {k: full[0] + k * per_step for k in range(0, 8)}
        out[c] = {"target_step_ms": 1e3 * full["target"], "round_ms": {k: 1e3 * r for k, r in rounds.items()},
                  "round_in_target_steps": {k: r / full["target"] for k, r in rounds.items()},
                  "speedup": {k: {a: a * full["target"] / rounds[k] for a in accepts if a <= k + 1}
                              for k in range(1, 8)},
                  "break_even_accept": {k: rounds[k] / full["target"] for k in range(1, 8)}}
    return out


def profiled(specs: list[str]) -> dict:
    """{L: {tag: summary}} from scripts/sglang_profile.py's profile.json files, given as "L=PATH" (several files
    for one layer count are merged; tags are "<mode>_c<C>")."""
    out = {}
    for spec in specs:
        L, _, path = spec.partition("=")
        with open(path) as f:
            res = json.load(f)["result"]
        out.setdefault(int(L), {}).update({t: v for t, v in res.items() if "round_ms" in v})
    return out


def split_model(prof: dict, target_mode: str, round_mode: str, K: int, native_mode: str = "") -> dict:
    """The round of `round_mode` (lookahead K) split into its parts, per layer count and concurrency, each part
    fitted linearly in L: the target step (`target_mode`'s plain decode round), the draft's steps (the draft span
    / K: one step), the draft extend, the verify (the rest of run_batch) and scheduling (the round outside
    run_batch); with `native_mode` (SGLang's own EAGLE3 at the same lookahead, no Aurora), Aurora's share of the
    round. Host times of SGLang's scheduler thread per round, from its torch profiler (sglang_profile.stages)."""
    from sglang_profile import stages  # scripts/ is on the path of a script run from it

    layers = sorted(prof)
    rows, parts = {}, ("round", "scheduling", "draft_step", "draft_extend", "verify", "gpu_busy")
    for L in layers:
        for c in (1, 16):
            t, r = prof[L].get(f"{target_mode}_c{c}"), prof[L].get(f"{round_mode}_c{c}")
            if t is None or r is None:
                continue
            st = stages(r)
            row = {"target_step": t["round_ms"], "target_gpu_busy": t["gpu_busy_ms"], **st,
                   "draft_step": st["draft"] / K}
            n = prof[L].get(f"{native_mode}_c{c}") if native_mode else None
            if n is not None:
                row["native_round"] = n["round_ms"]
                row["aurora_share"] = st["round"] - n["round_ms"]
            row["others_in_target_steps"] = {tag.rsplit("_c", 1)[0]: v["round_ms"] / t["round_ms"]
                                             for tag, v in prof[L].items() if tag.endswith(f"_c{c}")}
            rows.setdefault(L, {})[c] = row
    lines = {}
    if len(layers) >= 2:
        for c in (1, 16):
            if all(c in rows.get(L, {}) for L in layers):
                for part in ("target_step", *parts, *(("aurora_share",) if native_mode else ())):
                    if all(part in rows[L][c] for L in layers):
                        lines.setdefault(part, {})[c] = fit(layers, [rows[L][c][part] for L in layers])
    return {"layers": layers, "rows": rows, "lines_ms": lines}


def print_split(sm: dict, K: int) -> None:
    print(f"\nthe round at lookahead {K}, host ms per round from SGLang's profiler (in target steps)")
    print(f"| layers | c | target step | round | scheduling | draft step (x{K}) | draft extend | verify | GPU busy | "
          "Aurora's share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for L, per_c in sm["rows"].items():
        for c, r in per_c.items():
            T = r["target_step"]
            share = f"{r['aurora_share']:.3f}" if "aurora_share" in r else ""
            print(f"| {L} | {c} | {T:.3f} | {r['round']:.3f} ({r['round'] / T:.2f}) | {r['scheduling']:.3f} | "
                  f"{r['draft_step']:.3f} | {r['draft_extend']:.3f} | {r['verify']:.3f} | {r['gpu_busy']:.3f} | "
                  f"{share} |")
    for L, per_c in sm["rows"].items():
        for c, r in per_c.items():
            print(f"  L{L} c{c}: every mode's round in target steps: "
                  + ", ".join(f"{m} {v:.2f}" for m, v in r["others_in_target_steps"].items()))
    if sm["lines_ms"]:
        print("fitted lines, ms = fixed + per layer x L")
        for part, per_c in sm["lines_ms"].items():
            for c, (f, sl) in per_c.items():
                print(f"  {part:14s} c{c:<3d} {f:7.3f} + {sl:.4f} x L")


def plot(proj: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, c in zip(axes, (1, 16)):
        for k in range(1, 8):
            a = np.linspace(1.0, k + 1, 50)
            r = proj[c]["round_in_target_steps"][k]
            ax.plot(a, a / r, label=f"lookahead {k}")
        ax.axhline(1.0, color="k", lw=0.8)
        if c == 1:
            ax.plot([PUBLISHED["accept"]], [PUBLISHED["speedup"]], "k*", ms=12, label=PUBLISHED["label"])
        ax.set_title(f"concurrency {c}")
        ax.set_xlabel("accept length (tokens per round)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("projected speedup vs target only")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="minimax_dummy_L<N>.json files, two or more layer counts")
    ap.add_argument("--profiles", nargs="+", default=[], metavar="L=PATH",
                    help="sglang_profile.py profile.json files per layer count: split the round into its parts")
    ap.add_argument("--target-mode", default="plain", help="--profiles: the mode that decodes with the target alone")
    ap.add_argument("--round-mode", default="d4", help="--profiles: the mode at the fixed lookahead")
    ap.add_argument("--native-mode", default="", help="--profiles: SGLang's own EAGLE3 at the same lookahead")
    ap.add_argument("--lookahead", type=int, default=4, help="the configured lookahead K the sweep pinned")
    ap.add_argument("--layers", type=int, default=62, help="the full model's layers")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--weight-scale", type=float, default=1.0, help="bytes per layer relative to the runs' bf16; "
                    "0.5 for FP8 weights")
    ap.add_argument("--allreduces", type=int, default=2, help="all-reduces per layer under tensor parallelism")
    ap.add_argument("--allreduce-us", type=float, default=20.0)
    ap.add_argument("--accepts", default="1.0,1.5,2.0,2.62,3.0,3.5,4.0,5.0")
    ap.add_argument("--out", default="", help="folder for projection.json and projection.png")
    a = ap.parse_args()
    K = a.lookahead
    if a.profiles:
        sm = split_model(profiled(a.profiles), a.target_mode, a.round_mode, K, a.native_mode)
        print_split(sm, K)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "round_split.json"), "w") as f:
                json.dump({"inputs": a.profiles, "lookahead": K, **sm}, f, indent=1)
        if not a.runs:
            return
    meas = measurements(a.runs)
    mdl = model(meas, K)
    accepts = [float(x) for x in a.accepts.split(",")]
    print("measured, ms per target step / per round (served tok/s of the run; accept ~1 with a random draft), "
          "and the round in target steps")
    print("| layers | c | target step | " + " | ".join(f"depth {d}" for d in sorted(meas[mdl['layers'][0]]['depth']))
          + " |")
    print("|---|---|---|" + "---|" * len(meas[mdl["layers"][0]]["depth"]))
    for L in mdl["layers"]:
        t = mdl["times"][L]
        for c in (1, 16):
            cells = [f"{1e3 * t[d][c]:.2f} ({t[d][c] / t['target'][c]:.2f})" for d in sorted(meas[L]["depth"])
                     if c in t[d]]
            print(f"| {L} | {c} | {1e3 * t['target'][c]:.2f} | " + " | ".join(cells) + " |")
    print("\nfitted lines, ms = fixed + per layer x L")
    for n, per_c in mdl["lines"].items():
        for c, (f, s) in per_c.items():
            print(f"  {('target step' if n == 'target' else f'round depth {n}'):14s} c{c:<3d} {1e3 * f:7.3f} + "
                  f"{1e3 * s:.4f} x L")
    out = {"inputs": a.runs, "assumptions": {"layers": a.layers, "tp": a.tp, "weight_scale": a.weight_scale,
                                             "allreduces_per_layer": a.allreduces, "allreduce_us": a.allreduce_us,
                                             "lookahead_measured": K},
           "measured_ms": {L: {str(n): {c: 1e3 * v for c, v in per.items()} for n, per in mdl["times"][L].items()}
                           for L in mdl["layers"]},
           "lines_ms": {str(n): {c: [1e3 * f, 1e3 * s] for c, (f, s) in per.items()} for n, per in
                        mdl["lines"].items()},
           "variants": {}}
    for scale in sorted({a.weight_scale, 0.5, 1.0}, reverse=True):
        proj = projection(mdl, K, a.layers, a.tp, scale, a.allreduces, a.allreduce_us * 1e-6, accepts)
        out["variants"][f"weight_scale={scale}"] = proj
        print(f"\nprojected: {a.layers} layers, tp {a.tp}, weight bytes x{scale}, {a.allreduces} all-reduces/layer x "
              f"{a.allreduce_us:.0f} us")
        for c in (1, 16):
            p = proj[c]
            print(f"  c{c}: target step {p['target_step_ms']:.2f} ms; depth 0 round {p['round_in_target_steps'][0]:.2f}"
                  " target steps")
            print("  | lookahead | round (target steps) = break-even accept | " + " | ".join(f"a={x:g}" for x in accepts)
                  + " |")
            print("  |---|---|" + "---|" * len(accepts))
            for k in range(1, 8):
                cells = [f"{p['speedup'][k][x]:.2f}" if x in p["speedup"][k] else "" for x in accepts]
                print(f"  | {k} | {p['round_in_target_steps'][k]:.2f} | " + " | ".join(cells) + " |")
        if a.out and scale == a.weight_scale:
            os.makedirs(a.out, exist_ok=True)
            plot(proj, os.path.join(a.out, "projection.png"),
                 f"MiniMax M2.5 projected from {'/'.join(map(str, mdl['layers']))}-layer runs: {a.layers} layers, "
                 f"tp {a.tp}, weight bytes x{scale}, {a.allreduces}x{a.allreduce_us:.0f} us all-reduce per layer")
    print(f"\n{PUBLISHED['label']}: {PUBLISHED['speedup']}x at accept {PUBLISHED['accept']} (lookahead 4)")
    if a.out:
        with open(os.path.join(a.out, "projection.json"), "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.out}/projection.json and projection.png")


if __name__ == "__main__":
    main()
