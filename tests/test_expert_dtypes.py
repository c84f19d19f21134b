"""Experts stored in float16, and experts of mixed dtypes: the output dtype rule of --dtype auto (the experts'
dtype; where they differ, the widest of theirs, float32 for bfloat16 with float16) and the merge's values."""

import json

import pytest
import torch
from test_merge import calib, read_folder, reference_regmean  # noqa: F401 (calib: the fixture, float32 grams)

import merge_model
from conftest import save_expert


@pytest.fixture(scope="module")
def typed_experts(base_model, tokenizer, tmp_path_factory):
    """The two fixture experts' seeds, saved in each of float32, bfloat16 and float16."""
    d = tmp_path_factory.mktemp("typed")
    return {
        (dtype, seed): save_expert(base_model, d / f"{dtype}-{seed}", tokenizer, seed, dtype=getattr(torch, dtype))
        for dtype in ("float32", "bfloat16", "float16")
        for seed in (10, 11)
    }


def merge(models, calib, out):  # noqa: F811
    merge_model.main(
        ["regmean", "--models", *map(str, models), "--grams", str(calib[0]["st"]), str(calib[1]["st"])]
        + ["--alpha", "0.1", "--output-dir", str(out)]
    )
    return read_folder(out), json.loads((out / "config.json").read_text())["dtype"]


@pytest.mark.parametrize(
    "dtypes, want",
    [
        (("float16", "float16"), "float16"),
        (("float32", "bfloat16"), "float32"),
        (("bfloat16", "float32"), "float32"),  # not the last expert's
        (("float16", "bfloat16"), "float32"),
        (("bfloat16", "bfloat16"), "bfloat16"),
    ],
)
def test_output_dtype_rule_and_values(typed_experts, calib, dtypes, want, tmp_path):  # noqa: F811
    models = [typed_experts[dtype, seed] for dtype, seed in zip(dtypes, (10, 11))]
    merged, written = merge(models, calib, tmp_path / "m")
    assert written == want
    assert {t.dtype for t in merged.values()} == {getattr(torch, want)}
    tensors = [read_folder(m) for m in models]
    for name, w in merged.items():
        module = name.rsplit(".", 1)[0]
        ws = [t[name].double() for t in tensors]  # each expert's weights as stored, in float64
        if module in calib[0]["grams"]:
            ref = reference_regmean(ws, [c["grams"][module] for c in calib], 0.1, [0.5, 0.5])
        else:
            ref = sum(ws) / 2
        # the float64 closed form on the stored weights, rounded once to the output dtype
        bound = torch.finfo(getattr(torch, want)).eps * ref.abs().max() + 1e-6 * ref.abs().max()
        assert (w.double() - ref).abs().max() <= bound, (name, dtypes)


def test_help_states_the_dtype_rule(capsys):
    with pytest.raises(SystemExit):
        merge_model.main(["--help"])
    assert "where experts differ, the widest of theirs, and float32 for bfloat16 with float16" in " ".join(
        capsys.readouterr().out.split()
    )
