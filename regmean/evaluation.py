"""Stage 3's runs: lm_eval on model folders, with the seed's command (docs/evaluation.md), each folder's results
written into it (folder/lm_eval_results_preds/, which regmean/results.py tabulates), each folder evaluated once
per task and --limit (what it holds already is not run again).

    experts = recorded_experts(["runs/merges/avg"])   # {label: folder}: the experts the model cards record
    run = evaluate([*experts.values(), "runs/merges/avg", "runs/merges/regmean_0.1"], tasks=["gsm8k"], limit=100)
    run.backend, run.seconds, run.samples    # "vllm" or "hf", lm_eval's wall time per folder, the samples scored
    run.skipped                              # the folders that held results of every task already

Everything is checked before the first model loads: the folders, the lm_eval options evaluate.py sets
itself, and every task with its data (lm_eval loads them here as it will in the run).
"""

import argparse
import codecs
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import adapter_config, is_adapter_dir, resolve_base
from .recipe import CARD_RECIPE, read_recipe
from .results import result_files, results_dir, task_name, warn
from .utils import PRESETS, UserError, choose_device, choose_dtype, did_you_mean, dtype_name, first_line

# The task overrides, always included: the repository's lm-eval-harness/ (REGMEAN_HARNESS_DIR for an installed
# package used outside the repository).
HARNESS_DIR = Path(os.environ.get("REGMEAN_HARNESS_DIR") or Path(__file__).resolve().parents[1] / "lm-eval-harness")
SEED_TASKS = "mathqa,gsm8k,humaneval_instruct,mbpp"
# The reference's harness (a snapshot of lm-eval labelled 0.4.8) tokenized every prompt without
# special tokens unless add_bos_token=True (Gemma only); lm-eval 0.4.13 leaves it to the tokenizer,
# and Llama-3's adds <|begin_of_text|>. false: the reference's prompts; true: always; tokenizer: 0.4.13's.
ADD_BOS_TOKEN = "false"
# lm_eval options that evaluate.py sets itself (passing them through would give lm_eval two).
MANAGED_OPTIONS = {"--model", "-M", "--output_path", "-o", "--include_path", "-t", "-a", "-L"}


