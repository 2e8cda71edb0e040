"""Aurora end to end at MiniMax M2.5's shape on one GPU, dummy weights, reduced depth (GPU machine only):
configs/minimax-m2.5-dummy.yaml through Aurora's normal path (ServeConfig -> Service.from_config -> SGLang with
`--load-format dummy` -> Aurora's HTTP routes), token-id traffic to /v1/completions.

  scripts/device/env.sh python scripts/minimax_dummy_run.py --layers 4 --out results/minimax_dummy
  ... --layers 10 --dtypes bfloat16 --modes target,eagle3     # a second depth, and the target alone

Per (mode, dtype), one SGLang start: `--dtype float16` is the real checkpoint's activation dtype (its
captured states are fp16, the draft stays bf16: the conversion path). Phases: warm-up (below); c1 (--c1-requests)
and c16 (--c16-requests) with capture + training; c16 with capture off (the engine's sample rate 0); an explicit
swap (guarded, step swap, acknowledged by every rank); one request after it. Reports served tok/s, accept length,
failed requests, wire bytes per captured token (and what the 2 GiB buffer bound holds in requests), the
trainer's tokens/s against the captured tokens/s, swap time, the GPU memory split, the captured samples'
shapes and dtypes, and the checkpoint's format. Prints a table and writes OUT/minimax_dummy.json.
Random weights: accept length means nothing here; this is about cost, memory and correctness at real sizes.

Warm-up: Triton compiles a kernel the first time it meets a new specialisation (batch size 1, a multiple of 16, any
other; each depth's token count), in SGLang's scheduler (attention metadata, verify) and in Aurora's trainer (the
fused loss). A server pays that once; a phase of a few seconds that pays it measures the compiler. So every
measured phase follows an unmeasured one of the same concurrency (and pinned depth), and the first waits for the
trainer's first steps (--warm 0: the old single warm-up request, to see what a cold server costs).
"""
import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import time

import httpx
import torch
import yaml

from aurora.models.minimax_dummy import aux_layers_for, write_draft, write_target
from aurora.server.app import create_app, serve_in_thread
from aurora.server.config import ServeConfig
from aurora.service import Service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML = os.path.join(ROOT, "configs", "minimax-m2.5-dummy.yaml")
GB = 1e9
LAYER_GB, FIXED_GB = 7.34, 2.46 + 0.49  # bf16 dummy weights per layer; embedding + LM head, the draft


async def _traffic(url, conc, n, prompt_len, max_tokens, seed, vocab=32000):
    """n token-id requests (distinct random prompts of ids < vocab: the draft's vocabulary), `conc` at a time."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]
    usage, failed, it = [], [], iter(prompts)

    async def worker(h):
        for p in it:
            r = await h.post("/v1/completions", json={"prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                                      "ignore_eos": True})
            if r.status_code != 200:
                failed.append(f"{r.status_code}: {r.text[:200]}")
                continue
            usage.append(r.json()["usage"])

    async with httpx.AsyncClient(base_url=url, timeout=900) as h:
        t = time.perf_counter()
        await asyncio.gather(*(worker(h) for _ in range(conc)))
        dt = time.perf_counter() - t
    toks = sum(u["completion_tokens"] for u in usage)
    rounds = sum(u.get("spec_verify_rounds") or 0 for u in usage)
    return {"seconds": dt, "requests": len(usage), "failed": len(failed), "failures": failed[:3],
            "completion_tokens": toks, "tokens_per_s": toks / dt if dt else 0.0,
            "accept_length": toks / rounds if rounds else None,
            "captured_tokens": sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)}


def _gpu_processes() -> dict:
    """MiB per process on the GPU (nvidia-smi), {} where it cannot tell (e.g. in a container)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(pid): int(mib) for pid, mib in (l.split(",") for l in out.strip().splitlines() if "," in l)}


def _memory(service) -> dict:
    free, total = torch.cuda.mem_get_info()
    procs = _gpu_processes()
    own = procs.get(os.getpid())
    return {"total_gb": total / GB, "used_gb": (total - free) / GB,
            "aurora_allocated_gb": torch.cuda.memory_allocated() / GB,     # trainer: master, AdamW, embedding, ...
            "aurora_peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "aurora_reserved_gb": torch.cuda.memory_reserved() / GB,
            "aurora_process_gb": own * 2**20 / GB if own is not None else None,
            "sglang_processes_gb": {str(p): m * 2**20 / GB for p, m in procs.items() if p != os.getpid()} or None}


