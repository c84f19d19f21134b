"""The RegMean math (Jin et al., ICLR 2023), no I/O: the merge of one linear layer from the
experts' weights and the grams of its input.

    G̃ᵢ = α Gᵢ + (1 - α) diag(Gᵢ)                       (α: alpha; 1 is plain RegMean)
    (Σᵢ cᵢ G̃ᵢ + λI) Wᵀ = Σᵢ cᵢ G̃ᵢ Wᵢᵀ + λ W_avgᵀ        (cᵢ: the experts' normalized weights)

λ is a tiny ridge toward the weighted average W_avg: input directions the data never excites
keep the average. The system is solved for the deviation from the average, on a factorization
shared by the layers that read one input (q/k/v, gate/up):

    merged, residual, error = RegMeanSystem.factor(grams, alpha, coefs, device).solve(rows)
    merged, diagnostics = merge_weight(expert_weights, grams, alpha, coefs)     # one layer

or, holding one expert's gram at a time (the streamed merge: memory independent of the number of experts),

    system = RegMeanSystem.start(n, alpha, coefs, device)
    for i, gram in enumerate(grams): system.add_gram(i, gram)          # A = Σ cᵢ G̃ᵢ + λI, in float64
    system.finish()                                                       # factored as above
    rhs, spread = deviation_sums(num_rows, n, wide_rhs(n, alpha))         # then per expert i > 0:
    add_deviation(rhs, spread, gram, coefs[i], alpha, expert_rows - first_expert_rows)
    merged, residual, error = system.solve_deviation(first_expert_rows, spread, rhs)

The solve is float32 Cholesky where that is accurate (its error is measured on random probes),
float64 Cholesky where the gram is too ill-conditioned for float32, and an eigendecomposition
where even that fails; never lstsq (whose default CPU driver truncates the rank of
ill-conditioned grams).

"Never excited" is judged at the precision the grams were stored and summed in, float32: a
float32 gram of data that never reaches a direction still has an eigenvalue of about
±1e-9 · λmax there (rounding), which a float64 cutoff inverts into amplified noise. Each entry of
a float32 gram is off by at most about eps32 · sqrt(Aᵢᵢ Aⱼⱼ), so the curvature uᵀAu of a unit
direction u is known to within its floor eps32 · (Σᵢ |uᵢ| sqrt(Aᵢᵢ))², at most n · eps32 · λmax
(pinv's default cutoff, at float32's eps): the floor grows with the width as pinv's does, but
follows the size of the inputs a direction is made of, so that small but excited inputs beside a
massive activation are kept. Eigen-directions of A whose eigenvalue is below DOUBT (30) times
their floor keep the average: near the floor an eigenvalue is known but its direction is not
(rounding turns it by about floor / gap, and the continuous spectra of real activations have no
gap there), and a turned direction would carry its deviation into the unexcited ones (the
unexcited part of a tiny model's merge, at margins 3, 10 and 30: 3.7e-3, 1.6e-3 and 2.1e-4 of the
average's norm). A Cholesky path is kept only when no curvature near the floor shows (the pivots
against DOUBT · eps32 · Aᵢᵢ, inverse iteration on the factor against DOUBT x the floor of the
directions it finds); otherwise the layer goes to the eigendecomposition.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

RIDGE = 1e-9  # λ = RIDGE * mean(diag(Σ cᵢ G̃ᵢ)): below any direction the data excites, above float64 rounding
TOLERANCE = 1e-5  # estimated relative error of a merged weight above which float64 is used
RESIDUAL_LIMIT = 1e-3  # relative residual of a solve (on sampled rows) above which the next fallback is taken
NUM_PROBES = 8  # random right-hand sides used to estimate a float32 factorization's error
NUM_RESIDUAL_COLUMNS = 64  # output rows on which each solve's residual is measured
PATHS = ("average", "cholesky32", "cholesky64", "eigh64")  # the solvers, each more robust than the one before
EPS32 = torch.finfo(torch.float32).eps  # the precision grams are stored and summed in
DOUBT = 30.0  # a direction counts as excited when its curvature is above DOUBT x its precision floor (see above)
NUM_ITERATIONS = 12  # inverse iterations of the smallest-curvature check


def precision_floor(directions: Tensor, diagonal: Tensor) -> Tensor:
    """eps32 · (Σᵢ |uᵢ| sqrt(Aᵢᵢ))² for each unit column u of `directions` ([n, k]): how far the
    float32 rounding of A's entries can move the curvature uᵀAu (float64 [k])."""
    return EPS32 * (directions.abs().double().T @ diagonal.double().clamp_min(0).sqrt()).square()


