"""A new user's first hour, through the command lines (issue 25): the table of the tasks the folders
hold, judge_merge.py refusing swapped grams and reading the experts a folder records, the model
card's "make this merge again" command run from where the user stands, summaries that explain
themselves, and logs: bars only on a terminal, 1-based recipe errors, "did you mean"."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_merge import read_folder

import compute_gram
import judge_merge
import merge_model
from conftest import ROOT
from regmean.results import RESULTS_DIR
from regmean.utils import UserError

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def cli(script, *args, cwd=ROOT):
    """A stage script as a user runs it: its own process, stderr a pipe (not a terminal)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV)


def merge(*args):
    return merge_model.main([str(a) for a in args])


@pytest.fixture(scope="module")
def grams(experts, calib_files, tmp_path_factory):
    """The real compute_gram.py on each expert (float32 pinned): gram files bound to their model."""
    d = tmp_path_factory.mktemp("grams")
    out = []
    for expert, kind in zip(experts, ["code", "math"]):
        args = ["toy-code", "--model", expert, "--dataset", calib_files[kind], "--format", kind]
        args += ["--output-dir", d / kind, "--max-length", 64, "--batch-size", 4, "--device", "cpu"]
        out.append(compute_gram.main([str(a) for a in args + ["--dtype", "float32"]]))
    return out


# ----------------------------------------------------------------------------- 1. the table
def results_file(folder, results, shots, stamp="2026-01-01T00-00-00.000000"):
    """An lm_eval result file as lm_eval writes it (results, n-shot), in a model folder."""
    path = Path(folder) / RESULTS_DIR / "model" / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "n-shot": shots}))


def toy(code, math):
    """The demo's tasks as lm_eval 0.4 writes them (name, alias and sample_len before the metrics)."""
    return {
        task: {"name": task, "alias": task, "sample_len": 40, "exact_match,none": v, "exact_match_stderr,none": 0.07}
        for task, v in [("toy_code", code), ("toy_math", math)]
    }


def test_table_of_the_tasks_the_folders_hold(tmp_path):
    merges = tmp_path / "runs" / "demo" / "merges"
    results_file(merges / "avg", toy(0.25, 0.5), {"toy_code": 0, "toy_math": 0})
    results_file(merges / "regmean_0.1", toy(0.3125, 0.75), {"toy_code": 0, "toy_math": 0})
    (merges / "regmean_1.0").mkdir()  # merged, not evaluated yet
    folders = sorted(merges.iterdir())  # what the shell makes of runs/demo/merges/*
    proc = cli("evaluate.py", "--table", *[f.relative_to(tmp_path) for f in folders], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (merges / "results.md").read_text()  # beside what it read
    assert table.splitlines() == [
        "| Method/Benchmark | toy_code | toy_math |",
        "| ---- | ---- | ---- |",
        "|  | 0-shot exact_match | 0-shot exact_match |",
        "| Average | 25.00 | 50.00 |",
        "| RegMean (α=0.1) | 31.25 | 75.00 |",
    ]
    assert table in proc.stdout and (merges / "results.png").read_bytes()[:4] == b"\x89PNG"
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: {Path('runs/demo/merges/regmean_1.0')} holds no lm_eval results "
        f"({Path('runs/demo/merges/regmean_1.0') / RESULTS_DIR}/*/results_*.json): left out"
    ]
    # The same command again: the glob now matches the table's own files too, which are skipped.
    again = cli("evaluate.py", "--table", *sorted(merges.iterdir()), cwd=tmp_path)
    assert again.returncode == 0 and "results.md" not in again.stderr
    assert (merges / "results.md").read_text() == table
    # --output puts it elsewhere; --tasks picks columns
    proc = cli("evaluate.py", "--table", merges / "avg", "--tasks", "toy_math", "--output", tmp_path / "t")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t" / "results.md").read_text().splitlines()[3] == "| Average | 50.00 |"