def _sample_check(samples: list, dtype: torch.dtype, hidden: int) -> dict:
    bad = []
    for s in samples:
        T = s.num_tokens
        if tuple(s.aux_hidden.shape) != (T - 1, 3 * hidden) or s.aux_hidden.dtype != dtype:
            bad.append(f"{s.request_id}: aux {tuple(s.aux_hidden.shape)} {s.aux_hidden.dtype}, T={T}")
        th = s.target_hidden
        if th is not None and (tuple(th.shape) != (T - 1, hidden) or th.dtype != dtype):
            bad.append(f"{s.request_id}: target_hidden {tuple(th.shape)} {th.dtype}")
    s0 = samples[0] if samples else None
    return {"checked": len(samples), "bad": bad[:5], "ok": bool(samples) and not bad,
            "aux": None if s0 is None else [list(s0.aux_hidden.shape), str(s0.aux_hidden.dtype)],
            "target_hidden": None if s0 is None or s0.target_hidden is None else
            [list(s0.target_hidden.shape), str(s0.target_hidden.dtype)]}


def _checkpoint_check(run_dir: str, aux: list[int]) -> dict:
    from safetensors import safe_open

    d = os.path.join(run_dir, "checkpoint", "draft")
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k not in ("d2t", "t2d")}
        fc = f.get_slice("fc.weight").get_shape()
    ids = hf.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
    return {"ok": ids is not None and [i + 1 for i in ids] == aux and dtypes == {"BF16"} and fc == [3072, 9216],
            "eagle_aux_hidden_state_layer_ids": ids, "dtypes": sorted(dtypes), "fc": fc}


def _spy(a, tag: str) -> list:
    """py-spy (raw stacks, every thread, idle kept, not pausing the process) of Aurora's process and of SGLang's
    scheduler for --spy-s seconds from now: where capture and training cost serving at this shape."""
    from sglang_profile import scheduler_pid, start_spies  # scripts/ is on the path of a script run from it

    os.makedirs(a.spy, exist_ok=True)
    spies = start_spies({"aurora": os.getpid(), "scheduler": scheduler_pid()}, a.spy_s,
                        lambda who: os.path.join(a.spy, f"spy_L{a.layers}_{tag}_{who}.raw"))
    return [p for p, _ in spies.values()]


