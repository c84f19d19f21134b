"""compute_gram.py --holdout F: every round(1/F)-th row goes to gram-holdout.safetensors, the rest to
gram.safetensors; together, token-weighted, they are the grams of all rows, on both plans and on two processes;
in the forward passes of all rows (whole-model plan) or one run of each layer (layer plan), no more than without
--holdout, checkpointed and resumed; a bad fraction is refused in one line before any work."""

import pytest
from test_gram_distributed import launch
from test_gram_layers import MAX_LENGTH, gram, interrupted_after_layer_0
from torch import nn

from conftest import ROOT
from regmean.grams import HOLDOUT_FILE, holdout_rows
from regmean.layerwise import PARTS_DIR
from regmean.model_plan import checkpoint_path
from regmean.tensor_io import GramFile
from regmean.utils import GRAM_FILE, UserError


def assert_parts_make_the_whole(out, whole):
    fit, held, all_rows = GramFile(out / GRAM_FILE), GramFile(out / HOLDOUT_FILE), GramFile(whole)
    n_fit, n_held = (int(g.metadata["num_tokens"]) for g in (fit, held))
    assert n_fit + n_held == int(all_rows.metadata["num_tokens"]) and n_held > 0
    assert fit.metadata["holdout"].startswith("fit rows: 1 row in 3 held out (rows 2, 5, ...")
    assert held.metadata["holdout"].startswith("held-out rows: 1 row in 3")
    assert int(fit.metadata["num_examples"]) + int(held.metadata["num_examples"]) == 13
    for name in all_rows.modules():
        ref = all_rows.get(name).double()
        joined = (n_fit * fit.get(name).double() + n_held * held.get(name).double()) / (n_fit + n_held)
        assert ((joined - ref).abs().max() / ref.abs().max()).item() < 1e-6, name
    assert sorted(p.name for p in out.iterdir()) == sorted([GRAM_FILE, HOLDOUT_FILE])


@pytest.mark.parametrize("plan", ["model", "layers"])
def test_holdout_and_fit_grams_are_the_grams_of_all_rows(experts, calib_files, tmp_path, plan):
    whole = gram(experts[0], calib_files["code"], tmp_path / "all", "--plan", plan)
    gram(experts[0], calib_files["code"], tmp_path / "split", "--plan", plan, "--holdout", 0.34)
    assert_parts_make_the_whole(tmp_path / "split", whole)


@pytest.mark.parametrize("plan", ["model", "layers"])
def test_holdout_on_two_processes(experts, calib_files, tmp_path, plan):
    whole = gram(experts[0], calib_files["code"], tmp_path / "all", "--plan", plan)
    out = tmp_path / "two"
    args = ["--model", str(experts[0]), "--dataset", str(calib_files["code"]), "--format", "code"]
    args += ["--output-dir", str(out), "--max-length", str(MAX_LENGTH), "--batch-size", "2", "--device", "cpu"]
    args += ["--dtype", "float32", "--plan", plan, "--holdout", "0.34"]
    proc = launch(2, ROOT / "compute_gram.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_parts_make_the_whole(out, whole)


def forward_passes(run, stop_at=None):
    """run() with the model's forward passes counted; the first one once `stop_at` exists raises KeyboardInterrupt
    (like Ctrl-C after the first checkpoint)."""
    count = []

    def hook(module, args):
        if type(module).__name__ == "LlamaModel":
            if stop_at is not None and stop_at.exists():
                raise KeyboardInterrupt
            count.append(1)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return len(count)


def test_holdout_is_one_pass_and_resumes(experts, calib_files, tmp_path, capsys):
    def run(out, *extra):
        return lambda: gram(experts[0], calib_files["code"], out, "--plan", "model", *extra)

    whole = tmp_path / "all" / GRAM_FILE
    passes = forward_passes(run(tmp_path / "all"))
    assert forward_passes(run(tmp_path / "split", "--holdout", 0.34)) == passes  # the rows of both, once
    assert_parts_make_the_whole(tmp_path / "split", whole)

    out, args = tmp_path / "resumed", ("--holdout", 0.34, "--checkpoint-every", 1)
    with pytest.raises(KeyboardInterrupt):
        forward_passes(run(out, *args), stop_at=checkpoint_path(out))
    assert not (out / GRAM_FILE).exists() and not (out / HOLDOUT_FILE).exists()
    capsys.readouterr()
    assert forward_passes(run(out, *args)) == passes - 1  # the checkpointed batch is not run again
    assert "resuming from" in capsys.readouterr().err
    assert_parts_make_the_whole(out, whole)


def test_holdout_on_the_layer_plan_reads_each_layer_once_and_resumes(experts, calib_files, tmp_path, monkeypatch):
    """The held-out rows' hidden states go through each layer beside the fit rows' (no second run of the layers);
    interrupted after layer 0, both of its part files are kept and the rerun runs layer 1 only."""
    from regmean import layerwise

    loads, grams_of_layer = [], layerwise.layer_grams
    load_layer = layerwise.DecoderAdapter.load_layer
    monkeypatch.setattr(
        layerwise.DecoderAdapter, "load_layer", lambda self, i, *a: loads.append(i) or load_layer(self, i, *a)
    )

    def run(out, *extra):
        loads.clear()
        gram(experts[0], calib_files["code"], out, "--plan", "layers", *extra)
        return list(loads)

    whole = tmp_path / "all" / GRAM_FILE
    layers = run(tmp_path / "all")
    assert run(tmp_path / "split", "--holdout", 0.34) == layers == [0, 1]
    assert_parts_make_the_whole(tmp_path / "split", whole)

    out, args = tmp_path / "resumed", ("--holdout", 0.34, "--checkpoint-every", 1)
    monkeypatch.setattr(layerwise, "layer_grams", interrupted_after_layer_0(out, grams_of_layer))
    with pytest.raises(KeyboardInterrupt):
        run(out, *args)
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == [
        "layer-00000-held.safetensors",
        "layer-00000.safetensors",
    ]
    calls = []
    monkeypatch.setattr(layerwise, "layer_grams", lambda *a, **k: calls.append(1) or grams_of_layer(*a, **k))
    run(out, *args)
    assert len(calls) == 1  # layer 1 only
    assert_parts_make_the_whole(out, whole)


def test_holdout_rows_are_every_kth_row():
    fit, held, rule = holdout_rows(10, 0.25)
    assert held == [3, 7] and fit == [0, 1, 2, 4, 5, 6, 8, 9] and "1 row in 4 held out" in rule
    assert holdout_rows(5, None) == ([0, 1, 2, 3, 4], [], "")


@pytest.mark.parametrize("fraction, message", [(0.0, "in \\(0, 1\\)"), (1.0, "in \\(0, 1\\)"), (0.1, "no row is held")])
def test_bad_holdout_is_refused(experts, calib_files, tmp_path, fraction, message):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(calib_files["code"].read_text().splitlines()[:5]) + "\n")
    with pytest.raises(UserError, match=message):
        gram(experts[0], data, tmp_path / "out", "--holdout", fraction)
    assert not (tmp_path / "out").exists()
