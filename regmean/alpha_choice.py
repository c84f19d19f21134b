"""Choosing α from validation grams (merge_model.py regmean --alpha auto | auto-global --validation-grams V1 V2 ...).

For each group of linear layers that read one input, α is taken on a grid to minimize, on each expert's
validation grams Vᵢ, the objective RegMean fits:

    Σᵢ cᵢ tr((W(α) − Wᵢ) Vᵢ (W(α) − Wᵢ)ᵀ)        W(α): the RegMean solution on the fit grams Gᵢ at α

W(α) is the merge's own solution. One eigendecomposition per group gives every α's (the issue's hint). With
S = Σ cᵢ Gᵢ + λI (λ: the solver's ridge) and D = diag(S), the system's matrix is
αS + (1 − α)D = D^½ (αC + (1 − α)I) D^½, C = D^−½ S D^−½ = U Λ Uᵀ, so

    W(α)ᵀ = W_avgᵀ + D^−½ U diag(1 / (αΛ + 1 − α)) Uᵀ D^−½ (α P + (1 − α) Q)

with P = Σ cᵢ Gᵢ Xᵢᵀ, Q = Σ cᵢ diag(Gᵢ) Xᵢᵀ, Xᵢ = Wᵢ − W_avg (the solver's deviation form). That is the solver's
own solution wherever the solver keeps every direction, which holds by construction when the smallest curvature
α λ_min + 1 − α is above 2x DOUBT times the largest precision floor of a direction of C (n eps32: C's diagonal
is 1; the floor's ratio to a curvature is the same in C's coordinates as in the solver's). The α of the grid
below that (α near 1 where the fit grams leave directions unexcited) are solved by solver.RegMeanSystem itself,
fallbacks and unexcited directions included, so the criterion scores exactly the weights the merge would write
at every α (how="solver": the solver at every α, the slow reference of the tests). The criterion is taken on
sampled output rows (every ALPHA_SAMPLE_EVERY-th, at least 16 and about at most ALPHA_MAX_ROWS a layer), all α
in one product per expert; the rows of a layer are independent, so the sampled sum estimates the full one. The
final weights are then solved by solver.RegMeanSystem at the chosen α, with all its guarantees. Cost and
figures: docs/merging.md#choosing-α-from-data---alpha-auto.

    curve = alpha_curve(fit_grams, val_grams, expert_rows, coefs, grid)   # one group, float64 numbers
    alphas, table = choose_alphas(experts, coefs, gram_files, val_files, linear, grid, global_=False, ...)
"""

import statistics

import torch
from torch import Tensor

from .experts import Expert
from .merge_report import KINDS, block_slice, depth, module_kind, sample_step
from .solver import DOUBT, EPS32, RIDGE, RegMeanSystem, symmetric_eigh
from .tensor_io import GramFile, read_tensor
from .utils import Progress, UserError

ALPHA_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]  # --alpha-grid's default
AUTO = ("auto", "auto-global")  # --alpha's values that choose it from validation grams
ALPHA_SAMPLE_EVERY = 16  # the criterion is taken on every 16th output row of a layer (at least 16 rows) ...
ALPHA_MAX_ROWS = 128  # ... and on at most about this many rows per layer (lm_head: 128 of 128256, not 8016)
EIGH_MIN_GRID = 20  # larger grids: one eigendecomposition (about 18 Cholesky factorizations) serves all α
HOW_TO_VALIDATE = (
    "give each expert's validation grams with --validation-grams V1 V2 ... (one gram file per model, in the "
    "models' order): compute_gram.py --holdout 0.1 writes held-out grams next to the fit grams, or run "
    "compute_gram.py on unlabeled prompts of the tasks you care about"
)


def check_grid(grid: list[float]) -> list[float]:
    """The α grid, sorted and unique; every value in [0, 1]."""
    if not grid:
        raise UserError("--alpha-grid needs at least one value")
    bad = [a for a in grid if not 0.0 <= a <= 1.0]
    if bad:
        raise UserError(f"--alpha-grid values must be in [0, 1], got {bad[0]}")
    return sorted(set(float(a) for a in grid))


