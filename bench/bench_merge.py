"""Benchmark of merge_model.py (streaming RegMean) against the seed's method, side by side.

    python bench/bench_merge.py              # Llama-shaped bf16 experts (hidden 2048, intermediate 5632,
                                             # vocab 32000, GQA 16:4) with 2 and 6 layers; ~15 min on 2 cores
    python bench/bench_merge.py --quick      # small shapes, ~1 min: checks that the benchmark runs
    python bench/bench_merge.py --repeat 3   # on a busy machine: alternate the methods, keep the fastest run
    python bench/bench_merge.py --layer-8b --device cuda   # one Llama-3-8B-shaped layer (+ lm_head) on a GPU
    python bench/bench_merge.py --pp-examples 0   # streaming and baseline only, without regmean++
    python bench/bench_merge.py --like-for-like --pp-examples 0   # + streaming writing float32, as the baseline does
    python bench/bench_merge.py --ill-conditioned --alpha 1.0 --like-for-like --pp-examples 0   # grams of cond ~1e7
    python bench/bench_merge.py --figures-overhead --repeat 3   # regmean with and without the output error
                                             # figures (regmean/merge_report.py), alternating: the wall time ratio

For each depth it writes (merge_inputs.py) two experts (random bf16 weights, safetensors shards) and synthetic SPD
grams for them, both as gram.safetensors (this project) and as the seed's gram.pkl (one tensor
per module), then runs, each in its own process so that peak RSS is that method's alone:
- baseline: the seed's merge_model.py: both models loaded with from_pretrained (float32), all
  grams unpickled, torch.linalg.lstsq per linear module, the result saved with save_pretrained;
- streaming: `merge_model.py regmean` with default settings (output in the experts' dtype, bfloat16);
- streaming-f32 (--like-for-like): the same with `--dtype float32`, the baseline's output dtype;
- regmean++: `merge_model.py regmean++` on --pp-examples toy chat rows per expert (code and math
  rows of demo.py, a local BPE tokenizer with the chat template), forward passes in float32.

--ill-conditioned makes every gram low rank plus a diagonal ~1e-6 of its top eigenvalue
(condition number ~1e7, as measured on real o_proj grams), so that the solver leaves its
float32 Cholesky path; at alpha 0.1 the kept diagonal makes the system well conditioned
again, so run it with --alpha 1.0. It prints wall time and peak RSS of each, the ratios
against the targets (peak RSS at the deepest <= 25% of the baseline's and <= 1.15x the
shallowest's, wall <= 0.6x the baseline's), regmean++ next to regmean (wall, peak RSS,
seconds per calibration token and per token-layer), and an extrapolation to the seed's Llama-3-8B pair.
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from merge_inputs import (  # noqa: E402  (bench/, next to this file)
    NUM_EXPERTS,
    condition_numbers,
    input_key,
    linear_shapes,
    prepare,
    prepare_calibration,
    seeded,
    synthetic_gram,
)

LLAMA3_8B = dict(hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, layers=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument(
        "--depths", type=int, nargs="+", default=[2, 6], help="numbers of layers to run (memory must be flat in depth)"
    )
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per method and depth, alternating; the fastest counts (for a shared machine)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small shapes (hidden 256, intermediate 704, vocab 4000, 1 and 3 layers)"
    )
    p.add_argument("--work-dir", default="runs/bench/merge", help="experts, grams and outputs go here")
    p.add_argument(
        "--layer-8b", action="store_true", help="time one Llama-3-8B-shaped layer and lm_head on --device instead"
    )
    p.add_argument("--device", default="auto", help="for --layer-8b")
    p.add_argument(
        "--pp-examples", type=int, default=32, help="calibration rows per expert for regmean++ (0: skip regmean++)"
    )
    p.add_argument("--like-for-like", action="store_true", help="also streaming with float32 output, as the baseline")
    p.add_argument("--ill-conditioned", action="store_true", help="grams with condition number ~1e7 (see above)")
    p.add_argument(
        "--figures-overhead",
        action="store_true",
        help="only regmean, with the output error figures and picture (default) and without "
        "(--error-sample-every 0), alternating; prints the wall time ratio",
    )
    p.add_argument(
        "--child",
        choices=["baseline", "streaming", "streaming-f32", "streaming-nofigures", "regmeanpp"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, args.depths = (
            256,
            704,
            4000,
            4,
            1,
            [1, 3],
        )
    return args


# ----------------------------------------------------------------------------- the methods (children)
def baseline(folder, alpha):
    """The seed's merge: everything in memory, lstsq per module, save_pretrained."""
    from transformers import AutoModelForCausalLM

    models = [
        AutoModelForCausalLM.from_pretrained(str(folder / f"expert{i}"), dtype=torch.float32)
        for i in range(NUM_EXPERTS)
    ]
    all_grams = []
    for i in range(NUM_EXPERTS):
        with open(folder / f"expert{i}" / "gram.pkl", "rb") as f:
            all_grams.append(pickle.load(f))  # the seed's own (unrestricted) loading of its own files
    params = {}
    for model in models:
        for name, p in model.named_parameters():
            params.setdefault(name, []).append(p)
    merged = {}
    with torch.no_grad():
        for name, ps in params.items():
            module = name[: -len(".weight")]
            if name.endswith(".weight") and module in all_grams[0]:
                grams, gram_ws = [], []
                for grams_i, p in zip(all_grams, ps):
                    g = grams_i[module]
                    mask = torch.full_like(g, alpha)  # off-diagonals scaled by alpha, diagonal kept
                    mask.fill_diagonal_(1.0)
                    g = g * mask
                    gram_ws.append(g @ p.float().T)
                    grams.append(g)
                merged[name] = torch.linalg.lstsq(sum(grams), sum(gram_ws)).solution.T
            else:
                merged[name] = torch.stack(ps).mean(0)
        for name, p in models[-1].named_parameters():
            p.data.copy_(merged[name])
    models[-1].save_pretrained(str(folder / "out-baseline"))


