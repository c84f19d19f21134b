"""Stage 2 as one function: experts fine-tuned from one base -> a merged model folder, by the plain average,
RegMean or RegMean++, streaming in bounded memory (docs/merging.md, docs/regmeanpp.md). merge_model.py is
its command line.

    out_dir = merge("regmean", models=["code", "math"], alpha=0.1)   # grams from the presets' folders
    out_dir = merge("avg", models=[a, b], weights=[1, 2], output_dir="runs/merges/ab")
    out_dir = merge("regmean++", models=[a, b], datasets=["a.jsonl", "b.jsonl"], formats=["code", "math"])

The keywords are MergeSettings' fields, with its defaults. Every input is checked before the work; the
folder (shards, config, tokenizer, README.md model card with the recipe, merge_report.json and .png)
appears under its final name only when complete.
"""

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .adapters import is_adapter_dir
from .alpha_choice import (
    ALPHA_GRID,
    AUTO,
    HOW_TO_VALIDATE,
    alpha_summary,
    check_grid,
    choose_alphas,
    draw_alphas,
    group_curves,
    validation_row,
)
from .calibration import BATCH_SIZE, MAX_LENGTH, NUM_EXAMPLES, SPLIT
from .experts import (
    Expert,
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
from .layerwise import HiddenStates, check_supported, hidden_states_plan
from .lora_merge import check_adapter_output, write_adapter_merge
from .merge_report import SAMPLE_EVERY, draw_picture, error_summary, summary_lines
from .merging import BLOCK_MB, StreamingMerge, gram_groups, merge_tensors, summarize, unexcited_lines, writer_dtype
from .model_card import copy_side_files, gram_provenance, options_of, write_model_card
from .recipe import recipe_of
from .regmeanpp import CalibrationSet, CalibrationSettings, calibration_sets, merge_regmean_pp
from .tensor_io import GramFile, ShardWriter
from .utils import (
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
    plain_settings,
)


@dataclass
class MergeSettings:
    """Every setting of a merge, with its default; merge_model.py offers each one as an option, and
    merge_report.json keeps them all."""

    method: str  # avg, regmean or regmean++
    models: list[str] = field(default_factory=lambda: ["code", "math"])
    grams: list[str] | None = None  # regmean: one gram file or folder per model
    weights: list[float] | None = None  # per-expert weights, normalized to sum 1
    alpha: float | str = 0.1  # off-diagonal scale of the grams; auto, auto-global: chosen on validation grams
    validation_grams: list[str] | None = None  # --alpha auto: one gram file per model, the criterion's data
    alpha_grid: list[float] | None = None  # --alpha auto: the values tried (default: alpha_choice.ALPHA_GRID)
    alphas: dict[str, float] | None = None  # α per input (gram key -> α), as a recipe of an auto merge writes it
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
    config: str | None = None  # the recipe file the settings were read from (merge_model.py --config), recorded
    error_sample_every: int = SAMPLE_EVERY  # output error figures on every Nth output row (0: none)
    solve: str = "ours"  # regmean: ours (solver.RegMeanSystem) or reference (its lstsq, to reproduce its numbers)
    base: str | None = None  # the base of LoRA experts given as adapter folders (default: their config's)
    output_format: str = "dense"  # dense: a model folder; adapter: a LoRA adapter (every expert a LoRA of one base)


SOLVES = ("ours", "reference")
WHOLE_TENSORS_MB = 2.0**40  # --solve reference: each weight solved whole, as the reference did (one lstsq per layer)
REFERENCE_WARNING = (
    "warning: --solve reference is the reference's arithmetic, kept for reproduction: torch.linalg.lstsq (driver "
    "gels) in float32 on the grams as given, no ridge, no rule for unexcited directions, a float32 output; it "
    "misses ill-conditioned layers that the default solve gets (docs/merging.md). The output error figures below "
    "show what it costs."
)


# The settings a method does not use: merge_report.json leaves them out rather than list values that played no part.
PP_ONLY = ("datasets", "formats", "split", "num_examples", "max_length", "batch_size", "forward_dtype", "max_hidden_gb")
AUTO_ONLY = ("validation_grams", "alpha_grid", "alphas")
UNUSED = {
    "avg": (*PP_ONLY, *AUTO_ONLY, "grams", "alpha", "exclude", "allow_gram_mismatch", "error_sample_every", "solve"),
    "regmean": PP_ONLY,
    "regmean++": ("grams", "allow_gram_mismatch", "solve", *AUTO_ONLY),
}


def used_settings(s: MergeSettings) -> dict:
    """The settings of a merge that its method uses, for merge_report.json."""
    unused = (*UNUSED[s.method], *(k for k in AUTO_ONLY if getattr(s, k) is None))  # fixed α: no auto settings
    return {k: v for k, v in asdict(s).items() if k not in unused}


def check_settings(s: MergeSettings) -> list[float]:
    """Everything about the settings that can be wrong, before any file is read. Returns the per-expert weights."""
    weights = expert_weights(s.models, s.weights)
    check_alpha(s)
    if s.error_sample_every < 0:
        raise UserError(f"--error-sample-every must be >= 0, got {s.error_sample_every}")
    if s.block_mb <= 0:
        raise UserError(f"--block-mb must be > 0, got {s.block_mb}")
    if s.solve not in SOLVES:
        raise UserError(f"--solve must be one of {', '.join(SOLVES)}, got {s.solve!r}")
    if s.solve == "reference" and s.method != "regmean":
        raise UserError(
            f"--solve reference is for regmean (the reference's merge_model.py); {s.method} solves its own way"
        )
    if s.method == "regmean++" and s.grams:
        raise UserError("regmean++ computes its own grams: pass --datasets, not --grams")
    if s.method != "regmean++" and (s.datasets or s.formats):
        takes = "--grams" if s.method == "regmean" else "neither"
        raise UserError(f"--datasets and --formats are for regmean++; {s.method} takes {takes}")
    if s.method == "avg" and s.exclude:
        raise UserError("--exclude is for regmean and regmean++ (avg takes the mean of every tensor)")
    if s.output_format not in ("dense", "adapter"):
        raise UserError(f"--output-format must be dense or adapter, got {s.output_format!r}")
    if s.output_format == "adapter" and s.solve == "reference":
        raise UserError("--solve reference writes a dense model, as the reference did: leave out --output-format")
    if s.alpha in AUTO and (s.solve == "reference" or s.output_format == "adapter"):
        with_what = "--solve reference" if s.solve == "reference" else "--output-format adapter"
        raise UserError(f"--alpha {s.alpha} is not supported with {with_what} yet: give α as a number")
    check_at_least_one(num_examples=s.num_examples, max_length=s.max_length, batch_size=s.batch_size)
    return weights


def check_alpha(s: MergeSettings) -> None:
    """--alpha (a number, auto or auto-global), --validation-grams, --alpha-grid and a recipe's per-input alphas."""
    auto = s.alpha in AUTO
    if isinstance(s.alpha, str) and not auto:
        raise UserError(f"--alpha must be a number in [0, 1], auto or auto-global, got {s.alpha!r}")
    if not auto and not 0.0 <= s.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {s.alpha}")
    if auto and s.method != "regmean":
        raise UserError(f"--alpha {s.alpha} is for regmean (it needs gram files); {s.method} takes a number")
    if auto and s.alphas:
        raise UserError(f"--alpha {s.alpha} and a recipe's parameters.alphas (α per input) exclude each other")
    if auto and not s.validation_grams:
        raise UserError(f"--alpha {s.alpha} needs validation grams: {HOW_TO_VALIDATE}")
    if auto and len(s.validation_grams) != len(s.models):
        raise UserError(f"--validation-grams has {len(s.validation_grams)} files for {len(s.models)} models")
    if not auto and (s.validation_grams or s.alpha_grid):
        raise UserError("--validation-grams and --alpha-grid are for --alpha auto or auto-global")
    if s.alpha_grid is not None:
        check_grid(s.alpha_grid)
    if s.alphas:
        if s.method != "regmean":
            raise UserError(f"parameters.alphas (α per input) is for regmean, not {s.method}")
        bad = next(((k, a) for k, a in s.alphas.items() if not 0.0 <= a <= 1.0), None)
        if bad:
            raise UserError(f"parameters.alphas: the α of {bad[0]} must be in [0, 1], got {bad[1]}")


@dataclass
class Inputs:
    """What a merge reads, opened and checked before the work."""

    experts: list[Expert]
    source: Expert  # config and tokenizer: the last model, or the largest vocabulary
    gram_paths: list[str] | None  # regmean
    gram_files: list[GramFile]  # regmean
    linear: dict[str, int]  # regmean: the linear layers with a gram in every file
    calib: list[CalibrationSet] | None  # regmean++
    provenance: list[dict]  # per expert: where its grams come from (regmean), or its data (regmean++)
    excluded: list[str]  # linear layers averaged (--exclude)
    tied: dict[str, str] | None  # {lm_head: embedding} when the experts tie them (merged by the mean)
    val_files: list[GramFile] = field(default_factory=list)  # --alpha auto: each expert's validation grams


def open_inputs(s: MergeSettings) -> Inputs:
    """The experts, and their gram files (regmean) or calibration data (regmean++), checked against each other."""
    experts = load_experts(s.models, s.base)
    if s.output_format == "adapter":
        check_adapter_output(experts, s.method)
    source = vocab_source(experts)
    gram_files, gram_paths, linear, calib, provenance, excluded, val_files = [], None, {}, None, [], [], []
    if s.method == "regmean":
        gram_paths = resolve_gram_paths(s.models, s.grams)
        gram_files = open_gram_files(experts, gram_paths, s.allow_gram_mismatch)
        linear = linear_modules(experts[0].infos, gram_files)
        if s.alpha in AUTO:
            try:
                val_files = open_gram_files(experts, [str(v) for v in s.validation_grams], s.allow_gram_mismatch)
            except UserError as e:
                raise UserError(f"--validation-grams: {e}") from e
            if linear_modules(experts[0].infos, gram_files + val_files) != linear:
                raise UserError("--validation-grams: the validation grams cover other linear layers than --grams")
        provenance = [gram_provenance(g) for g in gram_files]
    elif s.method == "regmean++":
        check_supported(experts[0].config.get("model_type"))
        calib_settings = CalibrationSettings(s.split, s.num_examples, s.max_length, s.batch_size)
        calib = calibration_sets(experts, s.datasets, s.formats, calib_settings)
        provenance = [c.provenance for c in calib]
    if s.exclude:
        candidates = list(linear) if linear else linear_weight_names(source.dir, experts[0].infos)
        excluded = match_exclusions(s.exclude, candidates)
    tied = tied_head(experts[-1])
    return Inputs(experts, source, gram_paths, gram_files, linear, calib, provenance, excluded, tied, val_files)


def resolve_alphas(
    s: MergeSettings, inputs: Inputs, coefs: list[float], timer, device
) -> tuple[dict | None, dict | None]:
    """The α of each solved input: None (one α for all), chosen on validation grams (--alpha auto, auto-global),
    or a recipe's parameters.alphas, checked to name every solved input. Returns (alphas, the choice for the
    report: mode, grid, per input criterion)."""
    if s.method != "regmean" or not (s.alpha in AUTO or s.alphas):
        return None, None
    solved = {m: n for m, n in inputs.linear.items() if m not in inputs.excluded}
    groups = gram_groups(inputs.gram_files, solved)
    keys = [k[0] for k in groups]
    if s.alphas:
        missing = [k for k in keys if k not in s.alphas]
        extra = [k for k in s.alphas if k not in keys]
        if missing or extra:
            what = f"has no α for {missing[0]}" if missing else f"names {extra[0]}, which is no solved input"
            raise UserError(f"parameters.alphas {what} (α per input, keyed by the input's first linear layer)")
        return dict(s.alphas), None
    grid = check_grid(s.alpha_grid or ALPHA_GRID)
    with timer("alpha"):
        curves = group_curves(inputs.experts, coefs, inputs.gram_files, inputs.val_files, groups, grid, device=device)
    alphas = choose_alphas(curves, coefs, grid, s.alpha)
    return alphas, dict(mode=s.alpha, grid=grid, curves=curves)


def print_plan(s: MergeSettings, inputs: Inputs, tensors: int, device, out_dtype, out_dir: Path) -> None:
    """The log's first lines: what is merged how, ties, exclusions, nested vocabularies."""
    experts = inputs.experts
    what = {
        "avg": "all by the mean",
        "regmean": f"{len(inputs.linear) - len(inputs.excluded)} by RegMean",
        "regmean++": "linear layers by RegMean++",
    }[s.method]
    print(
        f"merging {len(s.models)} models ({', '.join(str(e.dir) for e in experts)}) by {s.method}: "
        f"{tensors} tensors, {what}, on {device}, output {dtype_name(out_dtype)} -> {out_dir}"
    )
    if inputs.tied and s.method != "avg":
        head, embedding = next(iter(inputs.tied.items()))
        print(f"{head} is tied to {embedding}: the shared matrix is merged by the mean, lm_head's gram is not used")
    if s.method == "regmean":
        print(gram_reads(s))
    if inputs.excluded:
        print(f"excluded from {s.method} (averaged), matching {s.exclude}: {', '.join(inputs.excluded)}")
    sizes = sorted({e.config.get("vocab_size") for e in experts})
    if len(sizes) > 1:
        print(f"vocabularies nest ({' < '.join(map(str, sizes))} tokens): rows only some experts have are their mean")
        print(f"config and tokenizer from {inputs.source.dir}, the largest vocabulary")


def gram_reads(s: MergeSettings) -> str:
    """The log line on how the grams are held and read (docs/merging.md#memory)."""
    if s.solve == "reference":
        return "grams: the N grams of an input held at once (--solve reference, as the reference did)"
    figures = "the output error figures read each gram again" if s.error_sample_every else "each read once"
    auto = (
        f"; --alpha {s.alpha}'s validation criterion holds an input's N fit and N validation grams at once"
        if s.alpha in AUTO
        else ""
    )
    return f"grams: one expert's at a time (memory independent of the number of experts), {figures}{auto}"


def plan_hidden_states(s: MergeSettings, inputs: Inputs, device) -> tuple[torch.dtype, int, dict]:
    """regmean++: the dtype of its forward passes, its calibration tokens and where their hidden states are kept
    (the settings merge_report.json adds)."""
    width = inputs.experts[-1].config["hidden_size"]  # auto on the cpu times its products at this width
    forward_dtype = choose_dtype(s.forward_dtype, device, width=width)
    num_tokens = sum(c.num_tokens for c in inputs.calib)
    plan = hidden_states_plan(s.max_hidden_gb, device, forward_dtype, width, num_tokens)
    budget = plan["max_hidden_gb"]
    spill = plan["hidden_states"] == "disk"
    where = f"on disk (over the {budget:.3g} GiB budget)" if spill else f"on {device} (budget {budget:.3g} GiB)"
    said = describe_dtype(s.forward_dtype, forward_dtype, device, width)
    print(
        f"regmean++: {num_tokens} calibration tokens ({', '.join(str(c.num_tokens) for c in inputs.calib)}); their "
        f"hidden states ({plan['hidden_gib']:.3g} GiB, {said}) kept {where}"
    )
    return forward_dtype, num_tokens, plan


def merge(method: str, *, argv: list[str] | None = None, **settings) -> Path:
    """Merge by `method` (avg, regmean or regmean++) with `settings`, any of MergeSettings' fields (models,
    grams, weights, alpha, ...; its defaults for the others). argv: the merge_model.py command line the settings
    came from, for the model card and merge_report.json (default: the options that give these settings).
    Returns the merged folder."""
    s = MergeSettings(method, **plain_settings(settings))
    # a recipe's per-input alphas have no option: its recipe (the card's, merge_report.json's) remakes them
    argv = options_of(replace(s, alphas=None), repeated=("exclude",)) if argv is None else argv
    if s.base:  # adapters in mergekit's BASE+ADAPTER form: the recipe then names their base
        s.models = [f"{s.base}+{m}" if is_adapter_dir(m) else m for m in s.models]
    timer = Timer()
    pp = s.method == "regmean++"
    # Check every input before any heavy work.
    weights = check_settings(s)
    coefs = [w / sum(weights) for w in weights]
    device = choose_device(s.device)
    out_dir = Path(s.output_dir or Path(MERGES_DIR) / merge_dir_name(s.method, "per-layer" if s.alphas else s.alpha))
    check_output_free(out_dir, s.overwrite)
    with timer("load"):
        inputs = open_inputs(s)
    experts, calib, excluded = inputs.experts, inputs.calib, inputs.excluded
    infos = merged_infos(experts)
    reference = s.solve == "reference"  # the reference saved its merge in float32
    out_dtype = choose_dtype(s.dtype, device, default=torch.float32 if reference else experts_dtype(experts))
    plan = {name: (shape, writer_dtype(out_dtype, st_dtype)) for name, (shape, st_dtype) in infos.items()}
    if s.output_format == "adapter":
        return write_adapter_merge(s, inputs.experts, coefs, weights, inputs, device, out_dir, argv, timer)
    print_plan(s, inputs, len(infos), device, out_dtype, out_dir)
    if reference:
        print(REFERENCE_WARNING, file=sys.stderr)
    forward_dtype, num_tokens, extra_settings = plan_hidden_states(s, inputs, device) if pp else (None, 0, {})
    alphas, choice = resolve_alphas(s, inputs, coefs, timer, device)
    alpha_lines = alpha_summary(alphas, s.alpha if choice else "recipe") if alphas else []
    for line in alpha_lines:
        print(line)

    with atomic_dir(out_dir, overwrite=s.overwrite) as tmp:
        writer = ShardWriter(tmp, plan, s.max_shard_size)
        averaged = frozenset(m + ".weight" for m in excluded)
        block_mb = WHOLE_TENSORS_MB if reference else s.block_mb
        streaming = StreamingMerge(
            experts,
            coefs,
            s.alpha if alphas is None else None,
            device,
            out_dtype,
            writer,
            timer,
            block_mb,
            averaged,
            s.error_sample_every,
            s.solve,
            alphas,
        )
        try:
            if pp:
                spill = extra_settings["hidden_states"] == "disk"
                states = HiddenStates(device, tmp / ".hidden-states" if spill else None)
                report = merge_regmean_pp(streaming, calib, forward_dtype, states)
                del states
                shutil.rmtree(tmp / ".hidden-states", ignore_errors=True)
            else:
                report = merge_tensors(streaming, inputs.gram_files, inputs.linear, desc=f"merge ({s.method})")
        finally:
            writer.close()
        writer.finish()
        summary = summarize(report)
        if choice and s.alpha == "auto":
            with timer("picture"):
                draw_alphas(
                    alphas, choice["grid"], tmp / "merge_report_alpha.png", f"α chosen per input -> {out_dir.name}"
                )
        if choice:
            for row in report:
                curve = choice["curves"].get(row["gram"])
                row["validation"] = validation_row(curve, coefs, choice["grid"], row["alpha"])
        names = expert_labels([e.spec for e in experts])
        errors = error_summary(report, names)
        error_lines = summary_lines(errors, s.method)
        if errors:
            with timer("picture"):
                draw_picture(report, names, tmp / "merge_report.png", f"{s.method} (alpha {s.alpha}) -> {out_dir.name}")
        with timer("write"):
            copy_side_files(inputs.source.dir, tmp, out_dtype)
            calibration = [c.provenance for c in calib] if pp else None
            forward = dtype_name(forward_dtype) if pp else None
            resolved = dict(asdict(s), alpha=alphas[next(iter(alphas))] if s.alpha == "auto-global" else s.alpha)
            if s.alpha == "auto" or s.alphas:
                resolved["alphas"] = alphas
            recipe = recipe_of(resolved, weights, dtype_name(out_dtype), inputs.gram_paths, calibration, forward)
            write_model_card(
                tmp,
                s,
                experts,
                inputs.provenance,
                coefs,
                out_dtype,
                summary,
                argv,
                inputs.source,
                recipe,
                excluded,
                [*alpha_lines, *([""] if alpha_lines else []), *error_lines],
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
            merge_report = dict(
                settings=dict(
                    used_settings(s),
                    weights=weights,
                    output_dir=str(out_dir),
                    device=str(device),
                    dtype=dtype_name(out_dtype),
                    **extra_settings,
                ),
                command="python merge_model.py " + " ".join(argv),
                experts=[dict(model=e.model_id, dir=str(e.dir), weight=c) for e, c in zip(experts, coefs)],
                grams=inputs.provenance,
                alpha_choice=None
                if not choice
                else dict(
                    mode=choice["mode"],
                    grid=choice["grid"],
                    validation_grams=[gram_provenance(v) for v in inputs.val_files],
                    alphas=alphas,
                ),
                recipe=recipe,
                excluded=dict(patterns=s.exclude or [], modules=excluded),
                config_from=str(inputs.source.dir),
                summary=summary,
                tied=dict(tensors=inputs.tied, merged_by="mean") if inputs.tied else None,
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
