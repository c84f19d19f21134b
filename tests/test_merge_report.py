"""The output error figures eᵢ(W) = tr((W − Wᵢ)Gᵢ(W − Wᵢ)ᵀ) / tr(WᵢGᵢWᵢᵀ): against a float64
computation from the experts' explicit inputs Xᵢ, RegMean's weighted sum never above the
average's at alpha 1, zero for identical experts, regmean++ on the grams its solve used, the
sampled estimate within its stated error, and judge_merge.py on avg and regmean folders."""

import json
import shutil

import pytest
import torch
from test_merge import activations, grams_of, read_folder, run, write_project_grams
from test_regmeanpp import reference_regmeanpp, run_pp

import judge_merge
from regmean import merge_report, solver
from regmean.utils import UserError


def reference_figures(x: torch.Tensor, w: torch.Tensor, wi: torch.Tensor) -> float:
    """‖Xᵢ(W − Wᵢ)ᵀ‖² / ‖XᵢWᵢᵀ‖² in float64, from the inputs themselves."""
    x, w, wi = x.double(), w.double(), wi.double()
    return ((x @ (w - wi).T) ** 2).sum().item() / ((x @ wi.T) ** 2).sum().item()


def figure_of_gram(g: torch.Tensor, w: torch.Tensor, wi: torch.Tensor) -> float:
    d = w.double() - wi.double()
    return torch.trace(d @ g.double() @ d.T).item() / torch.trace(wi.double() @ g.double() @ wi.double().T).item()


@pytest.fixture(scope="module")
def calib(experts, calib_files, tokenizer, tmp_path_factory):
    """Each expert's inputs Xᵢ of every linear layer on its own calibration data, and its gram file."""
    d = tmp_path_factory.mktemp("grams")
    out = []
    for expert, kind in zip(experts, ["code", "math"]):
        acts = activations(expert, calib_files[kind], kind, tokenizer)
        n = next(iter(acts.values())).shape[0]
        out.append(dict(acts=acts, st=write_project_grams(d / f"{kind}.safetensors", grams_of(acts), n)))
    return out


@pytest.fixture(scope="module")
def expert_tensors(experts):
    return [read_folder(e) for e in experts]


def regmean_args(experts, calib, out, *extra):
    return ["regmean", "--models", *experts, "--grams", calib[0]["st"], calib[1]["st"], "--output-dir", out, *extra]


# ----------------------------------------------------------------------------- the math alone
def test_output_error_terms_are_the_quadratic_forms():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 12, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [(x.T @ x / len(x)).float() for x in xs]
    ws = [torch.randn(7, 12, generator=g) for _ in range(2)]
    merged, average = torch.randn(7, 12, generator=g), (ws[0] + ws[1]) / 2
    terms = solver.output_error_terms(merged, average, ws, grams)
    assert terms.shape == (3, 2, 7) and terms.dtype == torch.float64
    for i, (x, w) in enumerate(zip(xs, ws)):
        for k, other in enumerate((merged, average)):
            ref = ((x @ (other.double() - w.double()).T) ** 2).sum(0) / len(x)  # per output row
            assert torch.allclose(terms[k, i], ref, rtol=1e-5)
        assert torch.allclose(terms[2, i], ((x @ w.double().T) ** 2).sum(0) / len(x), rtol=1e-5)
    figures = merge_report.layer_figures(terms, 7)
    assert figures["merged_se"] == [0.0, 0.0]  # every row used: no sampling error
    assert figures["merged"][0] == pytest.approx(reference_figures(xs[0], merged, ws[0]), rel=1e-5)


def test_sampled_rows():
    assert merge_report.sample_rows(4096, 64).tolist() == list(range(32, 4096, 64))
    assert len(merge_report.sample_rows(64, 64)) == 16  # at least MIN_ROWS
    assert merge_report.sample_rows(10, 64).tolist() == list(range(10))
    assert merge_report.sample_rows(100, 1).tolist() == list(range(100))
    # the merge takes them block by block, as slices: the same rows whatever the blocks
    for num_rows, every, block in [(4096, 64, 1000), (4096, 256, 33), (100, 1, 7), (64, 64, 5), (32000, 256, 8192)]:
        step, got = merge_report.sample_step(num_rows, every), []
        for start in range(0, num_rows, block):
            rows = (start, min(start + block, num_rows))
            got += list(range(*rows))[merge_report.block_slice(rows, step)]
        assert got == merge_report.sample_rows(num_rows, every).tolist(), (num_rows, every, block)


