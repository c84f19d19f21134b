"""merge_model.py regmean --alpha auto | auto-global: the criterion against its float64 closed form, a case
whose best α is known (inputs from a known covariance), α = 1 on the fit grams themselves, a one-value grid
equal to the fixed-α merge, the recipe round trip of a per-input-α merge, and the bad inputs."""

import json

import pytest
import torch
from test_merge import activations, grams_of, read_folder, reference_regmean

import merge_model
from regmean.alpha_choice import ALPHA_GRID, alpha_curve, choose_alphas
from regmean.tensor_io import checkpoint_files, model_fingerprint, save_grams
from regmean.utils import UserError

COEFS = [0.5, 0.5]


def true_error(ws, grams, sigmas, alpha):
    """Σᵢ cᵢ tr((W(α) − Wᵢ) Σᵢ (W(α) − Wᵢ)ᵀ), W(α) the float64 RegMean solution on `grams`."""
    w = reference_regmean(ws, grams, alpha, COEFS)
    return sum(c * torch.trace((w - wi) @ s @ (w - wi).T).item() for wi, s, c in zip(ws, sigmas, COEFS))


def known_case(seed, n=24, fit_samples=120, val_samples=600, rows=48):
    """Two experts whose inputs come from known covariances Σᵢ: fit grams from few samples, validation grams
    from independent ones."""
    g = torch.Generator().manual_seed(seed)
    sigmas = []
    for _ in COEFS:
        a = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        sigmas.append(a @ a.T * 0.5 + torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.1))
    base = torch.randn(rows, n, generator=g, dtype=torch.float64)
    ws = [base + 0.3 * torch.randn(rows, n, generator=g, dtype=torch.float64) for _ in COEFS]

    def gram(s, k):
        x = torch.randn(k, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s).T
        return x.T @ x / k

    return ws, sigmas, [gram(s, fit_samples) for s in sigmas], [gram(s, val_samples) for s in sigmas]


@pytest.mark.parametrize("how, tol", [("solver", 1e-5), ("eigh", 1e-6), ("cholesky", 1e-6)])
def test_criterion_is_the_closed_form(how, tol):
    ws, _, fit, val = known_case(0)
    f32 = [[x.float() for x in xs] for xs in (fit, val, ws)]
    curve = alpha_curve(*f32, COEFS, ALPHA_GRID, how=how)
    for k, alpha in enumerate(ALPHA_GRID):
        w = reference_regmean([w.float() for w in ws], [f.float() for f in fit], alpha, COEFS)
        for i, (wi, v) in enumerate(zip(ws, val)):
            ref = torch.trace((w - wi) @ v.float().double() @ (w - wi).T).item()
            assert abs(curve["per_expert"][k, i].item() - ref) <= tol * ref, (alpha, i)


def test_unexcited_directions_agree_with_the_solver():
    """Fit grams of rank 8, their sum of rank 16 < 24: at α = 1 the solver leaves directions at the average, and
    every way of taking the criterion goes to the solver there; elsewhere the closed forms equal its solution."""
    ws, _, fit, val = known_case(1, fit_samples=8)
    f32 = [[x.float() for x in xs] for xs in (fit, val, ws)]
    curves = {how: alpha_curve(*f32, COEFS, ALPHA_GRID, how=how) for how in ("solver", "eigh", "cholesky")}
    assert 1.0 in curves["eigh"]["solved"] and 1.0 in curves["cholesky"]["solved"]
    for how in ("eigh", "cholesky"):
        rel = (curves[how]["per_expert"] - curves["solver"]["per_expert"]).abs() / curves["solver"]["per_expert"]
        assert rel.max().item() < 1e-5, (how, rel.max().item())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auto_finds_the_oracle_alpha(seed):
    ws, sigmas, fit, val = known_case(seed)
    true = [true_error(ws, fit, sigmas, a) for a in ALPHA_GRID]
    oracle = min(range(len(ALPHA_GRID)), key=true.__getitem__)
    curve = alpha_curve([f.float() for f in fit], [v.float() for v in val], [w.float() for w in ws], COEFS, ALPHA_GRID)
    chosen = ALPHA_GRID.index(choose_alphas({"x": curve}, COEFS, ALPHA_GRID, "auto")["x"])
    assert abs(chosen - oracle) <= 1, (ALPHA_GRID[chosen], ALPHA_GRID[oracle])
    assert 0 < oracle < len(ALPHA_GRID) - 1 and ALPHA_GRID[oracle] != 0.1  # the case is one where α matters
    assert true[chosen] < true[ALPHA_GRID.index(0.1)] and true[chosen] < true[-1]


# ----------------------------------------------------------------------------- through merge_model.py
def write_grams(path, expert, grams, num_tokens):
    """A gram file of `expert` (its fingerprint recorded), shared inputs stored once as compute_gram.py does."""
    alias = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    aliases = {
        k: k.rsplit(".", 1)[0] + "." + alias[k.rsplit(".", 1)[-1]] for k in grams if k.rsplit(".", 1)[-1] in alias
    }
    stored = {k: v for k, v in grams.items() if k not in aliases}
    fp = model_fingerprint(checkpoint_files(expert))
    save_grams(path, stored, aliases, num_tokens, dict(model=str(expert), dataset="t.jsonl", model_fingerprint=fp))
    return str(path)


