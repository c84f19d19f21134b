"""Issue 33: the experts beside the merges. evaluate.py finds the experts in the merged folders' model cards,
evaluates each model once (counted here through a stand-in for the lm_eval run), and the table adds a block of
scores normalized by the best expert on each task, checked by hand on planted lm_eval result files.
(The real lm_eval CLI skipping a folder that holds its results: tests/test_evaluate.py.)"""

import json
from pathlib import Path

import pytest

import evaluate
from regmean import evaluation, results
from regmean.results import RESULTS_DIR, normalized

STAMP = iter(range(10**6))


def plant(folder, scores, limit=None):
    """An lm_eval result file as lm_eval writes it: results, n-shot, n-samples and config (its --limit)."""
    folder = Path(folder)
    path = folder / RESULTS_DIR / "model" / f"results_2026-01-01T00-00-{next(STAMP):06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "results": scores,
        "n-shot": {t: 0 for t in scores},
        "n-samples": {t: {"original": 4, "effective": 4} for t in scores},
        "config": {"model": "hf", "limit": limit},
    }
    path.write_text(json.dumps(data))
    return path


def model(folder, experts=None):
    """A model folder evaluate.py accepts; with experts, a merge whose model card records them (as merge_model.py)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(b"")
    if experts:
        entries = "".join(f"- model: {e}\n  weight: 1.0\n" for e in experts)
        recipe = f"merge_method: avg\nmodels:\n{entries}parameters: {{}}\ndtype: float32\n"
        (folder / "README.md").write_text(f"# a merge\n\n## Recipe\n\nmade so:\n\n```yaml\n{recipe}```\n")
    return folder


def em(v):
    return {"alias": "x", "exact_match,none": v, "exact_match_stderr,none": 0.01}


def mbpp(v):  # several metrics: the table reads pass_at_1, the others differ on purpose
    return {"pass_at_1,none": v, "pass@1,none": 0.9, "pass_at_1,extract_code": 0.8}


def he(v):
    return {"pass@1,create_test": v}


# ----------------------------------------------------------------------------- the table
@pytest.fixture
def planted(tmp_path):
    code, math = model(tmp_path / "experts" / "coder"), model(tmp_path / "experts" / "mathy")
    base = model(tmp_path / "base")
    merges = tmp_path / "merges"
    avg, regmean = model(merges / "avg", [code, math]), model(merges / "regmean_0.1", [code, math])
    # every expert scores 0 on HumanEval (no normalized value); the math expert scores 0 on toy_code
    plant(code, {"humaneval_instruct": he(0.0), "mbpp": mbpp(0.40), "toy_code": em(0.5), "toy_math": em(0.0)})
    plant(math, {"humaneval_instruct": he(0.0), "mbpp": mbpp(0.20), "toy_code": em(0.0), "toy_math": em(0.2)})
    plant(base, {"humaneval_instruct": he(0.0), "mbpp": mbpp(0.10), "toy_code": em(0.0), "toy_math": em(0.0)})
    plant(avg, {"humaneval_instruct": he(0.05), "mbpp": mbpp(0.30), "toy_code": em(0.275), "toy_math": em(0.2)})
    plant(regmean, {"humaneval_instruct": he(0.0), "mbpp": mbpp(0.40), "toy_code": em(0.45)})  # no toy_math
    return tmp_path, base, code, math, avg, regmean


def test_table_with_experts_and_normalized_scores(planted, capsys):
    tmp_path, base, *_ = planted
    merges = sorted((tmp_path / "merges").iterdir())
    table = evaluate.main(["--table", *map(str, merges), "--base", str(base)])
    assert table == tmp_path / "merges" / "results.md"
    raw, intro, norm, note = table.read_text().split("\n\n")
    assert raw.splitlines() == [
        "| Method/Benchmark | HumanEval-Instruct (Code) | MBPP (Code) | toy_code | toy_math |",
        "| ---- | ---- | ---- | ---- | ---- |",
        "|  | 0-shot Pass@1 | 3-shot Pass@1 | 0-shot exact_match | 0-shot exact_match |",
        "| base (base) | 0.00 | 10.00 | 0.00 | 0.00 |",
        "| coder (expert) | 0.00 | 40.00 | 50.00 | 0.00 |",
        "| mathy (expert) | 0.00 | 20.00 | 0.00 | 20.00 |",
        "| Average | 5.00 | 30.00 | 27.50 | 20.00 |",
        "| RegMean (α=0.1) | 0.00 | 40.00 | 45.00 |  |",
    ]
    assert intro.startswith("Normalized: each score as a percentage of the best expert's score on that task")
    # by hand: MBPP / 40 (coder), toy_code / 50 (coder), toy_math / 20 (mathy); HumanEval: no expert above 0
    assert norm.splitlines() == [
        "| Normalized | HumanEval-Instruct (Code) | MBPP (Code) | toy_code | toy_math | Mean |",
        "| ---- | ---- | ---- | ---- | ---- | ---- |",
        "|  | – | % of coder (expert), 40.00 | % of coder (expert), 50.00 | % of mathy (expert), 20.00 | "
        "mean of 3 task(s) |",
        "| base (base) | – | 25.00 | 0.00 | 0.00 | 8.33 |",  # (25 + 0 + 0) / 3
        "| coder (expert) | – | 100.00 | 100.00 | 0.00 | 66.67 |",  # (100 + 100 + 0) / 3
        "| mathy (expert) | – | 50.00 | 0.00 | 100.00 | 50.00 |",  # (50 + 0 + 100) / 3
        "| Average | – | 75.00 | 55.00 | 100.00 | 76.67 |",  # (75 + 55 + 100) / 3
        "| RegMean (α=0.1) | – | 100.00 | 90.00 |  |  |",  # a task missing: no mean
    ]
    assert note == (
        "– HumanEval-Instruct (Code): no expert scores above zero, so no normalized value; left out of the Mean.\n"
    )
    assert table.read_text() in capsys.readouterr().out
    assert (tmp_path / "merges" / "results.png").read_bytes()[:4] == b"\x89PNG"
    # --no-experts: the merges' raw table as before
    evaluate.main(["--table", *map(str, merges), "--no-experts", "--output", str(tmp_path / "plain")])
    md = (tmp_path / "plain" / "results.md").read_text()
    assert "Normalized" not in md and [ln.split(" |")[0] for ln in md.splitlines()[3:]] == [
        "| Average",
        "| RegMean (α=0.1)",
    ]


def test_normalized_by_hand():
    by, table = normalized([[40.0, 0.0, None], [20.0, 0.0, 5.0], [30.0, 0.0, 5.0]], ["a", "b", "m"], [0, 1])
    assert by == [("a", 40.0), None, ("b", 5.0)]  # the best expert per task; none above zero on the second
    assert table == [[100.0, None, None, None], [50.0, None, 100.0, 75.0], [75.0, None, 100.0, 87.5]]
    by, _ = normalized([[20.0], [20.0]], ["a", "b"], [0, 1])
    assert by == [("a", 20.0)]  # a tie: the first expert


def test_a_folder_given_that_is_an_expert_is_one_row(planted):
    tmp_path, _, code, _, avg, _ = planted
    md = results.results_table([code, avg], experts=evaluation.recorded_experts([avg]))
    assert [ln.split(" |")[0] for ln in md.split("\n\n")[0].splitlines()[3:]] == [
        "| coder (expert)",
        "| mathy (expert)",
        "| Average",
    ]


def test_experts_not_here_are_skipped_in_one_line(tmp_path, capsys):
    local = model(tmp_path / "local")
    merged = model(tmp_path / "merged", ["code", "owner/hub-model", local, tmp_path / "gone"])
    assert evaluation.recorded_experts([merged, merged]) == {"local (expert)": local}
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 3  # each expert once, though two folders record it
    assert notes[0] == (
        f"warning: expert code of {merged} is not a local folder here (rombodawg/rombos_Replete-Coder-Llama3-8B): "
        "not evaluated, no row (download it into a folder and give that folder to evaluate.py)"
    )
    assert "expert owner/hub-model" in notes[1] and f"expert {tmp_path / 'gone'}" in notes[2]
    assert evaluation.recorded_experts([local]) == {}  # no card: no experts
    # a hub id downloaded into a folder of its name, given on the command line: that folder is the expert
    hub = model(tmp_path / "models" / "hub-model")
    assert evaluation.recorded_experts([merged, hub]) == {"local (expert)": local, "hub-model (expert)": hub}
    assert len(capsys.readouterr().err.splitlines()) == 2  # code and gone only


def test_results_of_a_read_only_folder_go_to_a_stand_in(tmp_path, monkeypatch):
    folder = model(tmp_path / "store" / "expert")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results.os, "access", lambda path, mode: False)
    where = results.results_dir(folder)
    assert where.parent.parent == Path("runs/eval-results") and where.parent.name.startswith("expert-")
    assert where.name == RESULTS_DIR and results.results_dir(folder) == where  # the same every time
    plant(folder, {"toy_code": em(0.5)})  # results lm_eval wrote into the folder itself are read there
    assert results.results_dir(folder) == folder / RESULTS_DIR


# ----------------------------------------------------------------------------- each model evaluated once
@pytest.fixture
def lm_eval_runs(monkeypatch):
    """A stand-in for the lm_eval run: it records the folder and the tasks of each command evaluate.py built and
    writes a result file where the command says; the tasks' own check is skipped (no lm_eval here)."""
    runs = []

    def run_lm_eval(cmd, folder):
        tasks = cmd[cmd.index("--tasks") + 1].split(",")
        limit = float(cmd[cmd.index("--limit") + 1]) if "--limit" in cmd else None
        output = Path(cmd[cmd.index("--output_path") + 1])
        assert output == Path(folder) / RESULTS_DIR
        runs.append((Path(folder).name, tasks))
        plant(folder, {t: em(0.25) for t in tasks}, limit)

    monkeypatch.setattr(evaluation, "run_lm_eval", run_lm_eval)
    monkeypatch.setattr(evaluation, "check_tasks", lambda tasks, metadata=None: None)
    return runs


