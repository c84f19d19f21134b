"""The bfloat16 paths on purpose, on any cpu (where bfloat16 is emulated these tiny models still take
seconds): grams from bfloat16 forward passes, and RegMean++ with bfloat16 forward passes of bfloat16
experts, against float64 forward passes of the same weights, at tolerances derived from bfloat16's
rounding below. The tests marked `dtype` leave the dtype at `auto`: `make test` runs them once as a
cpu with native bfloat16 would choose and once as one without (REGMEAN_CPU_BF16=1, then 0)."""

import json

import pytest
import torch
from test_gram import reference_grams, run
from test_merge import correction_error, read_folder, rel
from test_regmeanpp import reference_regmeanpp, run_pp

from conftest import save_expert
from regmean.tensor_io import GramFile
from regmean.utils import auto_dtype, dtype_name

pytestmark = pytest.mark.bf16

U = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, so a rounding moves a value by at most U of itself

# Grams. The hooks see activations x + δx, x the float64 pass's. If every direction v of a layer's
# inputs moves by ‖δx·v‖ ≤ ε‖x·v‖ (over the tokens), then, by Cauchy-Schwarz on each term of
# δG = (δxᵀx + xᵀδx + δxᵀδx) / n,
#     |vᵀ δG v| ≤ (2ε + ε²) vᵀGv,   in particular |δG_jk| ≤ (2ε + ε²)·sqrt(G_jj·G_kk)
# (the float32 sums add ~1e-6 to that, see test_dtype.py). ε: each activation is the last of a chain
# of bfloat16 roundings, each moving what it rounds by at most U and by U/√3 in rms (the error is
# spread evenly over ± half a last place). Along the longest path here, into lm_head of the 2-layer
# model, there are 18 per decoder layer (RMSNorm 2: the cast back and the weight product; q/k/v 1;
# rotary 4: cos/sin, two products, the sum; attention 2; o_proj 1; residual 1; RMSNorm 2; gate/up 1;
# SiLU 1; product 1; down 1; residual 1) and 2 in the final norm: k = 38. The weights add none (the
# experts are bfloat16, the reference runs the same values in float64). Independent roundings add in
# quadrature, sqrt(k/3)·U = 3.6 U; doubled for what attention and the gated MLP amplify (a softmax
# scales its inputs' errors by the scores' size): ε = 2·sqrt(38/3)·U = 7.1 U = 0.028, so
EPS = 2 * (38 / 3) ** 0.5 * U
GRAM_BOUND = 2 * EPS + EPS**2  # 0.057 of sqrt(G_jj G_kk); measured here at most 0.014 (3.5 U, o_proj inputs)
#
# RegMean++. Each layer solves A Wᵀ = Σ G̃ᵢ Wᵢᵀ, A = Σ G̃ᵢ, G̃ᵢ = α Gᵢ + (1 - α) diag(Gᵢ). To first order,
# gram errors δG̃ᵢ move the solution by δWᵀ = A⁻¹ Σ δG̃ᵢ (Wᵢ - W)ᵀ. By the bound above, each δG̃ᵢ is a
# relative change of G̃ᵢ of at most η = 2ε + ε² in every direction (δG̃ᵢ = G̃ᵢ^½ Eᵢ G̃ᵢ^½, ‖Eᵢ‖ ≤ η; the
# diagonal part too), and A ⪰ G̃ᵢ gives ‖A^-½ G̃ᵢ^½‖ ≤ 1, so in the norm the layer's outputs see,
# ‖E‖_A = sqrt(tr(E A Eᵀ)):
#     ‖δW‖_A ≤ η · Σᵢ eᵢ,   eᵢ = sqrt(tr((Wᵢ - W) G̃ᵢ (Wᵢ - W)ᵀ))   (how far the merge is from expert i)
# The check divides by the correction ‖W - W_avg‖_A, as every RegMean test does (correction_error), so a
# layer's tolerance is η Σᵢ eᵢ / ‖W - W_avg‖_A, from the float64 reference: 0.09-0.22 here at α = 0.5;
# measured 0.003-0.007. The earlier merged layers' own errors (~1e-5 of a weight) move the inputs far
# less than the roundings do. The bound assumes relative errors in every direction, which fails where
# the data hardly excites a gram: at α = 1 this tiny model's o_proj and down_proj grams are nearly
# singular (cond 1e4-1e7) and their merges moved by twice the bound; hence α = 0.5.
PP_ALPHA = 0.5


