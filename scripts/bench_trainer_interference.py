"""How much a GPU-bound trainer slows serving's small kernels, with and without a CUDA green context.

A stand-in for a decode step (150 small bf16 matmuls + SiLU, one CUDA graph, a high-priority stream) is
replayed 300 times alone, then beside a thread looping 4096^3 bf16 GEMMs on an ordinary stream, and on green
contexts of 16 and 32 SMs (what `--trainer-sms` gives the trainer; aurora/sharing.py). Prints the step's mean
and median milliseconds and the trainer's GEMMs/s in each case. CUDA only.

  python scripts/bench_trainer_interference.py
"""
import threading
import time

import torch
from torch.cuda.green_contexts import GreenContext


def main():
    dev = torch.device("cuda", 0)
    print("torch", torch.__version__, torch.cuda.get_device_name(0),
          torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
    x = torch.randn(16, 576, device=dev, dtype=torch.bfloat16)
    w = torch.randn(576, 576, device=dev, dtype=torch.bfloat16) * 0.04

    def step():
        y = x
        for _ in range(150):
            y = torch.nn.functional.silu(y @ w) + x
        return y

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


if __name__ == "__main__":
    main()
