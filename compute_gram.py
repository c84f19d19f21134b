r"""Stage 1: an expert and its calibration data -> gram.safetensors, the inner products XᵀX / n of the input
of every linear layer (lm_head included) over non-padding tokens: the first --num-examples rows, unshuffled,
rendered with the model's chat template. The work is regmean.grams.compute_grams; what it computes, the
plans, checkpoints and the file: docs/grams.md; several processes (data parallel): docs/scale-out.md.

    python compute_gram.py code        # rombos Replete-Coder on code_bagel_hermes-2.5
    python compute_gram.py math        # MAmmoTH2-8B on WebInstructSub
    python compute_gram.py toy-code    # the demo's toy expert (after `python demo.py --toy`)
    python compute_gram.py code --model DIR --dataset rows.jsonl --num-examples 500 \
        --output-dir runs/grams/mine --checkpoint-every 20
    python compute_gram.py --model DIR --dataset rows.jsonl --format code   # your own expert, no preset
    python compute_gram.py --model BASE+ADAPTER --dataset rows.jsonl --format code   # a LoRA adapter, applied
    python compute_gram.py code --holdout 0.1  # every 10th row -> gram-holdout.safetensors (validation grams)
    python compute_gram.py code --plan layers  # one decoder layer at a time (auto: when the model does not fit)
    python compute_gram.py code --rows reference   # the reference's rows and running mean, to reproduce its grams
    accelerate launch --multi_gpu --num_processes 8 compute_gram.py code   # 8 GPUs, data parallel
    accelerate launch --multi_gpu --num_processes 2 compute_gram.py code --device-map auto  # 2 copies, half the GPUs
    accelerate launch --multi_gpu --num_processes 2 compute_gram.py toy-code --device cpu     # 2 cpu processes (gloo)
"""

import argparse
from pathlib import Path

from regmean.calibration import BATCH_SIZE, MAX_LENGTH, NUM_EXAMPLES, ROWS, SPLIT
from regmean.grams import CHECKPOINT_EVERY, DEVICE, DTYPE, PLAN, PLANS, ROW_RULE, compute_grams
from regmean.utils import CPU_BF16_MIN_SPEEDUP, FORMATS, PRESETS, UserError
from utils import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("the expert and its calibration data")
    what.add_argument(
        "preset",
        nargs="?",
        choices=sorted(PRESETS),
        help="expert + calibration data preset (optional when --model, --dataset and --format are all given)",
    )
    what.add_argument(
        "--model",
        help="hub id or local folder, or a LoRA adapter folder or BASE+ADAPTER (the base with the adapter "
        "applied) (default: the preset's)",
    )
    what.add_argument("--base", help="the base of a LoRA adapter --model (default: its base_model_name_or_path)")
    what.add_argument("--dataset", help="hub id or a .json/.jsonl/.parquet/.csv file (default: the preset's)")
    what.add_argument("--format", choices=sorted(FORMATS), help="row columns -> chat turns (default: the preset's)")
    what.add_argument("--split", default=SPLIT, help="dataset split (hub datasets) (default: %(default)s)")
    what.add_argument(
        "--num-examples", type=int, default=NUM_EXAMPLES, help="first N rows, unshuffled (default: %(default)s)"
    )
    what.add_argument(
        "--max-length", type=int, default=MAX_LENGTH, help="each example cut to this many tokens (default: %(default)s)"
    )
    what.add_argument(
        "--rows",
        default=ROW_RULE,
        choices=ROWS,
        help="ours: one BOS per row, batches of similar length, padding left out; reference: as the reference's "
        "compute_gram.py made them, to reproduce its grams (special tokens added to the template's text, batches "
        "in file order padded on the tokenizer's side, padding counted, a float32 running mean; --plan model, one "
        "process) (default: %(default)s)",
    )
    what.add_argument(
        "--output-dir", help="folder for gram.safetensors (default: the preset's, else runs/grams/MODEL_FOLDER_NAME)"
    )
    how = p.add_argument_group("how it runs")
    how.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="examples per forward pass (default: %(default)s)"
    )
    how.add_argument(
        "--plan",
        default=PLAN,
        choices=PLANS,
        help="model: the whole expert on the device; layers: one decoder layer at a time on stored hidden states "
        "(memory of one layer, whatever the depth); auto: the whole model when its weights, grams and one "
        "batch fit the device's free memory, else layers (default: %(default)s)",
    )
    how.add_argument(
        "--max-hidden-gb",
        type=float,
        help="--plan layers: hidden states above this many GiB leave the device for host memory (cuda), "
        "else disk (default: half the free memory)",
    )
    how.add_argument(
        "--checkpoint-every",
        type=int,
        default=CHECKPOINT_EVERY,
        help="save partial sums every K batches; --plan layers: each finished layer (0: never) (default: %(default)s)",
    )
    how.add_argument(
        "--device",
        default=DEVICE,
        help="auto, cuda, cuda:N or cpu (several processes on cuda: cuda:LOCAL_RANK each) (default: %(default)s)",
    )
    how.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread the expert over the visible GPUs (accelerate big-model loading; with several processes, "
        "each takes GPUs // processes-per-node of them); cuda only, ignored on cpu",
    )
    how.add_argument(
        "--dtype",
        default=DTYPE,
        choices=["auto", "bfloat16", "float32"],
        help="dtype of the forward passes; the grams are float32 sums whatever it is (auto: bfloat16 on cuda, and on "
        "a cpu with native bfloat16 (avx512_bf16 or AMX) where a timed product at the model's width runs it at least "
        f"{CPU_BF16_MIN_SPEEDUP}x float32's speed; else float32) (default: %(default)s)",
    )
    what.add_argument(
        "--holdout",
        type=float,
        metavar="F",
        help="every round(1/F)-th row (F in (0, 1)) goes to a second gram file, OUTPUT_DIR/gram-holdout.safetensors: "
        "validation grams for merge_model.py --alpha auto (default: none, every row in gram.safetensors)",
    )
    args = p.parse_args(argv)
    if args.preset is None:
        missing = [flag for flag in ("model", "dataset", "format") if getattr(args, flag) is None]
        if missing:
            raise UserError(
                f"give a preset ({', '.join(sorted(PRESETS))}) or your own expert with --model DIR --dataset FILE "
                f"--format {{{','.join(sorted(FORMATS))}}} (missing: {', '.join('--' + m for m in missing)})"
            )
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    preset = PRESETS.get(args.preset, {})  # what --model, --dataset, --format and --output-dir leave out
    model = args.model or preset["model"]
    return compute_grams(
        model,
        args.dataset or preset["dataset"],
        args.format or preset["format"],
        args.output_dir or preset.get("gram_dir") or Path("runs/grams") / Path(model).name,
        split=args.split,
        num_examples=args.num_examples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        plan=args.plan,
        device_map=args.device_map,
        checkpoint_every=args.checkpoint_every,
        max_hidden_gb=args.max_hidden_gb,
        rows=args.rows,
        base=args.base,
        holdout=args.holdout,
    )


if __name__ == "__main__":
    run_main(main)
