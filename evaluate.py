"""Stage 3: lm_eval on merged model folders and on the experts their model cards record (and the base, --base),
then the table of their scores, raw and as a percentage of the best expert's on each task (results.md,
results.png, in the folders' common parent or --output). Each folder gets the reference's lm_eval command below
(vLLM when installed and on CUDA, else lm-eval's hf backend; add_bos_token=False as the reference's harness had
it) with the tasks of lm-eval-harness/ included, once: a folder holding results of a task (at this --limit) is not
run on it again (--rerun). Arguments evaluate.py does not know, after the folders, go to lm_eval unchanged.
HumanEval and MBPP execute model-written code. The options, the table and what runs offline: docs/evaluation.md.

    python evaluate.py runs/merges/avg runs/merges/regmean_0.1     # lm_eval on the experts and each folder, the table
    python evaluate.py runs/merges/regmean_0.1 --tasks gsm8k --limit 100 --batch_size auto
    python evaluate.py --table runs/merges/avg runs/merges/regmean_0.1    # the table only
    python evaluate.py --table runs/demo/merges/*     # after `make demo`: -> runs/demo/merges/results.md
    python evaluate.py runs/merges/avg --base runs/models/base --no-experts   # the base and the merge only
    HF_HUB_OFFLINE=1 python evaluate.py runs/models/SmolLM2-135M-Instruct --tasks humaneval_instruct   # offline

    HF_ALLOW_CODE_EVAL=1 lm_eval --model vllm \\
        --model_args pretrained=DIR,tensor_parallel_size=1,dtype=bfloat16,add_bos_token=False \\
        --tasks mathqa,gsm8k,humaneval_instruct,mbpp --output_path DIR/lm_eval_results_preds \\
        --log_samples --trust_remote_code --confirm_run_unsafe_code --include_path lm-eval-harness
"""

import argparse
import resource
import time
from pathlib import Path

from regmean.evaluation import ADD_BOS_TOKEN, SEED_TASKS, Evaluation, evaluate, recorded_experts
from regmean.results import results_table, table_dir
from regmean.utils import CPU_BF16_MIN_SPEEDUP, UserError, peak_memory
from utils import run_main


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the arguments left for lm_eval."""
    parser = argparse.ArgumentParser(
        description="Evaluate merged model folders with lm-eval (vLLM or hf backend) and tabulate the scores. "
        "Unknown arguments (after the folders) are passed to lm_eval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("folders", nargs="+", metavar="DIR", help="merged model folders (e.g. runs/merges/regmean_0.1)")
    add("--table", action="store_true", help="only build the table from the folders' existing lm_eval results")
    add(
        "--tasks",
        help=f"comma-separated lm_eval task names or task YAML files (default: {SEED_TASKS}; "
        "with --table: the tasks the folders hold)",
    )
    add("--output", help="folder for results.md and results.png (default: beside the folders, their common parent)")
    add("--base", metavar="DIR", help="the base model's folder: evaluated too, the table's first row")
    add(
        "--no-experts",
        action="store_true",
        help="leave out the experts the folders' model cards record (not evaluated, no rows, no normalized scores)",
    )
    add("--rerun", action="store_true", help="run lm_eval on every folder again, even on tasks it holds results of")
    run = parser.add_argument_group("the lm_eval runs").add_argument
    run(
        "--backend",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="lm-eval model backend; auto: vllm when installed and on CUDA, else hf",
    )
    run("--limit", type=float, help="lm_eval --limit: at most N examples per task (a fraction if < 1)")
    run("--device", default="auto", help="auto|cuda|cpu (the hf backend's device)")
    run(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="model dtype; auto: bfloat16 on cuda, and on a cpu with native bfloat16 (avx512_bf16, AMX) where a timed "
        f"product at the model's width runs it at least {CPU_BF16_MIN_SPEEDUP}x float32's speed; else float32",
    )
    run(
        "--model-args",
        "--model_args",
        dest="model_args",
        default="",
        help="extra key=value,... appended to lm_eval --model_args (e.g. max_model_len=4096)",
    )
    run(
        "--add-bos-token",
        choices=["false", "true", "tokenizer"],
        default=ADD_BOS_TOKEN,
        help="BOS before every prompt: false as in the reference's harness (its table was made so), "
        "true, or tokenizer (its own default, as lm-eval 0.4.13 does)",
    )
    run(
        "--tokenizer",
        help="tokenizer for lm_eval (a folder or hub id) instead of the model folder's own; the reference "
        "used meta-llama/Meta-Llama-3-8B (gated on the hub)",
    )
    return parser.parse_known_args(argv)


def split_tasks(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def summary(run: Evaluation, wall: float) -> str:
    if not run.seconds:
        return f"nothing to evaluate: every folder holds results of these tasks ({len(run.skipped)} folder(s))"
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return (
        f"evaluated {len(run.seconds)} folder(s) with {run.backend} in {wall:.1f} s "
        f"({', '.join(f'{Path(f).name} {s:.1f} s' for f, s in run.seconds.items())}); "
        f"{run.samples} samples, {run.samples / wall:.2f} samples/s; {peak_memory()} "
        f"(lm_eval peak RSS {child_rss:.2f} GiB)"
        + (f"; {len(run.skipped)} folder(s) held their results already" if run.skipped else "")
    )


def main(argv=None):
    args, lm_eval_args = parse_args(argv)
    t0 = time.perf_counter()
    output = Path(args.output) if args.output else table_dir(args.folders)
    experts = {} if args.no_experts else recorded_experts(args.folders)
    rows = dict(folders=args.folders, experts=experts, base=args.base)
    if args.table:
        if lm_eval_args:
            raise UserError(f"--table takes no lm_eval arguments, got {' '.join(lm_eval_args)}")
        if args.rerun:
            raise UserError("--rerun runs lm_eval: it does not go with --table")
        tasks = None if args.tasks is None else split_tasks(args.tasks)
        print(results_table(**rows, tasks=tasks, output_dir=output), end="")
        print(f"wrote {output / 'results.md'} and results.png in {time.perf_counter() - t0:.1f} s")
        return output / "results.md"

    # the base, the experts, then the folders given, each once (files among them are the table's: skipped there)
    models = [args.base] if args.base else []
    models += [*experts.values(), *(f for f in args.folders if not Path(f).is_file())]
    unique = {}
    for f in models:
        unique.setdefault(Path(f).resolve(), f)
    run = evaluate(
        list(unique.values()),
        tasks=split_tasks(args.tasks or SEED_TASKS),
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        model_args=args.model_args,
        add_bos_token=args.add_bos_token,
        tokenizer=args.tokenizer,
        lm_eval_args=lm_eval_args,
        rerun=args.rerun,
    )
    print(results_table(**rows, output_dir=output), end="")
    print(summary(run, time.perf_counter() - t0))
    print(f"wrote {output / 'results.md'} and results.png")
    return output / "results.md"


if __name__ == "__main__":
    run_main(main)