def test_each_model_is_evaluated_once(tmp_path, lm_eval_runs, capsys):
    code, math = model(tmp_path / "coder"), model(tmp_path / "mathy")
    base = model(tmp_path / "base")
    avg, regmean = model(tmp_path / "m" / "avg", [code, math]), model(tmp_path / "m" / "regmean_0.1", [math, code])
    plant(code, {"toy_code": em(0.5), "toy_math": em(0.0)})  # evaluated before
    args = ["--tasks", "toy_code,toy_math", "--backend", "hf", "--device", "cpu", "--dtype", "float32"]
    table = evaluate.main([str(avg), str(regmean), "--base", str(base), *args])
    both = ["toy_code", "toy_math"]
    assert lm_eval_runs == [("base", both), ("mathy", both), ("avg", both), ("regmean_0.1", both)]
    assert f"[{code}] holds results of toy_code, toy_math already: not evaluated again" in capsys.readouterr().err
    labels = [ln.split(" |")[0] for ln in table.read_text().split("\n\n")[0].splitlines()[3:]]
    assert labels == ["| base (base)", "| coder (expert)", "| mathy (expert)", "| Average", "| RegMean (α=0.1)"]

    lm_eval_runs.clear()  # the same command again: nothing to run, the table from the files
    evaluate.main([str(avg), str(regmean), "--base", str(base), *args])
    assert lm_eval_runs == []
    assert "nothing to evaluate: every folder holds results of these tasks (5 folder(s))" in capsys.readouterr().out

    evaluate.main([str(avg), *args[:1], "toy_code,toy_extra", *args[2:]])  # a new task: only it runs
    assert lm_eval_runs == [("coder", ["toy_extra"]), ("mathy", ["toy_extra"]), ("avg", ["toy_extra"])]

    lm_eval_runs.clear()  # another --limit is another run; --no-experts leaves the experts alone
    evaluate.main([str(avg), *args, "--limit", "2", "--no-experts"])
    assert lm_eval_runs == [("avg", both)]
    lm_eval_runs.clear()
    evaluate.main([str(avg), *args, "--limit", "2", "--no-experts", "--rerun"])
    assert lm_eval_runs == [("avg", both)]