# ----------------------------------------------------------------------------- checks
def check_model_folder(folder: str | Path) -> None:
    """A folder lm_eval can load: config.json and weights, or a LoRA adapter whose base is here."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder{did_you_mean(folder)}")
    if is_adapter_dir(folder):
        adapter_base(folder)
        return
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not (folder / "config.json").is_file() or not has_weights:
        raise UserError(f"{folder} holds no model (it needs config.json and .safetensors/.bin weights)")


def check_lm_eval_args(lm_eval_args: Sequence[str]) -> None:
    managed = sorted({a.split("=", 1)[0] for a in lm_eval_args} & MANAGED_OPTIONS)
    if managed:
        raise UserError(
            f"evaluate.py sets {', '.join(managed)} itself; use --backend, --tasks, --limit, --model-args "
            "(tasks outside lm-eval-harness/ can be given as YAML files in --tasks)"
        )


def check_tasks(tasks: Sequence[str], metadata: dict | None = None) -> None:
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


def passthrough_metadata(lm_eval_args: Sequence[str]) -> dict | None:
    """What lm_eval makes of a pass-through --metadata (some tasks read data paths there, e.g.
    humaneval_path), parsed by lm_eval's own argument action, so that check_tasks loads the tasks
    as the run will; None without one."""
    from lm_eval._cli.utils import MergeDictAction

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--metadata", nargs="+", action=MergeDictAction, default=None)
    try:
        return parser.parse_known_args(list(lm_eval_args))[0].metadata
    except (ValueError, SyntaxError) as e:
        raise UserError(f"lm_eval --metadata cannot be parsed: {first_line(e)}") from None


def choose_backend(name: str, device: torch.device) -> str:
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


def adapter_base(folder: str | Path) -> Path:
    """The base model folder of a LoRA adapter folder (its base_model_name_or_path), checked to be here."""
    return resolve_base(Path(folder), None, adapter_config(Path(folder)))


def model_config_dir(folder: str | Path) -> Path:
    """Where a folder's config.json is: the folder, or an adapter's base."""
    return adapter_base(folder) if is_adapter_dir(folder) else Path(folder)


# ----------------------------------------------------------------------------- running lm_eval
def lm_eval_command(
    folder: str | Path,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    tasks: Sequence[str],
    limit: float | None,
    model_args: str,
    passthrough: Sequence[str],
    add_bos_token: str = ADD_BOS_TOKEN,
    tokenizer: str | None = None,
) -> list[str]:
    """The seed's lm_eval command line for one folder (+ --include_path, + the hf backend's device,
    + add_bos_token as the reference's harness had it, + the tokenizer when one is named). A LoRA adapter folder
    runs on its base: the hf backend's peft=, vLLM's lora_local_path= (enable_lora, max_lora_rank)."""
    own = sorted({kv.split("=", 1)[0].strip() for kv in model_args.split(",")} & {"add_bos_token", "tokenizer"})
    if own:
        raise UserError(f"--model-args sets {', '.join(own)}: use --add-bos-token / --tokenizer instead")
    model, adapter = folder, ""
    if is_adapter_dir(folder):
        model, config = adapter_base(folder), adapter_config(Path(folder))
        rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
        vllm_rank = max(8, 1 << (rank - 1).bit_length())  # vLLM takes powers of two (8, 16, ..., 256, 512)
        adapter = f",lora_local_path={folder},max_lora_rank={vllm_rank}" if backend == "vllm" else f",peft={folder}"
    if backend == "vllm":
        args = f"pretrained={model},tensor_parallel_size=1,dtype={dtype_name(dtype)}"
    else:
        args = f"pretrained={model},dtype={dtype_name(dtype)}"
    args += adapter
    if add_bos_token != "tokenizer":  # "tokenizer": leave it to the tokenizer (lm-eval 0.4.13's default)
        args += f",add_bos_token={add_bos_token == 'true'}"
    if tokenizer:
        args += f",tokenizer={tokenizer}"
    if model_args:
        args += "," + model_args
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", backend, "--model_args", args]
    cmd += ["--tasks", ",".join(tasks), "--output_path", str(results_dir(folder))]
    cmd += ["--log_samples", "--trust_remote_code", "--confirm_run_unsafe_code", "--include_path", str(HARNESS_DIR)]
    if backend == "hf":
        cmd += ["--device", str(device)]
    if limit is not None:
        cmd += ["--limit", f"{limit:g}"]
    return cmd + list(passthrough)


def run_lm_eval(cmd: list[str], folder: str | Path) -> None:
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


def samples_scored(folder: str | Path) -> int:
    """The samples lm_eval scored in the folder's newest result file."""
    newest = result_files(folder)[-1]
    return sum(int(n.get("effective", 0)) for n in json.loads(newest.read_text()).get("n-samples", {}).values())


@dataclass
class Evaluation:
    backend: str  # the lm_eval backend that ran: vllm or hf ("" when nothing ran)
    seconds: dict[str, float]  # lm_eval's wall time per folder evaluated, as the folder was given
    samples: int  # the samples scored, all folders together
    skipped: list[str] = field(default_factory=list)  # the folders that held results of every task already


# ----------------------------------------------------------------------------- what is evaluated
def recorded_experts(folders: Sequence[str | Path]) -> dict[str, Path]:
    """{NAME (expert): folder} of the experts the folders' model cards record (their recipe's `models`), each once,
    in the order first met. A preset name stands for its model; a recorded path is read from where evaluate runs,
    as the card's recipe says; a hub id stands for a folder among `folders` of its name (runs/models/MAmmoTH2-8B
    for TIGER-Lab/MAmmoTH2-8B). An expert that is no local folder here (another hub id, or a path that is not
    there) is skipped with a one-line note; folders without a recipe (not merges, or made by another tool) record
    none."""
    experts, seen = {}, set()
    given = {Path(f).name: Path(f) for f in folders if Path(f).is_dir()}
    for folder in folders:
        card = Path(folder) / "README.md"
        if not Path(folder).is_dir() or not card.is_file() or not CARD_RECIPE.search(card.read_text()):
            continue
        for spec in read_recipe(card).get("models") or []:
            model = PRESETS[spec]["model"] if spec in PRESETS else spec
            if not Path(model).is_dir() and model.count("/") == 1 and Path(model).name in given:
                model = str(given[Path(model).name])  # a hub id, downloaded into a folder of its name
            if spec in seen or Path(model).resolve() in seen:
                continue
            seen |= {spec, Path(model).resolve()}
            if not Path(model).is_dir():
                warn(
                    f"expert {spec} of {folder} is not a local folder here ({model}): not evaluated, no row "
                    "(download it into a folder and give that folder to evaluate.py)"
                )
                continue
            experts[f"{Path(model).name} (expert)"] = Path(model)
    return experts