def _depth_sweep(a, url, service, tr) -> dict:
    """The trainer stopped (so that round costs are serving's alone), capture on: c16 at Aurora's decision, then
    each depth pinned in turn (plugin/depth.py's force file) at c1 and c16. Per phase: served tok/s, accept
    length, and the scheduler's own round cost at that depth and batch bucket (depth.json's round_ms). With capture
    pacing on (the default), a stopped trainer's full queue soon takes capture down to the pacer's floor: these
    phases then cost what a paced server pays (--no-pacing: every request captured)."""
    from aurora.sglang_engine.plugin.depth import bucket_of, read_snapshot, write_forced_depth

    tr.stop(timeout=60)
    swap_dir = service.engine._publisher.dir
    _warm(a, url, 16, a.c16_requests // 4, 50)
    out = {"trainer_stopped_c16": asyncio.run(_traffic(url, 16, a.c16_requests, a.prompt_len, a.max_tokens, 11,
                                                       a.prompt_vocab))}
    print(f"L{a.layers} trainer stopped, c16: {out['trainer_stopped_c16']['tokens_per_s']:.1f} tok/s", flush=True)
    seed = 20
    try:
        for conc, n in ((1, a.sweep_requests[0]), (16, a.sweep_requests[1])):
            for d in a.depth_sweep:
                write_forced_depth(swap_dir, d)
                time.sleep(0.6)  # every scheduler looks for the file at least every 0.25 s
                seed += 1
                _warm(a, url, conc, max(2, n // 4), seed)
                res = asyncio.run(_traffic(url, conc, n, a.prompt_len, a.max_tokens, seed, a.prompt_vocab))
                time.sleep(2.5)  # depth.json is rewritten at most every 2 s
                snap = read_snapshot(swap_dir) or {}
                b = (snap.get("buckets") or {}).get(str(bucket_of(conc))) or {}
                res.update(depth=d, forced=snap.get("forced"), round_ms=(b.get("round_ms") or {}).get(str(d)),
                           timed=(b.get("timed") or {}).get(str(d)), rounds_by_depth=b.get("rounds_by_depth"),
                           delivered_tok_s=b.get("delivered_tok_s"))
                out[f"c{conc} d{d}"] = res
                print(f"L{a.layers} c{conc} depth {d}: {res['tokens_per_s']:9.1f} tok/s  accept {res['accept_length']}"
                      f"  round {res['round_ms']} ms  failed {res['failed']}", flush=True)
    finally:
        write_forced_depth(swap_dir, None)
    return out


def _warm(a, url, conc: int, n: int, seed: int) -> None:
    """An unmeasured pass: n requests, conc at a time (a concurrency's ramp-down meets every smaller batch size)."""
    if a.warm:
        asyncio.run(_traffic(url, conc, n, a.prompt_len, a.max_tokens, 1000 + seed, a.prompt_vocab))


def run_one(a, mode: str, dtype: str, dirs: dict) -> dict:
    weights = LAYER_GB * a.layers + FIXED_GB
    frac = a.mem_fraction or min(0.9, (weights + a.kv_gb) / (torch.cuda.mem_get_info()[1] / GB))
    with open(YAML) as f:
        base = yaml.safe_load(f)["sglang_args"]
    args = re.sub(r"--mem-fraction-static \S+", f"--mem-fraction-static {frac:.3f}", base)
    if dtype != "bfloat16":
        args += f" --dtype {dtype}"  # after Aurora's own --dtype bfloat16: SGLang's parser keeps the last
    run_dir = os.path.join(a.out, f"run-L{a.layers}-{mode}-{dtype}")
    cfg = ServeConfig.load(YAML, target=dirs["target"], draft=dirs["draft"] if mode == "eagle3" else None,
                           run_dir=run_dir, sglang_args=args, sync_every=a.sync_every, wandb="disabled",
                           adaptive_depth=a.adaptive_depth, capture_pacing=not a.no_pacing)
    row = {"layers": a.layers, "mode": mode, "dtype": dtype, "mem_fraction_static": round(frac, 3),
           "aux_layers": aux_layers_for(a.layers), "sglang_args": args}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    service = Service.from_config(cfg)
    row["start_s"] = time.time() - t0
    seen = []
    tr = service.trainer
    if tr is not None:  # the engine holds the trainer's add_sample since construction: wrap the engine's hook
        emit = service.engine.on_sample
        service.engine.on_sample = lambda s: (seen.append(s) if len(seen) < 64 else None, emit(s))[1]
    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(serve_in_thread(create_app(service, cfg)))
        asyncio.run(_traffic(url, 1, 1, a.prompt_len, 16, 0, a.prompt_vocab))
        _warm(a, url, 16, 48, 0)
        t_warm = time.time()
        while a.warm and tr is not None and tr.status()["steps"] < 2 and time.time() - t_warm < 120:
            _warm(a, url, 16, 16, 1)  # the trainer's first steps compile its kernels: not inside a measured phase
        row["warm_s"] = time.time() - t0 - row["start_s"]
        phases = [("c1", 1, a.c1_requests, True), ("c16", 16, a.c16_requests, True)]
        if mode == "target":  # step time at the verify's token counts (c x draft tokens): the round cost model's input
            phases += [(f"c{n}", n, max(8, 4 * n), True) for n in a.target_concurrencies]
        if tr is not None:
            phases.append(("c16 capture off", 16, a.c16_requests, False))
        for i, (name, conc, n, capture) in enumerate(phases):
            service.engine.sample_rate = 1.0 if capture else 0.0
            _warm(a, url, conc, max(2, n // 4), 10 + i)
            spies = _spy(a, f"{mode}_{name.replace(' ', '_')}") if a.spy and name == "c16" else []
            cap0 = dict(service.engine.stats().get("capture") or {})
            tt0 = tr.status()["tokens_trained"] if tr else 0
            res = asyncio.run(_traffic(url, conc, n, a.prompt_len, a.max_tokens, 1 + i, a.prompt_vocab))
            st = service.engine.stats()
            cap = st.get("capture") or {}
            if tr is not None and capture:
                ts = tr.status()
                kept = cap.get("samples", 0) - cap0.get("samples", 0)
                wire = cap.get("bytes", 0) - cap0.get("bytes", 0)
                # with capture pacing (the default) only some requests are captured: count their tokens alone
                # (every request here has the same length)
                tokens = kept * res["captured_tokens"] / max(res["requests"], 1)
                res.update(capture_samples=kept, capture_rate=cap.get("capture_rate"),
                           wire_bytes_per_token=wire / tokens if kept else None,
                           captured_tokens_per_s=tokens / res["seconds"],
                           offered_tokens_per_s=res["captured_tokens"] / res["seconds"],
                           trainer_tokens_per_s_ema=ts["tokens_per_second"],
                           trainer_tokens_per_s=(ts["tokens_trained"] - tt0) / res["seconds"],
                           trainer_steps=ts["steps"], trainer_state=ts["state"], trainer_failures=ts["failures"])
            for p in spies:
                p.wait()
            row[name] = res
            print(f"L{a.layers} {mode:6s} {dtype:8s} {name:16s} {res['tokens_per_s']:9.1f} tok/s  "
                  f"accept {res['accept_length']}  failed {res['failed']}", flush=True)
        row["memory"] = _memory(service)
        if tr is not None:
            service.engine.sample_rate = 1.0
            v0 = service.engine.draft_version
            v = tr.swap_now()  # the guard, then the engine's swap in a thread of its own
            deadline = time.time() + float(os.environ.get("SWAP_WAIT_S", 120))
            # a step swap applies at SGLang's next forward: a request every so often, as traffic would
            trickle = 0
            while v is not None and service.engine.draft_version != v and time.time() < deadline:
                trickle += 1
                asyncio.run(_traffic(url, 1, 1, 16, 4, 100 + trickle, a.prompt_vocab))
            ts = tr.status()
            row["swap"] = {"version": v, "acknowledged": v is not None and service.engine.draft_version == v != v0,
                           "refused": ts["last_guard"] if v is None else None,
                           "swap_ms": list(service.engine.swap_ms), "swaps": service.engine.swaps,
                           "swap_failures": service.engine.swap_failures, "trainer_swaps": ts["swaps"],
                           "swaps_refused": ts["swaps_refused"], "trickle_requests": trickle}
            row["after swap"] = asyncio.run(_traffic(url, 4, 8, a.prompt_len, a.max_tokens, 7, a.prompt_vocab))
            if a.depth_sweep:
                row["sweep"] = _depth_sweep(a, url, service, tr)
            buf = tr.status()
            per_sample = buf["buffer_bytes"] / buf["buffer_size"] if buf["buffer_size"] else None
            row["buffer"] = {"bytes": buf["buffer_bytes"], "samples": buf["buffer_size"],
                             "bytes_per_sample": per_sample, "bytes_per_token": per_sample /
                             (a.prompt_len + a.max_tokens) if per_sample else None,
                             "requests_in_2GiB": int(2 * 2**30 / per_sample) if per_sample else None,
                             "samples_invalid": buf["samples_invalid"], "loss_per_step": buf["loss_per_step"]}
            row["samples"] = _sample_check(seen, getattr(torch, dtype), 3072)
        row["engine"] = {k: v for k, v in service.engine.stats().items() if k in ("capture", "swaps", "swap_failures")}
    finally:
        stack.close()
        service.shutdown()
    if tr is not None:
        row["checkpoint"] = _checkpoint_check(run_dir, aux_layers_for(a.layers))
    phases = [v for v in row.values() if isinstance(v, dict)] + list(row.get("sweep", {}).values())
    row["failed_total"] = sum(p["failed"] for p in phases if "failed" in p)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="results/minimax_dummy")
    ap.add_argument("--dirs", default="/tmp/minimax-dummy", help="where the dummy target and draft are written")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--modes", default="eagle3", help="comma list of eagle3, target")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-vocab", type=int, default=32000, help="prompt ids are drawn below this")
    ap.add_argument("--c1-requests", type=int, default=8)
    ap.add_argument("--c16-requests", type=int, default=64)
    ap.add_argument("--sync-every", type=int, default=800)
    ap.add_argument("--adaptive-depth", action="store_true", help="Aurora chooses SGLang's depth (default: the fixed "
                    "lookahead, whose round cost this run measures)")
    ap.add_argument("--target-concurrencies", default="", help="comma list: more concurrencies for mode target, e.g. "
                    "5,80 (the token counts of a lookahead-4 verify at c1 and c16)")
    ap.add_argument("--depth-sweep", default="", help="comma list of depths (with --adaptive-depth): after the swap, "
                    "stop the trainer and pin each depth in turn at c1 and c16 (the round cost model's input; "
                    "Aurora's candidate depths are 0, 1, 2 and the lookahead)")
    ap.add_argument("--sweep-requests", default="6,32", help="requests per pinned depth at c1 and at c16")
    ap.add_argument("--spy", default="", help="a folder: py-spy Aurora's process and SGLang's scheduler during the "
                    "c16 phase (py-spy on PATH; summarise with scripts/sglang_profile.py's spy_summary)")
    ap.add_argument("--spy-s", type=int, default=3, help="seconds of py-spy, from the c16 phase's start")
    ap.add_argument("--no-pacing", action="store_true", help="capture every request (capture_pacing off): "
                    "the capture cost at its full rate")
    ap.add_argument("--warm", type=int, default=1, help="1: an unmeasured pass before every measured phase (see "
                    "above); 0: one warm-up request only")
    ap.add_argument("--kv-gb", type=float, default=12.0, help="SGLang's KV pool beyond the weights")
    ap.add_argument("--mem-fraction", type=float, default=None, help="override --mem-fraction-static")
    a = ap.parse_args()
    a.target_concurrencies = [int(n) for n in a.target_concurrencies.split(",") if n]
    a.depth_sweep = [int(d) for d in a.depth_sweep.split(",") if d]
    a.sweep_requests = [int(n) for n in a.sweep_requests.split(",")]
    if a.depth_sweep and not a.adaptive_depth:
        ap.error("--depth-sweep pins Aurora's depth decision: it needs --adaptive-depth")
    os.makedirs(a.out, exist_ok=True)
    import sglang
    base = os.path.join(a.dirs, f"L{a.layers}")
    dirs = {"target": os.path.join(base, "target"), "draft": os.path.join(base, "draft")}
    t0 = time.time()
    if not os.path.exists(os.path.join(dirs["target"], "model.safetensors")):
        write_target(dirs["target"], a.layers)
    if not os.path.exists(os.path.join(dirs["draft"], "model.safetensors")):
        write_draft(dirs["draft"], a.layers)
    log = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "sglang": sglang.__version__,
           "layers": a.layers, "generate_s": time.time() - t0, "rows": []}
    path = os.path.join(a.out, f"minimax_dummy_L{a.layers}.json")
    for mode in a.modes.split(","):
        for dtype in a.dtypes.split(","):
            try:
                log["rows"].append(run_one(a, mode, dtype, dirs))
            except Exception as e:  # one failed start must not lose the other rows
                log["rows"].append({"layers": a.layers, "mode": mode, "dtype": dtype, "error": repr(e)})
                print(f"L{a.layers} {mode} {dtype}: FAILED {e!r}", flush=True)
            with open(path, "w") as f:
                json.dump(log, f, indent=1, default=str)
    print(f"\n{log['card']}, SGLang {log['sglang']}, {a.layers} layers, prompts {a.prompt_len} + {a.max_tokens} tokens")
    print("| mode | dtype | c1 tok/s | c16 tok/s | c16 capture off | accept c16 | failed | wire B/token | "
          "trainer tok/s vs captured tok/s (c16) | swap ms | samples ok | ckpt ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in log["rows"]:
        if "error" in r:
            print(f"| {r['mode']} | {r['dtype']} | error: {r['error'][:80]} |")
            continue
        c1, c16, off = r.get("c1", {}), r.get("c16", {}), r.get("c16 capture off", {})
        f = lambda x, p=0: "" if x is None else f"{x:,.{p}f}"  # noqa: E731
        swap = r.get("swap", {})
        print(f"| {r['mode']} | {r['dtype']} | {f(c1.get('tokens_per_s'))} | {f(c16.get('tokens_per_s'))} | "
              f"{f(off.get('tokens_per_s'))} | {f(c16.get('accept_length'), 2)} | {r['failed_total']} | "
              f"{f(c16.get('wire_bytes_per_token'))} | {f(c16.get('trainer_tokens_per_s'))} vs "
              f"{f(c16.get('captured_tokens_per_s'))} | {f((swap.get('swap_ms') or [None])[-1], 1)} | "
              f"{r.get('samples', {}).get('ok', '')} | {r.get('checkpoint', {}).get('ok', '')} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
