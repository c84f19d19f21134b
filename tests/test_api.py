"""docs/api.md's example, run as it stands on tiny experts laid out as the demo's toy world, against the
command line: the merge it makes from Python is the one merge_model.py makes from the same grams."""

import re
import shutil

from safetensors.torch import load_file

import merge_model
from conftest import ROOT


def api_example() -> str:
    text = (ROOT / "docs/api.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_api_example_runs_and_merges_as_the_command_line(experts, calib_files, tmp_path, monkeypatch):
    for expert, kind in zip(experts, ["code", "math"]):
        shutil.copytree(expert, tmp_path / f"runs/toy/toy-{kind}")
        (tmp_path / "runs/toy/data").mkdir(parents=True, exist_ok=True)
        shutil.copy(calib_files[kind], tmp_path / f"runs/toy/data/{kind}_calib.jsonl")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(api_example(), namespace)
    merged, report = namespace["merged"], namespace["report"]
    assert report.name == "judge_report.json" and report.exists()
    assert (merged / "README.md").exists() and (merged / "merge_report.json").exists()
    cli = merge_model.main(
        ["regmean", "--models", *namespace["experts"], "--grams", *map(str, namespace["grams"]), "--alpha", "0.1"]
        + ["--output-dir", "runs/toy/merges/cli"]
    )
    ours, theirs = load_file(merged / "model.safetensors"), load_file(cli / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    assert "merge_model.py regmean" in (merged / "README.md").read_text()  # the card records the command