def hidden_size(model_dir):
    """The width `auto` times its products at, unless REGMEAN_CPU_BF16 decides (`make test` sets it)."""
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def gram_errors(path, reference):
    """{module: max_jk |G_jk - ref_jk| / sqrt(ref_jj ref_kk)}: the quantity GRAM_BOUND bounds."""
    grams = GramFile(path)
    assert sorted(grams.modules()) == sorted(reference)
    out = {}
    for name, ref in reference.items():
        d = torch.diag(ref).sqrt()
        out[name] = ((grams.get(name).double() - ref).abs() / torch.outer(d, d)).max().item()
    return out


@pytest.fixture(scope="module")
def bf16_experts(base_model, tokenizer, tmp_path_factory):
    """Two experts like the fixture's, saved in bfloat16: bfloat16 passes and the float64 reference run the same
    weights."""
    d = tmp_path_factory.mktemp("bf16-experts")
    return [
        save_expert(base_model, d / kind, tokenizer, seed, dtype=torch.bfloat16)
        for seed, kind in [(10, "code"), (11, "math")]
    ]


@pytest.fixture(scope="module")
def code_reference(bf16_experts, calib_files):
    return reference_grams(bf16_experts[0], calib_files["code"], "code")[0]


def test_grams_from_bfloat16_passes(bf16_experts, calib_files, code_reference, tmp_path):
    path = run(bf16_experts[0], calib_files["code"], tmp_path / "g", "--batch-size", "4", "--dtype", "bfloat16")
    assert GramFile(path).metadata["dtype"] == "bfloat16"
    errors = gram_errors(path, code_reference)
    for name, err in errors.items():
        assert err <= GRAM_BOUND, f"{name}: {err:.2e} of sqrt(G_jj G_kk), bound {GRAM_BOUND:.2e}"
    assert max(errors.values()) > 1e-4  # bfloat16 shows (float32 passes stay near 1e-6): the path really ran


def pp_tolerances(ref, ref_grams, experts, alpha):
    """{linear weight: η Σᵢ eᵢ / ‖W - W_avg‖_A} (see above), and A, from the float64 reference."""
    out = {}
    for module, grams in ref_grams.items():
        name, w = module + ".weight", ref[module + ".weight"].double()
        reduced = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
        a, ws = sum(reduced), [t[name].double() for t in experts]
        norm = lambda e, g: ((e @ g) * e).sum().sqrt()  # sqrt(tr(E G Eᵀ))
        spread = sum(norm(wi - w, g) for wi, g in zip(ws, reduced))
        out[name] = ((GRAM_BOUND * spread / norm(w - sum(ws) / len(ws), a)).item(), a)
    return out


@pytest.fixture(scope="module")
def pp_reference(bf16_experts, calib_files):
    return reference_regmeanpp(bf16_experts, calib_files, PP_ALPHA)


def check_pp(out, reference, experts, tolerance=None):
    """A regmean++ merge written in float32 against the float64 reference: every linear weight's
    correction within its derived bound (or `tolerance`) in the outputs' norm, every other tensor (the
    mean of bfloat16 experts: exact in float32) to 1e-6. Returns the errors."""
    ref, tensors = reference[0], [read_folder(e) for e in experts]
    merged, bounds = read_folder(out), pp_tolerances(*reference, tensors, PP_ALPHA)
    assert set(merged) == set(ref) and len(bounds) == 2 * 7 + 1
    errors = {}
    for name, w in merged.items():
        if name not in bounds:
            assert rel(w, ref[name]) <= 1e-6, name
            continue
        bound, a = bounds[name]
        average = sum(t[name].double() for t in tensors) / len(tensors)
        assert rel(ref[name], average) > 1e-3, f"{name}: the reference is the average, nothing to check"
        errors[name] = correction_error(w, ref[name], average, gram=a)
        tol = bound if tolerance is None else tolerance
        assert errors[name] <= tol, f"{name}: correction off by {errors[name]:.2e} (tolerance {tol:.2e})"
    return errors