def test_table_puts_the_reference_tasks_first_in_its_order(tmp_path):
    results = {
        "toy_code": {"exact_match,none": 0.5},
        "mbpp": {"pass_at_1,none": 0.426},
        "gsm8k": {"exact_match,strict-match": 0.6831, "exact_match,flexible-extract": 0.7},
    }
    results_file(tmp_path / "avg", results, {"toy_code": 0, "mbpp": 3, "gsm8k": 5})
    proc = cli("evaluate.py", "--table", tmp_path / "avg")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0] == "| Method/Benchmark | GSM8k (Math) | MBPP (Code) | toy_code |"
    assert lines[2] == "|  | 5-shot EM | 3-shot Pass@1 | 0-shot exact_match |"
    assert lines[3] == "| Average | 68.31 | 42.60 | 50.00 |"


def test_table_errors_when_no_cell_can_be_filled(tmp_path):
    results_file(tmp_path / "avg", toy(0.25, 0.5), {})
    proc = cli("evaluate.py", "--table", tmp_path / "avg", "--tasks", "gsm8k,mbpp", "--output", tmp_path / "t")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "error: no cell of the table can be filled: the folders hold scores of toy_code, toy_math, "
        "not of the tasks asked for"
    )
    proc = cli("evaluate.py", "--table", tmp_path / "avgg", "--output", tmp_path / "t")
    assert proc.stderr.strip() == f"error: {tmp_path / 'avgg'} is not a folder; did you mean {tmp_path / 'avg'}?"
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------- 2, 3. judge_merge.py
def test_judge_refuses_swapped_grams_as_merge_does(experts, grams, tmp_path):
    avg = merge("avg", "--models", *experts, "--output-dir", tmp_path / "avg")
    swapped = ["--models", *experts, "--grams", grams[1], grams[0]]
    proc = cli("judge_merge.py", avg, *swapped)
    refused = cli("merge_model.py", "regmean", *swapped, "--output-dir", tmp_path / "rm")
    assert proc.returncode == refused.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line == refused.stderr.strip().splitlines()[-1]  # one check, one message
    assert f"it matches model 2, {experts[1]}: are --grams in another order than --models?" in line
    assert not (avg / "judge_report.json").exists() and not (tmp_path / "rm").exists()
    report = judge_merge.main([str(a) for a in [avg, *swapped, "--allow-gram-mismatch"]])
    assert report.is_file()


def test_judge_uses_the_experts_grams_and_weights_the_folder_records(experts, grams, tmp_path):
    rm = merge("regmean", "--models", *experts, "--grams", *grams, "--weights", 2, 1, "--output-dir", tmp_path / "rm")
    proc = cli("judge_merge.py", rm, "--output", tmp_path / "judged")
    assert proc.returncode == 0, proc.stderr
    assert f"experts as recorded in {rm / 'README.md'}: {experts[0]}, {experts[1]}" in proc.stdout
    judged = json.loads((tmp_path / "judged" / "judge_report.json").read_text())
    assert [e["dir"] for e in judged["experts"]] == [str(e) for e in experts]
    assert [e["weight"] for e in judged["experts"]] == pytest.approx([2 / 3, 1 / 3])
    assert judged["grams"] == [str(g) for g in grams]
    own = json.loads((rm / "merge_report.json").read_text())["layers"]
    for a, b in zip(own, judged["layers"], strict=True):  # the merge's own figures, found again
        assert a["tensor"] == b["tensor"]
        assert a["output_error"]["merged"] == pytest.approx(b["output_error"]["merged"], rel=1e-6)