@pytest.fixture(scope="module")
def gram_sets(experts, calib_files, tokenizer, tmp_path_factory):
    """Per expert: fit grams (its calibration file) and validation grams (the other kind's file: other inputs)."""
    d = tmp_path_factory.mktemp("grams")
    out = {"fit": [], "val": []}
    for expert, kind, other in zip(experts, ["code", "math"], ["math", "code"]):
        for which, data in (("fit", kind), ("val", other)):
            acts = activations(expert, calib_files[data], data, tokenizer)
            n = next(iter(acts.values())).shape[0]
            out[which].append(write_grams(d / f"{expert.name}-{which}.safetensors", expert, grams_of(acts), n))
    return out


def run(*args):
    return merge_model.main([str(a) for a in args])


def merge_auto(experts, fit, val, out, *extra):
    return run(
        "regmean", "--models", *experts, "--grams", *fit, "--validation-grams", *val, "--output-dir", out, *extra
    )


def report_of(out):
    return json.loads((out / "merge_report.json").read_text())


def test_fit_grams_as_validation_choose_alpha_one(experts, gram_sets, tmp_path):
    out = merge_auto(experts, gram_sets["fit"], gram_sets["fit"], tmp_path / "m", "--alpha", "auto")
    rows = report_of(out)["layers"]
    assert rows and all(r["alpha"] == 1.0 for r in rows), {r["tensor"]: r["alpha"] for r in rows}
    assert all(min(r["validation"]["curve"]) == r["validation"]["curve"][-1] for r in rows)


def test_auto_merge_report_card_and_recipe_round_trip(experts, gram_sets, tmp_path):
    out = merge_auto(experts, gram_sets["fit"], gram_sets["val"], tmp_path / "m", "--alpha", "auto")
    report = report_of(out)
    alphas = report["alpha_choice"]["alphas"]
    assert set(alphas.values()) <= set(ALPHA_GRID) and len(alphas) == 2 * 4 + 1  # qkv, o, gate/up, down; lm_head
    assert report["recipe"]["parameters"]["alphas"] == alphas and "alpha" not in report["recipe"]["parameters"]
    for row in report["layers"]:
        assert row["alpha"] == alphas[row["gram"]] and len(row["validation"]["experts"]) == 2
    card = (out / "README.md").read_text()
    assert "alpha chosen per input on validation grams" in card and "- o_proj: median" in card
    assert (out / "merge_report_alpha.png").stat().st_size > 0
    again = run("--config", out / "README.md", "--output-dir", tmp_path / "again")
    assert [r["alpha"] for r in report_of(again)["layers"]] == [r["alpha"] for r in report["layers"]]
    first, second = read_folder(out), read_folder(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_auto_global_is_one_alpha(experts, gram_sets, tmp_path):
    out = merge_auto(experts, gram_sets["fit"], gram_sets["val"], tmp_path / "m", "--alpha", "auto-global")
    report = report_of(out)
    chosen = {r["alpha"] for r in report["layers"]}
    assert len(chosen) == 1 and report["recipe"]["parameters"]["alpha"] == chosen.pop()


def test_one_value_grid_is_the_fixed_alpha_merge(experts, gram_sets, tmp_path):
    auto = merge_auto(
        experts, gram_sets["fit"], gram_sets["val"], tmp_path / "a", "--alpha", "auto", "--alpha-grid", 0.3
    )
    fixed = run(
        "regmean", "--models", *experts, "--grams", *gram_sets["fit"], "--alpha", 0.3, "--output-dir", tmp_path / "f"
    )
    first, second = read_folder(auto), read_folder(fixed)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "auto", "--validation-grams", "SWAP"], "--validation-grams: "),
        (["--alpha", "auto", "--validation-grams", "VAL", "--alpha-grid", "0.5", "1.5"], "must be in [0, 1], got 1.5"),
        (["--alpha", "auto"], "needs validation grams"),
        (["--alpha", "auto", "--validation-grams", "VAL", "--method-avg"], "is for regmean"),
        (["--alpha", "0.5", "--validation-grams", "VAL"], "are for --alpha auto"),
    ],
)
def test_bad_inputs(experts, gram_sets, tmp_path, args, message):
    val = gram_sets["val"]
    args = [a for x in args for a in ({"SWAP": val[::-1], "VAL": val}.get(x, [x]))]
    method = "avg" if "--method-avg" in args else "regmean"
    args = [a for a in args if a != "--method-avg"]
    grams = [] if method == "avg" else ["--grams", *gram_sets["fit"]]
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        run(method, "--models", *experts, *grams, *args, "--output-dir", tmp_path / "m")
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_judge_reports_the_validation_error(experts, gram_sets, tmp_path):
    from regmean.judge import judge

    fixed = run(
        "regmean", "--models", *experts, "--grams", *gram_sets["fit"], "--alpha", 1.0, "--output-dir", tmp_path / "f"
    )
    fit, val = gram_sets["fit"], gram_sets["val"]
    on_fit = json.loads(judge(str(fixed), validation_grams=fit, output=str(tmp_path / "j1")).read_text())
    assert on_fit["validation"]["layers"] == on_fit["layers"]  # the fit grams as validation grams: the same figures
    total = on_fit["validation"]["total"]
    assert total["merged_relative"] < total["average_relative"]  # α = 1 minimizes exactly this sum
    on_val = json.loads(judge(str(fixed), validation_grams=val, output=str(tmp_path / "j2")).read_text())
    assert on_val["validation"]["total"]["merged"] > 0 and on_val["validation"]["grams"] == val
    with pytest.raises(UserError, match="--validation-grams: "):
        judge(str(fixed), validation_grams=val[::-1], output=str(tmp_path / "j3"))
    assert not (tmp_path / "j3").exists()
