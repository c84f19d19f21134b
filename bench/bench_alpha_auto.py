"""The cost of merge_model.py regmean --alpha auto against a fixed-α merge, on synthetic Llama-shaped experts
(bench/merge_inputs.py; validation grams are a second set of synthetic grams of the same shapes).

    python bench/bench_alpha_auto.py                       # SmolLM2-135M-shaped (576 / 1536, GQA 9:3, vocab 49152),
                                                           # 30 layers
    python bench/bench_alpha_auto.py --layers 4 --repeat 2 # fewer layers; alternate the runs, keep the fastest
    python bench/bench_alpha_auto.py --hidden 4096 --intermediate 14336 --vocab 128256 --heads 32 --kv-heads 8 \
        --layers 1                                         # one Llama-3-8B-shaped layer (+ lm_head)
    python bench/bench_alpha_auto.py --models runs/demo/smollm2-code runs/demo/smollm2-math \
        --grams runs/demo/grams/smollm2-code runs/demo/grams/smollm2-math \
        --validation-grams VAL_CODE VAL_MATH --fixed 0.1 1.0  # real experts: the demo's SmolLM2-135M pair
    python bench/bench_alpha_auto.py --curve-only --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8
                          # one Llama-3-8B-shaped layer, in memory: the criterion of its 4 inputs against the
                          # fixed-α solve of all their rows (no files; what --alpha auto adds per layer)

Runs the fixed-α merges (--fixed, α 0.1 by default) and --alpha auto alternately in one process, --repeat
times, and prints the wall time of each (the fastest of its runs), auto's phases ("alpha": choosing α, the
rest the same merge as a fixed one) and auto's wall time over each fixed merge's, side by side.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from merge_inputs import NUM_EXPERTS, input_key, linear_shapes, prepare, seeded, synthetic_gram  # noqa: E402


def validation_grams(folder, args):
    """A second set of synthetic grams per expert (other seeds), as validation grams."""
    from regmean.tensor_io import save_grams

    shapes = linear_shapes(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, args.layers)
    paths = []
    for i in range(NUM_EXPERTS):
        path = folder / f"expert{i}" / "gram-validation.safetensors"
        if not path.exists():
            aliases = {m: input_key(m) for m in shapes if input_key(m) != m}
            stored = {m: synthetic_gram(shapes[m][1], f"{m}/{i}/validation") for m in shapes if m not in aliases}
            save_grams(path, stored, aliases, 10000, dict(model="synthetic", dataset="synthetic-validation"))
        paths.append(str(path))
    return paths


def run_merge(folder, args, extra, name):
    import merge_model

    t0 = time.perf_counter()
    out = merge_model.main(
        ["regmean", "--models", *args.models, "--grams", *args.grams, "--output-dir", str(folder / name)]
        + ["--overwrite", "--device", args.device, *extra]
    )
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "merge_report.json").read_text())["figures"]


def curve_only(args):
    """The criterion (alpha_choice.alpha_curve on the rows --alpha auto samples) of each input of one layer, and
    the fixed-α solve of all its rows (solver.merge_weight), timed side by side on synthetic grams and weights."""
    import torch

    from regmean.alpha_choice import ALPHA_GRID, ALPHA_MAX_ROWS, ALPHA_SAMPLE_EVERY, alpha_curve
    from regmean.merge_report import sample_step
    from regmean.solver import RegMeanSystem

    shapes = linear_shapes(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, 1)
    groups = {}
    for m, (rows, n) in shapes.items():
        if m != "lm_head":
            groups.setdefault(input_key(m), []).append((m, rows, n))
    coefs, totals = [0.5, 0.5], {"auto": 0.0, "fixed": 0.0}
    for key, members in groups.items():
        n = members[0][2]
        fit = [synthetic_gram(n, f"{key}/{i}") for i in range(NUM_EXPERTS)]
        val = [synthetic_gram(n, f"{key}/{i}/validation") for i in range(NUM_EXPERTS)]
        weights = [[torch.randn(rows, n, generator=seeded(m, i)) * 0.02 for m, rows, _ in members] for i in range(2)]
        t0 = time.perf_counter()
        for member in zip(*weights):
            system = RegMeanSystem.factor(fit, args.fixed[0], coefs, num_rows=member[0].shape[0])
            system.solve(list(member))
        fixed = time.perf_counter() - t0
        steps = [max(sample_step(w.shape[0], ALPHA_SAMPLE_EVERY), w.shape[0] // ALPHA_MAX_ROWS) for w in weights[0]]
        sampled = [torch.cat([w[s // 2 :: s] for w, s in zip(ws, steps)]) for ws in weights]
        t0 = time.perf_counter()
        curve = alpha_curve(fit, val, sampled, coefs, ALPHA_GRID)
        auto = time.perf_counter() - t0
        totals["auto"] += auto
        totals["fixed"] += fixed
        what = f"{key} ({n} wide, {sampled[0].shape[0]} rows sampled)"
        solved = f"{sum(r for _, r, _ in members)} rows {fixed:.1f} s, solver at α {curve['solved']}"
        print(f"{what}: criterion {auto:.1f} s, fixed-α solve of {solved}", flush=True)
        del fit, val, weights
    load = f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cpus)"
    print(f"one layer: criterion {totals['auto']:.1f} s, fixed-α solves {totals['fixed']:.1f} s; {load}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--fixed", type=float, nargs="+", default=[0.1], help="the fixed merges' α")
    p.add_argument("--models", nargs="+", help="real experts instead of synthetic ones (then --grams and ...")
    p.add_argument("--grams", nargs="+", help="... --validation-grams, one per model)")
    p.add_argument("--validation-grams", nargs="+")
    p.add_argument("--curve-only", action="store_true", help="one layer in memory, no merge (see above)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", default="runs/bench/alpha_auto")
    args = p.parse_args(argv)
    args.ill_conditioned = False  # merge_inputs.prepare reads it
    if args.curve_only:
        return curve_only(args)
    if args.models:
        folder, val = Path(args.work_dir) / "real", args.validation_grams
    else:
        folder = Path(args.work_dir) / f"h{args.hidden}-i{args.intermediate}-v{args.vocab}-l{args.layers}"
        prepare(folder, args, args.layers)
        val = validation_grams(folder, args)
        args.models = args.grams = [str(folder / f"expert{i}") for i in range(NUM_EXPERTS)]
    runs = {f"fixed {a:g}": ["--alpha", str(a)] for a in args.fixed}
    runs["auto"] = ["--alpha", "auto", "--validation-grams", *val]
    best = {}
    for _ in range(args.repeat):
        for name, extra in runs.items():
            wall, figures = run_merge(folder, args, extra, "out-" + name.replace(" ", "-"))
            print(f"{name}: {wall:.1f} s", flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, figures)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cpus)")
    for name, (wall, figures) in best.items():
        phases = ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if k.endswith("_s") and k != "wall_s")
        print(f"{name}: wall {wall:.1f} s ({phases}); {figures['peak_memory']}")
    auto = best["auto"][0]
    print("auto / fixed wall time: " + ", ".join(f"{auto / best[n][0]:.2f}x ({n})" for n in runs if n != "auto"))


if __name__ == "__main__":
    main()