def test_judge_an_avg_merge_of_the_demos_experts_by_its_folder_alone(experts, grams, tmp_path, monkeypatch):
    """As after `make demo`: an avg merge records no grams; the experts are the smollm2-* presets' folders,
    whose grams are in the presets' gram folders."""
    monkeypatch.chdir(tmp_path)
    for expert, gram, name in zip(experts, grams, ["smollm2-code", "smollm2-math"]):
        shutil.copytree(expert, Path("runs/demo") / name)
        shutil.copytree(gram.parent, Path("runs/demo/grams") / name)
    avg = "runs/demo/merges/avg"
    merge("avg", "--models", "runs/demo/smollm2-code", "runs/demo/smollm2-math", "--output-dir", avg)
    proc = cli("judge_merge.py", avg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    judged = json.loads((tmp_path / avg / "judge_report.json").read_text())
    assert judged["grams"] == [f"runs/demo/grams/{n}/gram.safetensors" for n in ["smollm2-code", "smollm2-math"]]
    # the figures of an avg merge are the average's: said so, not "below the average on 0%"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("- ")]
    assert len(lines) == 2 and all("this merge is the average" in ln for ln in lines)
    assert "below the average on 0%" not in proc.stdout


# ----------------------------------------------------------------------------- 5. the model card
def test_the_cards_command_makes_the_merge_again_from_where_the_user_stands(experts, grams, tmp_path):
    args = ["regmean", "--models", *experts, "--grams", *grams, "--alpha", 0.3, "--output-dir", "merges/rm"]
    assert cli("merge_model.py", *args, cwd=tmp_path).returncode == 0
    card = (tmp_path / "merges/rm/README.md").read_text()
    command = re.search(r"`(python merge_model.py --config \S+ --output-dir DIR)` makes this merge again", card)[1]
    assert command == "python merge_model.py --config merges/rm/README.md --output-dir DIR"
    argv = shlex.split(command.replace("DIR", "again"))[2:]
    proc = cli("merge_model.py", *argv, cwd=tmp_path)  # the user's shell, where the merge ran
    assert proc.returncode == 0, proc.stderr
    first, again = read_folder(tmp_path / "merges/rm"), read_folder(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


# ----------------------------------------------------------------------------- 7. summaries
def test_summaries_explain_themselves(experts, grams, tmp_path):
    proc = cli("merge_model.py", "regmean", "--models", *experts, "--grams", *grams, "--output-dir", tmp_path / "rm")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "rm" / "merge_report.json").read_text())
    settings = report["settings"]
    assert settings["alpha"] == 0.1 and settings["grams"] == [str(g) for g in grams]
    assert not {"num_examples", "split", "batch_size", "max_length", "datasets", "forward_dtype"} & set(settings)
    top = max(report["output_errors"], key=lambda e: e["max_sampling_se"])
    layer = re.sub(r"^model\.|\.(self_attn|mlp)|\.weight$", "", top["max_sampling_se_layer"])
    line = next(ln for ln in proc.stdout.splitlines() if "largest relative sampling error" in ln)
    assert f"largest relative sampling error {top['max_sampling_se']:.2g}, at {layer} (" in line
    if top["max_sampling_se"] > 0.1:
        assert line.endswith("--error-sample-every 1 takes every row (exact figures, slower))")
    else:
        assert "small: every figure is good to about" in line
    exact = cli("merge_model.py", "regmean", "--models", *experts, "--grams", *grams, "--error-sample-every", 1,
                "--output-dir", tmp_path / "exact")  # fmt: skip
    assert exact.returncode == 0 and "sampling error" not in exact.stdout
    avg = merge("avg", "--models", *experts, "--output-dir", tmp_path / "avg")
    assert not {"alpha", "grams", "num_examples", "exclude"} & set(
        json.loads((avg / "merge_report.json").read_text())["settings"]
    )


# ----------------------------------------------------------------------------- 9. logs and errors
def test_logs_and_errors_a_new_user_meets(experts, grams, tmp_path):
    proc = cli("merge_model.py", "regmean", "--models", *experts, "--grams", *grams, "--output-dir", tmp_path / "rm")
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # no bars in a log ...
    assert re.search(r"^merge \(regmean\): \d+ tensor in [\d.]+ s$", proc.stderr, re.M)  # ... one line instead
    # a recipe error counts the models from 1
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: regmean\nmodels:\n- model: {experts[0]}\n- model: {experts[1]}\n  gram: x\n")
    with pytest.raises(UserError, match=rf"^{recipe}: the second model \({experts[1]}\): unknown key 'gram'"):
        merge("--config", recipe, "--output-dir", tmp_path / "x")
    # a mistyped folder gets a "did you mean"; an owner/name-shaped one no hub connection error
    typo = str(experts[0]).replace("code", "cdoe")
    with pytest.raises(UserError, match=rf"^model '{typo}' is neither .*; did you mean {experts[0]}\?$"):
        merge("avg", "--models", typo, experts[1], "--output-dir", tmp_path / "x")
    proc = cli("merge_model.py", "avg", "--models", "runs/smollm2-cod", experts[1], "--output-dir", tmp_path / "x")
    assert proc.stderr.strip().startswith(
        "error: model 'runs/smollm2-cod': no such folder here, and the hub is unreachable (HF_HUB_OFFLINE=1)"
    )
    assert not (tmp_path / "x").exists()
