"""Judge any merged model: how much of each expert every linear layer keeps, against the experts'
gram files. The same figures, summary and picture as a RegMean merge writes, for a folder made by
`merge_model.py avg`, by regmean with other settings, or by another tool.

    python judge_merge.py runs/demo/merges/avg  # the experts, grams and weights its model card records
    python judge_merge.py runs/merges/avg --models A B --grams A/gram.safetensors B/gram.safetensors
    python judge_merge.py MERGED --models A B C --grams gA gB gC --weights 1 1 2 --output runs/judged/x \
        --sample-every 1 --device cuda

For each linear layer with a gram in every gram file, and each expert i (full gram Gᵢ, α = 1):

    eᵢ(W) = tr((W − Wᵢ) Gᵢ (W − Wᵢ)ᵀ) / tr(Wᵢ Gᵢ Wᵢᵀ)

the relative error of the layer's output on expert i's calibration inputs, for the merged weight
W read from the folder and for the weighted average of the experts (--weights; rounded to the
merged tensor's dtype, as an avg merge writes it), on every --sample-every-th output row (with
each figure's sampling error). Writes judge_report.json (per layer and expert, the summary, the
settings) and judge_report.png to --output (default: the merged folder), and prints the summary.

By default the experts, their gram files and weights are those the folder's model card records (the
recipe merge_model.py writes in README.md; options given replace them); where a model has no gram
file recorded (an avg or regmean++ merge), its preset's is taken (a preset by name or by its folder,
e.g. runs/demo/smollm2-code). A folder without a recipe is judged against the code and math presets.
Each gram file must describe the expert at its position, as merge_model.py checks it: a swap is
refused and named (--allow-gram-mismatch judges anyway).
The math is in regmean/solver.py, the loop over tensors in regmean/merging.py, the figures and the picture in
regmean/merge_report.py.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from regmean.experts import (
    expert_labels,
    expert_weights,
    linear_modules,
    load_experts,
    open_gram_files,
    resolve_gram_paths,
)
from regmean.merge_report import SAMPLE_EVERY, draw_picture, error_summary, summary_lines
from regmean.merging import judge_tensors
from regmean.recipe import CARD_RECIPE, read_recipe
from regmean.tensor_io import checkpoint_files, tensor_infos
from regmean.utils import Timer, UserError, choose_device, did_you_mean, peak_memory
from utils import run_main

DEFAULT_MODELS = ["code", "math"]  # for a folder whose model card records no recipe


@dataclass
class JudgeSettings:
    merged: str  # the merged model folder
    models: list[str] | None = None  # the experts (default: the recipe in the folder's model card, else the presets)
    grams: list[str] | None = None  # one gram file or folder per model (default: the recipe's, else each preset's)
    weights: list[float] | None = None  # the experts' weights for the average, normalized (default: the recipe's)
    output: str | None = None  # where judge_report.json and .png go (default: the merged folder)
    sample_every: int = SAMPLE_EVERY  # figures on every Nth output row of a layer (1: all rows)
    device: str = "auto"
    allow_gram_mismatch: bool = False  # judge even when a gram file records another model than its expert


def parse_args(argv=None) -> JudgeSettings:
    d = JudgeSettings("")
    p = argparse.ArgumentParser(description="Output error figures of a merged model against its experts' grams.")
    p.add_argument("merged", help="the merged model folder (safetensors)")
    p.add_argument(
        "--models",
        nargs="+",
        default=d.models,
        help="the experts (default: those the folder's model card records, else " + " ".join(DEFAULT_MODELS) + ")",
    )
    p.add_argument(
        "--grams", nargs="+", default=d.grams, help="one gram file or folder per model (default: the recipe's)"
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=d.weights,
        help="the average's weights (default: the recipe's, else equal)",
    )
    p.add_argument("--output", default=d.output, help="folder for judge_report.json/.png (default: the merged folder)")
    p.add_argument(
        "--sample-every",
        type=int,
        default=d.sample_every,
        help=f"every Nth output row of a layer, at least 16 rows (1: all rows; default: {d.sample_every})",
    )
    p.add_argument("--device", default=d.device, help="auto, cuda or cpu (default: auto)")
    p.add_argument(
        "--allow-gram-mismatch",
        action="store_true",
        help="judge even when a gram file records another model than the expert at its position (refused by default)",
    )
    return JudgeSettings(**vars(p.parse_args(argv)))


def recorded_recipe(merged_dir: Path) -> dict:
    """The merge settings a folder's model card records (merge_model.py writes them as its recipe); {}
    when it has none (a folder another tool made)."""
    card = merged_dir / "README.md"
    if not card.is_file() or not CARD_RECIPE.search(card.read_text()):
        return {}
    return read_recipe(card)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    s = parse_args(argv)
    timer = Timer()
    # Every input checked before the work starts.
    merged_dir = Path(s.merged)
    if not merged_dir.is_dir():
        raise UserError(f"{merged_dir} is not a folder{did_you_mean(merged_dir)}")
    recipe = recorded_recipe(merged_dir)
    if s.models is None and recipe.get("models"):
        s.models = recipe["models"]
        s.grams = s.grams or recipe.get("grams")
        s.weights = s.weights or recipe.get("weights")
        print(f"experts as recorded in {merged_dir / 'README.md'}: {', '.join(s.models)}")
    elif s.models is None:
        s.models = DEFAULT_MODELS
        print(
            f"note: {merged_dir} records no recipe (README.md); judging against the presets "
            f"{' '.join(s.models)} (--models to choose)",
            file=sys.stderr,
        )
    weights = expert_weights(s.models, s.weights)
    if s.sample_every < 1:
        raise UserError(f"--sample-every must be >= 1, got {s.sample_every}")
    coefs = [w / sum(weights) for w in weights]
    gram_paths = resolve_gram_paths(s.models, s.grams)
    out_dir = Path(s.output) if s.output else merged_dir
    device = choose_device(s.device)
    with timer("load"):
        experts = load_experts(s.models)
        gram_files = open_gram_files(experts, gram_paths, s.allow_gram_mismatch)
        linear = linear_modules(experts[0].infos, gram_files)
        merged_files = checkpoint_files(merged_dir)
        merged_infos = tensor_infos(merged_files)
    for module in linear:
        name = module + ".weight"
        if name not in merged_infos:
            raise UserError(f"{merged_dir} has no tensor {name}")
        if merged_infos[name][0] != experts[0].infos[name][0]:
            raise UserError(
                f"{name} has shape {list(merged_infos[name][0])} in {merged_dir}, "
                f"{list(experts[0].infos[name][0])} in the experts"
            )
    names = expert_labels(s.models)
    print(f"judging {merged_dir} against {', '.join(names)}: {len(linear)} linear layers on {device}")

    with timer("figures"):
        layers = judge_tensors(merged_files, experts, coefs, gram_files, linear, device, s.sample_every)
    summary = error_summary(layers, names)
    lines = summary_lines(summary, recipe.get("method", "merged"), every="--sample-every")
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer("picture"):
        picture = draw_picture(layers, names, out_dir / "judge_report.png", f"{merged_dir.name} judged")
    report = dict(
        settings=dict(asdict(s), weights=weights, output=str(out_dir), device=str(device)),
        command="python judge_merge.py " + " ".join(argv),
        experts=[dict(model=e.model_id, dir=str(e.dir), weight=c) for e, c in zip(experts, coefs)],
        grams=[str(g.path) for g in gram_files],
        output_errors=summary,
        layers=layers,
    )
    tmp = out_dir / "judge_report.json.tmp"  # complete or absent
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out_dir / "judge_report.json")
    print("\n".join(lines))
    print(f"done in {timer.total():.1f}s; {peak_memory(device)} -> {out_dir / 'judge_report.json'}, {picture}")
    return out_dir / "judge_report.json"


if __name__ == "__main__":
    run_main(main)
