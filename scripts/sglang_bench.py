"""SGLang target-only vs SGLang + Aurora draft (trained online, capture on and off) vs Aurora's built-in engine,
tokens/s at concurrency 1 and 16 on one card (GPU machine only).

  python scripts/sglang_bench.py --train-requests 2000 --out results/sglang \
      --sglang-args="--attention-backend triton --sampling-backend pytorch"

Workload (DEVICE.md's SGLang baseline): greedy chat requests, 128 output tokens, ignore_eos, 8 fixed prompts
each made unique with "(#i)"; 1 warm-up request; 8 requests at concurrency 1, 64 at 16. Aurora's rows go
through Aurora's own HTTP front (/v1/chat/completions), SGLang's rows through SGLang's.
Phases: (1) SGLang target-only; (2) Aurora service on SGLang from a day-0 draft, trained online on
`--train-requests` chat requests (AlpacaEval/MT-bench/Arena prompts, never the bench prompts), then benched
with capture and training on; (3) the same service restarted from the trained draft with sample_rate 0
(capture off); (4) the built-in engine with the trained draft (in this process).
"""
import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import os
import time

import httpx
import torch

from aurora.models import hub
from aurora.prompts import load_prompts
from aurora.server.app import create_app, serve_in_thread
from aurora.server.config import ServeConfig
from aurora.service import Service
from aurora.sglang_engine.launch import SGLangServer, free_port, server_command, server_env

PROMPTS = ["Explain the concept of quantum computing.", "Write a short story about a time traveler.",
           "Describe the process of photosynthesis.", "Write a Python function that checks whether a number is prime.",
           "What are the main causes of inflation?", "Give me three tips for better sleep.",
           "Summarize the plot of Romeo and Juliet.", "How does a hash table work?"]


