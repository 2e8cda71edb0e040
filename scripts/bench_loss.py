"""Benchmark fused linear + forward-KL (fp32 target probabilities) against the 3-matmul floor and baselines.

For each (H, N) with V = 32000: ms of forward + backward (the median over --rounds rounds, in each of which
every method takes its turn with triton.testing.do_bench's median; "±" is half the range over the rounds),
TFLOP/s on the 6 N H V of work, and peak extra memory (max_memory_allocated minus what was allocated before the call:
inputs and target excluded, gradients included) for:
  floor       3 bare bf16 matmuls: h @ W.T, G @ W, G.T @ h
  eager       torch: logits in fp32, log_softmax, kl_div(batchmean), autograd
  compile     torch.compile of the eager function (N marked dynamic: one compile per H)
  liger       Liger-Kernel 0.8.5 LigerFusedLinearKLDivFunction (batchmean)
  ours        aurora_kernels.fused_linear_divergence (kind="probs", objective="fkl"), default chunk
  ours_pipe2, ours_pipe4  the same with pipeline=2 / 4 (row kernels on a side stream, overlapping the GEMMs)
  ours_c4096  the same with chunk_size=4096
  ours_bv2048, ours_bv4096, ours_bv8192w16  the same with other V tiles / warps of the row kernel (default 1024 x 4)
  ours_topk   the same with a top-64 target (ids, logprobs) instead of dense probs
  ours_nodefer  the same with a single chunk's gradient GEMMs in forward (dW then scaled in backward)
`--profile`: after timing each shape, a torch.profiler table of the GPU kernels of every method (5 calls).

Usage (GPU): python scripts/bench_loss.py --out results/kernels/bench_loss.csv
"""

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
import aurora_kernels.linear_divergence as fld  # noqa: E402
from aurora_kernels import fused_linear_divergence  # noqa: E402

V = 32000


def kl_eager(h, W, p):
    logits = (h @ W.t()).float()
    return F.kl_div(torch.log_softmax(logits, -1), p, reduction="batchmean")


def make_methods(H, compiled, liger_fn):
    @torch.no_grad()
    def floor(h, W, p, ids, lps):
        g = torch.mm(h, W.t())
        torch.mm(g, W)
        torch.mm(g.t(), h)

    def autograd_call(loss_fn):
        def run(h, W, p, ids, lps):
            h.grad = W.grad = None
            loss_fn(h, W, p, ids, lps).backward()

        return run

    methods = {"floor": floor}
    methods["eager"] = autograd_call(lambda h, W, p, ids, lps: kl_eager(h, W, p))
    methods["compile"] = autograd_call(lambda h, W, p, ids, lps: compiled(h, W, p))
    if liger_fn is not None:
        methods["liger"] = autograd_call(
            lambda h, W, p, ids, lps: liger_fn(h, W, p, None, "batchmean", -100, 1.0, 1e-10, None)
        )
    methods["ours"] = autograd_call(lambda h, W, p, ids, lps: fused_linear_divergence(h, W, p).loss)
    for n in (2, 4):  # row blocks per chunk, row kernel on a side stream overlapping the next block's GEMM
        methods[f"ours_pipe{n}"] = autograd_call(
            lambda h, W, p, ids, lps, n=n: fused_linear_divergence(h, W, p, pipeline=n).loss)
    methods["ours_c4096"] = autograd_call(
        lambda h, W, p, ids, lps: fused_linear_divergence(h, W, p, chunk_size=4096).loss
    )
    def with_tiles(block_v, warps):
        def loss_fn(h, W, p, ids, lps):
            old = fld._MAX_BLOCK_V, fld._NUM_WARPS
            fld._MAX_BLOCK_V, fld._NUM_WARPS = block_v, warps
            try:
                return fused_linear_divergence(h, W, p).loss
            finally:
                fld._MAX_BLOCK_V, fld._NUM_WARPS = old

        return autograd_call(loss_fn)

    def gemms_in_forward(h, W, p, ids, lps):  # the single-chunk path as it was: dW scaled by its own pass
        fld._DEFER_SINGLE_CHUNK = False
        try:
            return fused_linear_divergence(h, W, p).loss
        finally:
            fld._DEFER_SINGLE_CHUNK = True

    methods["ours_nodefer"] = autograd_call(gemms_in_forward)
    methods["ours_bv2048"] = with_tiles(2048, 8)
    methods["ours_bv4096"] = with_tiles(4096, 8)
    methods["ours_bv8192w16"] = with_tiles(8192, 16)
    methods["ours_topk"] = autograd_call(
        lambda h, W, p, ids, lps: fused_linear_divergence(h, W, (ids, lps), kind="topk").loss
    )
    return methods


def peak_extra_gib(fn, args):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def check_against_eager(h, W, p):
    """bf16 sanity check at bench scale: our loss and gradients vs eager torch."""
    hr, Wr = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    ref = kl_eager(hr, Wr, p)
    ref.backward()
    ho, Wo = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    out = fused_linear_divergence(ho, Wo, p)
    out.loss.backward()

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    return dict(fp32_dw_addmm=fld._addmm_fp32_ok, loss_ours=out.loss.item(), loss_eager=ref.item(), dh_rel=rel(ho.grad, hr.grad), dW_rel=rel(Wo.grad, Wr.grad))