def test_regmeanpp_with_bfloat16_passes_and_experts(bf16_experts, calib_files, pp_reference, tmp_path):
    # output in float32: written in the experts' bfloat16, each weight would move by up to U of itself, about the
    # size of the correction (0.2-0.8% of a weight at alpha 0.1)
    out = run_pp(bf16_experts, calib_files, tmp_path / "pp", "--alpha", PP_ALPHA, "--forward-dtype", "bfloat16",
                 "--dtype", "float32")  # fmt: skip
    assert json.loads((out / "merge_report.json").read_text())["settings"]["forward_dtype"] == "bfloat16"
    errors = check_pp(out, pp_reference, bf16_experts)
    assert max(errors.values()) > 1e-3  # bfloat16 shows (float32 passes: ~1e-5): the path really ran


def test_a_bfloat16_merge_a_quarter_short_fails(bf16_experts, calib_files, pp_reference, tmp_path, monkeypatch):
    """What the derived tolerances can tell (0.09-0.22 of the correction): a merge whose corrections to
    the average are 25% short fails them. Finer errors are the float32 tests' to find (they see 1%)."""
    from regmean import solver

    solve = solver.RegMeanSystem.solve_deviation

    def short(self, anchor, spread, rhs):
        merged, residual, error = solve(self, anchor, spread, rhs)
        average = (anchor + spread).to(merged.dtype)
        return average + 0.75 * (merged - average), residual, error

    monkeypatch.setattr(solver.RegMeanSystem, "solve_deviation", short)
    out = run_pp(bf16_experts, calib_files, tmp_path / "pp", "--alpha", PP_ALPHA, "--forward-dtype", "bfloat16",
                 "--dtype", "float32")  # fmt: skip
    with pytest.raises(AssertionError, match=r"correction off by 2\.\d+e-01"):
        check_pp(out, pp_reference, bf16_experts)


# ----------------------------------------------------------------------------- auto, as each cpu kind chooses
@pytest.mark.dtype
def test_auto_grams_hold_the_tolerance_of_the_dtype_auto_picks(bf16_experts, calib_files, code_reference, tmp_path,
                                                               capsys):  # fmt: skip
    dtype, why = auto_dtype(torch.device("cpu"), hidden_size(bf16_experts[0]))  # as compute_gram.py asks
    path = run(bf16_experts[0], calib_files["code"], tmp_path / "g", "--batch-size", "4", "--dtype", "auto")
    assert GramFile(path).metadata["dtype"] == dtype_name(dtype)
    assert f"in {dtype_name(dtype)} (auto: {why})" in capsys.readouterr().err
    bound = GRAM_BOUND if dtype == torch.bfloat16 else 2e-5  # float32 passes: test_gram.py's 2e-5, per sqrt(GjjGkk)
    for name, err in gram_errors(path, code_reference).items():
        assert err <= bound, f"{name}: {err:.2e}, bound for {dtype_name(dtype)} {bound:.2e}"


@pytest.mark.dtype
def test_auto_regmeanpp_holds_the_tolerance_of_the_dtype_auto_picks(bf16_experts, calib_files, pp_reference,
                                                                    tmp_path):  # fmt: skip
    dtype = auto_dtype(torch.device("cpu"), hidden_size(bf16_experts[0]))[0]  # as merge_model.py asks
    out = run_pp(bf16_experts, calib_files, tmp_path / "pp", "--alpha", PP_ALPHA, "--forward-dtype", "auto",
                 "--dtype", "float32")  # fmt: skip
    assert json.loads((out / "merge_report.json").read_text())["settings"]["forward_dtype"] == dtype_name(dtype)
    # float32 passes: test_regmeanpp.py's tolerance at alpha 0.5 (there in the Frobenius norm)
    check_pp(out, pp_reference, bf16_experts, None if dtype == torch.bfloat16 else 1e-4)
