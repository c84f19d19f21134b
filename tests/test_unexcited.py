"""Input directions the calibration data never excites: with fewer calibration tokens than a layer's
input width, Σ Gᵢ is singular at alpha 1 and its null space is rotated (made of real activations,
not of whole input features). The merge must leave those directions at the experts' weighted
average and fit the data as a float64 solve does. Everything comes from real forward passes of a
tiny model whose hidden size is larger than the calibration tokens."""

import json

import pytest
import torch
from test_merge import activations, correction_error, grams_of, read_folder, resolved_gram, write_project_grams

import compute_gram
import merge_model
from conftest import save_expert, tiny_config
from demo import write_jsonl

HIDDEN, INTERMEDIATE = 128, 256  # more than the calibration tokens of all experts together
MAX_LENGTH = 64
NULL_TOLERANCE = 1e-3  # the merged weight's part in the never-excited directions, relative to the average's norm
FIT_TOLERANCE = 1e-3  # the merge's output error on the data, relative to its correction's, against float64


def rows(seed):
    """Two short math rows per expert: a few dozen tokens in all."""
    return [
        {"question": f"What is {seed + 11} + {seed + 3}?", "answer": f"{2 * seed + 14}."},
        {"question": f"Add {seed} and 5.", "answer": f"{seed + 5}."},
    ]


@pytest.fixture(scope="module")
def wide(tokenizer, tmp_path_factory):
    """Three experts of a tiny Llama with hidden size 128, each with its own short calibration file
    and its float64 activations on it (a float32 forward pass, one row at a time)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("wide")
    torch.manual_seed(3)
    config = tiny_config(len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=8)
    base = AutoModelForCausalLM.from_config(config)
    experts = [save_expert(base, d / f"e{i}", tokenizer, seed=20 + i, scale=0.05) for i in range(3)]
    files = [write_jsonl(d / f"calib{i}.jsonl", rows(i + 1)) for i in range(3)]
    acts = [activations(e, f, "math", tokenizer) for e, f in zip(experts, files)]
    return dict(experts=experts, files=files, acts=acts, tensors=[read_folder(e) for e in experts])


def check_merge(out, wide, which, coefs):
    """Every RegMean layer of merge `out` of experts `which` against float64:
    (1) in the directions no expert's activations reach (the null space of the stacked activations,
    from their SVD) the merged weight is the weighted average, within NULL_TOLERANCE of the
    average's norm;
    (2) on the data, in every direction float32 grams resolve, the merged layer's outputs are those
    of the float64 minimum-norm solve (pinv), within FIT_TOLERANCE of its correction to the average.
    "Resolved" here: an eigen-direction u of the float64 Σ cᵢ Gᵢ whose eigenvalue is 100 times
    above eps32 · (Σᵢ |uᵢ| sqrt(Aᵢᵢ))², how far float32 rounding can move it (test_merge.resolved_gram;
    the merge keeps directions from 30 times up). Below that a float32 gram cannot tell data from
    rounding; the error on all directions is printed. Returns the null dimensions."""
    merged = read_folder(out)
    report = {r["tensor"]: r for r in json.loads((out / "merge_report.json").read_text())["layers"]}
    nulls = {}
    for module in wide["acts"][0]:
        name = module + ".weight"
        xs = [wide["acts"][i][module] for i in which]
        ws = [wide["tensors"][i][name].double() for i in which]
        average = sum(c * w for c, w in zip(coefs, ws))
        a = sum(c * x.T @ x / len(x) for c, x in zip(coefs, xs))
        rhs = sum(c * (x.T @ x / len(x)) @ (w - average).T for c, x, w in zip(coefs, xs, ws))
        ref = average + (torch.linalg.pinv(a, hermitian=True) @ rhs).T
        _, s, vh = torch.linalg.svd(torch.cat(xs), full_matrices=True)
        null = vh[int((s > s[0] * 1e-10).sum()) :].T  # [in, in - rank]
        w = merged[name].double()
        nulls[module] = null.shape[1]
        if null.shape[1]:
            assert bool((torch.diagonal(a) > 0).all()), f"{module}: a dead input feature, not a rotated null space"
            part = ((w - average) @ null).norm() / average.norm()
            assert part <= NULL_TOLERANCE, f"{module}: {part:.2e} of the average in {null.shape[1]} null directions"
            assert report[name]["unexcited"] >= null.shape[1] and report[name]["path"] == "eigh64", report[name]
        fit = correction_error(w, ref, average, resolved_gram(a))
        assert fit <= FIT_TOLERANCE, f"{module}: output off float64's by {fit:.2e} of the correction"
        every = correction_error(w, ref, average, a)
        print(f"{module}: {null.shape[1]} null directions; against float64 on all directions {every:.1e}")
    assert sum(n > 0 for n in nulls.values()) >= 5, nulls  # most layers have unexcited directions
    return nulls


@pytest.mark.parametrize("which, weights", [((0, 1), [1, 3]), ((0, 1, 2), [1, 1, 2])])
def test_unexcited_directions_keep_the_average(wide, which, weights, tmp_path, capsys):
    """Grams of the test's own forward passes (float32, as compute_gram.py stores them), merged at alpha 1."""
    grams = []
    for i in which:
        acts = wide["acts"][i]
        num_tokens = len(next(iter(acts.values())))
        grams.append(write_project_grams(tmp_path / f"g{i}.safetensors", grams_of(acts), num_tokens))
    out = tmp_path / "m"
    merge_model.main(
        ["regmean", "--models", *[str(wide["experts"][i]) for i in which], "--grams", *map(str, grams)]
        + ["--weights", *map(str, weights), "--alpha", "1", "--dtype", "float32", "--output-dir", str(out)]
    )
    coefs = [w / sum(weights) for w in weights]
    nulls = check_merge(out, wide, which, coefs)
    log = capsys.readouterr().out
    some = next(m for m, n in nulls.items() if n)
    assert f"{some}.weight: " in log and "input directions unexcited" in log
    assert "input directions left at the average in" in json.loads((out / "merge_report.json").read_text())["summary"]


def test_unexcited_directions_through_the_command_lines(wide, tmp_path, capsys):
    """compute_gram.py on a few tokens per expert (one row per batch: the forward passes are the test's own, the
    gram sums compute_gram.py's), then merge_model.py regmean --alpha 1."""
    grams = []
    for i in (0, 1):
        out = tmp_path / f"g{i}"
        compute_gram.main(
            ["math", "--model", str(wide["experts"][i]), "--dataset", str(wide["files"][i]), "--output-dir", str(out)]
            + ["--max-length", str(MAX_LENGTH), "--batch-size", "1", "--device", "cpu", "--dtype", "float32"]
        )
        grams.append(out / "gram.safetensors")
    num_tokens = json.loads(json.dumps(sum(len(next(iter(wide["acts"][i].values()))) for i in (0, 1))))
    assert num_tokens < HIDDEN  # fewer tokens than the width
    out = tmp_path / "m"
    merge_model.main(
        ["regmean", "--models", *[str(wide["experts"][i]) for i in (0, 1)], "--grams", *map(str, grams)]
        + ["--alpha", "1", "--dtype", "float32", "--output-dir", str(out)]
    )
    check_merge(out, wide, (0, 1), [0.5, 0.5])
    assert "input directions unexcited" in capsys.readouterr().out
