"""Judge any merged model: how much of each expert every linear layer keeps, eᵢ(W) = tr((W − Wᵢ) Gᵢ (W − Wᵢ)ᵀ) /
tr(Wᵢ Gᵢ Wᵢᵀ) against the experts' gram files, for the merged weight and the weighted average: the same figures,
summary and picture as a RegMean merge writes, for a folder made by `merge_model.py avg`, by regmean with other
settings, or by another tool. Writes judge_report.json and .png to --output (default: the merged folder). The
experts, grams and weights default to those the folder's model card records. The command line of
regmean.judge.judge; the figures, the defaults and the checks: docs/merging.md.

    python judge_merge.py runs/demo/merges/avg  # the experts, grams and weights its model card records
    python judge_merge.py runs/merges/avg --models A B --grams A/gram.safetensors B/gram.safetensors
    python judge_merge.py MERGED --models A B C --grams gA gB gC --weights 1 1 2 --output runs/judged/x \
        --sample-every 1 --device cuda
"""

import argparse
import sys
from pathlib import Path

from regmean.judge import DEFAULT_MODELS, JudgeSettings, judge
from utils import run_main


def parse_args(argv=None) -> dict:
    """The options given ({JudgeSettings field: value}); judge() takes JudgeSettings' defaults for the others
    (SUPPRESS: give no default= below)."""
    d = JudgeSettings("")  # the defaults, for the help
    p = argparse.ArgumentParser(
        description="Output error figures of a merged model against its experts' grams.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("merged", help="the merged model folder (safetensors), or a merged LoRA adapter folder")
    p.add_argument(
        "--models",
        nargs="+",
        help="the experts (default: those the folder's model card records, else " + " ".join(DEFAULT_MODELS) + ")",
    )
    p.add_argument("--grams", nargs="+", help="one gram file or folder per model (default: the recipe's)")
    p.add_argument("--weights", nargs="+", type=float, help="the average's weights (default: the recipe's, else equal)")
    p.add_argument("--output", help="folder for judge_report.json/.png (default: the merged folder)")
    p.add_argument(
        "--sample-every",
        type=int,
        help=f"every Nth output row of a layer, at least 16 rows (1: all rows; default: {d.sample_every})",
    )
    p.add_argument("--device", help="auto, cuda or cpu (default: auto)")
    p.add_argument(
        "--validation-grams",
        nargs="+",
        help="one gram file per model (e.g. compute_gram.py --holdout's gram-holdout.safetensors): the same figures "
        "on those inputs too, and the model's total validation error (what merge_model.py --alpha auto minimizes)",
    )
    p.add_argument(
        "--allow-gram-mismatch",
        action="store_true",
        help="judge even when a gram file records another model than the expert at its position (refused by default)",
    )
    return vars(p.parse_args(argv))


def main(argv=None) -> Path:
    """Judge as the command line says; returns the path of judge_report.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return judge(**parse_args(argv), argv=argv)


if __name__ == "__main__":
    run_main(main)
