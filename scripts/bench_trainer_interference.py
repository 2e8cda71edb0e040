"""How much a GPU-bound trainer slows serving's small kernels, with and without a CUDA green context.

A stand-in for a decode step (150 small bf16 matmuls + SiLU, one CUDA graph, a high-priority stream) is
replayed 300 times alone, then beside a thread looping 4096^3 bf16 GEMMs on an ordinary stream, and on green
contexts of 16 and 32 SMs (what `--trainer-sms` gives the trainer; aurora/sharing.py). Prints the step's mean
and median milliseconds and the trainer's GEMMs/s in each case. CUDA only.

`--processes`: serving in a process of its own, as SGLang's scheduler serves beside Aurora's trainer. Two
processes' kernels do not run side by side on one GPU (without MPS the GPU time-slices between their contexts),
so here the stand-in round (the graph, a host sync, `--host-ms` of Python) is timed while this process runs a
draft-sized training step (a [tokens, 576] x [576, vocab] head, cross-entropy, backward) in each of these ways:
back to back; back to back with its queue drained after every op (forward and backward), so that at most one
kernel of it is ever waiting; and at a duty of 0.1 (each step followed by a rest of nine times its length).

  python scripts/bench_trainer_interference.py --processes --phase-s 4
"""
import argparse
import multiprocessing as mp
import threading
import time

import torch
from torch.cuda.green_contexts import GreenContext


def _serving_step(dev):
    """The stand-in decode step: 150 small bf16 matmuls + SiLU on 16 rows."""
    x = torch.randn(16, 576, device=dev, dtype=torch.bfloat16)
    w = torch.randn(576, 576, device=dev, dtype=torch.bfloat16) * 0.04

    def step():
        y = x
        for _ in range(150):
            y = torch.nn.functional.silu(y @ w) + x
        return y
    return step


def main():
    dev = torch.device("cuda", 0)
    print("torch", torch.__version__, torch.cuda.get_device_name(0),
          torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
    step = _serving_step(dev)
    serving = torch.cuda.Stream(priority=-100)
    serving.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(serving):
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=serving):
            step()

    def serve(n=300):
        ts = []
        with torch.cuda.stream(serving):
            for _ in range(n):
                t = time.perf_counter()
                graph.replay()
                serving.synchronize()
                ts.append(time.perf_counter() - t)
        ts.sort()
        return sum(ts) / len(ts) * 1e3, ts[len(ts) // 2] * 1e3

    stop, rate = threading.Event(), {}

    def trainer(sms):
        if sms:
            ctx = GreenContext.create(num_sms=sms, device_id=0)
            rate["ctx"] = ctx  # alive while its stream is used
            stream = ctx.Stream()
        else:
            stream = torch.cuda.Stream(dev)
        torch.cuda.set_stream(stream)
        a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            for _ in range(4):
                a @ a
            stream.synchronize()
            n += 4
        rate["gemms"] = n / (time.perf_counter() - t0)

    print("serving alone: mean %.3f ms, median %.3f ms" % serve())
    for sms in (0, 16, 32):
        stop.clear()
        t = threading.Thread(target=trainer, args=(sms,))
        t.start()
        time.sleep(0.5)
        mean, median = serve()
        stop.set()
        t.join()
        where = f"a green context of {sms} SMs" if sms else "an ordinary stream"
        print(f"trainer on {where}: serving mean {mean:.3f} ms, median {median:.3f} ms; "
              f"trainer {rate['gemms']:.0f} GEMMs/s")


def _graph_step(dev):
    step = _serving_step(dev)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _serve(host_ms: float, ready, stop, out) -> None:
    """The serving process: rounds of (graph replay, host sync, host_ms of Python) until `stop`."""
    dev = torch.device("cuda", 0)
    graph = _graph_step(dev)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    ready.set()
    rounds = []
    while not stop.is_set():
        t = time.monotonic()
        graph.replay()
        torch.cuda.synchronize()
        spin = time.perf_counter() + host_ms / 1e3
        while time.perf_counter() < spin:
            pass
        rounds.append((t, time.monotonic() - t))
    out.put(rounds)


def _train_step(x, head, target, drain: bool):
    """One draft-sized step; with `drain`, the stream is synchronised after every op of forward and backward."""
    sync = torch.cuda.synchronize if drain else (lambda: None)

    def hook(g):
        sync()
        return g

    h = torch.nn.functional.silu(x)
    sync()
    if drain:
        h.register_hook(hook)
    logits = h @ head
    sync()
    if drain:
        logits.register_hook(hook)
    loss = torch.nn.functional.cross_entropy(logits.float(), target)
    sync()
    loss.backward()
    torch.cuda.synchronize()


def across_processes(phase_s: float, host_ms: float, tokens: int, vocab: int) -> None:
    dev = torch.device("cuda", 0)
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_serve, args=(host_ms, ready, stop, out))
    child.start()
    x = torch.randn(tokens, 576, device=dev, dtype=torch.bfloat16, requires_grad=True)
    head = (torch.randn(576, vocab, device=dev, dtype=torch.bfloat16) * 0.04).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=dev)
    for drain in (False, True):
        _train_step(x, head, target, drain)  # warm both paths before timing
    ready.wait()
    phases = []

    def phase(name, drain=None, duty=1.0):
        t0, steps, busy = time.monotonic(), 0, 0.0
        while time.monotonic() - t0 < phase_s:
            if drain is None:
                time.sleep(0.01)
                continue
            s = time.monotonic()
            _train_step(x, head, target, drain)
            took = time.monotonic() - s
            busy, steps = busy + took, steps + 1
            if duty < 1:
                time.sleep(took * (1 - duty) / duty)
        phases.append((name, t0, time.monotonic(), steps, busy))

    phase("alone")
    phase("trainer back to back", drain=False)
    phase("trainer, queue drained after every op", drain=True)
    phase("trainer at duty 0.1", drain=False, duty=0.1)
    phase("trainer at duty 0.1, drained", drain=True, duty=0.1)
    phase("alone again")
    stop.set()
    rounds = out.get()
    child.join()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; serving round = graph + sync + {host_ms} ms "
          f"of host; training step = [{tokens}, 576] x [576, {vocab}] + cross-entropy + backward")
    print(f"{'phase':42s} {'rounds/s':>9s} {'mean ms':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'train ms/step':>14s}")
    for name, a, b, steps, busy in phases:
        ts = sorted(d for t, d in rounds if a <= t < b)
        if not ts:
            continue
        per = f"{busy / steps * 1e3:.1f}" if steps else "-"
        print(f"{name:42s} {len(ts) / (b - a):9.0f} {sum(ts) / len(ts) * 1e3:8.3f} {ts[len(ts) // 2] * 1e3:7.3f} "
              f"{ts[int(len(ts) * 0.99)] * 1e3:7.3f} {per:>14s}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", action="store_true", help="serving in a process of its own (see above)")
    ap.add_argument("--phase-s", type=float, default=4.0)
    ap.add_argument("--host-ms", type=float, default=1.0, help="--processes: Python per serving round")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152)
    a = ap.parse_args()
    if a.processes:
        across_processes(a.phase_s, a.host_ms, a.tokens, a.vocab)
    else:
        main()
