"""bench/bench_pipeline_8b.py at two layers of Llama-3-8B's widths, end to end, so that the bench cannot rot:
every stage runs and is measured, the merged folder passes the hub checks, loads and generates, and its
sampled tensors pass the float64 check (the bench exits otherwise). And a run the disk cannot hold is refused
before anything is written."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_pipeline_8b import main  # noqa: E402

from regmean.utils import UserError


def test_pipeline_runs_to_the_end_at_two_layers(tmp_path):
    out = tmp_path / "pipeline"
    figures = main(["--output-dir", str(out), "--layers", "2"])
    want = ["experts", "grams code", "grams math", "merge avg", "merge regmean", "load + generate", "float64 check"]
    assert list(figures["stages"]) == want
    for name, stage in figures["stages"].items():
        assert stage["wall_s"] > 0 and stage["peak_rss_gb"] > 0, name
    assert figures["stages"]["merge regmean"]["read_gb"] > 0  # the page cache was dropped: reads are counted
    assert not (out / "merges" / "avg").exists()  # removed once measured
    assert figures["generate"]["hub"]["problems"] == [] and len(figures["generate"]["tokens"]) == 8
    checked = {c["tensor"].split("[")[0] for c in figures["check"] if c["ok"]}
    assert checked == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    }
    assert json.loads((out / "figures.json").read_text())["layers"] == 2
    again = main(["--output-dir", str(out), "--layers", "2"])  # resumed: every stage reused
    assert again["stages"] == figures["stages"]


def test_a_run_the_disk_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "big"
    with pytest.raises(UserError, match="GB free, the run needs"):
        main(["--output-dir", str(out), "--layers", "2000"])
    assert not out.exists()
