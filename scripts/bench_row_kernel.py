"""Time the fused loss's Triton row kernel alone (no GEMMs): fkl, V 32000, bf16 draft logits, and a dense target
given as fp32 probabilities (what bench_loss.py times) or bf16 logits without their LSE (what the trainer passes).

The row kernel reads a chunk's logits (twice: the second read mostly hits L2), the target (probs once; logits
twice, the second from L2), and writes the bf16 gradient over the logits: at least 8 (probs) or 6 (logits) bytes
of HBM traffic per element, which is what the GB/s column counts (so HBM bandwidth is the bound).

Usage (GPU): python scripts/bench_row_kernel.py --rows 8192 32768 [--compare OLD.py]
  --compare: another file defining launch_row_kernel (e.g. a previous commit's _triton_divergence.py), timed
  with the same arguments, to see a change's effect inside one run.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from aurora_kernels import _triton_divergence as tk  # noqa: E402
from aurora_kernels.linear_divergence import _Config  # noqa: E402

V = 32000


def load_module(path):
    spec = importlib.util.spec_from_file_location("row_kernel_compare", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--tiles", nargs="+", default=["1024x4", "4096x8", "2048x4", "1024x2", "512x2", "1024x8"],
                    help="BLOCK_V x num_warps")
    ap.add_argument("--kinds", nargs="+", default=["probs", "logits"])
    ap.add_argument("--compare", default=None)
    args = ap.parse_args()
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, triton {triton.__version__}")
    impls = [("lg2.approx log", tk, True), ("libdevice log", tk, False)]
    if args.compare:
        impls.append(("compare", load_module(args.compare), None))
    print("| target | rows | tile | implementation | ms | GB/s |")
    print("|---|---|---|---|---|---|")
    for kind, n in ((k, n) for k in args.kinds for n in args.rows):
        g = torch.Generator(device=dev).manual_seed(0)
        logits0 = torch.randn(n, V, device=dev, generator=g).mul_(3).bfloat16()
        t = torch.randn(n, V, device=dev, generator=g) * 3
        tgt, nbytes = (torch.softmax(t, -1), 8) if kind == "probs" else (t.bfloat16(), 6)
        cfg = _Config(kind, "fkl", tgt, None, None, 1.0, -20.0)
        scale = torch.full((), 1.0 / n, device=dev)
        div = torch.empty(n, device=dev)
        dam = torch.empty(n, dtype=torch.int64, device=dev)
        tam = torch.empty(n, dtype=torch.int64, device=dev)
        ref = None
        for tile in args.tiles:
            bv, nw = (int(x) for x in tile.split("x"))
            for name, mod, fast in impls:
                if fast is not None:
                    mod.fast_log = fast
                buf = logits0.clone()
                mod.launch_row_kernel(buf, 0, cfg, None, scale, div, dam, tam, True, bv, nw)
                if ref is None:
                    ref = (buf.float(), div.clone(), dam.clone())
                else:  # every variant computes the same thing
                    assert torch.allclose(buf.float(), ref[0], atol=1e-6, rtol=1e-2), (tile, name)
                    assert torch.allclose(div, ref[1], atol=1e-4, rtol=1e-4), (tile, name, (div - ref[1]).abs().max())
                    assert torch.equal(dam, ref[2]), (tile, name)
                ms = triton.testing.do_bench(
                    lambda: mod.launch_row_kernel(buf, 0, cfg, None, scale, div, dam, tam, True, bv, nw),
                    warmup=50, rep=300)
                print(f"| {kind} | {n} | {tile} | {name} | {ms:.3f} | {nbytes * n * V / ms / 1e6:,.0f} |", flush=True)
    tk.fast_log = True


if __name__ == "__main__":
    main()
