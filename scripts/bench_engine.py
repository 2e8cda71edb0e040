"""Tokens/s of the built-in engine: target-only against speculative (EAGLE3 chain), at several batch sizes.

  python scripts/bench_engine.py --target smollm2 --draft scratch --batch 1 8 16 32 --out results/engine/bench.csv
  python scripts/bench_engine.py --draft CKPT --depths 0 1 2 3 4 adaptive --batch 1 4 16 64   # the depth decision

`--depths` runs the draft at each fixed speculation depth (0 = plain decoding that still extends the draft) and
with the engine's own per-step choice (`adaptive`, which times the depths itself during the warm-up run), beside
target-only: the adaptive row should be within a few percent of the best fixed depth at every batch size.

Each batch size runs `batch` chat requests at once (ignore_eos, `--max-tokens` each) after one warm-up
round of the same shape (CUDA graph capture is excluded). tokens/s = completion tokens / wall time.
"""
import argparse
import csv
import os
import platform
import time

import torch
from transformers import AutoConfig

from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.engine.sequence import SamplingParams
from aurora.models import hub
from aurora.models.draft import DraftConfig, load_draft, new_draft
from aurora.prompts import chat_ids, load_prompts


def run(engine, prompts, max_tokens):
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            for p in prompts]
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    while engine.has_work():
        engine.step()
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    toks = sum(len(s.output_ids) for s in seqs)
    rounds = sum(s.verify_rounds for s in seqs)
    return toks / dt, (sum(s.verify_tokens for s in seqs) / rounds if rounds else 0.0)


def profile(engine, prompts, max_tokens, label):
    """Where a round's time goes: kernels on the device (inside CUDA graphs too) against wall time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.runner.device.type == "cuda" else [])
    steps = 0
    with torch_profile(activities=acts) as prof:
        seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
                for p in prompts]
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
            steps += 1
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    dev_us = sum(e.self_device_time_total for e in ev)
    n_kernels = sum(e.count for e in ev)
    print(f"[profile {label}] {steps} steps, wall {wall / steps * 1e3:.2f} ms/step, device busy "
          f"{dev_us / steps / 1e3:.2f} ms/step, {n_kernels / steps:.0f} kernels/step "
          f"({sum(len(s.output_ids) for s in seqs)} tokens)")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"    {e.self_device_time_total / steps:8.1f} us/step {e.count / steps:6.1f}x  {e.key[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="scratch", help="scratch | checkpoint dir")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--topk", type=int, default=1, help="> 1: draft a tree (top-k children per node)")
    ap.add_argument("--num-draft-tokens", type=int, default=None, help="tree nodes verified per round, root included")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-fused-kernels", action="store_true", help="the target's serving kernels in plain "
                    "torch (default on CUDA: Triton rotary + KV write, add + RMSNorm, SiLU * up)")
    ap.add_argument("--domain", default="chat", help="prompt set (aurora.prompts): chat, code, math, ...")
    ap.add_argument("--profile", action="store_true", help="after each timed run, profile one more and print "
                    "the device time per round against the wall time, and the costliest kernels")
    ap.add_argument("--depths", nargs="+", default=None, help="fixed depths and/or 'adaptive' (see above); "
                    "default: one eagle3 row at full lookahead")
    ap.add_argument("--out", default="results/engine/bench.csv")
    a = ap.parse_args()
    target = hub.resolve(a.target)
    draft = (new_draft(DraftConfig.from_target(AutoConfig.from_pretrained(target)))
             if a.draft == "scratch" else load_draft(hub.resolve(a.draft)))
    max_b = max(a.batch)
    rows, eng_snapshot = [], None
    dev_name = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else platform.processor() or "cpu"
    modes = [("target-only", None, None)] + ([(f"depth {d}" if d != "adaptive" else d, draft, d) for d in a.depths]
                                             if a.depths else [("eagle3", draft, None)])
    for mode, d, depth in modes:
        eng = LLMEngine(target, d, EngineConfig(max_batch=max_b, max_model_len=1024, lookahead=a.lookahead,
                                                topk=a.topk, num_draft_tokens=a.num_draft_tokens,
                                                device=a.device, cuda_graphs=not a.no_cuda_graphs, capture=False,
                                                fused_kernels=False if a.no_fused_kernels else None,
                                                adaptive=depth == "adaptive"))
        if depth not in (None, "adaptive"):
            eng.speculation.choose = lambda bucket, d=int(depth): d
        tok = eng.tokenizer
        chats = chat_ids(tok, load_prompts(a.domain, 64), 400)
        for B in a.batch:
            prompts = (chats * (B // len(chats) + 1))[:B]
            run(eng, prompts, a.max_tokens)  # warm-up: graph capture for every bucket the timed run meets
            tps, al = run(eng, prompts, a.max_tokens)
            rows.append({"device": dev_name, "mode": mode, "batch": B, "max_tokens": a.max_tokens,
                         "lookahead": a.lookahead, "topk": a.topk, "num_draft_tokens": eng.config.num_draft_tokens,
                         "fused_kernels": eng.fused_kernels, "tokens_per_s": round(tps, 1),
                         "accept_length": round(al, 3)})
            print(rows[-1], flush=True)
            if a.profile:
                profile(eng, prompts, a.max_tokens, f"{mode} batch {B}")
        if depth == "adaptive":
            eng_snapshot = eng.speculation.snapshot()
        del eng
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["mode"] == "target-only"}
    if a.depths and "adaptive" in a.depths:
        print("adaptive decision:", eng_snapshot)
    print(f"\n{'mode':12} {'batch':>5} {'tok/s':>10} {'accept len':>10} {'vs target-only':>14}   ({dev_name})")
    for r in rows:
        print(f"{r['mode']:12} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {r['accept_length']:>10.3f} "
              f"{r['tokens_per_s'] / base[r['batch']]:>13.2f}x")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
