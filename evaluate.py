"""Stage 3: lm_eval on merged model folders, then the table of their scores (results.md, results.png, in the
folders' common parent or --output). Each folder gets the reference's lm_eval command below (vLLM when installed
and on CUDA, else lm-eval's hf backend; add_bos_token=False as the reference's harness had it) with the tasks of
lm-eval-harness/ included; arguments evaluate.py does not know, after the folders, go to lm_eval unchanged.
HumanEval and MBPP execute model-written code. The options, the table and what runs offline: docs/evaluation.md.

    python evaluate.py runs/merges/avg runs/merges/regmean_0.1     # lm_eval on each folder, then the table
    python evaluate.py runs/merges/regmean_0.1 --tasks gsm8k --limit 100 --batch_size auto
    python evaluate.py --table runs/merges/avg runs/merges/regmean_0.1    # the table only
    python evaluate.py --table runs/demo/merges/*     # after `make demo`: -> runs/demo/merges/results.md
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

from regmean.evaluation import ADD_BOS_TOKEN, SEED_TASKS, Evaluation, evaluate
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


def summary(run: Evaluation, folders: int, wall: float) -> str:
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return (
        f"evaluated {folders} folder(s) with {run.backend} in {wall:.1f} s "
        f"({', '.join(f'{Path(f).name} {s:.1f} s' for f, s in run.seconds.items())}); "
        f"{run.samples} samples, {run.samples / wall:.2f} samples/s; {peak_memory()} "
        f"(lm_eval peak RSS {child_rss:.2f} GiB)"
    )


def main(argv=None):
    args, lm_eval_args = parse_args(argv)
    t0 = time.perf_counter()
    output = Path(args.output) if args.output else table_dir(args.folders)
    if args.table:
        if lm_eval_args:
            raise UserError(f"--table takes no lm_eval arguments, got {' '.join(lm_eval_args)}")
        tasks = None if args.tasks is None else split_tasks(args.tasks)
        print(results_table(args.folders, tasks=tasks, output_dir=output), end="")
        print(f"wrote {output / 'results.md'} and results.png in {time.perf_counter() - t0:.1f} s")
        return output / "results.md"

    run = evaluate(
        args.folders,
        tasks=split_tasks(args.tasks or SEED_TASKS),
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        model_args=args.model_args,
        add_bos_token=args.add_bos_token,
        tokenizer=args.tokenizer,
        lm_eval_args=lm_eval_args,
    )
    print(results_table(args.folders, output_dir=output), end="")
    print(summary(run, len(args.folders), time.perf_counter() - t0))
    print(f"wrote {output / 'results.md'} and results.png")
    return output / "results.md"


if __name__ == "__main__":
    run_main(main)