def alpha_curve(
    fit_grams: list[Tensor],
    val_grams: list[Tensor],
    expert_rows: list[Tensor],
    coefs: list[float],
    grid: list[float],
    how: str = "auto",
) -> dict | None:
    """The validation criterion of one group over the grid, on some output rows of its weights.

    fit_grams, val_grams: per expert, [n, n]; expert_rows: per expert, the same rows of its weights ([rows, n],
    the members of the group stacked). Returns per_expert [len(grid), N] (tr((W(α) − Wᵢ) Vᵢ (W(α) − Wᵢ)ᵀ) on
    these rows), energy [N] (tr(Wᵢ Vᵢ Wᵢᵀ) on these rows), float64, and solved (the α taken by the solver);
    None where the data never reached this input (the solver leaves it at the average whatever α). how: "eigh"
    (one eigendecomposition for the α where the solver keeps every direction, the solver for the others, see
    above), "cholesky" (the same closed form by one float64 Cholesky per such α), "auto" (eigh for grids of more
    than EIGH_MIN_GRID values, else cholesky) or "solver" (the solver at every α, the slow reference)."""
    if how == "solver":
        return solver_curve(fit_grams, val_grams, expert_rows, coefs, grid)
    if how == "auto":
        how = "eigh" if len(grid) > EIGH_MIN_GRID else "cholesky"
    n, device = fit_grams[0].shape[0], fit_grams[0].device
    s = torch.zeros(n, n, dtype=torch.float64, device=device)
    for c, g in zip(coefs, fit_grams):
        s.add_(g.double(), alpha=c)
    scale = s.diagonal().mean().item()
    if not scale > 0:
        return None
    s.diagonal().add_(RIDGE * scale)  # S + λI: A(α) = α(S + λI) + (1 − α) diag(S + λI), the solver's λ
    dinv = s.diagonal().rsqrt()
    if how == "eigh":
        s.mul_(dinv[:, None]).mul_(dinv[None, :])  # C, in place
        evals, u = symmetric_eigh(s)
        s = None  # C's memory back before the products below
        smallest = evals[0].item()
    else:
        smallest = 0.0  # C is positive semi-definite: α λ_min + 1 − α >= 1 − α
    # α whose smallest curvature α λ_min + 1 − α is over 2x DOUBT times the largest precision floor a direction
    # of C can have (n eps32, C's diagonal being 1): the solver keeps every direction, the closed form is its
    # solution. The others (α near 1 where the fit grams leave directions unexcited) go to the solver itself.
    closed = [a for a in grid if (a * smallest + 1 - a) / (n * EPS32) > 2 * DOUBT]
    rows32 = [x.to(device, torch.float32) for x in expert_rows]
    w = [x.double() for x in rows32]
    merged = {}
    if closed:
        avg = sum(c * x for c, x in zip(coefs, w))
        xt = [(x - avg).T for x in w]  # Xᵢᵀ, [n, rows]
        p = sum(c * (g.double() @ x) for c, g, x in zip(coefs, fit_grams, xt))  # Σ cᵢ Gᵢ Xᵢᵀ
        q = sum(c * g.diagonal().double()[:, None] * x for c, g, x in zip(coefs, fit_grams, xt))  # Σ cᵢ diag(Gᵢ) Xᵢᵀ
        del xt
        if how == "eigh":
            p_hat, q_hat = u.T @ (dinv[:, None] * p), u.T @ (dinv[:, None] * q)
            alphas = torch.tensor(closed, dtype=torch.float64, device=device)[:, None, None]  # [k, 1, 1]
            z = (alphas * p_hat + (1 - alphas) * q_hat) / (alphas * evals[:, None] + 1 - alphas)
            merged.update(zip(closed, avg + (dinv[:, None] * (u @ z)).transpose(1, 2)))  # [k, rows, n]
            del z, p_hat, q_hat, u
        else:
            for alpha in closed:  # A(α) = α S + (1 − α) diag(S), S with its ridge: diag(A) = diag(S)
                a = s * alpha
                a.diagonal().copy_(s.diagonal())
                merged[alpha] = avg + torch.cholesky_solve(alpha * p + (1 - alpha) * q, torch.linalg.cholesky(a)).T
                del a
        del p, q
    del s
    for alpha in grid:
        if alpha not in merged:
            solved, _, _ = RegMeanSystem.factor(fit_grams, alpha, coefs, device).solve(rows32)
            merged[alpha] = solved.double()
    stacked = torch.stack([merged[a] for a in grid])  # [grid, rows, n]: one product per expert for all α
    per_expert, energy = [], []
    for wi, v in zip(w, val_grams):  # one float64 validation gram at a time
        v = v.to(device, torch.float64)
        energy.append(torch.linalg.vecdot(wi @ v, wi).sum())
        per_expert.append(torch.linalg.vecdot((stacked - wi) @ v, stacked - wi).sum(-1))
        del v
    per_expert, energy = torch.stack(per_expert, 1), torch.stack(energy)
    return dict(per_expert=per_expert.cpu(), energy=energy.cpu(), solved=[a for a in grid if a not in closed])


