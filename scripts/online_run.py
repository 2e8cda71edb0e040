"""Online training from scratch, measured by the engine: accept length against requests served.

  python scripts/online_run.py --requests 5000 --block 1000 --domains chat code math --out results/online

Drives the real service (engine + capture + trainer + hot swap) in-process with `--concurrency` clients.
Prompts cycle through the domains in blocks of `--block` requests (a domain switch every block). Writes
requests.csv (one row per finished request: domain, draft version, accept length; appended as requests finish,
so a run cut short keeps what it served, and sorted by request at the end), accept_length.png
(rolling mean, swap markers, domain bands) and the final draft checkpoint under <out>/run/checkpoint.

`--offline-epochs E` then compares with offline training on the same tokens: every sample the run captured
is kept; a fresh day-0 draft (same vocabulary map) is trained on them shuffled, with the same optimiser
settings, until it has trained as many tokens as the online trainer did (replays included) or E epochs are
done (offline.json records both counts; E >= the replay passes makes them equal), and both drafts serve the same
evaluation requests (the last `--eval-per-domain` prompts of each domain, after the run; the run served them
too wherever its traffic wrapped around a prompt set) in the live engine; offline.json has the result.
"""
import argparse
import asyncio
import csv
import os
import time

from aurora.engine.sequence import SamplingParams
from aurora.prompts import chat_ids, load_prompts
from aurora.server.config import ServeConfig
from aurora.service import Service
from aurora.training.loss import OBJECTIVES
from sweep_train import serve  # scripts/ is on the path of `python scripts/online_run.py`


FIELDS = ["request", "domain", "draft_version", "completion_tokens", "verify_tokens", "verify_rounds", "accept_length",
          "t"]