def missing_tasks(folder: str | Path, tasks: Sequence[str], limit: float | None) -> list[str]:
    """The tasks (as given: names or YAML files) whose results the folder does not hold yet at this --limit
    (lm_eval records it in every result file's config)."""
    held = {}
    for file in result_files(folder):
        try:
            data = json.loads(file.read_text())
            held |= {task: (data.get("config") or {}).get("limit") for task in data["results"]}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue  # the table reports such a file
    return [t for t in tasks if task_name(t) not in held or held[task_name(t)] != limit]


def evaluate(
    folders: Sequence[str | Path],
    *,
    tasks: Sequence[str] = tuple(SEED_TASKS.split(",")),
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    limit: float | None = None,
    model_args: str = "",
    add_bos_token: str = ADD_BOS_TOKEN,
    tokenizer: str | None = None,
    lm_eval_args: Sequence[str] = (),
    rerun: bool = False,
) -> Evaluation:
    """lm_eval on each folder, its results written into it (folder/lm_eval_results_preds/; results.results_dir for
    a folder that cannot be written to), after checking the folders, the options and every task. Each folder runs
    only the tasks it holds no results of yet at this limit (missing_tasks); rerun: all of them again.
    backend: auto|vllm|hf (auto: vllm when installed and on CUDA); device: auto|cuda|cpu (the hf backend's); dtype:
    auto|bfloat16|float16|float32 (auto: utils.choose_dtype at the first evaluated folder's width); limit: lm_eval
    --limit; model_args: appended to --model_args; add_bos_token: false|true|tokenizer; tokenizer: a folder or hub
    id instead of each folder's own; lm_eval_args: passed to lm_eval unchanged (not the options evaluate.py sets
    itself: MANAGED_OPTIONS)."""
    check_lm_eval_args(lm_eval_args)
    if not HARNESS_DIR.is_dir():
        raise UserError(
            f"the task overrides are not at {HARNESS_DIR}: run from the repository, or set REGMEAN_HARNESS_DIR "
            "to its lm-eval-harness folder"
        )
    for folder in folders:
        check_model_folder(folder)
    if not tasks:
        raise UserError("--tasks is empty")
    todo = {folder: list(tasks) if rerun else missing_tasks(folder, tasks, limit) for folder in folders}
    skipped = [str(folder) for folder, missing in todo.items() if not missing]
    for folder in skipped:
        print(f"[{folder}] holds results of {', '.join(tasks)} already: not evaluated again", file=sys.stderr)
    todo = {folder: missing for folder, missing in todo.items() if missing}
    if not todo:
        return Evaluation("", {}, 0, skipped)
    torch_device = choose_device(device)
    config = model_config_dir(next(iter(todo))) / "config.json"
    width = json.loads(config.read_text()).get("hidden_size")  # auto times it on cpu
    torch_dtype = choose_dtype(dtype, torch_device, width=width)
    backend = choose_backend(backend, torch_device)
    check_tasks(tasks, passthrough_metadata(lm_eval_args))

    seconds = {}
    for folder, left in todo.items():
        cmd = lm_eval_command(
            folder, backend, torch_device, torch_dtype, left, limit, model_args, lm_eval_args, add_bos_token, tokenizer
        )
        print(
            f"[{folder}] HF_ALLOW_CODE_EVAL=1 {' '.join(cmd[2:]).replace('lm_eval run', 'lm_eval', 1)}", file=sys.stderr
        )
        start = time.perf_counter()
        run_lm_eval(cmd, folder)
        seconds[str(folder)] = time.perf_counter() - start
    return Evaluation(backend, seconds, sum(samples_scored(f) for f in todo), skipped)
