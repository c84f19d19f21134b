"""Judge any merged model: how much of each expert every linear layer keeps, against the experts'
gram files. The same figures, summary and picture as a RegMean merge writes, for a folder made by
`merge_model.py avg`, by regmean with other settings, or by another tool.

    python judge_merge.py runs/merges/avg      # code + math presets, grams from their preset folders
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
The math is in regmean.py, the loop over tensors in merging.py, the figures and the picture in
merge_report.py.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from merge_report import SAMPLE_EVERY, draw_picture, error_summary, summary_lines
from merging import expert_labels, expert_weights, judge_tensors, linear_modules, load_experts, resolve_gram_paths
from tensor_io import GramFile, checkpoint_files, tensor_infos
from utils import Timer, UserError, choose_device, peak_memory, run_main


@dataclass
class JudgeSettings:
    merged: str  # the merged model folder
    models: list[str] = field(default_factory=lambda: ["code", "math"])
    grams: list[str] | None = None  # one gram file or folder per model (default: each preset's gram folder)
    weights: list[float] | None = None  # the experts' weights for the average, normalized (default: equal)
    output: str | None = None  # where judge_report.json and .png go (default: the merged folder)
    sample_every: int = SAMPLE_EVERY  # figures on every Nth output row of a layer (1: all rows)
    device: str = "auto"


def parse_args(argv=None) -> JudgeSettings:
    d = JudgeSettings("")
    p = argparse.ArgumentParser(description="Output error figures of a merged model against its experts' grams.")
    p.add_argument("merged", help="the merged model folder (safetensors)")
    p.add_argument("--models", nargs="+", default=d.models, help=f"the experts (default: {' '.join(d.models)})")
    p.add_argument("--grams", nargs="+", default=d.grams, help="one gram file or folder per model")
    p.add_argument("--weights", nargs="+", type=float, default=d.weights, help="the average's weights (default: equal)")
    p.add_argument("--output", default=d.output, help="folder for judge_report.json/.png (default: the merged folder)")
    p.add_argument(
        "--sample-every",
        type=int,
        default=d.sample_every,
        help=f"every Nth output row of a layer, at least 16 rows (1: all rows; default: {d.sample_every})",
    )
    p.add_argument("--device", default=d.device, help="auto, cuda or cpu (default: auto)")
    return JudgeSettings(**vars(p.parse_args(argv)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    s = parse_args(argv)
    timer = Timer()
    # Every input checked before the work starts.
    merged_dir = Path(s.merged)
    if not merged_dir.is_dir():
        raise UserError(f"{merged_dir} is not a folder")
    weights = expert_weights(s.models, s.weights)
    if s.sample_every < 1:
        raise UserError(f"--sample-every must be >= 1, got {s.sample_every}")
    coefs = [w / sum(weights) for w in weights]
    gram_paths = resolve_gram_paths(s.models, s.grams)
    out_dir = Path(s.output) if s.output else merged_dir
    device = choose_device(s.device)
    with timer("load"):
        experts = load_experts(s.models)
        gram_files = [GramFile(p) for p in gram_paths]
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
    lines = summary_lines(summary, "merged")
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
