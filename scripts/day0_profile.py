"""Where a day-0 Aurora service spends more than the same engine without a draft: each mode's service is built in
this process and its engine driven from this thread (a closed loop of `--concurrency` requests, token ids in and
out, no HTTP; the trainer runs in its own thread as when serving) under torch.profiler, and the device kernels and
host operators are compared per engine step.

  python scripts/day0_profile.py --requests 200 --concurrency 16 --max-tokens 128          # --draft none vs defaults
  python scripts/day0_profile.py --mode none="--draft none" --mode idle="--trainer-duty 0.001"

Each mode: a fresh service, `--warmup` GSM8K requests untimed, then `--requests` distinct chat prompts profiled
(CPU and, on a GPU, CUDA activity: the trainer's kernels included, its host operators not, since they run in its own
thread). Prints per mode the engine steps, wall and device-busy time per step, and the kernels and host operators
whose time per step differs most from the first mode's. The profiler slows the host side alike in every mode:
compare modes, not absolute host times.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speedup_run  # noqa: E402  (the prompt stream)
from front_cost import free_memory, in_process  # noqa: E402

from aurora.prompts import chat_ids, load_prompts  # noqa: E402


def closed_loop(engine, share, prompts: list[list[int]], concurrency: int, max_tokens: int) -> int:
    """Drive the LLMEngine in this thread as its own thread drives it when serving (each step inside
    `share.serving()`, so that the trainer sees a busy server and keeps to its duty): `concurrency` requests at a
    time, a finished one replaced by the next prompt. Returns the completion tokens."""
    from aurora.engine.sequence import SamplingParams

    todo, live, tokens = list(prompts), 0, 0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    while todo or engine.has_work():
        while todo and live < concurrency:
            engine.add_request(todo.pop(0), params)
            live += 1
        with share.serving():
            outputs = engine.step()
        for o in outputs:
            if o.finished:
                live -= 1
                tokens += len(o.output_ids)
    return tokens


def profile_mode(serve_args: str, texts: list[str], warm: list[str], concurrency: int, max_tokens: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from aurora.engine.async_engine import use_serving_stream

    service = in_process(serve_args)
    service.engine.shutdown()  # its thread stops; the engine is driven from here, where the profiler sees its ops
    engine, share = service.engine.engine, service.engine.share
    use_serving_stream(engine)
    cuda = engine.runner.device.type == "cuda"
    try:
        closed_loop(engine, share, chat_ids(engine.tokenizer, warm), concurrency, max_tokens)
        prompts = chat_ids(engine.tokenizer, texts)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        steps0 = engine.time["steps"]
        trained0 = service.trainer.status().get("steps", 0) if service.trainer is not None else 0
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            tokens = closed_loop(engine, share, prompts, concurrency, max_tokens)
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t
        steps = max(engine.time["steps"] - steps0, 1)
        trained = service.trainer.status().get("steps", 0) - trained0 if service.trainer is not None else None
    finally:
        service.shutdown()
        del service, engine
        free_memory()
    ev = prof.key_averages()
    kernels = {e.key: e.self_device_time_total / steps for e in ev if e.self_device_time_total > 0}
    host = {e.key: e.self_cpu_time_total / steps for e in ev if e.self_cpu_time_total > 0}
    return {"steps": steps, "wall_ms": 1e3 * wall / steps, "tokens": tokens, "device_us": sum(kernels.values()),
            "kernels": kernels, "host": host, "trainer_steps": trained}


def differences(base: dict, other: dict, top: int) -> list[tuple[str, float, float]]:
    keys = set(base) | set(other)
    rows = [(k, base.get(k, 0.0), other.get(k, 0.0)) for k in keys]
    return sorted(rows, key=lambda r: -abs(r[2] - r[1]))[:top]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", action="append", default=None,
                    help='NAME=aurora serve args (repeatable; default: none="--draft none" and aurora= )')
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    modes = [m.partition("=")[::2] for m in (a.mode or ["none=--draft none", "aurora="])]
    texts, warm = speedup_run.prompt_stream(a.requests), load_prompts("math")[:a.warmup]
    runs = {}
    for name, extra in modes:
        run_dir = f"/tmp/aurora_day0_profile_{name}"
        runs[name] = profile_mode(f"--wandb disabled --run-dir {run_dir} {extra}", texts, warm, a.concurrency,
                                  a.max_tokens)
        r = runs[name]
        print(f"{name}: {r['steps']} steps, {r['wall_ms']:.3f} ms per step (profiled), device busy "
              f"{r['device_us'] / 1e3:.3f} ms per step, {r['tokens']} tokens, trainer steps while profiled {r['trainer_steps']}",
              flush=True)
    base_name = modes[0][0]
    base = runs[base_name]
    for name, _ in modes[1:]:
        r = runs[name]
        for what in ("kernels", "host"):
            print(f"\n{what} (us per engine step), {base_name} -> {name}, largest differences:")
            for key, b, o in differences(base[what], r[what], a.top):
                print(f"  {b:9.1f} {o:9.1f} {o - b:+9.1f}  {key[:100]}")


if __name__ == "__main__":
    main()
