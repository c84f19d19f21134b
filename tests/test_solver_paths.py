"""Each path of regmean/solver.py's solver where it is taken, against closed forms written plainly here:
alpha 0 (the diagonal-only system), an all-zero gram, float64 Cholesky, a system singular within
float32 precision that float32 Cholesky would accept; and the settings merge_model.py refuses."""

import math
import re

import pytest
import torch
from test_merge import assert_correction_close, reference_regmean

import merge_model
from regmean import solver
from regmean.solver import EPS32
from regmean.utils import UserError


def experts_and_grams(n=48, out=24, rank=None, num=2, seed=0, null_curvature=0.0):
    """Random expert weights and float32 grams of random data (rank `rank` when given: a rotated null space,
    where each gram gets `null_curvature` x eps32 x its smallest diagonal entry as an explicit eigenvalue)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, n, generator=g, dtype=torch.float64)
    ws = [(base + 0.1 * torch.randn(out, n, generator=g, dtype=torch.float64)).float() for _ in range(num)]
    rotation = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    span, null = rotation[:, : rank or n], rotation[:, rank or n :]
    xs = [torch.randn(200, rank or n, generator=g, dtype=torch.float64) @ span.T for _ in range(num)]
    grams = [x.T @ x / len(x) for x in xs]
    grams = [gram + null_curvature * EPS32 * gram.diagonal().min() * null @ null.T for gram in grams]
    return ws, [gram.float() for gram in grams], span


def weighted_average(ws, coefs):
    return sum(c * w.double() for c, w in zip(coefs, ws))


def test_alpha_zero_is_the_diagonal_weighted_average():
    """G̃ = diag(G): each input column j of the merge is Σ cᵢ Gᵢⱼⱼ Wᵢ[:, j] / Σ cᵢ Gᵢⱼⱼ."""
    ws, grams, _ = experts_and_grams()
    coefs = [0.3, 0.7]
    merged, diag = solver.merge_weight(ws, grams, 0.0, coefs)
    d = [c * g.double().diagonal() for c, g in zip(coefs, grams)]
    want = sum(w.double() * di for w, di in zip(ws, d)) / sum(d)
    average = weighted_average(ws, coefs)
    err = ((merged.double() - want).norm() / (want - average).norm()).item()
    assert err < 1e-4, err  # measured 1.1e-5: the float32 rounding of the merged weight
    assert diag["path"] == "cholesky32" and diag["unexcited"] == 0


def test_an_all_zero_gram():
    """All grams zero (the data never reached the input): the weighted average, exactly. One expert's gram zero:
    the data says only the other expert's inputs matter, and the merge is that expert's weight."""
    ws, grams, _ = experts_and_grams()
    zero = torch.zeros_like(grams[0])
    merged, diag = solver.merge_weight(ws, [zero, zero], 1.0, [0.25, 0.75])
    assert diag["path"] == "average" and diag["unexcited"] == ws[0].shape[1]
    assert torch.equal(merged, 0.25 * ws[0] + 0.75 * ws[1])
    merged, diag = solver.merge_weight(ws, [zero, grams[1]], 1.0, [0.25, 0.75])
    assert ((merged - ws[1]).norm() / (ws[1] - ws[0]).norm()).item() < 1e-4, diag


def spd(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((q * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ q.T).float()


def test_float64_cholesky_is_taken_where_float32_is_not_accurate():
    """Condition number 1e5: float32 Cholesky's error would show in the merge, the system is far from singular
    within float32 precision: float64 Cholesky, and the float64 closed form to 1e-6 of the correction."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(16, 64, generator=g) for _ in range(2)]  # experts far apart: float32's error would show
    grams = [spd(64, 1e5, 1), spd(64, 1e5, 2)]
    coefs = [0.5, 0.5]
    merged, diag = solver.merge_weight(ws, grams, 1.0, coefs)
    assert diag["path"] == "cholesky64" and diag["unexcited"] == 0, diag
    a = sum(c * g.double() for c, g in zip(coefs, grams))
    want = torch.linalg.solve(a, sum(c * g.double() @ w.double().T for c, g, w in zip(coefs, grams, ws))).T
    average = weighted_average(ws, coefs)
    err = ((merged.double() - want).norm() / (want - average).norm()).item()
    assert err < 1e-6, err


