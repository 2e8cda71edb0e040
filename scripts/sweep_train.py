"""Screen training settings on captured traffic: which learning rate, epochs, draft vocabulary, batch size and
LM-head initialisation learn the most from a fixed number of requests.

  python scripts/sweep_train.py --domain chat --eval 100 --grid lr=3e-4,1e-3 epochs=3,6 + vocab=16384 head=target

The domain's prompts are served once through the real engine (a scratch draft that never trains) to capture
samples; the last --eval prompts are held out. Each setting (the product of the --grid lists) trains a fresh
day-0 draft on the other samples for `epochs` shuffled passes, and is scored on the held-out samples by
simulated greedy accept length (guard.simulated_acceptance: exact for greedy serving up to numerics). Settings
whose draft fits the engine (the engine's vocabulary) are also swapped in and serve the held-out prompts, so
the table shows the engine's measured accept length beside the simulated one.

Grid keys: lr, epochs, vocab (0 = the target's vocabulary), batch (tokens per step), warmup (steps),
head (random | target: the LM head starts as the target's rows for the draft vocabulary, folded with the
target's final norm), reject (weight of the rejected-proposal term), train (the first N training samples, in
--domain order; 0 = all: a data-scaling curve, e.g. `--domain chat instruct arena --grid train=196,392,785,0`),
seed (the draft's initialisation and the epochs' shuffle), targets (dist: the target's distribution from its
final states | onehot: its own next token only, what SGLang samples carry by default | topkN: its N most likely
tokens at completion positions, one-hot at prompt positions, what SGLang samples carry with
--sglang-capture-topk N), prompt (1: prompt positions are
trained too, as the built-in engine captures them | 0: completion positions only), positions (served: TTT step k
at rotary position t+k, as serving runs it | fixed: every step at t), ttt (TTT steps trained per position, as
`aurora serve --train-ttt-steps`; 0 = --lookahead; auto = grown from one), reach (with ttt=auto: the share of
rounds reaching the next step at which it joins training). A row's last column (k=) is the TTT steps it trained
at the end. Held-out scores are reported per domain, and each setting's mean and spread over its seeds at the
end. The engine serves the held-out prompts at its
full lookahead (no depth decision), so its accept length is the draft's, measured.
"""
import argparse
import asyncio
import dataclasses
import itertools
import tempfile
import time

import torch

from aurora.engine.sequence import SamplingParams
from aurora.models.draft import new_draft
from aurora.prompts import chat_ids, load_prompts
from aurora.server.config import ServeConfig
from aurora.service import Service
from aurora.sglang_engine import wire
from aurora.training.guard import simulated_acceptance
from aurora.training.trainer import OnlineTrainer, TrainConfig
from aurora.training.vocab import vocab_from_samples

DEFAULTS = {"lr": 3e-4, "epochs": 3, "vocab": 0, "batch": 2048, "warmup": 20, "head": "random", "reject": 0.1,
            "train": 0, "seed": 1, "targets": "dist", "prompt": 1, "positions": "served", "ttt": 0,
            "reach": 0.1}
CHOICES = {"head": ("random", "target"), "targets": ("dist", "onehot"), "positions": ("served", "fixed"),
           "prompt": (0, 1)}


def parse_grid(items: list[str]) -> list[dict]:
    """key=v1,v2 items: their product; '+' starts another group (the settings are the groups' union)."""
    if "+" in items:
        i = items.index("+")
        return parse_grid(items[:i]) + parse_grid(items[i + 1:])
    axes = {}
    for item in items:
        key, _, values = item.partition("=")
        if key not in DEFAULTS or not values:
            raise SystemExit(f"bad --grid item {item!r}: use key=v1,v2 with key in {sorted(DEFAULTS)}")
        kind = type(DEFAULTS[key])
        axes[key] = [v if key == "ttt" and v == "auto" else kind(float(v)) if kind is int else kind(v)
                     for v in values.split(",")]
        if key in CHOICES and any(v not in CHOICES[key] and not _topk(key, v) for v in axes[key]):
            raise SystemExit(f"bad --grid item {item!r}: {key} is one of {CHOICES[key]}")
    keys = list(axes)
    return [{**DEFAULTS, **dict(zip(keys, combo))} for combo in itertools.product(*(axes[k] for k in keys))]


