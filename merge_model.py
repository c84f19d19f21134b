"""Stage 2: merge experts fine-tuned from one base into one model, by the plain average, by
RegMean (Jin et al., ICLR 2023) or by RegMean++ (Nguyen et al., arXiv 2508.03121), streaming
in bounded memory.

    python merge_model.py avg                  # code + math presets -> runs/merges/avg
    python merge_model.py regmean              # same, grams from runs/merges/{code,math}-llama3
                                               #   -> runs/merges/regmean_0.1
    python merge_model.py regmean --models toy-code toy-math --alpha 1.0   # after `python demo.py --toy`
    python merge_model.py regmean --models A B C --grams A/gram.safetensors B/gram.pkl C \
        --weights 1 1 2 --output-dir runs/merges/abc --dtype bfloat16 --overwrite
    python merge_model.py regmean++            # code + math presets on their data -> runs/merges/regmeanpp_0.1
    python merge_model.py regmean++ --models toy-code toy-math          # after `python demo.py --toy`
    python merge_model.py regmean++ --models A B --datasets a.jsonl b.jsonl --formats code math \
        --num-examples 2000 --max-length 256 --batch-size 16 --max-hidden-gb 20
    python merge_model.py --config recipe.yml --alpha 0.5    # a recipe (regmean/recipe.py); options given override it
    python merge_model.py --config runs/merges/regmean_0.1/README.md --output-dir again   # a merge made again
    python merge_model.py regmean --exclude lm_head --exclude 'down_proj$'   # averaged, not solved

For every linear layer y = x Wᵀ (W is out x in) whose input has a gram in every gram file:
    G̃ᵢ = α Gᵢ + (1 - α) diag(Gᵢ)                       (α = --alpha; 1 is plain RegMean)
    (Σᵢ cᵢ G̃ᵢ + λI) Wᵀ = Σᵢ cᵢ G̃ᵢ Wᵢᵀ + λ W_avgᵀ        (cᵢ = normalized --weights)
solved for the deviation from the weighted average W_avg by a Cholesky factorization shared
by the layers that read the same input (q/k/v, gate/up). Input directions the data never
excites keep the average: those where the eigenvalue of Σᵢ cᵢ G̃ᵢ is below the float32 rounding
floor of the grams, n · eps32 · λmax (pinv's default cutoff at float32 precision); λ is a tiny
ridge toward the average. Every other tensor (embeddings, norms, biases,
layers without grams) is the weighted mean; `avg` is the weighted mean of every tensor.

The solve is float32 Cholesky where that is accurate (its error is measured on random probes
per input), float64 Cholesky where the gram is too ill-conditioned for float32, and an
eigendecomposition where even that fails; never lstsq (whose default CPU driver truncates the
rank of ill-conditioned grams); a system singular within float32 precision always takes the
eigendecomposition. merge_report.json holds the path, ridge, cutoff, the number of input
directions left at the average (`unexcited`, also in the log), relative residual, estimated
error and time of every linear layer.

As it merges, regmean and regmean++ measure how much of each expert every linear layer keeps:
eᵢ(W) = tr((W − Wᵢ) Gᵢ (W − Wᵢ)ᵀ) / tr(Wᵢ Gᵢ Wᵢᵀ), the relative error of the layer's output on
expert i's own calibration inputs (full grams; for regmean++ the grams its solve used), for the
merged weight and for the weighted average, on every --error-sample-every-th output row (with
its sampling error). They go to merge_report.json (`output_error` of each layer, `output_errors`
per expert), merge_report.png (over depth per module kind), the model card and the log.
judge_merge.py computes the same for any merged folder.

Each expert tensor is read from its safetensors file when needed (in blocks of rows when
large), and each merged block goes straight to its place in the output shards, so memory
stays flat in depth and vocabulary. The output folder (shards + index, config, generation
config and tokenizer of the last model listed, README.md model card, merge_report.json)
appears under its final name only when complete.

RegMean++ needs no gram files: it takes the grams itself, layer by layer, on the merged model's
own activations. The merged embeddings of each expert's calibration tokens (rendered and
tokenized as compute_gram.py does) feed layer 0; for layer l, each expert's own decoder layer l
runs on the hidden states that merged layers 0..l-1 produce, the grams of its linear inputs (over
non-padding tokens) give layer l's RegMean merge (same alpha, weights and solver), and the merged
layer l moves the hidden states on. lm_head's grams come from each expert's final norm on the
merged last hidden states. One decoder layer of one expert is in memory at a time; the hidden
states (tokens x hidden per expert) stay on the device, or go to disk above --max-hidden-gb
(the log and merge_report.json say which). merge_report.json adds each layer's gram figures
(tokens, trace, mean diagonal, a condition-number bound) per expert.

Checked before the work: each gram file records a fingerprint of the expert it was computed on
(compute_gram.py), which must be the expert at its position (a swap is named; --allow-gram-mismatch
merges anyway); every --exclude pattern must match a linear layer; experts may differ in shape only
by tokens added at the end of a vocabulary (same strings at the same ids): the rows all share are
merged as above, the others are the mean of the experts that have them, and the config and tokenizer
come from the largest vocabulary. The model card ends with the resolved recipe, which --config reads.

This file is the command line and the orchestration; the RegMean math is in regmean/solver.py, the
streaming merge in regmean/merging.py, RegMean++ in regmean/regmeanpp.py, the shard writer and gram files in
regmean/tensor_io.py, recipe files in regmean/recipe.py.
"""