@pytest.mark.parametrize("num, coefs, seed", [(2, [0.5, 0.5], 1), (3, [0.2, 0.3, 0.5], 0)])
def test_cholesky_does_not_accept_a_system_singular_within_float32(num, coefs, seed):
    """Rank 62 of 64 in a rotated subspace, and in the 2 null directions an explicit curvature of 10 eps32 x the
    smallest diagonal entry: far above the float32 rounding of the grams and of a Cholesky factorization (a few
    tenths of eps32 x the diagonal here, on any cpu), so float32 Cholesky of Σ cᵢ Gᵢ + λI succeeds by construction;
    yet below DOUBT (30) x the precision floor of any unit direction (at least eps32 x the smallest diagonal entry),
    so the system is singular within the grams' precision by construction too: the eigendecomposition, the 2 null
    directions at the average, the rest the float64 closed form on the data's span."""
    ws, grams, span = experts_and_grams(n=64, out=32, rank=62, num=num, seed=seed, null_curvature=10.0)
    a = sum(c * g for c, g in zip(coefs, grams))
    ridge = solver.RIDGE * a.diagonal().mean()
    assert torch.linalg.cholesky_ex(a + ridge * torch.eye(64))[1].item() == 0  # float32 Cholesky would take it
    merged, diag = solver.merge_weight(ws, grams, 1.0, coefs)
    assert diag["path"] == "eigh64" and diag["unexcited"] == 2, diag
    average = weighted_average(ws, coefs)
    null = torch.eye(64, dtype=torch.float64) - span @ span.T
    assert ((merged.double() - average) @ null).norm() <= 1e-6 * average.norm()
    a64 = sum(c * g.double() for c, g in zip(coefs, grams))
    rhs = sum(c * g.double() @ (w.double() - average).T for c, g, w in zip(coefs, grams, ws))
    want = average + (span @ torch.linalg.solve(span.T @ a64 @ span, span.T @ rhs)).T  # solved on the span only
    err = ((merged.double() - want).norm() / (want - average).norm()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--alpha", "-0.1"], "--alpha must be in [0, 1], got -0.1"),
        (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
        (["--alpha", "nan"], "--alpha must be in [0, 1], got nan"),
        (["--weights", "-1", "2"], "--weights must be finite, >= 0 and not all 0, got [-1.0, 2.0]"),
        (["--weights", "nan", "1"], "--weights must be finite, >= 0 and not all 0, got [nan, 1.0]"),
        (["--weights", "0", "0"], "--weights must be finite, >= 0 and not all 0, got [0.0, 0.0]"),
        (["--weights", "inf", "1"], "--weights must be finite, >= 0 and not all 0, got [inf, 1.0]"),
    ],
)
def test_bad_alpha_and_weights_are_refused_with_nothing_written(experts, args, needle, tmp_path):
    out = tmp_path / "m"
    grams = [str(tmp_path / "g0.safetensors"), str(tmp_path / "g1.safetensors")]  # refused before any file is read
    with pytest.raises(UserError, match=re.escape(needle)):
        merge_model.main(
            ["regmean", "--models", *map(str, experts), "--grams", *grams, *args, "--output-dir", f"{out}"]
        )
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the solver alone
@pytest.mark.parametrize("out_features", [48, 160])  # fewer rows than inputs, and more (A⁻¹Δ formed once)
def test_solver_accuracy_on_ill_conditioned_grams(out_features):
    """Grams with condition number 1e7: within the targets of the float64 closed form."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(out_features, 96, generator=g)
    ws = [base + 0.05 * torch.randn(out_features, 96, generator=g) for _ in range(2)]
    grams = [spd(96, 1e7, 2), spd(96, 1e7, 3)]
    for alpha in [1.0, 0.1]:
        merged, diag = solver.merge_weight(ws, grams, alpha, [0.5, 0.5])
        ref = reference_regmean(ws, grams, alpha, [0.5, 0.5])
        assert_correction_close(merged, ref, ws, [0.5, 0.5], 1e-4, f"alpha {alpha}, {diag}")  # measured 4e-6
        assert diag["residual"] < 1e-3


def test_solver_falls_back_on_an_indefinite_gram():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(8, 16, generator=g) for _ in range(2)]
    bad = torch.eye(16)
    bad[3, 3] = -1.0  # not a gram of any data: Cholesky must fail, the eigendecomposition copes
    merged, diag = solver.merge_weight(ws, [bad, bad], 1.0, [0.5, 0.5])
    assert diag["path"] == "eigh64" and torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, 3], (ws[0][:, 3] + ws[1][:, 3]) / 2)  # no positive curvature: the average
