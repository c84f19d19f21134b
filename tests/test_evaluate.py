"""Stage 3: evaluate.py, offline (the task overrides: test_humaneval_task.py).

evaluate.py runs the real lm_eval CLI (hf backend) on a tiny model with
local copies of upstream's gsm8k and mathqa configs and our humaneval_instruct, and on the real
SmolLM2-135M-Instruct; --table reads the result files those runs wrote.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from regmean.evaluation import SEED_TASKS, lm_eval_command, run_lm_eval
from regmean.results import RESULTS_DIR, label_for, results_table
from regmean.utils import UserError

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
    files = list((folder / RESULTS_DIR).glob("*/results_*.json"))
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
    assert list(folder.glob(f"{RESULTS_DIR}/*/samples_humaneval_instruct_*.jsonl"))  # --log_samples


def test_evaluate_runs_each_folder_once(lm_eval_run):
    """The same command again: the folder holds results of every task at this --limit, lm_eval is not run."""
    folder, table_dir, _ = lm_eval_run
    d = folder.parent
    tasks = f"{d / 'gsm8k.yaml'},{d / 'mathqa.yaml'},humaneval_instruct"
    proc = run([folder, "--tasks", tasks, "--limit", 2, "--output", table_dir, "--gen_kwargs", "max_gen_toks=16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[{folder}] holds results of " in proc.stderr and "lm_eval run" not in proc.stderr
    assert "nothing to evaluate: every folder holds results of these tasks (1 folder(s))" in proc.stdout
    assert len(list((folder / RESULTS_DIR).glob("*/results_*.json"))) == 1


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
    results = json.loads(next((folder / RESULTS_DIR).glob("*/results_*.json")).read_text())["results"]
    md = (table_dir / "results.md").read_text().splitlines()
    assert md[0] == "| Method/Benchmark | GSM8k (Math) | MathQA (Math) | HumanEval-Instruct (Code) |"  # no mbpp run
    assert md[2] == "|  | 5-shot EM | 0-shot Acc-norm | 0-shot Pass@1 |"
    assert md[3] == "| " + " | ".join(["RegMean (α=0.1)"] + expected_row(results)) + " |"
    assert "\n".join(md[:4]) in proc.stdout
    assert (table_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_only_takes_newest_file_per_task(lm_eval_run, tmp_path):
    folder, _, _ = lm_eval_run
    avg = tmp_path / "avg"
    shutil.copytree(folder / RESULTS_DIR, avg / RESULTS_DIR)
    first = next((avg / RESULTS_DIR).glob("*/results_*.json"))
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


def test_results_table_custom_rows_columns_and_mean(lm_eval_run, tmp_path):
    folder, _, _ = lm_eval_run
    results = json.loads(next((folder / RESULTS_DIR).glob("*/results_*.json")).read_text())["results"]
    columns = [
        ("Math", "acc_norm", "mathqa", ["acc_norm,none"]),
        ("Code", "pass@1", "humaneval_instruct", ["pass@1,create_test"]),
    ]
    rows = {"Code expert": folder, label_for(folder): folder}
    md = results_table(rows, columns=columns, output_dir=tmp_path / "out", mean_column=True)
    a, b = 100.0 * results["mathqa"]["acc_norm,none"], 100.0 * results["humaneval_instruct"]["pass@1,create_test"]
    lines = md.splitlines()
    assert lines[0] == "| Method/Benchmark | Math | Code | Mean |"
    assert lines[3] == f"| Code expert | {a:.2f} | {b:.2f} | {(a + b) / 2:.2f} |"
    assert lines[4].startswith("| RegMean (α=0.1) |")
    assert (tmp_path / "out" / "results.md").read_text() == md
    assert results_table(rows, columns=columns, mean_column=True) == md  # no output_dir: the markdown only
    assert not (folder.parent / "results.md").exists()
    # a column whose task was not run leaves the cell and the mean blank
    md = results_table(
        {"Code expert": folder},
        columns=columns + [("MBPP", "pass@1", "mbpp", ["pass_at_1,none"])],
        output_dir=tmp_path / "out",
        mean_column=True,
    )
    assert md.splitlines()[3] == f"| Code expert | {a:.2f} | {b:.2f} |  |  |"


def fake_results(folder, results, stamp="2026-01-01T00-00-00.000000"):
    """An lm_eval result file as lm_eval writes it, in a model folder."""
    path = Path(folder) / RESULTS_DIR / "model" / f"results_{stamp}.json"
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
    out = json.loads(next((folder / RESULTS_DIR).glob("*/results_*.json")).read_text())
    assert out["n-samples"]["humaneval_instruct"]["effective"] == 3
    samples = [json.loads(line) for line in next((folder / RESULTS_DIR).glob("*/samples_*.jsonl")).open()]
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

    cmd = lm_eval_command(
        "runs/merges/regmean_0.1",
        "vllm",
        torch.device("cuda"),
        torch.bfloat16,
        SEED_TASKS.split(","),
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
        run_lm_eval(
            [sys.executable, "-c", "import sys; print('loading', file=sys.stderr); raise ValueError('no such model')"],
            "m",
        )


def test_labels():
    assert [
        label_for(f"runs/merges/{n}") for n in ["avg", "regmean_0.1", "regmean_1.0", "regmeanpp_0.1", "code-llama3"]
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
    assert not (tmp_path / RESULTS_DIR).exists()


def test_error_task_not_available_offline(tmp_path, experts):
    proc = run(
        [experts[0], "--backend", "hf", "--tasks", "gsm8k"], HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf")
    )
    line = one_error_line(proc)
    assert "task 'gsm8k' cannot be loaded" in line
    assert not (experts[0] / RESULTS_DIR).exists()


def test_error_table_without_results(tmp_path):
    line = one_error_line(run(["--table", tmp_path, "--output", tmp_path / "table"]))
    assert "no lm_eval result files" in line
    assert not (tmp_path / "table" / "results.md").exists()


def test_error_managed_lm_eval_options(experts):
    with pytest.raises(UserError, match="^evaluate.py sets --output_path itself; use --backend"):
        evaluate.main([str(experts[0]), "--output_path", "elsewhere"])
    with pytest.raises(UserError, match="^evaluate.py sets --model itself; use --backend"):
        evaluate.main([str(experts[0]), "--model=hf"])


def test_an_adapter_folder_runs_on_its_base(tmp_path, experts):
    """A LoRA adapter folder: lm_eval loads its base (base_model_name_or_path) with peft= on the hf backend, and
    with lora_local_path= and a vLLM rank (a power of two) on vLLM; a missing base is one line."""
    import torch

    adapter = tmp_path / "lora"
    adapter.mkdir()
    config = dict(peft_type="LORA", r=24, lora_alpha=24, base_model_name_or_path=str(experts[0]))
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    args = (torch.device("cpu"), torch.float32, ["gsm8k"], None, "", [])
    hf = lm_eval_command(adapter, "hf", *args)
    assert hf[hf.index("--model_args") + 1].startswith(f"pretrained={experts[0]},dtype=float32,peft={adapter},")
    vllm = lm_eval_command(adapter, "vllm", *args)
    model_args = vllm[vllm.index("--model_args") + 1]
    assert f"pretrained={experts[0]}," in model_args and f"lora_local_path={adapter},max_lora_rank=32" in model_args
    assert "--output_path" in hf and hf[hf.index("--output_path") + 1] == str(adapter / RESULTS_DIR)
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "the base model is missing" in one_error_line(run([adapter, "--backend", "hf"]))