async def drive(service, prompts, domains, block, concurrency, max_tokens, record):
    tok = service.engine.tokenizer
    sem = asyncio.Semaphore(concurrency)
    pools = {d: chat_ids(tok, prompts[d], 384) for d in domains}
    t0 = time.perf_counter()

    async def one(i):
        d = domains[(i // block) % len(domains)]
        ids = pools[d][(i // (block * len(domains)) * block + i % block) % len(pools[d])]
        async with sem:
            async for o in service.engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
                if o.finished:
                    record({"request": i, "domain": d, "draft_version": o.draft_version,
                            "completion_tokens": len(o.output_ids), "verify_tokens": o.verify_tokens,
                            "verify_rounds": o.verify_rounds,
                            "accept_length": round(o.accept_length, 4), "t": round(time.perf_counter() - t0, 2)})
        if i % 250 == 0:
            st = service.draft_status()
            tr = st["trainer"] or {}
            print(f"[{time.perf_counter() - t0:7.1f}s] request {i:5d} {d:5s} version {st['draft_version']} "
                  f"accept_len(recent) {st['accept_length_recent']:.3f} trainer steps {tr.get('steps')} "
                  f"loss {[round(x, 2) for x in tr.get('loss_per_step', [])]} swaps {tr.get('swaps')} "
                  f"refused {tr.get('swaps_refused')} dropped {tr.get('samples_dropped')}", flush=True)

    await asyncio.gather(*(one(i) for i in range(args.requests)))


def plot(rows, out, window=100):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["request"])
    x = [r["request"] for r in rows]
    al = [r["accept_length"] for r in rows]
    roll = [sum(al[max(0, i - window + 1):i + 1]) / len(al[max(0, i - window + 1):i + 1]) for i in range(len(al))]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(x, roll, label=f"accept length (rolling {window} requests, measured by the engine)")
    prev = None
    for r in rows:
        if prev is not None and r["draft_version"] != prev:
            ax.axvline(r["request"], color="gray", ls=":", lw=0.8)
        prev = r["draft_version"]
    doms = sorted({r["domain"] for r in rows})
    colors = dict(zip(doms, ["#fde0dd", "#e0ecf4", "#e5f5e0", "#fff7bc", "#efedf5"]))
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i]["domain"] != rows[start]["domain"]:
            ax.axvspan(rows[start]["request"], rows[i - 1]["request"], color=colors[rows[start]["domain"]], alpha=0.6, lw=0)
            ax.text((rows[start]["request"] + rows[i - 1]["request"]) / 2, 1.02, rows[start]["domain"], ha="center", fontsize=8)
            start = i
    ax.axhline(2.62, color="red", ls="--", lw=0.8, label="published from-scratch figure (2.62)")
    ax.set_xlabel("requests served")
    ax.set_ylabel("accept length (tokens / verify round)")
    ax.set_ylim(bottom=1.0)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accept_length.png"), dpi=120)


def offline_compare(service, samples, prompts):
    """Train a fresh draft offline on the run's own samples; serve the same new requests with both drafts."""
    import json

    from aurora.models.draft import new_draft
    from aurora.training.trainer import OnlineTrainer, TrainConfig

    eng, trainer = service.engine.engine, service.trainer
    if trainer is None:
        raise SystemExit(f"no trainer to compare with: a pruned draft vocabulary waits for the first "
                         f"{service.config.vocab_warmup_requests} requests before training starts")
    online_version = trainer.swap_now() or trainer.version  # the online draft's latest weights go live ...
    trainer.stop(timeout=60)                                 # ... and stay: no swap during the evaluation
    fresh = new_draft(eng.draft.config, dtype=eng.draft.fc.weight.dtype, device=eng.draft.fc.weight.device, seed=1)
    fresh.set_vocab_map(eng.draft.d2t, eng.draft.t2d)
    fresh.share_embedding(eng.target.embed_tokens)
    c = trainer.config
    off = OnlineTrainer(fresh, eng.target.lm_head.weight,
                        TrainConfig(objective=c.objective, lr=c.lr, warmup_steps=c.warmup_steps,
                                    ttt_length=c.ttt_length, device=c.device, reject_weight=c.reject_weight,
                                    batch_tokens=c.batch_tokens),
                        lambda sd, v, acc: None)
    t0 = time.perf_counter()
    online_tokens = trainer.status()["tokens_trained"]
    tokens = off.train_epochs(samples, args.offline_epochs, max_tokens=online_tokens)
    train_s = time.perf_counter() - t0
    evals = {d: chat_ids(eng.tokenizer, prompts[d][-args.eval_per_domain:], 384) for d in args.domains}

    def measure():
        accept = asyncio.run(serve(service, evals, args.max_tokens, args.concurrency, capture=False))
        return {d: round(a, 3) for d, a in accept.items()}

    result = {"samples": len(samples), "online_tokens_trained": online_tokens,
              "offline_tokens_trained": tokens, "offline_epochs": args.offline_epochs,
              "offline_train_seconds": round(train_s, 1), "online_version": online_version}
    result["online_accept_length"] = measure()
    service.engine.swap_draft(off._snapshot(), 10 ** 6).wait(60)
    result["offline_accept_length"] = measure()
    print("offline comparison:", result, flush=True)
    with open(os.path.join(args.out, "offline.json"), "w") as f:
        json.dump(result, f, indent=1)


def main():
    global args
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--domains", nargs="+", default=["chat", "code", "math"])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sync-every", type=int, default=800)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--replay-passes", type=int, default=ServeConfig.replay_passes)
    ap.add_argument("--objective", default=ServeConfig.objective, choices=OBJECTIVES)
    ap.add_argument("--draft-vocab-size", type=int, default=None, help="None: the target's vocabulary")
    ap.add_argument("--priority-stream", type=int, default=1, help="1: serve on a high-priority CUDA stream")
    ap.add_argument("--offline-epochs", type=int, default=0, help="0: no offline comparison; else at most E epochs, "
                    "stopping at the online trainer's token count")
    ap.add_argument("--eval-per-domain", type=int, default=100)
    ap.add_argument("--out", default="results/online")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = ServeConfig(target=args.target, draft="scratch", lookahead=args.lookahead, sync_every=args.sync_every,
                      lr=args.lr, device=args.device, max_batch=args.concurrency, max_model_len=args.max_model_len,
                      run_dir=os.path.join(args.out, "run"), wandb="disabled", replay_passes=args.replay_passes,
                      draft_vocab_size=args.draft_vocab_size, objective=args.objective,
                      priority_stream=bool(args.priority_stream))
    service = Service.from_config(cfg)
    kept = []
    if args.offline_epochs:  # keep every captured sample for the offline comparison
        eng = service.engine.engine
        to_trainer = eng.on_sample
        eng.on_sample = lambda s: (kept.append(s), to_trainer(s))
    prompts = {d: load_prompts(d) for d in args.domains}
    rows = []
    csv_path = os.path.join(args.out, "requests.csv")
    with open(csv_path, "w", newline="") as f:  # written as requests finish: a run cut short keeps its rows
        live = csv.DictWriter(f, fieldnames=FIELDS)
        live.writeheader()

        def record(row):
            rows.append(row)
            live.writerow(row)
            f.flush()

        t = time.perf_counter()
        asyncio.run(drive(service, prompts, args.domains, args.block, args.concurrency, args.max_tokens, record))
        wall = time.perf_counter() - t
    status = service.draft_status()
    if args.offline_epochs:
        offline_compare(service, kept, prompts)
    service.shutdown()
    rows.sort(key=lambda r: r["request"])
    with open(csv_path, "w", newline="") as f:  # the finished run's rows in request order
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out)
    toks = sum(r["completion_tokens"] for r in rows)
    print(f"\n{len(rows)} requests, {toks} completion tokens in {wall:.0f} s ({toks / wall:.0f} tok/s incl. training)")
    print("accept length by draft version:", {v: round(a, 3) for v, a in status["accept_length_by_version"].items()})
    for lo in range(0, len(rows), args.block // 2):
        part = rows[lo:lo + args.block // 2]
        print(f"requests {lo:5d}-{lo + len(part) - 1:5d} {part[0]['domain']:5s} accept length "
              f"{sum(r['verify_tokens'] for r in part) / max(1, sum(r['verify_rounds'] for r in part)):.3f}")
    print("trainer:", {k: status["trainer"][k] for k in ("steps", "swaps", "swaps_refused", "failures", "last_error",
                                                          "samples_captured", "samples_dropped", "tokens_per_second")})


if __name__ == "__main__":
    main()