def regmeanpp(folder, alpha, num_examples):
    import merge_model

    out = merge_model.main(
        [
            "regmean++",
            "--models",
            str(folder / "expert0"),
            str(folder / "expert1"),
            "--datasets",
            str(folder / "calib_code.jsonl"),
            str(folder / "calib_math.jsonl"),
            "--formats",
            "code",
            "math",
            "--num-examples",
            str(num_examples),
            "--alpha",
            str(alpha),
            "--output-dir",
            str(folder / "out-regmeanpp"),
            "--overwrite",
            "--device",
            "cpu",
        ]
    )
    return json.loads((out / "merge_report.json").read_text())["figures"]


def streaming(folder, alpha, dtype="auto", figures=True):
    import merge_model

    out = merge_model.main(
        [
            "regmean",
            "--models",
            str(folder / "expert0"),
            str(folder / "expert1"),
            "--grams",
            str(folder / "expert0"),
            str(folder / "expert1"),
            "--alpha",
            str(alpha),
            "--output-dir",
            str(folder / f"out-streaming-{dtype}{'' if figures else '-nofigures'}"),
            "--overwrite",
            "--device",
            "cpu",
            "--dtype",
            dtype,
            *([] if figures else ["--error-sample-every", "0"]),
        ]
    )
    report = json.loads((out / "merge_report.json").read_text())
    paths = [layer["path"] for layer in report["layers"] if "path" in layer]
    return dict(report["figures"], paths={p: paths.count(p) for p in sorted(set(paths))})


def child(args):
    folder = Path(args.dir)
    t0 = time.perf_counter()
    if args.child == "regmeanpp":
        figures = regmeanpp(folder, args.alpha, args.pp_examples)
    else:
        if args.child == "baseline":
            figures = baseline(folder, args.alpha)
        else:
            dtype = "float32" if args.child == "streaming-f32" else "auto"
            figures = streaming(folder, args.alpha, dtype, figures=args.child != "streaming-nofigures")
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        "RESULT "
        + json.dumps(
            dict(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, rss_gib=usage.ru_maxrss / 2**20, figures=figures)
        )
    )


def run_child(method, folder, alpha, pp_examples=0):
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            method,
            "--dir",
            str(folder),
            "--alpha",
            str(alpha),
            "--pp-examples",
            str(pp_examples),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{method} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ----------------------------------------------------------------------------- extrapolation
def solve_flops(shapes):
    """Floating point operations of the streaming solve: per distinct input of size n read by
    layers with m outputs in all, a Cholesky (n³/3), the right-hand sides (2 N n² m) and the
    triangular solves (2 n² m)."""
    groups = {}
    for module, (out, n) in shapes.items():
        groups.setdefault(input_key(module), [n, 0])[1] += out
    return sum(n**3 / 3 + (2 * NUM_EXPERTS + 2) * n * n * m for n, m in groups.values())


def working_set(shapes, block_mb):
    """Bytes the streaming merge holds at its largest step: the N grams of one input, N - 1
    differences and the Cholesky factor, plus a block of rows per expert and ~5 temporaries."""
    n = max(n for _, n in shapes.values())
    system = 2 * NUM_EXPERTS * n * n * 4
    rows = (NUM_EXPERTS + 5) * block_mb * 2**20
    return system + rows


def model_bytes(c, dtype_bytes):
    kv = c["hidden"] // c["heads"] * c["kv_heads"]
    per_layer = (
        2 * c["hidden"] * c["hidden"] + 2 * kv * c["hidden"] + 3 * c["hidden"] * c["intermediate"] + 2 * c["hidden"]
    )
    return dtype_bytes * (c["layers"] * per_layer + 2 * c["vocab"] * c["hidden"] + c["hidden"])


