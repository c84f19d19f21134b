"""Calibration files in every format the tools read: .json (a JSON array), .parquet and .csv give the same rows,
in the same order, as the .jsonl file, and compute_gram.py computes the same grams from each."""

import csv
import json

import pytest
import torch

import compute_gram
from conftest import make_rows
from regmean.calibration import load_rows
from regmean.tensor_io import GramFile


def write_all_formats(rows, d):
    """The rows as .jsonl, .json (an array), .parquet (pyarrow) and .csv (a header row, every value a string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {"jsonl": d / "rows.jsonl", "json": d / "rows.json", "parquet": d / "rows.parquet", "csv": d / "rows.csv"}
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["json"].write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"])
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return files


@pytest.mark.parametrize("kind", ["code", "math"])
def test_every_format_gives_the_same_rows(kind, tmp_path):
    rows = make_rows(kind, 9, seed=8)
    for fmt, path in write_all_formats(rows, tmp_path).items():
        assert load_rows(str(path)) == rows, fmt
        assert load_rows(str(path), num_examples=4) == rows[:4], fmt


def test_compute_gram_gives_the_same_grams_from_every_format(experts, tmp_path):
    files = write_all_formats(make_rows("math", 5, seed=9), tmp_path)
    grams = {}
    for fmt, path in files.items():
        out = tmp_path / f"g-{fmt}"
        compute_gram.main(
            ["math", "--model", str(experts[0]), "--dataset", str(path), "--output-dir", str(out)]
            + ["--max-length", "32", "--batch-size", "2", "--device", "cpu", "--dtype", "float32"]
        )
        grams[fmt] = GramFile(out / "gram.safetensors")
    first = grams["jsonl"]
    for fmt, g in grams.items():
        assert g.metadata["num_tokens"] == first.metadata["num_tokens"], fmt
        assert g.metadata["dataset"].endswith(f"rows.{fmt}"), fmt
        for key in set(first.key_of.values()):
            assert torch.equal(g.get(key), first.get(key)), (fmt, key)
