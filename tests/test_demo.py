"""The demo end to end (quick sizes, in a tmp root) and the toy world's own pieces."""

import json

import pytest

import demo
import evaluate


def test_toy_rows_are_right_and_held_out_rows_never_trained_on():
    sizes = dict(train_rows=300, calib_rows=40, test_rows=40)
    # a problem is the program (code) or the operation on two numbers (math, whatever the story)
    for kind, problem in (("code", "input"), ("math", "answer")):
        splits = demo.make_splits(kind, sizes, seed=5)
        assert {k: len(v) for k, v in splits.items()} == {"test": 40, "calib": 40, "train": 300}
        train, calib, test = ({r[problem] for r in splits[s]} for s in ("train", "calib", "test"))
        assert not (test & train) and not (test & calib) and not (calib & train)
        assert len(test) == 40 and len(calib) == 40
        assert demo.make_splits(kind, sizes, seed=5) == splits  # fixed seed, same rows
    # every reply is what Python (or arithmetic) says it is, checked independently
    for row in demo.make_splits("code", sizes, seed=6)["test"]:
        scope = {}
        assign, call = row["input"].split("\n")
        exec(assign, scope)
        assert call.startswith("print(") and call.endswith(")")
        assert str(eval(call[len("print(") : -1], scope)) == row["output"]
    for row in demo.make_splits("math", sizes, seed=6)["test"]:
        a, op, b, _, c = row["answer"].split(". The answer is ")[0].split()
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert row["answer"].endswith(f"The answer is {c}.") and a in row["question"] and b in row["question"]


def test_tokenizer_splits_digits_and_renders_the_chat_template(tmp_path):
    rows = demo.make_splits("math", dict(train_rows=100, calib_rows=0, test_rows=0), seed=1)["train"]
    tok = demo.build_tokenizer([json.dumps(r) for r in rows], tmp_path, vocab_size=300, split_digits=True)
    ids = tok("12345 + 678", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()] == list("12345678")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert (
        text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_quick_demo_runs_the_whole_flow(tmp_path):
    root = tmp_path / "toy"
    results = demo.main(["--quick", "--root", str(root)])
    assert results == root / "results.md"
    for folder in [
        "toy-code",
        "toy-math",
        "merges/avg",
        "merges/regmean_0.1",
        "merges/regmean_1.0",
        "merges/regmeanpp_0.1",
    ]:
        assert (root / folder / "config.json").is_file()
        assert list((root / folder / "lm_eval_results_preds").glob("*/results_*.json"))
    for name in ["toy-code", "toy-math"]:
        assert (root / "grams" / name / "gram.safetensors").is_file()
    lines = results.read_text().split("\n\n")[0].splitlines()  # the table; figures and times follow it
    assert lines[0].split("|")[1:-1] == [" Method/Benchmark ", " toy-code ", " toy-math ", " Mean "]
    labels = [line.split("|")[1].strip() for line in lines[3:]]
    assert labels == [
        "Code expert",
        "Math expert",
        "Average",
        "RegMean (α=0.1)",
        "RegMean (α=1.0)",
        "RegMean++ (α=0.1)",
    ]
    for line in lines[3:]:
        code, math, mean = (float(c) for c in line.split("|")[2:5])
        assert 0 <= code <= 100 and 0 <= math <= 100 and mean == pytest.approx((code + math) / 2, abs=0.01)
    assert "demo wall time" in results.read_text()
    assert (root / "results.png").stat().st_size > 1000
    assert demo.is_built(root)  # so the next run reuses the experts
    # what a user types next (issue 25): the merges' table from their results, beside them
    table = evaluate.main(["--table", *map(str, sorted((root / "merges").iterdir()))])
    assert table == root / "merges" / "results.md"
    md = table.read_text().split("\n\n")[0].splitlines()  # the scores; the normalized block follows
    assert md[0] == "| Method/Benchmark | toy_code | toy_math |" and len(md) == 3 + 2 + 4
    # the experts found through the merges' model cards, their results read where the demo wrote them
    assert [line.split("|")[1].strip() for line in md[3:5]] == ["toy-code (expert)", "toy-math (expert)"]
    assert [line.split("|")[2:4] for line in md[3:]] == [line.split("|")[2:4] for line in lines[3:]]
    assert "| Normalized | toy_code | toy_math | Mean |" in table.read_text()
    demo_norm = results.read_text().split("| Normalized |")[1].split("\n\n")[0].splitlines()[3:]
    assert [ln.split("|")[2:] for ln in demo_norm] == [
        ln.split("|")[2:] for ln in table.read_text().split("| Normalized |")[1].split("\n\n")[0].splitlines()[3:]
    ]