def _topk(key: str, value) -> int:
    """N of a `targets=topkN` value, else 0."""
    v = str(value)
    return int(v[4:]) if key == "targets" and v.startswith("topk") and v[4:].isdigit() and int(v[4:]) > 0 else 0


@torch.no_grad()
def with_topk(s, lm_head, k: int):
    """s as SGLang's capture would carry it with a top k: the target's k most likely tokens (and the full
    log-sum-exp) at the verified rows, none at the prefill rows (a row predicts the next token; the first decode
    round verifies from token index prompt_len on)."""
    logits = s.target_hidden.to(lm_head.device, lm_head.dtype) @ lm_head.t()
    top = {name: t.cpu() for name, t in wire.target_topk(logits, k).items()}  # what the plugin ships
    top["topk_ids"][:s.prompt_len] = -1
    return dataclasses.replace(s, target_hidden=None, target_topk_ids=top["topk_ids"],
                               target_topk_logits=top["topk_logits"], target_lse=top["lse"])


async def serve(service, pools: dict[str, list[list[int]]], max_tokens: int, concurrency: int, capture: bool):
    """Serve every prompt once (request ids '<pool>-<i>'); returns the engine's accept length per pool."""
    sem, out = asyncio.Semaphore(concurrency), {}

    async def one(name, i, ids):
        async with sem:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, capture=capture)
            async for o in service.engine.generate(ids, params, request_id=f"{name}-{i}"):
                if o.finished:
                    tot = out.setdefault(name, [0, 0])
                    tot[0] += len(o.output_ids)
                    tot[1] += o.verify_rounds
    await asyncio.gather(*(one(name, i, ids) for name, pool in pools.items() for i, ids in enumerate(pool)))
    return {name: t / max(1, r) for name, (t, r) in out.items()}


