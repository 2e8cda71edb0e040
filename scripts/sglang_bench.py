"""SGLang target-only vs SGLang + Aurora draft (trained online; capture on and off) vs Aurora's built-in engine,
tokens/s at concurrency 1 and 16 on one card (GPU machine only).

  python scripts/sglang_bench.py --train-seconds 100 --out results/sglang \
      --sglang-args="--attention-backend triton --sampling-backend pytorch"

Workload (DEVICE.md's SGLang baseline): greedy requests, 128 output tokens, ignore_eos; 8 requests at
concurrency 1, 64 at 16 (`--requests`), after one warm-up request. Two prompt sets: "chat" (8 fixed prompts
made unique with "(#i)", DEVICE.md's) and "code" (HumanEval prompts 0-63, never seen in training; reused
in turn beyond 64 requests). Aurora's rows go through
Aurora's own HTTP front (/v1/chat/completions), SGLang's through SGLang's.
Phases, one after another on the same card: (1) SGLang target-only; (2) Aurora on SGLang from a day-0 draft,
trained online for --train-seconds on HumanEval prompts 64-163 (16 clients, 64 tokens), then benched with
capture + training on, with capture on and the trainer stopped, and with capture off (sample rate 0: the
plugin sends nothing), alternated `--capture-rounds` times; (3) the built-in engine, target-only and with
the trained draft (in this process).
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
            if r.status_code == 400 and not ignore_eos:  # training traffic: a prompt over the context is refused
                continue
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
    ap.add_argument("--train-seconds", type=float, default=100)
    ap.add_argument("--sync-every", type=int, default=40)
    ap.add_argument("--sglang-args", default="")
    ap.add_argument("--out", default="results/sglang")
    ap.add_argument("--run-dir", help="server logs and checkpoints (default: <out>/run)")
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--requests", type=int, default=64, help="requests per row at concurrency 16 (8 at 1; x2)")
    ap.add_argument("--capture-rounds", type=int, default=1,
                    help="alternate capture on / off this many times (trainer stopped): the overhead needs repeats")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    run = a.run_dir or os.path.join(a.out, "run")
    extra = a.sglang_args + " --mem-fraction-static 0.5 --cuda-graph-max-bs 32"
    cfg = ServeConfig(target="smollm2", draft="scratch", engine="sglang", sync_every=a.sync_every, lr=1e-3,
                      max_batch=32, max_model_len=2048, run_dir=run, wandb="disabled", sglang_args=extra)
    import sglang
    rows, log = [], {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "sglang": sglang.__version__}
    code = load_prompts("code")
    domains = {"chat": None, "code": code[:64]}

    def add(name, url, note=""):
        for domain, prompts in domains.items():
            for c in (1, 16):
                n = max(8, a.requests // 8) if c == 1 else a.requests
                cycled = (prompts * (n // len(prompts) + 1))[:n] if prompts else None  # code: 64 prompts, reused
                tps, acc = asyncio.run(_chat(url, c, n, prompts=cycled))
                rows.append({"mode": name, "domain": domain, "concurrency": c, "tokens_per_s": round(tps, 1),
                             "accept_length": round(acc, 2) if acc else "", "note": note})
                print(f"{name:56s} {domain:5s} c={c:<3d} {tps:8.1f} tok/s  accept {acc}", flush=True)
        save()

    def save():
        with open(os.path.join(a.out, "bench.json"), "w") as f:
            json.dump({"rows": rows, **log}, f, indent=1, default=str)

    # (1) SGLang target-only
    port = free_port()
    ref = SGLangServer(server_command(dataclasses.replace(cfg, draft=None), hub.resolve("smollm2"), None, port),
                       server_env(None), os.path.join(run, "target-only.log"), port)
    log["target_only_start_s"] = ref.wait_ready()
    add("SGLang target-only", ref.url)
    ref.stop()

    # (2) Aurora on SGLang: day-0 draft trained online on HumanEval 64-163, then benched three ways
    t0 = time.time()
    service = Service.from_config(cfg)
    log["aurora_start_s"] = time.time() - t0
    service.trainer.config.min_samples_before_train = 16
    live = _Live(service, cfg)
    train = code[64:]
    t0, n = time.time(), 0
    while time.time() - t0 < a.train_seconds:
        asyncio.run(_chat(live.url, 16, len(train), max_tokens=64, ignore_eos=False, prompts=train))
        n += len(train)
    service.trainer.swap_now()  # None if the guard refuses: the live draft stays
    st = service.engine.stats()
    log["training"] = {"requests": n, "seconds": time.time() - t0, "swaps": st["swaps"],
                       "swap_ms": list(service.engine.swap_ms), "accept_length_by_version":
                       st["accept_length_by_version"], "capture": st["capture"], "trainer": service.trainer.status()}
    print(json.dumps(log["training"], default=str)[:1500], flush=True)
    note = f"draft v{service.engine.draft_version} after {n} requests"
    add("SGLang + Aurora draft (online), capture + training on", live.url, note)
    draft_dir = service.save()["path"]
    draft_dir = os.path.join(draft_dir, "draft") if os.path.isdir(os.path.join(draft_dir, "draft")) else draft_dir
    service.trainer.stop()  # capture alone: samples still flow into the buffer, nothing trains on the GPU
    for r in range(a.capture_rounds):
        service.engine.sample_rate = 1.0
        add("SGLang + Aurora draft (online), capture on, trainer stopped", live.url, note + f", round {r + 1}")
        service.engine.sample_rate = 0.0
        add("SGLang + Aurora draft (online), capture off", live.url, note + f", round {r + 1}")
    live.close()
    service.shutdown()

    # (3) the built-in engine, same trained draft
    if not a.skip_builtin:
        from aurora.engine.async_engine import AsyncEngine
        from aurora.engine.engine import EngineConfig, LLMEngine
        from aurora.models.draft import load_draft
        for name, d in (("Aurora built-in engine, target-only", None),
                        ("Aurora built-in engine + Aurora draft (online)", load_draft(draft_dir))):
            eng = LLMEngine(hub.resolve("smollm2"), d, EngineConfig(lookahead=4, max_batch=32, max_model_len=2048,
                                                                   device="cuda"))
            svc = Service(AsyncEngine(eng, "SmolLM2-135M-Instruct"), None, cfg)
            live = _Live(svc, cfg)
            add(name, live.url, note if d is not None else "")
            live.close()
            svc.engine.shutdown()
    with open(os.path.join(a.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| mode | prompts | concurrency | tok/s | accept length |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['domain']} | {r['concurrency']} | {r['tokens_per_s']:,} | {r['accept_length']} |")


if __name__ == "__main__":
    main()
