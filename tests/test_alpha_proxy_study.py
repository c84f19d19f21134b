"""bench/alpha_proxy_study.py end to end on the quick toy world (tiny experts, grid 0 and 1, auto, lm_eval --limit 4),
so the proxy study of docs/merging.md cannot rot; and its rank correlation against a plain restatement."""

import json
import sys
from pathlib import Path

from safetensors import safe_open

import demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import alpha_proxy_study  # noqa: E402

GRAM_FILES = ("gram.safetensors", "gram-holdout.safetensors")


def test_spearman_with_ties_is_pearson_of_mean_ranks():
    x, y = [0.3, 0.1, 0.2, 0.4], [50.0, 45.0, 45.0, 40.0]
    rx, ry = [3.0, 1.0, 2.0, 4.0], [4.0, 2.5, 2.5, 1.0]  # ties share the mean of their ranks
    mx, my = sum(rx) / 4, sum(ry) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    expected = cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    assert abs(alpha_proxy_study.spearman(x, y) - expected) < 1e-12
    assert alpha_proxy_study.spearman([1, 2, 3], [5, 5, 5]) is None  # a flat score has no rank correlation


def test_study_runs_end_to_end_on_the_quick_toy(tmp_path):
    root, out = tmp_path / "toy", tmp_path / "study"
    demo.build_toy(root, demo.SIZES["quick"])
    argv = ["--root", str(root), "--experts", "toy-code", "toy-math", "--out", str(out), "--num-examples", "16"]
    argv += ["--alpha-grid", "0", "1", "--merges", "grid", "auto", "--limit", "4", "--eval-batch-size", "8"]
    assert alpha_proxy_study.main(argv) == out / "proxy_study.md"
    for name in ("toy-code", "toy-math"):  # fit and validation rows are disjoint: 1 row in 4 of the 16 held out
        fit, held_out = (safe_open(out / "grams" / name / f, "pt").metadata() for f in GRAM_FILES)
        assert (fit["num_examples"], held_out["num_examples"]) == ("12", "4")
        assert fit["holdout"].startswith("fit rows") and held_out["holdout"].startswith("held-out rows")
    figures = json.loads((out / "proxy_study.json").read_text())
    assert set(figures["rows"]) == {"0.0", "1.0", "auto"}  # auto-global left out: --merges
    for row in figures["rows"].values():
        assert row["total"] > 0 and all(e > 0 for e in row["experts"])
        assert all(0 <= s <= 100 for s in row["scores"])
    text = (out / "proxy_study.md").read_text()
    assert "Spearman rank correlation" in text and "auto-global (not merged in this run)" in text
    assert (out / "proxy_study.png").stat().st_size > 10_000