def score(draft, samples, lm_head, K, target_to_draft, device, chunk=16) -> tuple[float, float]:
    """(served greedy accept length replayed from the samples, position-averaged greedy accept length) over the
    held-out samples, in chunks (full-vocabulary probabilities)."""
    tokens = rounds = num = den = 0
    for i in range(0, len(samples), chunk):
        r = simulated_acceptance(draft, samples[i:i + chunk], lm_head, K, target_to_draft, device)
        tokens, rounds = tokens + r["verify_tokens"], rounds + r["rounds"]
        num, den = num + r["greedy_accept_length"] * r["positions"], den + r["positions"]
    return tokens / max(rounds, 1), num / max(den, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--domain", nargs="+", default=["chat"])
    ap.add_argument("--requests", type=int, default=0, help="training prompts per domain (0: all but --eval)")
    ap.add_argument("--eval", type=int, default=100, help="held-out prompts per domain (the last ones)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 ... (keys: %s)" % ", ".join(DEFAULTS))
    args = ap.parse_args()
    settings = parse_grid(args.grid)
    cfg = ServeConfig(target=args.target, draft="scratch", lookahead=args.lookahead, sync_every=10 ** 9,
                      adaptive_depth=False, draft_vocab_size=0, capture_pacing=False,  # every request is a sample
                      device=args.device, max_batch=args.concurrency, run_dir=tempfile.mkdtemp(prefix="sweep-"),
                      wandb="disabled")
    service = Service.from_config(cfg)
    service.trainer.stop()  # capture only: nothing trains or swaps behind the sweep
    kept = {}
    service.engine.set_callbacks(lambda s: kept.__setitem__(s.request_id, s), None)
    eng = service.engine.engine
    tok = eng.tokenizer
    train_pool, eval_pools = [], {}
    for d in args.domain:
        ids = chat_ids(tok, load_prompts(d), 384)
        n_train = args.requests or len(ids) - args.eval
        if n_train + args.eval > len(ids):
            raise SystemExit(f"{d}: {len(ids)} prompts, fewer than --requests {n_train} + --eval {args.eval}")
        train_pool += ids[:n_train]
        eval_pools[d] = ids[len(ids) - args.eval:]
    t0 = time.perf_counter()
    asyncio.run(serve(service, {"train": train_pool, **eval_pools}, args.max_tokens, args.concurrency, True))
    deadline = time.monotonic() + 60  # a finished request's sample is handed over one engine step after its output
    while eng.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    train = [kept[f"train-{i}"] for i in range(len(train_pool))]
    heldout = {d: [kept[f"{d}-{i}"] for i in range(len(pool))] for d, pool in eval_pools.items()}
    print(f"captured {len(train)} training samples ({sum(s.num_tokens for s in train)} tokens) and "
          f"{args.eval} held-out per domain in {time.perf_counter() - t0:.0f} s; domains {args.domain}", flush=True)
    service.engine.set_callbacks(None, None)

    dev = eng.runner.device
    lm_head = eng.target.lm_head.weight
    fold = (lm_head.float() * eng.target.norm.weight.float()).to(lm_head.dtype)  # head(norm(x)) with unit norm weight
    base = eng.draft.config
    print("held-out accept length per domain: replayed greedy serving / position-averaged / engine-measured")
    header = f"{'setting':84s} {'tokens':>9s} {'train s':>8s}" + "".join(f" {d:>20s}" for d in eval_pools)
    print(header, flush=True)
    rows = []
    for st in settings:
        used = train[:st["train"]] if st["train"] else train
        if st["targets"] == "onehot":
            used = [dataclasses.replace(s, target_hidden=None) for s in used]
        elif _topk("targets", st["targets"]):
            used = [with_topk(s, lm_head, _topk("targets", st["targets"])) for s in used]
        if not st["prompt"]:
            used = [dataclasses.replace(s, loss_mask=s.loss_mask & (torch.arange(s.num_tokens) >= s.prompt_len))
                    for s in used]
        dcfg = dataclasses.replace(base, draft_vocab_size=st["vocab"] or base.vocab_size)
        draft = new_draft(dcfg, device=dev, seed=st["seed"])
        if dcfg.draft_vocab_size < dcfg.vocab_size:
            draft.set_vocab_map(*(t.to(dev) for t in vocab_from_samples(used, dcfg.draft_vocab_size,
                                                                        dcfg.vocab_size)))
        if st["head"] == "target":
            with torch.no_grad():
                draft.lm_head.weight.copy_(fold[torch.arange(dcfg.draft_vocab_size, device=dev) + draft.d2t])
        draft.share_embedding(eng.target.embed_tokens)
        tconf = TrainConfig(lr=st["lr"], warmup_steps=st["warmup"], batch_tokens=st["batch"],
                            reject_weight=st["reject"], ttt_length=args.lookahead, train_steps=st["ttt"],
                            grow_reach=st["reach"],
                            device=str(dev),
                            ttt_position_step=1 if st["positions"] == "served" else 0)
        trainer = OnlineTrainer(draft, None if st["targets"] != "dist" else lm_head, tconf,
                                lambda sd, v, acc: service.engine.swap_draft(sd, v, acc).wait(60))
        t = time.perf_counter()
        tokens = trainer.train_epochs(used, st["epochs"], seed=st["seed"])
        train_s = time.perf_counter() - t
        scores = {d: score(trainer.master, hs, lm_head, args.lookahead, trainer.target_to_draft, dev)
                  for d, hs in heldout.items()}
        measured = {}
        if dcfg.draft_vocab_size == base.draft_vocab_size:
            trainer.swap_now()
            measured = asyncio.run(serve(service, eval_pools, args.max_tokens, args.concurrency, False))
        name = " ".join(f"{k}={v}" for k, v in st.items())
        rows.append((name, scores[args.domain[0]][0], measured.get(args.domain[0])))
        cells = "".join(f" {r:6.3f}/{p:5.3f}/{'-' if d not in measured else f'{measured[d]:.3f}':>5s}"
                        for d, (r, p) in scores.items())
        print(f"{name:84s} {tokens:9d} {train_s:8.1f}{cells} k={trainer.ttt_steps}", flush=True)
    service.shutdown()
    groups: dict[str, list] = {}
    for name, replayed, engine in rows:
        groups.setdefault(" ".join(p for p in name.split() if not p.startswith("seed=")), []).append((replayed, engine))
    print(f"\nheld-out {args.domain[0]}, mean and spread (max - min) over seeds: replayed / engine-measured")
    for name, vals in groups.items():
        rep = [v[0] for v in vals]
        eng = [v[1] for v in vals if v[1] is not None]
        cell = lambda xs: f"{sum(xs) / len(xs):.3f} ±{(max(xs) - min(xs)) / 2:.3f}" if xs else "-"  # noqa: E731
        print(f"{name:90s} n={len(vals)}  {cell(rep)}  /  {cell(eng)}")
    print(f"\nbest on held-out {args.domain[0]}:", max(rows, key=lambda r: r[1])[0])


if __name__ == "__main__":
    main()