def solver_curve(fit_grams, val_grams, expert_rows, coefs, grid) -> dict | None:
    """alpha_curve by the merge's own solver: RegMeanSystem factored at each α, solved on these rows."""
    if not sum(c * g.diagonal().double().mean().item() for c, g in zip(coefs, fit_grams)) > 0:
        return None
    device = fit_grams[0].device
    rows32 = [x.to(device, torch.float32) for x in expert_rows]
    w = [x.double() for x in rows32]
    vals = [v.to(device, torch.float64) for v in val_grams]
    energy = torch.stack([torch.linalg.vecdot(wi @ v, wi).sum() for wi, v in zip(w, vals)])
    per_expert, n = [], fit_grams[0].shape[0]
    for alpha in grid:
        if (1 - alpha) / (n * EPS32) > 2 * DOUBT:  # the solver's checks pass by construction: a plain Cholesky
            merged = plain_solve(fit_grams, alpha, coefs, w)
        else:
            merged, _, _ = RegMeanSystem.factor(fit_grams, alpha, coefs, device).solve(rows32)
            merged = merged.double()
        per_expert.append(
            torch.stack([torch.linalg.vecdot((merged - wi) @ v, merged - wi).sum() for wi, v in zip(w, vals)])
        )
    return dict(per_expert=torch.stack(per_expert).cpu(), energy=energy.cpu())


def plain_solve(grams: list[Tensor], alpha: float, coefs: list[float], rows: list[Tensor]) -> Tensor:
    """The RegMean solution on these rows (float64) by one float64 Cholesky, where the reduced system is well
    conditioned by construction: its diagonal part (1 − α) diag(Gᵢ) puts every direction's curvature at least
    (1 − α) / (n eps32) times above its float32 precision floor (Cauchy-Schwarz), so that the solver would keep
    every direction and its float32 Cholesky path; alpha_curve takes this path when that is over 2x DOUBT."""
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = 0
    avg = sum(c * w for c, w in zip(coefs, rows))
    for g, c, w in zip(grams, coefs, rows):
        reduced = g.double() * alpha
        reduced.diagonal().copy_(g.diagonal())
        a += c * reduced
        rhs = rhs + c * (reduced @ (w - avg).T)
    a.diagonal().add_(RIDGE * a.diagonal().mean())
    return avg + torch.cholesky_solve(rhs, torch.linalg.cholesky(a)).T


def sampled_rows(expert: Expert, name: str, num_rows: int, step: int, block_rows: int = 4096) -> Tensor:
    """Rows step // 2, step // 2 + step, ... below num_rows of one expert's weight `name`, float32, read in
    blocks of rows (no whole tensor in memory)."""
    picked = []
    for start in range(0, num_rows, block_rows):
        rows = (start, min(start + block_rows, num_rows))
        picked.append(read_tensor(expert.files[name], name, rows)[block_slice(rows, step)].float())
    return torch.cat(picked)


