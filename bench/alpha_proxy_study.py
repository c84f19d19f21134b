"""Does the validation error that `--alpha auto` minimizes predict the benchmark scores? Issue 30's proxy study on
the demo's two SmolLM2-135M experts (run `make demo` first; its experts and data are read, never written).

    python bench/alpha_proxy_study.py                          # runs/demo -> runs/alpha_proxy/ (hours on 2 busy cores)
    python bench/alpha_proxy_study.py --merges auto auto-global  # only these (another process may make the rest)
    python bench/alpha_proxy_study.py --merges none              # the report from the merges scored so far
    python bench/alpha_proxy_study.py --root runs/toy --experts toy-code toy-math --out runs/alpha_proxy_toy

Fit and validation grams come from one `compute_gram.py --holdout F` run per expert on the demo's calibration rows
(1 row in round(1/F) held out, so the two are disjoint); then `merge_model.py regmean` at every α of the grid, with
`--alpha auto` and with `--alpha auto-global`; `judge_merge.py --validation-grams` gives every merge's validation
error (the criterion auto minimizes, summed over layers, relative to the experts' output energy, and per expert);
and the real `lm_eval` CLI scores every merge on the demo's tasks exactly as the demo runs it. It writes
OUT/proxy_study.md (the table, the Spearman rank correlation of the validation error with each score and their mean
over the grid, auto's score against the best and the median fixed α) and OUT/proxy_study.png. Each step is skipped
when its output is there, so a rerun resumes; the report covers the merges that have all their scores. The figures
and their reading: docs/merging.md.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compute_gram  # noqa: E402
import demo  # noqa: E402
import judge_merge  # noqa: E402
import merge_model  # noqa: E402
from regmean.alpha_choice import ALPHA_GRID  # noqa: E402
from regmean.evaluation import evaluate  # noqa: E402
from regmean.results import read_results, score  # noqa: E402

AUTO = ("auto", "auto-global")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/demo", help="a demo's folder: data/ and the experts (read only)")
    p.add_argument("--experts", nargs=2, default=["smollm2-code", "smollm2-math"], help="code expert, math expert")
    p.add_argument("--out", default="runs/alpha_proxy", help="grams, merges and the report go here")
    p.add_argument("--holdout", type=float, default=0.25, help="compute_gram.py --holdout (default 1 row in 4)")
    p.add_argument("--num-examples", type=int, default=64, help="calibration rows per expert (the demo's 64)")
    p.add_argument("--alpha-grid", type=float, nargs="+", default=ALPHA_GRID, help="the fixed αs (auto's grid)")
    p.add_argument("--merges", nargs="+", choices=["grid", *AUTO, "none"], help="make (and score) only these merges")
    p.add_argument("--eval-batch-size", type=int, default=64, help="lm_eval --batch_size (the demo's 64)")
    p.add_argument("--limit", type=float, default=None, help="lm_eval --limit (tests only: the demo runs all)")
    return p.parse_args(argv)


def make_grams(root: Path, experts: dict[str, str], out: Path, args) -> tuple[list[Path], list[Path]]:
    """Fit and held-out grams of each expert from one compute_gram.py --holdout run on the demo's calibration rows."""
    fit, held_out = [], []
    for kind, name in experts.items():
        folder = out / "grams" / name
        if not (folder / "gram-holdout.safetensors").is_file():
            data = root / "data" / f"{kind}_calib.jsonl"
            cmd = [name, "--model", str(root / name), "--dataset", str(data), "--format", kind]
            cmd += ["--num-examples", str(args.num_examples), "--holdout", str(args.holdout)]
            compute_gram.main(cmd + ["--output-dir", str(folder), "--device", "cpu"])
        fit.append(folder / "gram.safetensors")
        held_out.append(folder / "gram-holdout.safetensors")
    return fit, held_out


def merge_name(alpha) -> str:
    return f"regmean_{alpha}"