# ----------------------------------------------------------------------------- merges
# At alpha 1 the merged error lies in directions the grams hardly excite (this tiny GQA model's o_proj
# grams are nearly singular), where the float32 grams and products round at ~1e-4 of the figure.
@pytest.mark.parametrize("alpha,tol", [(0.1, 1e-4), (1.0, 1e-3)])
def test_regmean_figures_match_float64_from_the_inputs(experts, calib, expert_tensors, tmp_path, alpha, tol, capsys):
    out = run(*regmean_args(experts, calib, tmp_path / "m", "--alpha", alpha, "--error-sample-every", 1))
    merged, report = read_folder(out), json.loads((out / "merge_report.json").read_text())
    layers = {r["tensor"]: r for r in report["layers"]}
    assert len(layers) == 15  # 7 per decoder layer + lm_head
    for name, row in layers.items():
        module, ws = name.removesuffix(".weight"), [t[name] for t in expert_tensors]
        average = (ws[0] + ws[1]) / 2
        fig = row["output_error"]
        assert fig["rows"] == fig["of"] == ws[0].shape[0]
        for i, c in enumerate(calib):
            x = c["acts"][module]
            assert fig["merged"][i] == pytest.approx(reference_figures(x, merged[name], ws[i]), rel=tol), name
            assert fig["average"][i] == pytest.approx(reference_figures(x, average, ws[i]), rel=tol), name
        if alpha == 1.0:  # RegMean minimizes Σ cᵢ tr((W − Wᵢ)Gᵢ(W − Wᵢ)ᵀ): never above the average's
            unnormalized = [sum(0.5 * e * n for e, n in zip(fig[k], fig["energy"])) for k in ("merged", "average")]
            assert unnormalized[0] <= unnormalized[1] * (1 + 1e-6), name
    # the summary: printed, in the card and the report; the picture written
    summary = report["output_errors"]
    assert [s["expert"] for s in summary] == ["code", "math"]
    for s in summary:
        ours = [layers[n]["output_error"]["merged"][summary.index(s)] for n in layers]
        assert (
            s["merged_worst"] == max(ours)
            and s["merged_median"] == torch.tensor(ours, dtype=torch.float64).median().item()
        )
    printed = capsys.readouterr().out
    card = (out / "README.md").read_text()
    for line in merge_report.summary_lines(summary, "regmean"):
        assert line in printed and line in card
    png = (out / "merge_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000


def test_identical_experts_give_zero(experts, calib, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(experts[0], twin)
    out = run("regmean", "--models", experts[0], twin, "--grams", calib[0]["st"], calib[0]["st"], "--output-dir",
              tmp_path / "m")  # fmt: skip
    rows = json.loads((out / "merge_report.json").read_text())["layers"]
    assert rows and all(r["output_error"]["merged"] == [0.0, 0.0] for r in rows)
    assert all(r["output_error"]["average"] == [0.0, 0.0] for r in rows)


def test_sampled_figures_are_within_their_stated_error(experts, calib, tmp_path):
    exact = run(*regmean_args(experts, calib, tmp_path / "exact", "--error-sample-every", 1))
    sampled = run(*regmean_args(experts, calib, tmp_path / "sampled"))  # the default: every 256th row, >= 16 rows
    exact, sampled = (json.loads((d / "merge_report.json").read_text())["layers"] for d in (exact, sampled))
    worst = 0.0
    for e, s in zip(exact, sampled):
        fe, fs = e["output_error"], s["output_error"]
        step = merge_report.sample_step(fs["of"])
        assert fs["rows"] == len(range(step // 2, fs["of"], step)) >= min(16, fs["of"])
        for k in ("merged", "average"):
            for i in range(2):
                gap = abs(fs[k][i] - fe[k][i]) / fe[k][i]
                assert gap <= 4 * fs[f"{k}_se"][i] + 1e-6, (e["tensor"], k, i)
                worst = max(worst, fs[f"{k}_se"][i])
    assert 0 < worst < 0.5  # 16 of 64 rows of a tiny random model: a rough estimate, but a stated one
    assert any(s["output_error"]["rows"] == s["output_error"]["of"] for s in sampled)  # k/v: 16 rows, all used


def test_regmeanpp_figures_use_the_grams_of_its_solve(experts, calib_files, tmp_path):
    out = run_pp(experts, calib_files, tmp_path / "pp", "--alpha", 0.1, "--error-sample-every", 1)
    _, ref_grams = reference_regmeanpp(experts, calib_files, 0.1)
    merged, ws = read_folder(out), [read_folder(e) for e in experts]
    rows = json.loads((out / "merge_report.json").read_text())["layers"]
    assert len(rows) == 15
    for row in rows:
        name = row["tensor"]
        for i, g in enumerate(ref_grams[name.removesuffix(".weight")]):
            ref = figure_of_gram(g, merged[name], ws[i][name])
            assert row["output_error"]["merged"][i] == pytest.approx(ref, rel=2e-3), name
    assert (out / "merge_report.png").exists()


# ----------------------------------------------------------------------------- judge_merge.py
def test_judge_an_avg_folder_and_a_regmean_folder(experts, calib, expert_tensors, tmp_path):
    grams = ["--grams", calib[0]["st"], calib[1]["st"]]
    avg = run("avg", "--models", *experts, "--output-dir", tmp_path / "avg")
    report = judge_merge.main([str(a) for a in [avg, "--models", *experts, *grams, "--sample-every", 1]])
    judged = json.loads(report.read_text())
    assert report.parent == avg and (avg / "judge_report.png").exists()
    for row in judged["layers"]:
        fig, name = row["output_error"], row["tensor"]
        assert fig["merged"] == fig["average"]  # the avg folder is the average, as written
        x = calib[1]["acts"][name.removesuffix(".weight")]
        ws = [t[name] for t in expert_tensors]
        assert fig["merged"][1] == pytest.approx(reference_figures(x, (ws[0] + ws[1]) / 2, ws[1]), rel=1e-4)
    # a regmean folder judged on the same grams and rows gives the merge's own figures
    rm = run(*regmean_args(experts, calib, tmp_path / "rm"))
    out = judge_merge.main([str(a) for a in [rm, "--models", *experts, *grams, "--output", tmp_path / "j"]])
    own = json.loads((rm / "merge_report.json").read_text())["layers"]
    judged = json.loads(out.read_text())["layers"]
    assert [r["tensor"] for r in own] == [r["tensor"] for r in judged]
    for a, b in zip(own, judged):
        for k in ("merged", "average"):
            assert a["output_error"][k] == pytest.approx(b["output_error"][k], rel=1e-6)
    with pytest.raises(UserError, match="not a folder"):
        judge_merge.main([str(tmp_path / "nowhere"), "--models", *map(str, experts), *map(str, grams)])
