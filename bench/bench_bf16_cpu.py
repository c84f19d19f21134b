"""bfloat16 against float32 on this cpu: the products a forward pass runs, timed in both dtypes, and what
`--dtype auto` decides from its own short measurement (utils.cpu_bf16_choice).

    python bench/bench_bf16_cpu.py                  # 2 threads: a 2048² matmul, SmolLM2-135M's linear layers
    python bench/bench_bf16_cpu.py --threads 16 --rows 4096

A native bfloat16 flag (avx512_bf16, AMX) says what the cpu can do, not what this PyTorch build makes of it:
the same flag has meant bfloat16 at half float32's speed on one machine and several times it on another.
Products: a square matmul (--square, 2048), and F.linear at SmolLM2-135M's widths (hidden 576, intermediate
1536) on --rows token rows: 576 -> 576 (attention), 576 -> 1536 (gate/up), 1536 -> 576 (down). Each is warmed
up once, then timed --repeat times alternating the dtypes; the best time of each is reported.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from regmean.utils import CPU_BF16_ENV, auto_dtype, cpu_bf16_support, dtype_name  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def best_gflops(run, flop, repeat):
    """{dtype: GFLOP/s} of run(dtype), best of `repeat` after one warm-up each, the dtypes alternating."""
    best = dict.fromkeys(DTYPES, float("inf"))
    for i in range(repeat + 1):
        for dtype in DTYPES:
            t0 = time.perf_counter()
            run(dtype)
            if i:
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return {dtype: flop / t / 1e9 for dtype, t in best.items()}


def products(square, rows):
    """(label, run(dtype), flop) of each product timed."""
    g = torch.Generator().manual_seed(0)
    out = []
    a, b = torch.randn(square, square, generator=g), torch.randn(square, square, generator=g)
    pair = {d: (a.to(d), b.to(d)) for d in DTYPES}
    out.append((f"matmul {square}²", lambda d, p=pair: p[d][0] @ p[d][1], 2 * square**3))
    for k, n, what in [(576, 576, "attention"), (576, 1536, "gate/up"), (1536, 576, "down")]:
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        pair = {d: (x.to(d), w.to(d)) for d in DTYPES}
        out.append((f"F.linear {rows}x{k} -> {n} ({what})", lambda d, p=pair: F.linear(*p[d]), 2 * rows * k * n))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--rows", type=int, default=2048, help="token rows of the F.linear products (default: %(default)s)")
    p.add_argument("--square", type=int, default=2048, help="size of the square matmul (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each product (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_bf16_support()[1]}")
    with torch.inference_mode():
        for label, run, flop in products(args.square, args.rows):
            speed = best_gflops(run, flop, args.repeat)
            f32, bf16 = speed[torch.float32], speed[torch.bfloat16]
            print(f"{label:>38}: float32 {f32:6.0f}, bfloat16 {bf16:6.0f} GFLOP/s ({bf16 / f32:.2f}x)")
    if os.environ.get(CPU_BF16_ENV):
        print(f"({CPU_BF16_ENV} is set: auto follows it below, untimed)")
    for width in (576, 2048):
        dtype, why = auto_dtype(torch.device("cpu"), width)
        print(f"--dtype auto at width {width}: {dtype_name(dtype)} ({why})")


if __name__ == "__main__":
    main()