import argparse
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from regmean.calibration import BATCH_SIZE, MAX_LENGTH, NUM_EXAMPLES, SPLIT
from regmean.experts import (
    expert_labels,
    expert_weights,
    experts_dtype,
    linear_modules,
    linear_weight_names,
    load_experts,
    match_exclusions,
    merged_infos,
    open_gram_files,
    resolve_gram_paths,
    tied_head,
    vocab_source,
)
from regmean.layerwise import HiddenStates, check_supported, hidden_states_plan
from regmean.merge_report import SAMPLE_EVERY, draw_picture, error_summary, summary_lines
from regmean.merging import BLOCK_MB, StreamingMerge, merge_tensors, summarize, unexcited_lines, writer_dtype
from regmean.model_card import copy_side_files, gram_provenance, write_model_card
from regmean.recipe import read_recipe, recipe_of
from regmean.regmeanpp import CalibrationSettings, calibration_sets, merge_regmean_pp
from regmean.tensor_io import ShardWriter
from regmean.utils import (
    CPU_BF16_MIN_SPEEDUP,
    DTYPES,
    FORMATS,
    MERGE_METHODS,
    MERGES_DIR,
    Timer,
    UserError,
    atomic_dir,
    check_at_least_one,
    check_output_free,
    choose_device,
    choose_dtype,
    describe_dtype,
    dtype_name,
    merge_dir_name,
    peak_memory,
)
from utils import run_main


@dataclass
class MergeSettings:
    """Every setting of a merge, with its default; the command line below offers each one, and
    merge_report.json keeps them all."""

    method: str  # avg, regmean or regmean++
    models: list[str] = field(default_factory=lambda: ["code", "math"])
    grams: list[str] | None = None  # regmean: one gram file or folder per model
    weights: list[float] | None = None  # per-expert weights, normalized to sum 1
    alpha: float = 0.1  # off-diagonal scale of the grams
    datasets: list[str] | None = None  # regmean++: calibration data, one per model
    formats: list[str] | None = None  # regmean++: row format of each dataset, or one for all
    split: str = SPLIT
    num_examples: int = NUM_EXAMPLES
    max_length: int = MAX_LENGTH
    batch_size: int = BATCH_SIZE
    forward_dtype: str = "auto"  # regmean++: dtype of the forward passes and hidden states
    max_hidden_gb: float | None = None  # regmean++: hidden states above this go to disk
    output_dir: str | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"  # output dtype
    max_shard_size: str = "5GB"
    block_mb: float = BLOCK_MB
    exclude: list[str] | None = None  # regexes: linear layers whose name matches are averaged, not solved
    allow_gram_mismatch: bool = False  # merge grams whose recorded model is not the expert at their position
    config: str | None = None  # the recipe file the settings were read from (options given override it)
    error_sample_every: int = SAMPLE_EVERY  # output error figures on every Nth output row (0: none)


# The settings a method does not use: merge_report.json leaves them out rather than list values that played no part.
PP_ONLY = ("datasets", "formats", "split", "num_examples", "max_length", "batch_size", "forward_dtype", "max_hidden_gb")
UNUSED = {
    "avg": (*PP_ONLY, "grams", "alpha", "exclude", "allow_gram_mismatch", "error_sample_every"),
    "regmean": PP_ONLY,
    "regmean++": ("grams", "allow_gram_mismatch"),
}