def group_curves(
    experts: list[Expert],
    coefs: list[float],
    gram_files: list[GramFile],
    val_files: list[GramFile],
    groups: dict[tuple[str, ...], list[str]],
    grid: list[float],
    sample_every: int = ALPHA_SAMPLE_EVERY,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """{gram key of the first expert: its group's criterion} for every group of linear weights (groups: gram keys
    -> the weights that read that input, the excluded ones left out), each a dict with the group's members,
    the sampled rows and the criterion scaled to all rows (per_expert [grid, N], energy [N]); None for an input
    the data never reached."""
    out = {}
    bar = Progress(total=len(groups), desc="choosing alpha", unit="input")
    for key, members in groups.items():
        module = members[0].removesuffix(".weight")
        fit = [f.get(k).to(device) for f, k in zip(gram_files, key)]
        val = [v.get(v.key_of[module]) for v in val_files]
        rows, scale, used = [[] for _ in experts], [], 0
        for member in members:
            num_rows = min(e.infos[member][0][0] for e in experts)  # rows every expert has
            step = max(sample_step(num_rows, sample_every), num_rows // ALPHA_MAX_ROWS)
            for i, e in enumerate(experts):
                rows[i].append(sampled_rows(e, member, num_rows, step))
            taken = len(rows[0][-1])
            used += taken
            scale.append((taken, num_rows / taken))
        # rows of members of different sizes are weighted so that each member's sum stands for all its rows
        weights = torch.cat([torch.full((t,), f**0.5) for t, f in scale])
        curve = alpha_curve(fit, val, [torch.cat(r) * weights[:, None] for r in rows], coefs, grid)
        out[key[0]] = None if curve is None else dict(members=members, rows=used, **curve)
        del fit, val
        bar.update(1)
    bar.close()
    return out


def choose_alphas(curves: dict[str, dict | None], coefs: list[float], grid: list[float], mode: str) -> dict:
    """The α of every group from its criterion: its own minimizer over the grid (auto), or the one minimizer of
    the criterion summed over all groups (auto-global). Ties go to the larger α. Returns {gram key: α}; an
    input the data never reached gets the largest α of the grid (it is the average whatever α)."""
    c = torch.tensor(coefs, dtype=torch.float64)
    totals = {k: (v["per_expert"] * c).sum(-1) for k, v in curves.items() if v is not None}

    def argmin(curve):
        best = curve.min().item()
        return max(i for i, x in enumerate(curve.tolist()) if x <= best)

    if mode == "auto-global":
        chosen = grid[argmin(sum(totals.values()))] if totals else grid[-1]
        return {k: chosen for k in curves}
    return {k: grid[argmin(totals[k])] if k in totals else grid[-1] for k in curves}


def validation_row(curve: dict | None, coefs: list[float], grid: list[float], alpha: float) -> dict | None:
    """A layer's `validation` in merge_report.json: the criterion Σᵢ cᵢ tr(...) over the grid relative to
    Σᵢ cᵢ tr(Wᵢ Vᵢ Wᵢᵀ) (`curve`), and each expert's normalized validation error eᵢᵛ at the chosen α."""
    if curve is None:
        return None
    c = torch.tensor(coefs, dtype=torch.float64)
    norm = (curve["energy"] * c).sum().clamp_min(1e-300)
    at = grid.index(alpha)
    per = (curve["per_expert"][at] / curve["energy"].clamp_min(1e-300)).tolist()
    curve_ = ((curve["per_expert"] * c).sum(-1) / norm).tolist()
    return dict(curve=curve_, experts=per, rows=curve["rows"], solver_alphas=curve.get("solved", grid))


def alpha_summary(alphas: dict[str, float], mode: str) -> list[str]:
    """The log's and the card's lines on the chosen α: one per module kind (median, range, layers), over depth."""
    if mode == "auto-global":
        value = next(iter(alphas.values()), None)
        return [f"alpha (auto-global, one for the whole model, on validation grams): {value}"]
    lines = [f"alpha chosen per input on validation grams (--alpha auto), {len(alphas)} inputs, by module kind:"]
    for title, _ in [*KINDS, ("other", ())]:
        got = sorted(((depth(k) or 0), a) for k, a in alphas.items() if module_kind(k) == title)
        if got:
            values = [a for _, a in got]
            lines.append(
                f"- {title}: median {statistics.median(values):g}, range {min(values):g}-{max(values):g}; "
                f"over depth: {' '.join(f'{a:g}' for _, a in got)}"
            )
    return lines


def draw_alphas(alphas: dict[str, float], grid: list[float], path, title: str):
    """merge_report_alpha.png: the chosen α over depth, one line per module kind (lm_head: a point at the right)."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state (Agg canvas)
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 4))
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.14, top=0.88)
    ax = fig.subplots()
    last = max((depth(k) or 0 for k in alphas), default=0)
    for i, (title_, _) in enumerate([*KINDS, ("other", ())]):
        got = sorted(
            (depth(k) if depth(k) is not None else last + 1, a) for k, a in alphas.items() if module_kind(k) == title_
        )
        if got:
            ax.plot(*zip(*got), marker="o", linestyle="-" if len(got) > 1 else "none", color=f"C{i}", label=title_)
    ax.set_ylim(min(grid) - 0.05, max(grid) + 0.05)
    ax.set_yticks(grid)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (lm_head right of the last)")
    ax.set_ylabel("α chosen")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(path, dpi=100)
    return path
