"""The XᵀX product of the gram accumulator: ways to compute Σ XᵀX over batches of bfloat16
activations, each one's speed and its error against float64.

    python bench/bench_xtx.py                      # dims 1024 and 3584, 4 batches of 2048 rows, cpu
    python bench/bench_xtx.py --device cuda --rows 8192

The activations are bfloat16 (what a bfloat16 forward pass hands the hooks), with a few
large channels as real activations have. The reference is the float64 sum of the very same
bfloat16 values, so the error is that of the product and the accumulation alone. Options:
- upcast + full: X to float32, one float32 addmm into the sum (the textbook way);
- upcast + triangle: X to float32, upper block-triangle addmms (calibration.Gram, the project's);
- bf16 product: X stays bfloat16, XᵀX in bfloat16 (rounded to 8 bits per batch), summed in float32;
- bf16 in, f32 out: torch.mm(X, X, out_dtype=float32), products and sums in float32 (where
  this PyTorch build has it: cuda; not on cpu in torch 2.13).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regmean.calibration import Gram  # noqa: E402


def activations(rows, dim, batches, device, seed=0):
    """bfloat16 batches [rows, dim]: unit normals scaled per channel (log-normal, a few channels ~30x)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(dim, generator=g))
    scale[torch.randperm(dim, generator=g)[: max(1, dim // 256)]] *= 30
    return [(torch.randn(rows, dim, generator=g) * scale).to(device, torch.bfloat16) for _ in range(batches)]


def upcast_full(xs, dim, device):
    s = torch.zeros(dim, dim, device=device)
    for x in xs:
        x = x.float()
        s.addmm_(x.T, x)
    return s


def upcast_triangle(xs, dim, device):
    gram = Gram(dim, device)
    for x in xs:
        gram.add(x)
    return gram.result() * gram.num_rows  # the sum, mirrored


def bf16_product(xs, dim, device):
    s = torch.zeros(dim, dim, device=device)
    for x in xs:
        s += (x.T @ x).float()
    return s


def bf16_in_f32_out(xs, dim, device):
    s = torch.zeros(dim, dim, device=device)
    for x in xs:
        s += torch.mm(x.T, x, out_dtype=torch.float32)
    return s


OPTIONS = {
    "upcast + full": upcast_full,
    "upcast + triangle": upcast_triangle,
    "bf16 product": bf16_product,
    "bf16 in, f32 out": bf16_in_f32_out,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 3584])
    p.add_argument("--rows", type=int, default=2048, help="rows per batch")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2, help="timed runs per option, alternating; the best is kept")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"{args.batches} batches of {args.rows} bfloat16 rows on {device}, {torch.get_num_threads()} threads")
    results = {}
    for dim in args.dims:
        xs = activations(args.rows, dim, args.batches, device)
        ref = sum(x.double().T @ x.double() for x in xs)
        flops = 2 * args.rows * dim * dim * args.batches
        for rep in range(args.repeat + 1):  # the first round warms up and is not timed
            for name, fn in OPTIONS.items():
                try:
                    sync(device)
                    t = time.perf_counter()
                    out = fn(xs, dim, device)
                    sync(device)
                    elapsed = time.perf_counter() - t
                except (RuntimeError, NotImplementedError) as e:
                    results[dim, name] = (None, None, str(e).splitlines()[0][:60])
                    continue
                err = ((out.double() - ref).norm() / ref.norm()).item()
                if rep:
                    best = results.get((dim, name), (float("inf"),))[0] or float("inf")
                    results[dim, name] = (min(best, elapsed), err, "")
        for name in OPTIONS:
            t, err, why = results[dim, name]
            if t is None:
                print(f"dim {dim:5d}  {name:>18}: not available ({why})")
            else:
                print(
                    f"dim {dim:5d}  {name:>18}: {t * 1e3:8.1f} ms  {flops / t / 1e9:6.0f} GFLOP/s (full-product count)"
                    f"  error vs float64 {err:.1e}"
                )
    return results


if __name__ == "__main__":
    main()