def used_settings(s: MergeSettings) -> dict:
    """The settings of a merge that its method uses, for merge_report.json."""
    return {k: v for k, v in asdict(s).items() if k not in UNUSED[s.method]}


def parse_args(argv=None) -> MergeSettings:
    """Each setting from, first found: the options given, the --config recipe, MergeSettings' default.
    Options not given are left out of the namespace (SUPPRESS), so that they do not hide the recipe: give
    no default= below, MergeSettings holds the defaults."""
    d = MergeSettings("avg")  # the defaults, for the help
    p = argparse.ArgumentParser(
        description="Merge fine-tuned experts by plain averaging, RegMean or RegMean++, streaming.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "method",
        nargs="?",
        default=None,  # None, not SUPPRESS: argparse checks an absent positional's default against the choices
        choices=list(MERGE_METHODS),
        help="avg: weighted mean of every tensor; regmean: RegMean on linear layers, grams from files; "
        "regmean++: RegMean layer by layer, grams on the merged model's own hidden states "
        "(may come from --config instead)",
    )
    p.add_argument(
        "--config",
        help="a merge recipe (YAML: merge_method, models: [{model, grams, weight}], parameters: {alpha, exclude}, "
        "dtype; see docs/merging.md), or a merged folder's README.md: its settings; the options given override them",
    )
    p.add_argument(
        "--models",
        nargs="+",
        help="preset names, local folders or hub ids, 2 or more; config and tokenizer come from the last "
        "(or the one with the largest vocabulary) "
        f"(default: {' '.join(d.models)})",
    )
    p.add_argument(
        "--grams",
        nargs="+",
        help="one gram file or folder per model (default: each preset's gram folder)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        help="per-expert weights, normalized to sum 1 (default: equal)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help=f"off-diagonal scale of the grams; 1.0 is plain RegMean (default: {d.alpha})",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        help="regmean++: calibration data, one per model: preset names or .json/.jsonl/.parquet/.csv files "
        "or hub ids (default: each preset model's data)",
    )
    p.add_argument(
        "--formats",
        nargs="+",
        choices=sorted(FORMATS),
        help="regmean++: row format of each dataset, or one for all (default: the preset's)",
    )
    p.add_argument("--split", help=f"regmean++: split of hub datasets (default: {d.split})")
    p.add_argument(
        "--num-examples",
        type=int,
        help=f"regmean++: first N rows of each dataset, unshuffled (default: {d.num_examples})",
    )
    p.add_argument(
        "--max-length",
        type=int,
        help=f"regmean++: truncate each example to this many tokens (default: {d.max_length})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"regmean++: examples per forward pass (default: {d.batch_size})",
    )
    p.add_argument(
        "--forward-dtype",
        choices=["auto", "bfloat16", "float32"],
        help="regmean++: dtype of the forward passes and hidden states (default: bfloat16 on cuda, and on a cpu "
        f"with native bfloat16 where a timed product at the model's width runs it at least {CPU_BF16_MIN_SPEEDUP}x "
        "float32's speed; "
        "else float32)",
    )
    p.add_argument(
        "--max-hidden-gb",
        type=float,
        help="regmean++: hidden states larger than this go to disk, in the output folder while it is written "
        "(default: half the free memory of the device)",
    )
    p.add_argument(
        "--output-dir",
        help="(default: runs/merges/avg, runs/merges/regmean_{alpha} or runs/merges/regmeanpp_{alpha})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--device",
        help="auto, cuda or cpu: where the solves (and regmean++'s forward passes) run (default: auto)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        help="output dtype (default: auto, the experts' dtype; where experts differ, the widest of theirs, and "
        "float32 for bfloat16 with float16)",
    )
    p.add_argument("--max-shard-size", help=f"size of the output shards (default: {d.max_shard_size})")
    p.add_argument(
        "--block-mb",
        type=float,
        help="large tensors are merged in blocks of rows of about this many MB per expert, as float32 "
        f"(default: {d.block_mb:g})",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="regmean, regmean++: linear layers whose module name matches (re.search) are averaged instead of "
        "solved, e.g. --exclude lm_head; repeatable; a pattern matching no linear layer is an error",
    )
    p.add_argument(
        "--allow-gram-mismatch",
        action="store_true",
        help="regmean: merge even when a gram file records another model than the expert at its position "
        "(refused by default)",
    )
    p.add_argument(
        "--error-sample-every",
        type=int,
        help="the output error figures are taken on every Nth output row of each linear layer (at least 16 rows "
        f"a layer); 1: all rows (exact, slower); 0: no figures (default: {d.error_sample_every})",
    )
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    settings = read_recipe(given["config"]) if "config" in given else {}
    settings.update(given)
    if "method" not in settings:
        p.error("the method (avg, regmean or regmean++) is needed, on the command line or as merge_method in --config")
    return MergeSettings(**settings)


# ----------------------------------------------------------------------------- inputs
def check_settings(s: MergeSettings) -> list[float]:
    """Everything about the command line that can be wrong, before any file is read. Returns the
    per-expert weights."""
    weights = expert_weights(s.models, s.weights)
    if not 0.0 <= s.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {s.alpha}")
    if s.error_sample_every < 0:
        raise UserError(f"--error-sample-every must be >= 0, got {s.error_sample_every}")
    if s.block_mb <= 0:
        raise UserError(f"--block-mb must be > 0, got {s.block_mb}")
    if s.method == "regmean++" and s.grams:
        raise UserError("regmean++ computes its own grams: pass --datasets, not --grams")
    if s.method != "regmean++" and (s.datasets or s.formats):
        takes = "--grams" if s.method == "regmean" else "neither"
        raise UserError(f"--datasets and --formats are for regmean++; {s.method} takes {takes}")
    if s.method == "avg" and s.exclude:
        raise UserError("--exclude is for regmean and regmean++ (avg takes the mean of every tensor)")
    check_at_least_one(num_examples=s.num_examples, max_length=s.max_length, batch_size=s.batch_size)
    return weights


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    s = parse_args(argv)
    timer = Timer()
    pp = s.method == "regmean++"
    # Check every input before any heavy work.
    weights = check_settings(s)
    coefs = [w / sum(weights) for w in weights]
    device = choose_device(s.device)
    out_dir = Path(s.output_dir or Path(MERGES_DIR) / merge_dir_name(s.method, s.alpha))
    check_output_free(out_dir, s.overwrite)

    with timer("load"):
        experts = load_experts(s.models)
        source = vocab_source(experts)  # config and tokenizer: the last model, or the largest vocabulary
        gram_files, gram_paths, linear, calib, provenance, excluded = [], None, {}, None, [], []
        if s.method == "regmean":
            gram_paths = resolve_gram_paths(s.models, s.grams)
            gram_files = open_gram_files(experts, gram_paths, s.allow_gram_mismatch)
            linear = linear_modules(experts[0].infos, gram_files)
            provenance = [gram_provenance(g) for g in gram_files]
        elif pp:
            check_supported(experts[0].config.get("model_type"))
            calib_settings = CalibrationSettings(s.split, s.num_examples, s.max_length, s.batch_size)
            calib = calibration_sets(experts, s.datasets, s.formats, calib_settings)
            provenance = [c.provenance for c in calib]
        if s.exclude:
            candidates = list(linear) if linear else linear_weight_names(source.dir, experts[0].infos)
            excluded = match_exclusions(s.exclude, candidates)
    infos = merged_infos(experts)
    out_dtype = choose_dtype(s.dtype, device, default=experts_dtype(experts))
    plan = {name: (shape, writer_dtype(out_dtype, st_dtype)) for name, (shape, st_dtype) in infos.items()}
    what = {
        "avg": "all by the mean",
        "regmean": f"{len(linear) - len(excluded)} by RegMean",
        "regmean++": "linear layers by RegMean++",
    }[s.method]
    print(
        f"merging {len(s.models)} models ({', '.join(str(e.dir) for e in experts)}) by {s.method}: "
        f"{len(infos)} tensors, {what}, on {device}, output {dtype_name(out_dtype)} -> {out_dir}"
    )
    tied = tied_head(experts[-1])
    if tied and s.method != "avg":
        head, embedding = next(iter(tied.items()))
        print(f"{head} is tied to {embedding}: the shared matrix is merged by the mean, lm_head's gram is not used")
    if excluded:
        print(f"excluded from {s.method} (averaged), matching {s.exclude}: {', '.join(excluded)}")
    sizes = sorted({e.config.get("vocab_size") for e in experts})
    if len(sizes) > 1:
        print(f"vocabularies nest ({' < '.join(map(str, sizes))} tokens): rows only some experts have are their mean")
        print(f"config and tokenizer from {source.dir}, the largest vocabulary")
    extra_settings = {}
    if pp:
        width = experts[-1].config["hidden_size"]  # auto on the cpu times its products at this width
        forward_dtype = choose_dtype(s.forward_dtype, device, width=width)
        num_tokens = sum(c.num_tokens for c in calib)
        extra_settings = hidden_states_plan(s.max_hidden_gb, device, forward_dtype, width, num_tokens)
        spill = extra_settings["hidden_states"] == "disk"
        hidden_gib, budget = extra_settings["hidden_gib"], extra_settings["max_hidden_gb"]
        where = f"on disk (over the {budget:.3g} GiB budget)" if spill else f"on {device} (budget {budget:.3g} GiB)"
        said = describe_dtype(s.forward_dtype, forward_dtype, device, width)
        print(
            f"regmean++: {num_tokens} calibration tokens ({', '.join(str(c.num_tokens) for c in calib)}); their hidden "
            f"states ({hidden_gib:.3g} GiB, {said}) kept {where}"
        )

    with atomic_dir(out_dir, overwrite=s.overwrite) as tmp:
        writer = ShardWriter(tmp, plan, s.max_shard_size)
        averaged = frozenset(m + ".weight" for m in excluded)
        merge = StreamingMerge(
            experts, coefs, s.alpha, device, out_dtype, writer, timer, s.block_mb, averaged, s.error_sample_every
        )
        try:
            if pp:
                states = HiddenStates(device, tmp / ".hidden-states" if spill else None)
                report = merge_regmean_pp(merge, calib, forward_dtype, states)
                del states
                shutil.rmtree(tmp / ".hidden-states", ignore_errors=True)
            else:
                report = merge_tensors(merge, gram_files, linear, desc=f"merge ({s.method})")
        finally:
            writer.close()
        writer.finish()
        summary = summarize(report)
        names = expert_labels([e.spec for e in experts])
        errors = error_summary(report, names)
        error_lines = summary_lines(errors, s.method)
        if errors:
            with timer("picture"):
                draw_picture(report, names, tmp / "merge_report.png", f"{s.method} (alpha {s.alpha}) -> {out_dir.name}")
        with timer("write"):
            copy_side_files(source.dir, tmp, out_dtype)
            calibration = [c.provenance for c in calib] if pp else None
            recipe = recipe_of(
                asdict(s),
                weights,
                dtype_name(out_dtype),
                gram_paths,
                calibration,
                dtype_name(forward_dtype) if pp else None,
            )
            write_model_card(
                tmp,
                s,
                experts,
                provenance,
                coefs,
                out_dtype,
                summary,
                argv,
                source,
                recipe,
                excluded,
                error_lines,
                card=out_dir / "README.md",
            )
            total_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in plan.values())
            figures = dict(
                wall_s=round(timer.total(), 3),
                **{f"{k}_s": round(v, 3) for k, v in timer.phases.items()},
                peak_memory=peak_memory(device),
                output_bytes=total_bytes,
            )
            if pp:
                figures.update(calibration_tokens=num_tokens, seconds_per_token=timer.total() / num_tokens)
            settings = dict(
                used_settings(s),
                weights=weights,
                output_dir=str(out_dir),
                device=str(device),
                dtype=dtype_name(out_dtype),
                **extra_settings,
            )
            merge_report = dict(
                settings=settings,
                command="python merge_model.py " + " ".join(argv),
                experts=[dict(model=e.model_id, dir=str(e.dir), weight=c) for e, c in zip(experts, coefs)],
                grams=provenance,
                recipe=recipe,
                excluded=dict(patterns=s.exclude or [], modules=excluded),
                config_from=str(source.dir),
                summary=summary,
                tied=dict(tensors=tied, merged_by="mean") if tied else None,
                output_errors=errors,
                figures=figures,
                layers=report,
            )
            (tmp / "merge_report.json").write_text(json.dumps(merge_report, indent=2) + "\n")
    for line in unexcited_lines(report):
        print(line)
    if summary:
        print(f"{s.method}: {summary}")
    if error_lines:
        print("\n".join(error_lines))
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in timer.phases.items())
    rate = (
        f"{num_tokens / timer.phases.get('forward', 1e-9):.0f} calibration tokens/s in the forward passes; "
        if pp
        else ""
    )
    print(
        f"done in {timer.total():.1f}s ({phases}); {rate}{total_bytes / 2**30 / max(timer.total(), 1e-9):.2f} GiB/s "
        f"written; {peak_memory(device)} -> {out_dir}"
    )
    return out_dir


if __name__ == "__main__":
    run_main(main)