def symmetric_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh, on one thread on the cpu: its LAPACK driver synchronizes its threads at every column of
    the tridiagonal reduction, and on a busy cpu two threads took 6-10x as long as one (docs/benchmarks.md)."""
    if a.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigh(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 - α) diag(G): off-diagonals scaled by α, the diagonal kept (one new tensor)."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


@dataclass
class RegMeanSystem:
    """The factored system A = Σ cᵢ G̃ᵢ + λI of one input, shared by the layers that read it.

    `path` is the solver in use (see PATHS); `solve` moves to the next one where the current one
    is not accurate enough, and the layers solved after that use it too."""

    grams: list[Tensor] | None  # float32 [n, n] per expert, on the solve device; None when streamed (start)
    coefs: list[float]
    alpha: float
    ridge: float  # λ
    path: str = "cholesky32"
    probe_error: float | None = None  # relative error of the float32 factor on random probes
    deltas: list[Tensor] = field(default_factory=list)  # Δᵢ = cᵢ (G̃ᵢ - G̃_N), i < N
    maps: list[Tensor] | None = None  # Mᵢ = A⁻¹ Δᵢ (float32 path, when many rows are to come)
    chol: Tensor | None = None  # Cholesky factor of A: float32 or float64 as the path says
    a64: Tensor | None = None  # A in float64 (float64 paths)
    eig: tuple[Tensor, Tensor] | None = None  # eigenvalues of A above their precision floor and their vectors (eigh64)
    cutoff: float = 0.0  # the largest DOUBT x precision floor of a direction left at the average (0: none)
    unexcited: int = 0  # input directions left at the average (eigenvalue below their precision floor)
    margin: float | None = None  # Cholesky paths: the smallest curvature found over its precision floor
    probes: tuple[Tensor, Tensor] | None = None  # streamed: the probes z and A z (exact float64), summed as grams come

    @property
    def n(self) -> int:
        return self.grams[0].shape[0] if self.grams is not None else self.a64.shape[0]

    @classmethod
    def factor(
        cls,
        grams: list[Tensor],
        alpha: float,
        coefs: list[float],
        device: torch.device | str = "cpu",
        num_rows: int | None = None,
    ) -> "RegMeanSystem":
        """Factor the system of one input. grams: one [in, in] gram per expert; coefs: the
        experts' normalized weights; num_rows: how many output rows will be solved with it.

        A is factored by Cholesky in float32. Its error is measured on NUM_PROBES random
        solutions whose right-hand sides are exact float64 products; the float32 error grows with
        A's condition number, and solve() moves a layer to float64 where it would show in the
        merged weight. The right-hand side needs N - 1 products, not N: with Xᵢ = Wᵢ - W_avg,
        Σ cᵢ Xᵢ = 0, so Σ cᵢ G̃ᵢ Xᵢᵀ = Σ_{i<N} Δᵢ Xᵢᵀ. Where more rows than inputs are to come
        (q/k/v, gate/up, lm_head), Mᵢ = A⁻¹ Δᵢ is formed once and each row block costs one
        product per expert instead of a product and two triangular solves."""
        grams = [g.to(device, torch.float32) for g in grams]
        n = grams[0].shape[0]
        a = torch.zeros(n, n, device=device)
        for g, c in zip(grams, coefs):
            a.add_(g, alpha=c * alpha)
        a.diagonal().copy_(sum(c * g.diagonal() for g, c in zip(grams, coefs)))
        scale = torch.diagonal(a).mean().item()
        system = cls(grams=grams, coefs=list(coefs), alpha=alpha, ridge=RIDGE * scale if scale > 0 else 1.0)
        if scale <= 0:  # the data never reached this input: the average everywhere
            system.path, system.unexcited = "average", n
            return system
        a.diagonal().add_(system.ridge)
        l32, info = torch.linalg.cholesky_ex(a)
        del a
        if info.item() != 0:
            system.upgrade()
            return system
        for g, c in zip(grams[:-1], coefs):
            d = torch.sub(g, grams[-1]).mul_(c * alpha)
            d.diagonal().copy_(c * (g.diagonal() - grams[-1].diagonal()))
            system.deltas.append(d)
        z = torch.randn(n, NUM_PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        z_solved = torch.cholesky_solve(system.apply_a(z).float(), l32).double()
        system.chol, system.probe_error = l32, ((z_solved - z).norm() / z.norm()).item()
        if system.singular_within_precision():
            system.path = "cholesky64"  # skip float64 Cholesky: A is as singular in float64
            system.upgrade()
            return system
        if num_rows is not None and num_rows > n:
            system.maps = [torch.cholesky_solve(d, l32) for d in system.deltas]
        return system

    @classmethod
    def start(cls, n: int, alpha: float, coefs: list[float], device: torch.device | str = "cpu") -> "RegMeanSystem":
        """An empty system of one input [n, n], to which add_gram adds one expert's gram at a time and that
        finish then factors as factor does: A is summed in float64 (exact from the float32 grams), and so
        are the probes' products, so that no gram is kept."""
        system = cls(grams=None, coefs=list(coefs), alpha=alpha, ridge=0.0)
        system.a64 = torch.zeros(n, n, dtype=torch.float64, device=device)
        z = torch.randn(n, NUM_PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        system.probes = (z, torch.zeros_like(z))
        return system

    def add_gram(self, i: int, gram: Tensor, chunk: int = 2048) -> None:
        """A += cᵢ G̃ᵢ for expert i's gram (float32 [n, n]), a chunk of rows at a time (no float64 copy)."""
        c, g, z = self.coefs[i], gram.to(self.a64.device, torch.float32), self.probes[0]
        for r in range(0, self.n, chunk):
            self.a64[r : r + chunk].add_(g[r : r + chunk], alpha=c * self.alpha)
        self.a64.diagonal().add_(g.diagonal(), alpha=c * (1 - self.alpha))
        self.probes[1].add_(reduced_product(g, self.alpha, z), alpha=c)

    def finish(self) -> None:
        """Factor the system that add_gram summed: the ridge, float32 Cholesky with its probe error and
        its check for curvature near the precision floor, then the fallbacks (as factor)."""
        scale = self.a64.diagonal().mean().item()
        if not scale > 0:  # the data never reached this input: the average everywhere
            self.path, self.unexcited, self.ridge, self.probes = "average", self.n, 1.0, None
            return
        self.ridge = RIDGE * scale
        self.a64.diagonal().add_(self.ridge)
        z, az = self.probes
        self.probes = None
        l32, info = torch.linalg.cholesky_ex(self.a64.float())
        if info.item() != 0:
            self.upgrade()
            return
        z_solved = torch.cholesky_solve(az.add_(z, alpha=self.ridge).float(), l32).double()
        self.chol, self.probe_error = l32, ((z_solved - z).norm() / z.norm()).item()
        if self.singular_within_precision():
            self.path = "cholesky64"  # skip float64 Cholesky: A is as singular in float64
            self.upgrade()

    def apply_a(self, x: Tensor, chunk: int = 2048) -> Tensor:
        """A x for a few columns x, in x's precision. In float64 the products come from the
        float32 grams a chunk of rows at a time (no float64 copy of a 14336 x 14336 gram)."""
        if self.grams is None:  # streamed: A itself, in float64
            return (self.a64 @ x.to(self.a64.dtype)).to(x.dtype)
        if x.dtype == torch.float64 and self.a64 is not None:
            return self.a64 @ x
        out = self.ridge * x
        for g, c in zip(self.grams, self.coefs):
            out += c * reduced_product(g, self.alpha, x, chunk)
        return out

    def singular_within_precision(self) -> bool:
        """Whether A, factored by Cholesky, is singular within the grams' float32 precision, or too
        near it to tell: a pivot below DOUBT · eps32 · Aᵢᵢ (a pivot is the curvature of a direction
        with uᵢ = 1, whose floor is at least eps32 · Aᵢᵢ), or one of NUM_PROBES random directions
        after NUM_ITERATIONS inverse iterations on the factor (which pulls them toward the smallest
        eigenvalues) with a curvature below DOUBT x its precision floor. A few triangular solves,
        far below the factorization's cost."""
        diagonal = self.a64.diagonal() if self.a64 is not None else self.apply_a_diagonal()
        pivots = self.chol.diagonal().double().square()
        start = torch.randn(self.n, NUM_PROBES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        y = start.to(self.chol.device, self.chol.dtype)
        for _ in range(NUM_ITERATIONS):
            y = torch.cholesky_solve(y, self.chol)
            y = y / y.norm(dim=0).clamp_min(1e-300)
        y = y.double()
        curvature = torch.linalg.vecdot(y, self.apply_a(y), dim=0)
        self.margin = min(
            (pivots / (EPS32 * diagonal.double())).min().item(),
            (curvature / precision_floor(y, diagonal)).min().item(),
        )
        return not self.margin > DOUBT

    def apply_a_diagonal(self) -> Tensor:
        """The diagonal of A (float64), from the float32 grams."""
        if self.grams is None:
            return self.a64.diagonal()
        return sum(c * g.diagonal().double() for g, c in zip(self.grams, self.coefs)) + self.ridge

    def upgrade(self) -> None:
        """Move to the next, more robust solver: float64 Cholesky of A formed in float64 (kept only
        when A is not singular within float32 precision), then an eigendecomposition (directions
        whose eigenvalue is below their precision floor keep the average)."""
        self.chol, self.maps = None, None
        if self.a64 is None:  # float64 Δᵢ and A, exact from the float32 grams
            reduced = [reduce_off_diagonal(g.double(), self.alpha) for g in self.grams]
            self.deltas = [c * (r - reduced[-1]) for r, c in zip(reduced[:-1], self.coefs)]
            self.a64 = sum(c * r for r, c in zip(reduced, self.coefs))
            self.a64.diagonal().add_(self.ridge)
            del reduced
        if self.path == "cholesky32":
            l64, info = torch.linalg.cholesky_ex(self.a64)
            if info.item() == 0:
                self.path, self.chol = "cholesky64", l64
                if not self.singular_within_precision():
                    return
                self.chol = None
        evals, evecs = symmetric_eigh(self.a64)
        floors = DOUBT * precision_floor(evecs, self.a64.diagonal())
        keep = evals > floors
        self.cutoff = floors[~keep].max().item() if not keep.all() else 0.0
        self.path, self.eig, self.unexcited = "eigh64", (evals[keep], evecs[:, keep]), int((~keep).sum())

    def diagnostics(self) -> dict:
        """The solver taken and what it decided, for the report: path, ridge, probe_error, cutoff, unexcited."""
        return dict(
            path=self.path, ridge=self.ridge, probe_error=self.probe_error, cutoff=self.cutoff, unexcited=self.unexcited
        )

    def solve(self, expert_rows: list[Tensor]) -> tuple[Tensor, float, float]:
        """Merged rows (float32 [rows, in]) of one layer from each expert's rows of W (float32, on
        the system's device), its relative residual and its estimated relative error. Solving for
        the deviation from the average keeps the ridge toward the average and makes the rounding
        error proportional to the (small) deviation rather than to the weight."""
        while True:
            wide = self.path in ("cholesky64", "eigh64")
            rows = [w.double() if wide else w for w in expert_rows]
            avg = sum(c * w for c, w in zip(self.coefs, rows))
            if self.path == "average":
                return avg, 0.0, 0.0
            diffs = [w - avg for w in rows[:-1]]  # Xᵢ of all experts but the last
            sample = torch.linspace(0, len(avg) - 1, min(NUM_RESIDUAL_COLUMNS, len(avg)), device=avg.device).long()
            if self.maps is not None:  # D = Σ Mᵢ Xᵢᵀ
                dev_t = sum(x @ m.T for x, m in zip(diffs, self.maps))
                rhs_sample = sum(x[sample] @ d for x, d in zip(diffs, self.deltas))
            else:
                rhs_t = sum(x @ d for x, d in zip(diffs, self.deltas))  # Σ Δᵢ Xᵢᵀ, transposed ([rows, in])
                if self.path == "eigh64":
                    evals, evecs = self.eig
                    dev_t = ((rhs_t @ evecs) / evals) @ evecs.T
                else:
                    dev_t = torch.cholesky_solve(rhs_t.T, self.chol).T
                rhs_sample = rhs_t[sample]
                del rhs_t
            del diffs
            if (done := self.checked(avg, dev_t, rhs_sample, sample, (avg,))) is not None:
                return done
            self.upgrade()

    def solve_deviation(self, anchor: Tensor, spread: Tensor, rhs: Tensor) -> tuple[Tensor, float, float] | None:
        """solve() for a streamed system, from sums taken one expert at a time: the merged rows (float32
        [rows, in]), the relative residual and the estimated relative error. anchor: the first expert's rows W₀;
        spread: Σ cᵢ (Wᵢ − W₀); rhs: Σ cᵢ (Wᵢ − W₀) G̃ᵢ (deviation_sums, add_deviation). With Z = W − W₀ the
        system is A Zᵀ = (rhs + λ spread)ᵀ: the same solution as solve's (the ridge pulls toward the average
        W₀ + spread), and a deviation, so rounding stays proportional to the experts' differences. On eigh64,
        directions left at the average keep spread's part. Returns None where the path needs a float64 rhs and
        this one is float32 (wide_rhs said float32 would do): the caller sums it again in float64."""
        while True:
            wide = self.path in ("cholesky64", "eigh64")
            if wide and rhs.dtype != torch.float64:
                return None
            if self.path == "average":
                return (anchor + spread).float(), 0.0, 0.0
            t = rhs + self.ridge * spread
            if self.path == "eigh64":
                evals, evecs = self.eig
                s64 = spread.double()
                z = s64 - (s64 @ evecs) @ evecs.T + ((t @ evecs) / evals) @ evecs.T
            else:
                z = torch.cholesky_solve(t.T.to(self.chol.dtype), self.chol).T
            sample = torch.linspace(0, len(t) - 1, min(NUM_RESIDUAL_COLUMNS, len(t)), device=t.device).long()
            if (done := self.checked(anchor, z, t[sample], sample, (anchor, spread))) is not None:
                return done
            self.upgrade()

    def checked(
        self, base: Tensor, dev: Tensor, rhs_sample: Tensor, sample: Tensor, average: tuple[Tensor, ...]
    ) -> tuple[Tensor, float, float] | None:
        """The merged rows base + dev (float32), the relative residual of the system on the sampled output rows
        (rhs_sample: their right-hand side, [k, in]; in the solve's precision) and the estimated relative error;
        None where they fail the bounds and a wider path is left (upgrade() and solve again). average: the
        average's terms, summed only if the last path gives no finite answer."""
        wide = self.path in ("cholesky64", "eigh64")
        merged = (base.to(dev.dtype) + dev).float()
        error = 0.0 if wide else self.probe_error * (dev.norm() / merged.norm().clamp_min(1e-30)).item()
        rhs_sample = rhs_sample.T.to(dev.dtype)
        res = self.apply_a(dev[sample].T.contiguous()) - rhs_sample
        residual = (res.norm() / rhs_sample.norm().clamp_min(1e-30)).item()
        finite = bool(torch.isfinite(merged).all())
        if finite and residual <= RESIDUAL_LIMIT and error <= TOLERANCE:
            return merged, residual, error
        if self.path != "eigh64":
            return None
        if not finite:  # cannot happen with finite inputs; never write NaN anyway
            return sum(average).float(), float("nan"), error
        return merged, residual, error


def reduced_product(gram: Tensor, alpha: float, x: Tensor, chunk: int = 2048) -> Tensor:
    """G̃ x = α G x + (1 − α) diag(G) x for a float32 gram and columns x ([n, k]), in x's precision: in
    float64 a chunk of the gram's rows at a time (no float64 copy of the gram)."""
    if x.dtype == torch.float64:
        gx = torch.empty(len(gram), x.shape[1], dtype=x.dtype, device=x.device)
        for i in range(0, len(gram), chunk):
            torch.matmul(gram[i : i + chunk].double(), x, out=gx[i : i + chunk])
    else:
        gx = gram @ x
    return gx.mul_(alpha).addcmul_(torch.diagonal(gram).to(x.dtype)[:, None], x, value=1 - alpha)


def wide_rhs(n: int, alpha: float) -> bool:
    """Whether a streamed system's sums should be float64: unless its float32 Cholesky path is certain by
    construction, (1 − α) / (n eps32) above 2x DOUBT (every direction's curvature then lies that far above its
    precision floor: alpha_choice.plain_solve), as the fallbacks solve in float64 from float64 sums."""
    return not (1 - alpha) / (n * EPS32) > 2 * DOUBT


def deviation_sums(rows: int, n: int, wide: bool, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Zeroed rhs and spread [rows, n] for solve_deviation, float64 where wide."""
    dtype = torch.float64 if wide else torch.float32
    return torch.zeros(rows, n, dtype=dtype, device=device), torch.zeros(rows, n, dtype=dtype, device=device)


def add_deviation(rhs: Tensor, spread: Tensor, gram: Tensor, coef: float, alpha: float, deviation: Tensor) -> None:
    """rhs += cᵢ Yᵢ G̃ᵢ and spread += cᵢ Yᵢ for expert i's deviation Yᵢ = Wᵢ − W₀ from the first expert ([rows,
    in]; G̃ᵢ is symmetric), in rhs's precision."""
    deviation = deviation.to(rhs.dtype)
    rhs.add_(reduced_product(gram, alpha, deviation.T).T, alpha=coef)
    spread.add_(deviation, alpha=coef)


def merge_weight(
    expert_weights: list[Tensor],
    grams: list[Tensor],
    alpha: float,
    coefs: list[float],
    device: torch.device | str = "cpu",
) -> tuple[Tensor, dict]:
    """The RegMean merge of one linear weight: the experts' weights ([out, in]), their grams
    ([in, in]), alpha and normalized weights -> merged weight (float32) and diagnostics
    (residual, error, path, ridge, probe_error, cutoff, unexcited: directions left at the average)."""
    system = RegMeanSystem.factor(grams, alpha, coefs, device, num_rows=expert_weights[0].shape[0])
    merged, residual, error = system.solve([w.to(device, torch.float32) for w in expert_weights])
    return merged, dict(residual=residual, error=error, **system.diagnostics())


# ----------------------------------------------------------------------------- the reference's solve
def reference_reduce(gram: Tensor, alpha: float) -> Tensor:
    """G̃ as the reference's merge_model.py formed it: G times the weight matrix diag(1 - α) + α (float32, with
    the roundings of that weight matrix)."""
    n = gram.shape[0]
    weight = torch.diag(torch.ones(n) - alpha).to(gram.device) + torch.zeros(n, n, device=gram.device).fill_(alpha)
    return gram * weight


@dataclass
class ReferenceSystem:
    """merge_model.py --solve reference: the reference's solve, kept to reproduce its numbers. Wᵀ =
    lstsq(Σ wᵢ G̃ᵢ, Σ wᵢ G̃ᵢ Wᵢᵀ) by torch.linalg.lstsq with driver gels (QR, no rank guard: the only driver on
    cuda, where the reference ran) in float32, on the grams as given: no ridge, no float64, no rule for
    unexcited directions (they get whatever the rounding makes of them). wᵢ = N cᵢ: 1 for equal weights, so
    that the sums are the reference's own. The same interface as RegMeanSystem (factor, solve, diagnostics)."""

    grams: list[Tensor]  # float32 [n, n] per expert, as given, on the solve device
    coefs: list[float]
    alpha: float
    reduced: list[Tensor]  # wᵢ G̃ᵢ
    a: Tensor  # Σ wᵢ G̃ᵢ
    path: str = "lstsq-gels"

    @property
    def n(self) -> int:
        return self.grams[0].shape[0]

    @classmethod
    def factor(cls, grams: list[Tensor], alpha: float, coefs: list[float], device: torch.device | str = "cpu", **_):
        grams = [g.to(device, torch.float32) for g in grams]
        scales = [c * len(coefs) for c in coefs]
        reduced = [reference_reduce(g, alpha) for g in grams]
        reduced = [r if w == 1.0 else r * w for r, w in zip(reduced, scales)]
        return cls(grams=grams, coefs=list(coefs), alpha=alpha, reduced=reduced, a=sum(reduced))

    def diagnostics(self) -> dict:
        return dict(path=self.path, ridge=0.0, probe_error=None, cutoff=0.0, unexcited=0)

    def solve(self, expert_rows: list[Tensor]) -> tuple[Tensor, float, float]:
        """Merged rows (float32 [rows, in]) from each expert's rows (float32 [rows, in]), the relative
        residual of the system solved (on the rows solved) and 0 for the error estimate (it makes none)."""
        rhs = sum(r @ w.T for r, w in zip(self.reduced, expert_rows))
        solution = torch.linalg.lstsq(self.a, rhs, driver="gels").solution
        residual = ((self.a @ solution - rhs).norm() / rhs.norm().clamp_min(1e-30)).item()
        return solution.T, residual, 0.0


def output_error_terms(merged: Tensor, average: Tensor, expert_rows: list[Tensor], grams: list[Tensor]) -> Tensor:
    """How far a merged layer's output is from each expert's, on that expert's inputs, row by row.

    merged, average: the same rows of the merged and of the weighted-average weight ([rows, in]);
    expert_rows: those rows of each expert's weight; grams: each expert's full gram Gᵢ ([in, in],
    the second moment of its inputs, without the α reduction). Returns float64 [3, N, rows]:
    per output row r, (W_r − Wᵢ_r) Gᵢ (W_r − Wᵢ_r)ᵀ for W = merged (0) and W = average (1), and
    Wᵢ_r Gᵢ Wᵢ_rᵀ (2). Summed over all rows these are tr((W − Wᵢ) Gᵢ (W − Wᵢ)ᵀ) = ‖Xᵢ(W − Wᵢ)ᵀ‖² / nᵢ
    and tr(Wᵢ Gᵢ Wᵢᵀ); their ratio is the relative mean squared error of the layer's output on
    expert i's inputs. The differences are formed before the product (no cancellation), and the
    three quadratic forms of one expert take one matrix product."""
    out = []
    merged, average = merged.to(grams[0].dtype), average.to(grams[0].dtype)
    for w, g in zip(expert_rows, grams):
        w = w.to(g.dtype)
        stacked = torch.cat([merged - w, average - w, w])
        out.append(torch.linalg.vecdot(stacked @ g, stacked).double().view(3, -1))
    return torch.stack(out, 1)
