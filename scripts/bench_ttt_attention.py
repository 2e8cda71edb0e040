"""TTT attention memory and time, chunked (the trainer's default) vs one [L, L] score tensor per step.

  python scripts/bench_ttt_attention.py --lengths 1024 4096 [--device cuda]

One sample of L tokens through a SmolLM2-sized draft (hidden 576, 9 heads), TTT length 4, forward + backward.
Peak memory: CUDA's max_memory_allocated on a GPU; on the CPU the growth of the process's peak RSS, so each
configuration runs in its own process.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(length: int, chunk: int, device: str) -> dict:
    from aurora.models.draft import DraftConfig, new_draft
    from aurora.sample import Sample
    from aurora.training.ttt import collate, ttt_forward
    cfg = DraftConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      intermediate_size=1536, vocab_size=2048, draft_vocab_size=2048, target_hidden_size=576)
    draft = new_draft(cfg, seed=0).to(device)
    draft.share_embedding(torch.nn.Embedding(2048, 576).to(device))
    T = length + 1
    s = Sample("s", torch.randint(0, 2048, (T,)), 2, torch.randn(T - 1, 3 * 576), None, torch.ones(T, dtype=torch.bool))
    batch = collate([s], 4, torch.arange(2048), device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = ttt_forward(draft, batch, 4, with_logits=False, attn_chunk=chunk)
    sum(h.float().pow(2).mean() for h, _ in out).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20  # KiB -> GiB
    return {"length": length, "chunk": chunk, "seconds": time.perf_counter() - t, "peak_extra_gib": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: length chunk
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.device)))
        return
    print("| L | attention | forward+backward s | peak extra GiB |\n|---|---|---|---|")
    for length in a.lengths:
        for chunk, name in ((1024, "chunks of 1024 (default)"), (1 << 30, "whole [L, L]")):
            r = subprocess.run([sys.executable, __file__, "--device", a.device, "--one", str(length), str(chunk)],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"| {length} | {name} | failed: {r.stderr.strip().splitlines()[-1]} | |")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {length} | {name} | {res['seconds']:.2f} | {res['peak_extra_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