def make_merges(models: list[Path], fit: list[Path], held_out: list[Path], out: Path, args) -> dict:
    """{α or auto mode: merged folder}: merge_model.py regmean at every α of the grid, auto and auto-global."""
    wanted = args.merges or ["grid", *AUTO]
    merges = {}
    for alpha in [*args.alpha_grid, *AUTO]:
        folder = out / "merges" / merge_name(alpha)
        merges[alpha] = folder
        if (folder / "merge_report.json").is_file() or ("grid" if alpha not in AUTO else alpha) not in wanted:
            continue
        cmd = ["regmean", "--models", *map(str, models), "--grams", *map(str, fit), "--alpha", str(alpha)]
        if alpha in AUTO:
            grid = [str(a) for a in args.alpha_grid]
            cmd += ["--validation-grams", *map(str, held_out), "--alpha-grid", *grid]
        merge_model.main(cmd + ["--output-dir", str(folder), "--overwrite", "--device", "cpu"])
    return {k: v for k, v in merges.items() if (v / "merge_report.json").is_file()}


def validation_errors(folder: Path, models: list[Path], fit: list[Path], held_out: list[Path]) -> dict:
    """The merge's validation error from judge_merge.py --validation-grams: the total (relative to the experts'
    output energy, the criterion auto minimizes) and each expert's own, Σ_layers eᵢᵛ·energyᵢ / Σ_layers energyᵢ."""
    path = folder / "judge_report.json"
    if not path.is_file():
        cmd = [str(folder), "--models", *map(str, models), "--grams", *map(str, fit)]
        judge_merge.main(cmd + ["--validation-grams", *map(str, held_out)])
    validation = json.loads(path.read_text())["validation"]
    per_expert = []
    for i in range(len(models)):
        error = energy = 0.0
        for row in validation["layers"]:
            figures = row.get("output_error") or {}
            if (figures.get("merged") or [None])[i] is not None:
                error += figures["merged"][i] * figures["energy"][i]
                energy += figures["energy"][i]
        per_expert.append(error / energy if energy > 0 else None)
    return dict(total=validation["total"]["merged_relative"], experts=per_expert)


def scores(folder: Path) -> list[float | None]:
    """Each demo task's score (percent) as the demo's table reads it."""
    results = read_results(folder)[0]
    return [score(results, task, keys) for _, _, task, keys in demo.COLUMNS]


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's on the ranks (ties at their mean rank); None when one side is flat."""
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def chosen_alpha(folder: Path) -> str:
    """What an auto merge chose, from its merge_report.json: one α, or the median and range over the inputs."""
    alphas = sorted(json.loads((folder / "merge_report.json").read_text())["alpha_choice"]["alphas"].values())
    if alphas[0] == alphas[-1]:
        return f"{alphas[0]:g}"
    return f"median {statistics.median(alphas):g}, {alphas[0]:g}-{alphas[-1]:g}"


def fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def report(rows: dict, titles: list[str], merges: dict, grid: list[float]) -> tuple[str, dict]:
    """The markdown report and its figures: the table, the rank correlations over the grid, auto against the grid."""
    names = [f"e{i + 1}ᵛ" for i in range(len(next(iter(rows.values()))["experts"]))]
    head = ["α", "validation error", *names, *titles, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---- |" * len(head)]
    for key, r in rows.items():
        label = f"{key:g}" if key not in AUTO else f"{key} ({chosen_alpha(merges[key])})"
        cells = [fmt(r["total"], ".3e"), *(fmt(e, ".3e") for e in r["experts"]), *map(fmt, r["scores"]), fmt(r["mean"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    alphas = [a for a in grid if a in rows]
    on_grid = [rows[a] for a in alphas]
    errors = [r["total"] for r in on_grid]
    figures = {"spearman": {}}
    text = ["", f"Spearman rank correlation with the validation error over the {len(on_grid)} grid merges "]
    text[-1] += "(negative: a lower error goes with a higher score):"
    for i, title in enumerate([*titles, "mean"]):
        values = [r["scores"][i] if i < len(titles) else r["mean"] for r in on_grid]
        figures["spearman"][title] = rho = spearman(errors, values) if len(on_grid) > 1 else None
        text.append(f"- {title}: {fmt(rho, '+.2f')}")
    means = [r["mean"] for r in on_grid]
    if means:
        best = max(range(len(on_grid)), key=lambda i: means[i])
        least = alphas[errors.index(min(errors))]
        figures |= dict(best=means[best], median=statistics.median(means))
        best_alphas = ", ".join(f"{a:g}" for a in alphas if rows[a]["mean"] == means[best])
        text.append(
            f"\nFixed α: best mean score {means[best]:.2f} (α = {best_alphas}), median {figures['median']:.2f}, "
            f"worst {min(means):.2f}; lowest validation error at α = {least:g}."
        )
        if "auto-global" not in rows:  # its weights are the fixed merge's at its α, which a rerun would make again
            text.append(
                f"auto-global (not merged in this run) takes the grid's α of least summed validation error: "
                f"α = {least:g} here (as the judge estimates it), the fixed merge's weights."
            )
        for mode in AUTO:
            if mode in rows and rows[mode]["mean"] is not None:
                m = rows[mode]["mean"]
                figures[mode] = m
                text.append(
                    f"{mode}: mean score {m:.2f}, {m - means[best]:+.2f} against the best fixed α and "
                    f"{m - figures['median']:+.2f} against the median."
                )
    return "\n".join(lines + text) + "\n", figures


def draw(rows: dict, titles: list[str], grid: list[float], merges: dict, experts: list[str], path: Path) -> None:
    """Validation error (top) and scores (bottom) against α; auto's as horizontal lines, auto-global's α marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [a for a in grid if a in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    top.plot(xs, [rows[a]["total"] for a in xs], "o-", color="black", label="all experts")
    for i, name in enumerate(experts):
        top.plot(xs, [rows[a]["experts"][i] for a in xs], ".--", label=name)
    top.set_yscale("log")
    top.set_ylabel("validation error\n(relative to output energy)")
    for i, title in enumerate([*titles, "mean"]):
        values = [rows[a]["scores"][i] if i < len(titles) else rows[a]["mean"] for a in xs]
        line = bottom.plot(xs, values, "o-" if title == "mean" else ".-", label=title)[0]
        if "auto" in rows:
            auto = rows["auto"]["scores"][i] if i < len(titles) else rows["auto"]["mean"]
            if auto is not None:
                bottom.axhline(auto, color=line.get_color(), linestyle=":", linewidth=1)
    least = min(xs, key=lambda a: rows[a]["total"])
    for ax in (top, bottom):
        ax.axvline(least, color="gray", linestyle="--", linewidth=1, label=f"least validation error (α = {least:g})")
        if "auto" in rows:
            ax.plot([], [], ":", color="gray", label=f"auto ({chosen_alpha(merges['auto'])})")
        if "auto-global" in rows:
            ax.axvline(float(chosen_alpha(merges["auto-global"])), color="red", alpha=0.4, label="auto-global's α")
        ax.legend(fontsize=7)
    if "auto" in rows:
        top.axhline(rows["auto"]["total"], color="gray", linestyle=":", linewidth=1)
    bottom.set_ylabel("score (%)")
    bottom.set_xlabel("α (fixed)")
    fig.suptitle("validation error and lm_eval scores against α", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Path:
    args = parse_args(argv)
    demo.use_threads()
    root, out = Path(args.root), Path(args.out)
    experts = dict(zip(demo.KINDS, args.experts))
    models = [root / name for name in experts.values()]
    fit, held_out = make_grams(root, experts, out, args)
    merges = make_merges(models, fit, held_out, out, args)
    wanted = [f for k, f in merges.items() if not args.merges or ("grid" if k not in AUTO else k) in args.merges]
    data_dir = json.dumps({"toy_data_dir": str((root / "data").resolve())})
    extra = ["--apply_chat_template", "--batch_size", str(args.eval_batch_size), "--metadata", data_dir]
    if wanted:
        evaluate(wanted, tasks=demo.TASKS, backend="hf", device="cpu", dtype="float32",
                 limit=args.limit, lm_eval_args=extra)  # fmt: skip
    rows = {}  # every merge there with all its scores (a partial run's report covers what is done so far)
    for key, folder in merges.items():
        if None not in (row_scores := scores(folder)):
            rows[key] = validation_errors(folder, models, fit, held_out)
            rows[key] |= dict(scores=row_scores, mean=statistics.fmean(row_scores))
    titles = [title for title, *_ in demo.COLUMNS]
    text, figures = report(rows, titles, merges, args.alpha_grid)
    draw(rows, titles, args.alpha_grid, merges, args.experts, out / "proxy_study.png")
    (out / "proxy_study.md").write_text(text)
    (out / "proxy_study.json").write_text(json.dumps(dict(rows={str(k): v for k, v in rows.items()}, **figures)))
    print(text)
    print(f"wrote {out / 'proxy_study.md'}, {out / 'proxy_study.png'}")
    return out / "proxy_study.md"


if __name__ == "__main__":
    main()
