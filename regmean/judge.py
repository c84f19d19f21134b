"""Judge any merged model as one function: how much of each expert every linear layer keeps, against the experts'
gram files: the same figures, summary and picture as a RegMean merge writes (docs/merging.md), for a folder made
by an avg merge, by regmean with other settings, or by another tool. judge_merge.py is its command line.

    report = judge("runs/demo/merges/avg")   # the experts, grams and weights its model card records
    report = judge("runs/merges/avg", models=[a, b], grams=[ga, gb], output="runs/judged/avg", sample_every=1)

The keywords are JudgeSettings' fields, with its defaults. Writes judge_report.json and judge_report.png and
returns the path of judge_report.json.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .experts import (
    Expert,
    expert_labels,
    expert_weights,
    linear_modules,
    load_expert,
    load_experts,
    open_gram_files,
    resolve_gram_paths,
)
from .merge_report import SAMPLE_EVERY, draw_picture, error_summary, summary_lines
from .merging import judge_tensors
from .model_card import options_of
from .recipe import CARD_RECIPE, read_recipe
from .utils import Timer, UserError, choose_device, did_you_mean, peak_memory, plain_settings

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
    validation_grams: list[str] | None = None  # one gram file per model: the same figures on held-out inputs too


def recorded_recipe(merged_dir: Path) -> dict:
    """The merge settings a folder's model card records (merge_model.py writes them as its recipe); {}
    when it has none (a folder another tool made)."""
    card = merged_dir / "README.md"
    if not card.is_file() or not CARD_RECIPE.search(card.read_text()):
        return {}
    return read_recipe(card)


def choose_experts(s: JudgeSettings, merged_dir: Path, recipe: dict) -> None:
    """The experts, their grams and weights not given: the recipe's, else the presets'."""
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


def check_merged_shapes(merged_dir: Path, merged_infos: dict, expert: Expert, linear: dict[str, int]) -> None:
    """Every judged linear layer is in the merged folder, in the experts' shape."""
    for module in linear:
        name = module + ".weight"
        if name not in merged_infos:
            raise UserError(f"{merged_dir} has no tensor {name}")
        if merged_infos[name][0] != expert.infos[name][0]:
            raise UserError(
                f"{name} has shape {list(merged_infos[name][0])} in {merged_dir}, "
                f"{list(expert.infos[name][0])} in the experts"
            )


def validation_total(layers: list[dict], coefs: list[float]) -> dict:
    """The validation error of a whole merged model from its layers' figures on validation grams: the criterion of
    --alpha auto summed over layers, Σ_layers Σᵢ cᵢ tr((W − Wᵢ) Vᵢ (W − Wᵢ)ᵀ) (scaled to all rows), and the same
    relative to Σ_layers Σᵢ cᵢ tr(Wᵢ Vᵢ Wᵢᵀ), for the merge and for the weighted average."""
    out = {}
    for kind in ("merged", "average"):
        error = energy = 0.0
        for row in layers:
            figures = row.get("output_error") or {}
            for c, e, x in zip(coefs, figures.get(kind) or [], figures.get("energy") or []):
                if e is not None:
                    error, energy = error + c * e * x, energy + c * x
        out[kind] = error
        out[f"{kind}_relative"] = error / energy if energy > 0 else None
    return out


def judge(merged: str | Path, *, argv: list[str] | None = None, **settings) -> Path:
    """Judge the merged folder `merged` with `settings`, any of JudgeSettings' fields (models, grams, weights,
    output, ...; its defaults for the others). argv: the judge_merge.py command line the settings came from, for
    judge_report.json (default: the options that give these settings). Returns the path of judge_report.json."""
    s = JudgeSettings(str(merged), **plain_settings(settings))
    argv = options_of(s) if argv is None else argv
    timer = Timer()
    # Every input checked before the work starts.
    merged_dir = Path(s.merged)
    if not merged_dir.is_dir():
        raise UserError(f"{merged_dir} is not a folder{did_you_mean(merged_dir)}")
    recipe = recorded_recipe(merged_dir)
    choose_experts(s, merged_dir, recipe)
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
        merged = load_expert(str(merged_dir))  # a dense folder, or a LoRA adapter folded into its base as read
    check_merged_shapes(merged_dir, merged.infos, experts[0], linear)
    val_files = open_validation_grams(s, experts, linear) if s.validation_grams else None
    names = expert_labels(s.models)
    print(f"judging {merged_dir} against {', '.join(names)}: {len(linear)} linear layers on {device}")

    with timer("figures"):
        layers = judge_tensors(merged, experts, coefs, gram_files, linear, device, s.sample_every)
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
    if val_files:
        report["validation"] = judge_validation(
            val_files, experts, coefs, linear, merged, device, names, timer, s.sample_every
        )
        lines += report["validation"].pop("lines")
    tmp = out_dir / "judge_report.json.tmp"  # complete or absent
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out_dir / "judge_report.json")
    print("\n".join(lines))
    print(f"done in {timer.total():.1f}s; {peak_memory(device)} -> {out_dir / 'judge_report.json'}, {picture}")
    return out_dir / "judge_report.json"


def open_validation_grams(s: JudgeSettings, experts, linear) -> list:
    """--validation-grams, one per expert, each checked against its expert as --grams are, covering the same layers."""
    if len(s.validation_grams) != len(s.models):
        raise UserError(f"--validation-grams has {len(s.validation_grams)} files for {len(s.models)} models")
    try:
        val_files = open_gram_files(experts, [str(v) for v in s.validation_grams], s.allow_gram_mismatch)
    except UserError as e:
        raise UserError(f"--validation-grams: {e}") from e
    if linear_modules(experts[0].infos, val_files) != linear:
        raise UserError("--validation-grams: the validation grams cover other linear layers than --grams")
    return val_files


def judge_validation(val_files, experts, coefs, linear, merged, device, names, timer, sample_every) -> dict:
    """The figures on each expert's validation grams (--validation-grams): per layer, the summary, and the total
    validation error (validation_total), the number --alpha auto minimizes, comparable across merged folders."""
    with timer("validation"):
        layers = judge_tensors(merged, experts, coefs, val_files, linear, device, sample_every)
    summary = error_summary(layers, names)
    total = validation_total(layers, coefs)
    lines = [
        f"validation error (on --validation-grams, summed over {len(layers)} layers): "
        f"{total['merged_relative']:.4g} of the experts' output energy (the weighted average: "
        f"{total['average_relative']:.4g})",
        *summary_lines(summary, "merged", every="--sample-every"),
    ]
    return dict(grams=[str(g.path) for g in val_files], total=total, output_errors=summary, layers=layers, lines=lines)