async def _chat(url, conc, n, max_tokens=128, prompts=None, ignore_eos=True):
    prompts = prompts or [p + f" (#{i})" for i, p in enumerate(PROMPTS * (n // len(PROMPTS) + 1))][:n]
    done, it = [], iter(range(len(prompts)))

    async def worker(h):
        for i in it:
            r = await h.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": ignore_eos})
            r.raise_for_status()
            done.append(r.json()["usage"])

    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        model = (await h.get("/v1/models")).json()["data"][0]["id"]  # Aurora checks the name; SGLang does not
        (await h.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 16, "temperature": 0})).raise_for_status()
        t = time.perf_counter()
        await asyncio.gather(*(worker(h) for _ in range(conc)))
        dt = time.perf_counter() - t
    toks = sum(u["completion_tokens"] for u in done)
    rounds = sum(u.get("spec_verify_rounds") or 0 for u in done)
    return toks / dt, (toks / rounds if rounds else None)


def bench(url, concs=(1, 16)):
    return {c: asyncio.run(_chat(url, c, 8 if c == 1 else 64)) for c in concs}


class _Live:
    """Aurora's HTTP app for `service`, served in a thread until close()."""
    def __init__(self, service, cfg):
        self._stack = contextlib.ExitStack()
        self.url = self._stack.enter_context(serve_in_thread(create_app(service, cfg)))

    def close(self):
        self._stack.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-requests", type=int, default=2000)
    ap.add_argument("--sync-every", type=int, default=200)
    ap.add_argument("--sglang-args", default="")
    ap.add_argument("--out", default="results/sglang")
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--quick", type=float, default=0, metavar="SECONDS",
                    help="short device budget: one Aurora/SGLang server only (prefill graphs off), trained on "
                         "HumanEval traffic for SECONDS, benched with capture on and off; no target-only/built-in rows")
    a = ap.parse_args()
    if a.quick:
        return quick(a)
    os.makedirs(a.out, exist_ok=True)
    run = os.path.join(a.out, "run")
    extra = a.sglang_args + " --mem-fraction-static 0.5 --cuda-graph-max-bs 32"
    cfg = ServeConfig(target="smollm2", draft="scratch", engine="sglang", sync_every=a.sync_every, lr=3e-4,
                      max_batch=32, max_model_len=2048, run_dir=run, wandb="disabled", sglang_args=extra)
    rows, log = [], {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    import sglang
    log["sglang"] = sglang.__version__

    def add(name, res, note=""):
        for c, (tps, acc) in res.items():
            rows.append({"mode": name, "concurrency": c, "tokens_per_s": round(tps, 1),
                         "accept_length": round(acc, 2) if acc else "", "note": note})
            print(f"{name:48s} c={c:<3d} {tps:8.1f} tok/s  accept {acc}", flush=True)

    # (1) SGLang target-only
    port = free_port()
    ref = SGLangServer(server_command(dataclasses.replace(cfg, draft=None), hub.resolve("smollm2"), None, port),
                       server_env(None), os.path.join(run, "target-only.log"), port)
    log["target_only_start_s"] = ref.wait_ready()
    add("SGLang target-only", bench(ref.url))
    ref.stop()

    # (2) Aurora on SGLang, day-0 draft trained online, then benched with capture + training on
    t0 = time.time()
    service = Service.from_config(cfg)
    log["aurora_start_s"] = time.time() - t0
    service.trainer.config.min_samples_before_train = 16
    live = _Live(service, cfg)
    train_prompts = (load_prompts("chat") + load_prompts("arena"))
    t0 = time.time()
    asyncio.run(_chat(live.url, 32, a.train_requests, max_tokens=128, ignore_eos=False,
                      prompts=[train_prompts[i % len(train_prompts)] for i in range(a.train_requests)]))
    st = service.engine.stats()
    log["training"] = {"requests": a.train_requests, "seconds": time.time() - t0, "swaps": st["swaps"],
                       "swap_ms": list(service.engine.swap_ms), "accept_length_by_version":
                       st["accept_length_by_version"], "capture": st["capture"], "trainer": service.trainer.status()}
    print(json.dumps(log["training"], default=str)[:2000], flush=True)
    add("SGLang + Aurora draft (online), capture+training on", bench(live.url), f"after {a.train_requests} requests")
    draft_dir = service.save()["path"]
    draft_dir = os.path.join(draft_dir, "draft") if os.path.isdir(os.path.join(draft_dir, "draft")) else draft_dir
    service.trainer.stop()  # capture alone: samples still flow into the buffer, nothing trains on the GPU
    add("SGLang + Aurora draft (online), capture on, trainer stopped", bench(live.url))
    live.close()
    service.shutdown()

    # (3) the trained draft, capture off
    cfg3 = dataclasses.replace(cfg, draft=draft_dir, sample_rate=0.0, run_dir=run + "-nocapture")
    service = Service.from_config(cfg3)
    live = _Live(service, cfg3)
    add("SGLang + Aurora draft (online), capture off", bench(live.url))
    live.close()
    service.shutdown()

    # (4) the built-in engine, same trained draft
    if not a.skip_builtin:
        from aurora.engine.engine import EngineConfig, LLMEngine
        from aurora.models.draft import load_draft
        for name, d in (("Aurora built-in engine, target-only", None),
                        ("Aurora built-in engine + Aurora draft (online)", load_draft(draft_dir))):
            eng = LLMEngine(hub.resolve("smollm2"), d, EngineConfig(lookahead=4, max_batch=32, max_model_len=2048,
                                                                   device="cuda"))
            from aurora.engine.async_engine import AsyncEngine
            svc = Service(AsyncEngine(eng, "SmolLM2-135M-Instruct"), None, cfg)
            live = _Live(svc, cfg)
            add(name, bench(live.url))
            live.close()
            svc.engine.shutdown()
    with open(os.path.join(a.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump({"rows": rows, **log}, f, indent=1, default=str)
    print("\n| mode | concurrency | tok/s | accept length |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_s']:,} | {r['accept_length']} |")


def quick(a):
    os.makedirs(a.out, exist_ok=True)
    cfg = ServeConfig(target="smollm2", draft="scratch", engine="sglang", sync_every=a.sync_every, lr=1e-3,
                      max_batch=32, max_model_len=2048, run_dir=os.path.join(a.out, "run"), wandb="disabled",
                      sglang_args=a.sglang_args + " --mem-fraction-static 0.5 --cuda-graph-max-bs 32"
                                                  " --cuda-graph-backend-prefill disabled")
    out = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}

    def save():
        with open(os.path.join(a.out, "bench_quick.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)

    t0 = time.time()
    service = Service.from_config(cfg)
    out["start_s"] = time.time() - t0
    service.trainer.config.min_samples_before_train = 16
    live = _Live(service, cfg)
    code = load_prompts("code")
    t0, n = time.time(), 0
    while time.time() - t0 < a.quick:  # online training on HumanEval traffic
        asyncio.run(_chat(live.url, 16, 160, max_tokens=64, ignore_eos=False, prompts=code[n % 160:] + code[:n % 160]))
        n += 160
    service.trainer.swap_now()  # None if the guard refuses: the live draft stays
    st = service.engine.stats()
    out["training"] = {"requests": n, "seconds": time.time() - t0, "swaps": st["swaps"],
                       "swap_ms": list(service.engine.swap_ms), "accept_by_version": st["accept_length_by_version"],
                       "trainer_steps": service.trainer.steps, "capture": st["capture"]}
    save()
    for capture in (True, False):
        service.engine.sample_rate = 1.0 if capture else 0.0
        for domain, prompts in (("chat", None), ("code", [p for p in code[:64]])):
            for c in (1, 16):
                n_req = 8 if c == 1 else 64
                tps, acc = asyncio.run(_chat(live.url, c, n_req, prompts=prompts[:n_req] if prompts else None))
                out["rows"].append({"capture": capture, "domain": domain, "concurrency": c, "tokens_per_s": tps,
                                    "accept_length": acc})
                print(out["rows"][-1], flush=True)
                save()
    live.close()
    service.shutdown()


if __name__ == "__main__":
    main()