def seed_gram_bytes(shapes):
    return sum(n * n * 4 for _, n in shapes.values())


# ----------------------------------------------------------------------------- one 8B layer on a device
def layer_8b(args):
    from regmean import solver
    from regmean.merging import BLOCK_MB
    from regmean.utils import choose_device

    device = choose_device(args.device)
    c = (
        dict(LLAMA3_8B)
        if not args.quick
        else dict(hidden=512, intermediate=1792, vocab=16000, heads=8, kv_heads=2, layers=32)
    )
    shapes = linear_shapes(c["hidden"], c["intermediate"], c["vocab"], c["heads"], c["kv_heads"], 1)
    groups = {
        "q": ["q_proj", "k_proj", "v_proj"],
        "o": ["o_proj"],
        "gate": ["gate_proj", "up_proj"],
        "down": ["down_proj"],
        "lm_head": [None],
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {}
    for key, members in groups.items():
        modules = ["lm_head"] if key == "lm_head" else [next(m for m in shapes if m.endswith(p)) for p in members]
        n = shapes[modules[0]][1]
        grams = [synthetic_gram(n, f"8b/{key}/{i}").to(device) for i in range(NUM_EXPERTS)]
        weights = {
            m: [torch.randn(shapes[m], generator=seeded(m, i)).mul_(0.02).to(device) for i in range(NUM_EXPERTS)]
            for m in modules
        }
        sync()
        t0 = time.perf_counter()
        system = solver.RegMeanSystem.factor(
            grams, args.alpha, [1 / NUM_EXPERTS] * NUM_EXPERTS, device, num_rows=sum(shapes[m][0] for m in modules)
        )
        for m in modules:
            rows = shapes[m][0]
            step = max(1, int(BLOCK_MB * 2**20 // (n * 4)))  # the merge's row blocks
            for start in range(0, rows, step):
                system.solve([w[start : start + step] for w in weights[m]])
        sync()
        times[key] = time.perf_counter() - t0
        del grams, weights, system
    layer = sum(v for k, v in times.items() if k != "lm_head")
    print(
        f"one layer (hidden {c['hidden']}, intermediate {c['intermediate']}, vocab {c['vocab']}"
        f"{', --quick shapes' if args.quick else ''}) on {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}): "
        + ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
    )
    print(
        f"solve time per layer {layer:.2f}s; 32 layers + lm_head: {32 * layer + times['lm_head']:.1f}s "
        f"(solves only; reading and writing the 2 x 16 GB experts and 2 x 32 GB of grams come on top)"
    )


# ----------------------------------------------------------------------------- main
def main(argv=None):
    from regmean.merging import BLOCK_MB

    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.layer_8b:
        return layer_8b(args)
    work = (
        Path(args.work_dir)
        / f"h{args.hidden}-i{args.intermediate}-v{args.vocab}{'-ill' if args.ill_conditioned else ''}"
    )
    results = {}
    for layers in args.depths:
        folder = work / f"layers{layers}"
        t0 = time.perf_counter()
        prepare(folder, args, layers)
        methods = ["streaming", "baseline"] + (["streaming-f32"] if args.like_for_like else [])
        if args.ill_conditioned or layers == min(args.depths):
            print(f"{layers} layers: {condition_numbers(folder, args.alpha)}", flush=True)
        if args.figures_overhead:
            methods = ["streaming", "streaming-nofigures"]
        elif args.pp_examples:
            prepare_calibration(folder, args.pp_examples)
            methods.append("regmeanpp")
        print(f"{layers} layers: inputs ready in {folder} ({time.perf_counter() - t0:.0f}s)", flush=True)
        for _ in range(args.repeat):
            for method in methods:
                r = run_child(method, folder, args.alpha, args.pp_examples)
                paths = r["figures"].get("paths") if isinstance(r["figures"], dict) else None
                print(
                    f"  {method:13s} wall {r['wall_s']:7.1f}s   CPU {r['cpu_s']:7.1f}s   "
                    f"peak RSS {r['rss_gib']:6.2f} GiB" + (f"   solver paths {paths}" if paths else ""),
                    flush=True,
                )
                results.setdefault((method, layers), []).append(r)
    # the fastest run of each; peak RSS is the largest seen
    results = {
        k: dict(min(runs, key=lambda r: r["wall_s"]), rss_gib=max(r["rss_gib"] for r in runs))
        for k, runs in results.items()
    }
    lo, hi = min(args.depths), max(args.depths)
    if args.figures_overhead:
        print("\nregmean with the output error figures / without (fastest of each; target <= 1.10):")
        for layers in args.depths:
            on, off = results["streaming", layers], results["streaming-nofigures", layers]
            f = on["figures"]
            print(
                f"{layers:3d} layers: wall {on['wall_s']:.2f}s / {off['wall_s']:.2f}s "
                f"= {on['wall_s'] / off['wall_s']:.3f}"
                f"; CPU {on['cpu_s'] / off['cpu_s']:.3f}; figures {f.get('figures_s', 0):.2f}s + picture "
                f"{f.get('picture_s', 0):.2f}s inside the merge's {f['wall_s']:.2f}s"
            )
        return
    s, b, s_lo = results["streaming", hi], results["baseline", hi], results["streaming", lo]
    checks = [
        ("peak RSS, streaming / baseline", s["rss_gib"] / b["rss_gib"], 0.25, f"at {hi} layers"),
        ("peak RSS, streaming deep / shallow", s["rss_gib"] / s_lo["rss_gib"], 1.15, f"{hi} vs {lo} layers"),
        ("wall time, streaming / baseline", s["wall_s"] / b["wall_s"], 0.6, f"at {hi} layers"),
    ]
    if args.like_for_like:
        f32 = results["streaming-f32", hi]
        checks.append(("wall time, streaming-f32 / baseline", f32["wall_s"] / b["wall_s"], 0.6, f"at {hi} layers"))
        checks.append(("peak RSS, streaming-f32 / baseline", f32["rss_gib"] / b["rss_gib"], 0.25, f"at {hi} layers"))
    cpu = s["cpu_s"] / b["cpu_s"]
    print(
        f"\n(CPU time, streaming / baseline at {hi} layers: {cpu:.3f}; less sensitive than wall time to a busy machine)"
    )
    print("ratio                                   value   target")
    for name, value, target, where in checks:
        print(f"{name:36s} {value:8.3f}   <= {target}  {'ok' if value <= target else 'MISSED'} ({where})")

    if args.pp_examples:
        print("\nregmean++ next to regmean (streaming), same experts:")
        print("layers  wall pp/rm   peak RSS pp/rm   calibration tokens   s per token   ms per token and layer")
        for layers in args.depths:
            pp, rm = results["regmeanpp", layers], results["streaming", layers]
            tokens = pp["figures"]["calibration_tokens"]
            print(
                f"{layers:6d}  {pp['wall_s'] / rm['wall_s']:10.2f}   {pp['rss_gib'] / rm['rss_gib']:14.2f}   "
                f"{tokens:18d}"
                f"   {pp['wall_s'] / tokens:11.4f}   {1000 * pp['wall_s'] / tokens / layers:22.3f}"
            )
        pp_lo, pp_hi = results["regmeanpp", lo], results["regmeanpp", hi]
        print(
            f"regmean++ peak RSS, deep / shallow: {pp_hi['rss_gib'] / pp_lo['rss_gib']:.3f} ({hi} vs {lo} layers; "
            f"one layer per expert in memory at a time); its forward passes took "
            f"{pp_hi['figures'].get('forward_s', 0):.1f}s of {pp_hi['wall_s']:.1f}s at {hi} layers"
        )
    if args.quick:
        print(
            "(--quick: shapes too small for the targets, where start-up costs dominate; "
            "this checks that the benchmark runs)"
        )
    # Extrapolation to the seed's Llama-3-8B pair from the deepest run.
    shape = dict(
        hidden=args.hidden,
        intermediate=args.intermediate,
        vocab=args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        layers=hi,
    )
    here, big = linear_shapes(**shape), linear_shapes(**LLAMA3_8B)
    f = s["figures"]
    solve_8b = f.get("solve_s", 0) * solve_flops(big) / solve_flops(here)
    io_8b = (f.get("load_s", 0) + f.get("write_s", 0)) * model_bytes(LLAMA3_8B, 2) / model_bytes(shape, 2)
    block_mb = BLOCK_MB
    rss_8b = s["rss_gib"] + (working_set(big, block_mb) - working_set(here, block_mb)) / 2**30
    base_8b = (NUM_EXPERTS * model_bytes(LLAMA3_8B, 4) + NUM_EXPERTS * seed_gram_bytes(big)) / 2**30
    print("\nLlama-3-8B pair (32 layers, hidden 4096, intermediate 14336, vocab 128256), extrapolated:")
    print(
        f"  streaming: peak RSS ~ {rss_8b:.1f} GiB (measured {s['rss_gib']:.2f} GiB "
        "+ larger gram systems and row blocks); "
        f"CPU time ~ {(solve_8b + io_8b) / 3600:.1f} h on this machine (solve {solve_8b / 3600:.1f} h by flops, "
        f"load+write {io_8b / 60:.0f} min by bytes)"
    )
    print(f"  baseline: both float32 models and all per-module grams in memory: ~ {base_8b:.0f} GiB before any work")


if __name__ == "__main__":
    main()