def profile_kernels(name, fn, a, calls=5, trace=None):
    """The GPU kernels of `calls` calls: total device time per kernel name, per call. With `trace` (a path), also
    a Chrome trace of host and device, each call preceded by the 256 MB L2 flush do_bench runs (idle gaps show)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            if trace:
                flush.zero_()
            fn(*a)
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    h, W = a[0], a[1]
    h.grad = W.grad = None
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows = sorted(((e.key, e.self_device_time_total / calls / 1e3, e.count // calls) for e in kernels),
                  key=lambda r: -r[1])
    print(f"    {name}: {sum(r[1] for r in rows):.3f} ms of kernels per call")
    for key, ms, n in rows[:10]:
        print(f"      {ms:7.3f} ms  x{n:<3d} {key[:110]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[3072, 4096])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds; the methods alternate within each")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the slow baselines past this")
    ap.add_argument("--out", default="results/kernels/bench_loss.csv")
    ap.add_argument("--profile", action="store_true", help="print each method's GPU kernels (torch.profiler)")
    ap.add_argument("--trace-dir", default=None, help="with --profile: write a Chrome trace per method and shape")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench

    try:
        from liger_kernel.ops.fused_linear_kl_div import LigerFusedLinearKLDivFunction

        liger_fn = LigerFusedLinearKLDivFunction.apply
    except ImportError as e:
        print(f"liger-kernel not importable ({e}); skipping it")
        liger_fn = None
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}")
    t_start = time.time()
    rows_out = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fields = ["device", "torch", "triton", "H", "V", "N", "method", "ms", "tflops", "frac_of_floor", "peak_extra_gib",
              "rounds_spread"]
    with open(args.out, "w", newline="") as f:
        csv.writer(f).writerow(fields)
    for H in args.hidden:
        compiled = torch.compile(kl_eager)
        methods = make_methods(H, compiled, liger_fn)
        if args.methods:
            methods = {k: v for k, v in methods.items() if k in args.methods}
        for N in args.rows:
            gen = torch.Generator(device="cuda").manual_seed(0)
            h = torch.randn(N, H, device="cuda", generator=gen).bfloat16().requires_grad_()
            W = (torch.randn(V, H, device="cuda", generator=gen) / H**0.5).bfloat16().requires_grad_()
            p = torch.softmax(torch.randn(N, V, device="cuda", generator=gen) * 2, -1)
            lps, ids = torch.log(p).topk(64, -1)
            torch._dynamo.mark_dynamic(h, 0)
            torch._dynamo.mark_dynamic(p, 0)
            if N == args.rows[0]:
                print(f"H={H} N={N} check vs eager:", check_against_eager(h, W, p), flush=True)
            a = (h, W, p, ids, lps)
            live, mem = {}, {}
            for name, fn in methods.items():  # warm-up / compile, and peak memory, once per method
                if name in ("eager", "compile") and time.time() - t_start > args.budget_s:
                    print(f"  {name}: skipped (time budget)")
                    continue
                try:
                    fn(*a)
                    mem[name] = peak_extra_gib(fn, a)
                    live[name] = fn
                except torch.OutOfMemoryError:
                    print(f"  {name}: OOM")
                h.grad = W.grad = None
                torch.cuda.empty_cache()
            # the methods take turns, `rounds` times, each round in a rotated order: the card's clock drift
            # (GEMMs of one method moved 10 % between back-to-back blocks) then falls on every method alike
            times = {name: [] for name in live}
            for r in range(args.rounds):
                order = list(live)[r % len(live):] + list(live)[: r % len(live)]
                for name in order:
                    slow = name in ("eager", "compile")
                    times[name].append(do_bench(lambda: live[name](*a), warmup=5 if slow else 25,
                                                rep=40 if slow else 100, return_mode="median"))
                    h.grad = W.grad = None
            floor_ms = statistics.median(times["floor"]) if "floor" in times else None
            for name, ts in times.items():
                ms = statistics.median(ts)
                spread = (max(ts) - min(ts)) / ms
                tflops = 6 * N * H * V / ms / 1e9
                frac = floor_ms / ms if floor_ms else float("nan")
                row = [dev, torch.__version__, triton.__version__, H, V, N, name, f"{ms:.3f}", f"{tflops:.1f}",
                       f"{frac:.3f}", f"{mem[name]:.3f}", f"{spread:.3f}"]
                rows_out.append(row)
                with open(args.out, "a", newline="") as f:
                    csv.writer(f).writerow(row)
                print(f"H={H:5d} N={N:6d} {name:11s} {ms:8.3f} ms (rounds spread {100 * spread:4.1f} %) "
                      f"{tflops:6.1f} TFLOP/s  floor/t {frac:5.3f}  +{mem[name]:6.3f} GiB", flush=True)
                if args.profile:
                    trace = f"{args.trace_dir}/{name}_H{H}_N{N}.json" if args.trace_dir else None
                    profile_kernels(name, live[name], a, trace=trace)
            del h, W, p, ids, lps
            torch.cuda.empty_cache()
    # markdown table: one row per shape, one column per method
    names = list(dict.fromkeys(r[6] for r in rows_out))
    print("\n| H | N | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for H in args.hidden:
        for N in args.rows:
            cells = []
            for n in names:
                r = [r for r in rows_out if r[3] == H and r[5] == N and r[6] == n]
                cells.append(f"{r[0][7]} ±{100 * float(r[0][11]) / 2:.1f}% ({r[0][10]} GiB)" if r else "-")
            print(f"| {H} | {N} | " + " | ".join(cells) + " |")
    print(f"total bench time {time.time() - t_start:.0f} s; csv: {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
