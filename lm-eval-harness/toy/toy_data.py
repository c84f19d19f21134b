"""Held-out rows of the toy demo's two domains, for lm_eval's `custom_dataset`.

`python demo.py` writes them under runs/demo/data/ (--toy: runs/toy/data/); a run elsewhere passes
its folder with `lm_eval ... --metadata '{"toy_data_dir": "DIR"}'`.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _test_rows(kind, toy_data_dir=None, **_):
    import datasets

    path = Path(toy_data_dir or REPO / "runs" / "demo" / "data") / f"{kind}_test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python demo.py` first to write the rows")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})


def code_test(**metadata):
    return _test_rows("code", **metadata)


def math_test(**metadata):
    return _test_rows("math", **metadata)
