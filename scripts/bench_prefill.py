"""What one prefill call of the built-in engine costs, and whether a new shape costs more than a repeated one.

  python scripts/bench_prefill.py --group 8 --calls 20 [--profile] [--eager [--cudnn-sdpa]]

Served at 16 clients, the built-in engine spends a large share of its time in prefills (`engine_time` in
/v1/draft). This times `ModelRunner.prefill` on groups of `--group` distinct chat prompts (the engine's chat
template applied; the engine admits up to 8 per step), each group padded to its longest prompt as the engine pads
it: per call the first run of that group's shape and an immediate second run of the same group (same shape).
First much slower than second: the cost is per new shape (plans, heuristics, compilation); both slow: the forward
itself. It found cuDNN's per-shape attention plans (results/engine/h200_prefill_cudnn_2026-12-06/), which the
engine's eager prefill now leaves out; `--cudnn-sdpa` lets them back in, to see that cost beside today's. On CUDA
the engine replays a prefill as a CUDA graph of its (rows, length) bucket, captured at start; `--eager` times the
eager forward instead (what groups larger than the staging rows, and graphs off, run).
`--profile` prints the top operators by host time (and on a GPU by device time) of one more call of a new shape.
"""
import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend

from aurora.engine import model_runner
from aurora.engine.engine import EngineConfig, LLMEngine
from aurora.models import hub
from aurora.prompts import chat_ids, load_prompts


def timed(runner, prompts) -> float:
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    runner.prefill(0, prompts, True, False)  # returns the first tokens: one sync, as in serving
    sync()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--group", type=int, default=8, help="prompts per prefill call")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--eager", action="store_true", help="time the eager prefill, not its CUDA graphs")
    ap.add_argument("--cudnn-sdpa", action="store_true",
                    help="let an eager prefill's attention pick cuDNN again (the engine leaves it out): its old cost")
    a = ap.parse_args()
    t0 = time.perf_counter()
    eng = LLMEngine(hub.resolve(a.target), None, EngineConfig(max_batch=max(16, a.group), device=a.device))
    runner = eng.runner
    start_s = time.perf_counter() - t0
    if a.eager:
        runner.staged_prefill = False
    if a.cudnn_sdpa:
        model_runner._EAGER_SDPA = [*model_runner._EAGER_SDPA, SDPBackend.CUDNN_ATTENTION]
    for row in range(a.group):
        runner.set_row(row, 0.0, 1.0, 0, 0)
    ids = chat_ids(eng.tokenizer, load_prompts("chat"))
    groups = [ids[i * a.group:(i + 1) * a.group] for i in range(a.calls + 2)]
    timed(runner, groups[-1])  # the first call of the process (allocator, kernels loaded)
    first, second, padded = [], [], []
    for g in groups[:a.calls]:
        first.append(timed(runner, g))
        second.append(timed(runner, g))
        padded.append(len(g) * max(len(p) for p in g))
    graphed = runner.staged_prefill and runner.use_graphs
    gpu = runner.device.type == "cuda"
    print(f"{runner.device} {torch.__version__}, {a.target}, {a.calls} groups of {a.group} chat prompts, "
          + ("CUDA graphs, " if graphed else "eager, ")
          + (f"cuDNN attention {'allowed' if a.cudnn_sdpa else 'left out'}, " if gpu and not graphed else "")
          + f"padded tokens per call median {statistics.median(padded):.0f}, engine start {start_s:.1f} s "
          + f"({len(runner.graphs)} graphs)")
    print(f"{'':22s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for name, xs in (("first run of a shape", first), ("same shape again", second)):
        ms = [1e3 * x for x in xs]
        print(f"{name:22s} {statistics.median(ms):10.2f} {min(ms):8.2f} {max(ms):8.2f}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
        with profile(activities=acts) as p:
            timed(runner, groups[-2])
        keys = ["self_cpu_time_total"] + (["self_device_time_total"] if runner.device.type == "cuda" else [])
        for key in keys:  # host time per operator, then (on a GPU) device time: which one sets the pace
            print(p.key_averages().table(sort_by=key, row_limit=20))


if __name__ == "__main__":
    main()
