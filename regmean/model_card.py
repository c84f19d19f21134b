"""The merged folder's side files, besides the weights: the model card (README.md) and the config and tokenizer
files of the expert they come from, plus where each gram file comes from (for the card and the report).

    copy_side_files(source.dir, out_dir, out_dtype)
    write_model_card(out_dir, settings, experts, provenance, coefs, out_dtype, summary, argv, source, recipe, excluded)
    argv = options_of(settings, repeated=("exclude",))   # the command line of a merge run from Python
"""

import json
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from .recipe import card_section
from .tensor_io import GramFile
from .utils import MERGE_METHODS, dtype_name

# Files copied from the last model listed (the seed saved its merge into the math model).
COPIED_FILES = [
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template*",
]


def gram_provenance(grams: GramFile) -> dict:
    """Where a gram file comes from, for the model card and the report."""
    keep = (
        "model",
        "dataset",
        "split",
        "num_examples",
        "max_length",
        "row_format",
        "bos",  # calibration.tokenize_texts: one BOS per row
        "rows",  # "reference": compute_gram.py --rows reference, the reference's rows and running mean
        "padding",
        "num_tokens",
        "format",
        "model_fingerprint",
    )
    return dict(file=str(grams.path), **{k: grams.metadata[k] for k in keep if k in grams.metadata})


def write_model_card(
    out_dir, s, experts, provenance, coefs, out_dtype, summary, argv, source, recipe, excluded, errors=(), card=None
):
    """provenance: per expert, where its grams come from (a gram file's, or regmean++'s data); or [].
    source: the expert the config and tokenizer come from; excluded: linear layers averaged (--exclude);
    errors: the output error summary's lines; card: the card's final path, as the user names it
    (out_dir is where it is written, a temporary folder)."""
    tags = {"avg": [], "regmean": ["regmean"], "regmean++": ["regmean", "regmean-plus-plus"]}[s.method]
    grew = len({e.config.get("vocab_size") for e in experts}) > 1
    lines = [
        "---",
        "base_model:",
        *[f"- {e.model_id}" for e in experts],
        "tags:",
        "- merge",
        *[f"- {t}" for t in tags],
        "library_name: transformers",
        "---",
        "",
        f"# {MERGE_METHODS[s.method][1]} merge of {len(experts)} experts",
        "",
    ]
    solve = (
        "(Σ cᵢ G̃ᵢ + λI) Wᵀ = Σ cᵢ G̃ᵢ Wᵢᵀ + λ W_avgᵀ with G̃ᵢ = α Gᵢ + (1 - α) diag(Gᵢ); "
        "every other tensor is the weighted mean."
    )
    if s.method == "regmean":
        lines += [
            f"Method: RegMean (Jin et al., ICLR 2023) with alpha = {s.alpha}: each linear layer solves " + solve,
            "",
        ]
        if getattr(s, "solve", "ours") == "reference":
            lines += [
                "Solve: the reference's arithmetic, kept for reproduction (merge_model.py --solve reference): "
                "torch.linalg.lstsq (driver gels) in float32 on the grams as given, no ridge (λ = 0), no rule for "
                "unexcited directions.",
                "",
            ]
    elif s.method == "regmean++":
        lines += [
            f"Method: RegMean++ (Nguyen et al., arXiv 2508.03121) with alpha = {s.alpha}: layer by layer, the gram Gᵢ "
            "of a linear layer is taken on expert i's own layer run on the merged model's hidden states (the merged "
            "layers before it, on expert i's calibration data); each linear layer then solves " + solve,
            "",
        ]
    else:
        lines += ["Method: the weighted mean of every tensor.", ""]
    lines += [
        f"| expert | weight | {'calibration data' if s.method == 'regmean++' else 'gram'} |",
        "| --- | --- | --- |",
    ]
    for i, (e, c) in enumerate(zip(experts, coefs)):
        gram = "-" if not provenance else ", ".join(f"{k}: {v}" for k, v in provenance[i].items())
        lines.append(f"| {e.model_id} | {c:.4g} | {gram} |")
    lines += [
        "",
        f"Output dtype: {dtype_name(out_dtype)}. Config, generation config and tokenizer from {source.model_id}"
        + (" (the largest vocabulary; tokens only some experts have come from those)." if grew else "."),
        "",
    ]
    if summary:
        lines += [f"Solver: {summary}", ""]
    if errors:
        lines += [
            *errors,
            "",
            "The figures of every layer are in merge_report.json, over depth in merge_report.png.",
            "",
        ]
    if excluded:
        patterns = ", ".join(f"`{p}`" for p in s.exclude)
        lines += [
            f"Excluded from {s.method} (the weighted mean instead), matching {patterns}: {', '.join(excluded)}.",
            "",
        ]
    lines += card_section(recipe, card or out_dir / "README.md")
    lines += [
        "Command:",
        "",
        "```",
        "python merge_model.py " + " ".join(argv),
        "```",
        "",
        "Details per layer are in merge_report.json.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def copy_side_files(src_dir: Path, out_dir: Path, out_dtype: torch.dtype) -> None:
    """config.json (its dtype set to the output's) and the tokenizer files of src_dir (the last model listed, or
    the one with the largest vocabulary)."""
    config = json.loads((src_dir / "config.json").read_text())
    name = dtype_name(out_dtype)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for pattern in COPIED_FILES:
        for f in src_dir.glob(pattern):
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)


def options_of(settings, repeated: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives these settings (a dataclass: MergeSettings, JudgeSettings), for the card and
    the report of a run started from Python: the first field as the positional argument, then an option for each
    field not at its default (--alpha 1.0, --models A B, --overwrite); those in `repeated` once per value
    (--exclude A --exclude B)."""
    first, *rest = fields(settings)
    argv = [str(getattr(settings, first.name))]
    for f in rest:
        value = getattr(settings, f.name)
        default = f.default_factory() if f.default is MISSING else f.default
        option = "--" + f.name.replace("_", "-")
        if value is None or value is False or value == default:
            continue
        if value is True:
            argv.append(option)
        elif f.name in repeated:
            argv += [word for v in value for word in (option, str(v))]
        elif isinstance(value, list):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return argv
