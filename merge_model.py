"""Stage 2: merge experts fine-tuned from one base into one model, by the plain average, by RegMean (Jin et al.,
ICLR 2023) or by RegMean++ (Nguyen et al., arXiv 2508.03121), streaming in bounded memory, into a folder with the
weights, config, tokenizer, a model card ending in the merge's recipe (which --config reads) and merge_report.json
and .png (solver figures, how much of each expert every linear layer keeps). The command line of
regmean.merge.merge; what it computes, checks and writes: docs/merging.md and docs/regmeanpp.md.

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
    python merge_model.py regmean --solve reference   # the reference's own lstsq, to reproduce its numbers
    python merge_model.py regmean --models lora/a BASE+lora/b --grams ga gb --output-format adapter  # LoRA in and out
    python merge_model.py regmean --models A B --grams gA gB --alpha auto --validation-grams vA vB   # α per input
"""

import argparse
import sys
from pathlib import Path

from regmean.alpha_choice import ALPHA_GRID, AUTO
from regmean.merge import MergeSettings, merge
from regmean.recipe import read_recipe
from regmean.utils import CPU_BF16_MIN_SPEEDUP, DTYPES, FORMATS, MERGE_METHODS
from utils import run_main


def alpha_value(text: str) -> float | str:
    """--alpha: a number, or auto / auto-global."""
    if text in AUTO:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number in [0, 1], auto or auto-global, not {text!r}") from None


def parse_args(argv=None) -> dict:
    """The merge's settings ({MergeSettings field: value}), each from, first found: the options given, the --config
    recipe, MergeSettings' default (merge() fills those in). Options not given are left out of the namespace
    (SUPPRESS), so that they do not hide the recipe: give no default= below."""
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

    experts = p.add_argument_group("experts")
    experts.add_argument(
        "--models",
        nargs="+",
        help="preset names, local folders or hub ids, 2 or more; config and tokenizer come from the last "
        f"(or the one with the largest vocabulary) (default: {' '.join(d.models)})",
    )
    experts.add_argument(
        "--grams", nargs="+", help="one gram file or folder per model (default: each preset's gram folder)"
    )
    experts.add_argument(
        "--base",
        help="the base model of LoRA experts given as adapter folders (default: each adapter's "
        "base_model_name_or_path); an expert may also be given as BASE+ADAPTER",
    )
    experts.add_argument(
        "--weights", nargs="+", type=float, help="per-expert weights, normalized to sum 1 (default: equal)"
    )

    solve = p.add_argument_group("regmean and regmean++")
    solve.add_argument(
        "--alpha",
        type=alpha_value,
        help="off-diagonal scale of the grams; 1.0 is plain RegMean; regmean: auto chooses it per input, auto-global "
        f"one for the whole model, on --validation-grams (default: {d.alpha})",
    )
    solve.add_argument(
        "--validation-grams",
        nargs="+",
        help="regmean --alpha auto: one gram file or folder per model, in the models' order (e.g. the held-out grams "
        "of compute_gram.py --holdout), on which α is chosen",
    )
    solve.add_argument(
        "--alpha-grid",
        nargs="+",
        type=float,
        help=f"regmean --alpha auto: the values tried, in [0, 1] (default: {' '.join(map(str, ALPHA_GRID))})",
    )
    solve.add_argument(
        "--solve",
        choices=["ours", "reference"],
        help="regmean: ours (Cholesky with float64 and eigendecomposition fallbacks, unexcited directions kept at "
        "the average); reference: the reference's torch.linalg.lstsq (driver gels) in float32 with a float32 "
        f"output, kept to reproduce its numbers (docs/merging.md) (default: {d.solve})",
    )
    solve.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="regmean, regmean++: linear layers whose module name matches (re.search) are averaged instead of "
        "solved, e.g. --exclude lm_head; repeatable; a pattern matching no linear layer is an error",
    )
    solve.add_argument(
        "--allow-gram-mismatch",
        action="store_true",
        help="regmean: merge even when a gram file records another model than the expert at its position "
        "(refused by default)",
    )
    solve.add_argument(
        "--error-sample-every",
        type=int,
        help="the output error figures are taken on every Nth output row of each linear layer (at least 16 rows "
        f"a layer); 1: all rows (exact, slower); 0: no figures (default: {d.error_sample_every})",
    )

    pp = p.add_argument_group("regmean++: calibration data and forward passes")
    pp.add_argument(
        "--datasets",
        nargs="+",
        help="regmean++: calibration data, one per model: preset names or .json/.jsonl/.parquet/.csv files "
        "or hub ids (default: each preset model's data)",
    )
    pp.add_argument(
        "--formats",
        nargs="+",
        choices=sorted(FORMATS),
        help="regmean++: row format of each dataset, or one for all (default: the preset's)",
    )
    pp.add_argument("--split", help=f"regmean++: split of hub datasets (default: {d.split})")
    pp.add_argument(
        "--num-examples",
        type=int,
        help=f"regmean++: first N rows of each dataset, unshuffled (default: {d.num_examples})",
    )
    pp.add_argument(
        "--max-length",
        type=int,
        help=f"regmean++: truncate each example to this many tokens (default: {d.max_length})",
    )
    pp.add_argument("--batch-size", type=int, help=f"regmean++: examples per forward pass (default: {d.batch_size})")
    pp.add_argument(
        "--forward-dtype",
        choices=["auto", "bfloat16", "float32"],
        help="regmean++: dtype of the forward passes and hidden states (default: bfloat16 on cuda, and on a cpu "
        f"with native bfloat16 where a timed product at the model's width runs it at least {CPU_BF16_MIN_SPEEDUP}x "
        "float32's speed; else float32)",
    )
    pp.add_argument(
        "--max-hidden-gb",
        type=float,
        help="regmean++: hidden states larger than this go to disk, in the output folder while it is written "
        "(default: half the free memory of the device)",
    )

    out = p.add_argument_group("output and run")
    out.add_argument(
        "--output-dir", help="(default: runs/merges/avg, runs/merges/regmean_{alpha} or runs/merges/regmeanpp_{alpha})"
    )
    out.add_argument(
        "--output-format",
        choices=["dense", "adapter"],
        help="dense: a model folder; adapter: a PEFT LoRA adapter of rank the sum of the experts' ranks, the exact "
        "merge, when every expert is a LoRA adapter of one base (default: dense)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    out.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        help="output dtype (default: auto, the experts' dtype; where experts differ, the widest of theirs, and "
        "float32 for bfloat16 with float16)",
    )
    out.add_argument("--max-shard-size", help=f"size of the output shards (default: {d.max_shard_size})")
    out.add_argument(
        "--device", help="auto, cuda or cpu: where the solves (and regmean++'s forward passes) run (default: auto)"
    )
    out.add_argument(
        "--block-mb",
        type=float,
        help="large tensors are merged in blocks of rows of about this many MB per expert, as float32 "
        f"(default: {d.block_mb:g})",
    )

    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    settings = read_recipe(given["config"]) if "config" in given else {}
    settings.update(given)
    if "method" not in settings:
        p.error("the method (avg, regmean or regmean++) is needed, on the command line or as merge_method in --config")
    return settings


def main(argv=None) -> Path:
    """Merge as the command line says; returns the merged folder."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return merge(**parse_args(argv), argv=argv)


if __name__ == "__main__":
    run_main(main)
