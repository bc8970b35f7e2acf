"""Chinchilla's three ways to fit compute-optimal scaling (Hoffmann et al. 2022), with bootstrap
confidence intervals.

- Approach 1: the envelope of training curves. At each FLOP count, the run with the lowest
  (smoothed) training loss gives N_opt; fit N_opt = k C^a and D_opt = k' C^b.
- Approach 2: IsoFLOP profiles. Per budget, a parabola of final loss in log N (and in log D);
  its vertex gives N_opt (D_opt); fit power laws in C through the vertices.
- Approach 3: the parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising
  the Huber loss (delta 1e-3) between log-predicted and log-observed loss, with L-BFGS from a
  grid of starting points (the paper's grid), parametrised as A = e^a, B = e^b, E = e^e.

Compute is C = kappa N D, with kappa the runs' own FLOPs per parameter-token (6 for Chinchilla's
C = 6 N D; larger where attention FLOPs are counted), so the optimal allocation of approach 3 is

    N_opt = G (C / kappa)^(beta / (alpha + beta)),
    D_opt = (C / kappa)^(alpha / (alpha + beta)) / G,
    with G = (alpha A / (beta B))^(1 / (alpha + beta)).

Confidence intervals are percentile bootstraps (95%) over runs: resampled with replacement
(approach 2: within each budget). Published points (N, D, loss: no budgets, no training curves)
fit approach 3 only, and are resampled as points.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

from research.config import ResearchError
from research.storage import run_path

HUBER_DELTA = 1e-3
# L-BFGS stopping rules for the bootstrap refits. They start at the full fit's optimum, where
# scipy's defaults (relative ftol 2.2e-9, gradient 1e-5) stop after a few steps: the Huber sum is
# ~1e-4 and its gradient ~1e-5 there, so the refits stayed near the start and the intervals came
# out too narrow, with the point estimate at one end.
BOOTSTRAP_LBFGS = {"ftol": 1e-12, "gtol": 1e-9}
# Hoffmann et al. 2022, appendix D.2: the grid of initialisations for approach 3.
CHINCHILLA_GRID = dict(
    alpha=np.arange(0.0, 2.01, 0.5),
    beta=np.arange(0.0, 2.01, 0.5),
    e=np.arange(-1.0, 1.01, 0.5),
    a=np.arange(0.0, 25.1, 5.0),
    b=np.arange(0.0, 25.1, 5.0),
)


class FitError(ResearchError, ValueError):
    """Too few or degenerate runs for a fit, with what is needed."""


@dataclass
class Runs:
    """The columns the fits need, one entry per run."""

    names: list[str]
    n: np.ndarray  # parameters
    d: np.ndarray  # training tokens
    c: np.ndarray  # training FLOPs
    loss: np.ndarray  # final validation loss
    budget: np.ndarray  # IsoFLOP budget label (nan: none)
    curves: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (FLOPs, loss)

    def take(self, index: np.ndarray) -> Runs:
        return Runs(
            [self.names[i] for i in index],
            self.n[index],
            self.d[index],
            self.c[index],
            self.loss[index],
            self.budget[index],
            [self.curves[i] for i in index] if self.curves else [],
        )

    @property
    def kappa(self) -> float:
        """FLOPs per parameter per token (6 for C = 6ND)."""
        return float(np.median(self.c / (self.n * self.d)))


def load_runs(
    rows: list[dict], params: str = "active_params", curves: bool = True, smooth: int = 5
) -> Runs:
    """Runs from results.jsonl rows (holdout rows excluded by the caller)."""
    if not rows:
        raise FitError("no runs to fit: run a sweep first (research sweep EXPERIMENT)")
    missing = [r["name"] for r in rows if r.get("val_loss") is None]
    if missing:
        raise FitError(f"runs without a final val loss: {missing}")
    runs = Runs(
        names=[r["name"] for r in rows],
        n=np.array([float(r[params]) for r in rows]),
        d=np.array([float(r["tokens"]) for r in rows]),
        c=np.array([float(r["flops"]) for r in rows]),
        loss=np.array([float(r["val_loss"]) for r in rows]),
        budget=np.array([float(r["budget"]) if r.get("budget") else np.nan for r in rows]),
    )
    if curves:
        runs.curves = [training_curve(r, smooth) for r in rows]
    return runs


def training_curve(row: dict, smooth: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs so far, train loss averaged over `smooth` logged steps) from a run's metrics."""
    points: dict[int, float] = {}
    path = run_path(row["run_dir"]) / "metrics.jsonl" if row.get("run_dir") else None
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "train/loss" in record:
                points[record["step"]] = record["train/loss"]  # a resumed run's later line wins
    if not points:
        return np.zeros(0), np.zeros(0)
    steps = np.array(sorted(points), dtype=float)
    loss = np.array([points[int(s)] for s in steps])
    kernel = np.ones(smooth) / smooth
    if len(loss) >= smooth:
        loss = np.convolve(loss, kernel, mode="valid")
        steps = steps[smooth - 1 :]  # a trailing mean: the loss reached by that step
    flops_per_step = float(row["flops"]) / float(row["steps"])
    return steps * flops_per_step, loss


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = k x^p in log space: returns (p, k)."""
    if len(np.unique(x)) < 2:
        raise FitError("a power law needs points at two or more distinct x values")
    p, log_k = np.polyfit(np.log(x), np.log(y), 1)
    return float(p), float(math.exp(log_k))


def _ci(samples: list[float]) -> tuple[float, float]:
    values = np.asarray([s for s in samples if np.isfinite(s)])
    if len(values) < 2:
        return (math.nan, math.nan)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------- approach 1: envelope


def envelope(runs: Runs, points: int = 40, min_runs: int = 2) -> dict[str, np.ndarray]:
    """At log-spaced FLOP counts, the run with the lowest smoothed train loss there."""
    curves = [(c, loss) for c, loss in runs.curves if len(c) >= 2]
    if len(curves) < min_runs:
        raise FitError(
            "approach 1 needs training curves (a run's metrics.jsonl) of two or more runs; "
            "points without curves (e.g. published N, D, loss) fit approach 3 only"
        )
    low = max(min(c[0] for c, _ in curves), 1.0)
    high = max(c[-1] for c, _ in curves)
    grid = np.geomspace(low, high, points)
    best_n, best_d, best_loss, flops = [], [], [], []
    for target in grid:
        candidates = []
        for i, (c, loss) in enumerate(runs.curves):
            if len(c) >= 2 and c[0] <= target <= c[-1] * (1 + 1e-9):
                value = np.interp(np.log(target), np.log(c), loss)
                candidates.append((value, i))
        if len(candidates) < min_runs:
            continue
        value, i = min(candidates)
        flops.append(target)
        best_loss.append(value)
        best_n.append(runs.n[i])
        best_d.append(target / (runs.kappa * runs.n[i]))
    if len(set(best_n)) < 2:
        raise FitError(
            "approach 1: one model size is best at every FLOP count; add sizes or budgets"
        )
    return {
        "flops": np.array(flops),
        "n": np.array(best_n),
        "d": np.array(best_d),
        "loss": np.array(best_loss),
    }


def approach1(runs: Runs) -> dict:
    env = envelope(runs)
    a, k_n = power_law(env["flops"], env["n"])
    b, k_d = power_law(env["flops"], env["d"])
    g, k_l = power_law(env["flops"], env["loss"])
    return {"a": a, "k_n": k_n, "b": b, "k_d": k_d, "loss_exp": g, "k_loss": k_l, "envelope": env}


# ---------------------------------------------------------------- approach 2: IsoFLOP parabolas


def isoflop_vertices(runs: Runs, min_sizes: int = 3) -> list[dict]:
    """Per budget: parabolas of loss in log N and in log D, and their minima."""
    budgets = sorted({float(b) for b in runs.budget if np.isfinite(b)})
    if not budgets:
        raise FitError(
            "approach 2 needs IsoFLOP budgets (runs grouped by compute budget, a `budget` per "
            "row); these points have none, so only approach 3 fits them"
        )
    vertices = []
    for budget in budgets:
        mask = runs.budget == budget
        log_n, log_d, loss = np.log(runs.n[mask]), np.log(runs.d[mask]), runs.loss[mask]
        if len(np.unique(log_n)) < min_sizes:
            continue
        pn = np.polyfit(log_n, loss, 2)
        pd = np.polyfit(log_d, loss, 2)
        if pn[0] <= 0 or pd[0] <= 0:
            continue  # no minimum: this budget's sizes all sit on one side of the optimum
        x_n, x_d = -pn[1] / (2 * pn[0]), -pd[1] / (2 * pd[0])
        vertices.append(
            {
                "budget": budget,
                "flops": float(np.mean(runs.c[mask])),
                "n_opt": float(math.exp(x_n)),
                "d_opt": float(math.exp(x_d)),
                "loss_opt": float(np.polyval(pn, x_n)),
                "parabola_n": pn.tolist(),
                "parabola_d": pd.tolist(),
                "inside": bool(log_n.min() <= x_n <= log_n.max()),
            }
        )
    return vertices


def approach2(runs: Runs) -> dict:
    vertices = isoflop_vertices(runs)
    if len(vertices) < 2:
        raise FitError(
            "approach 2 needs two or more budgets whose IsoFLOP curve has a minimum (a parabola "
            "opening upwards through >= 3 sizes); widen the size range around the optimum"
        )
    c = np.array([v["flops"] for v in vertices])
    a, k_n = power_law(c, np.array([v["n_opt"] for v in vertices]))
    b, k_d = power_law(c, np.array([v["d_opt"] for v in vertices]))
    g, k_l = power_law(c, np.array([v["loss_opt"] for v in vertices]))
    return {
        "a": a,
        "k_n": k_n,
        "b": b,
        "k_d": k_d,
        "loss_exp": g,
        "k_loss": k_l,
        "vertices": vertices,
    }


# ---------------------------------------------------------------- approach 3: parametric law


def _objective(theta: np.ndarray, log_n, log_d, log_loss, delta: float):
    """Huber loss of log L(N, D) against the log losses, and its gradient in theta."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)  # one exp for both the log-sum-exp and its softmax
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_loss
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))
    w = weights * (dr / total)
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] @ log_n), -(w[1] @ log_d)])
    return value, grad


def _minimise(starts, log_n, log_d, log_loss, delta, options: dict | None = None):
    best = None
    solutions = []
    # Five unknowns: BLAS threads only add overhead, and stall when the cores are busy.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", RuntimeWarning)
        for start in starts:
            result = minimize(
                _objective,
                np.asarray(start, dtype=float),
                args=(log_n, log_d, log_loss, delta),
                jac=True,
                method="L-BFGS-B",
                options=options,
            )
            if not np.isfinite(result.fun):
                continue
            solutions.append((float(result.fun), result.x))
            if best is None or result.fun < best[0]:
                best = (float(result.fun), result.x)
    if best is None:
        raise FitError("approach 3: no starting point converged")
    return best, solutions


def _grid_objective(starts: np.ndarray, log_n, log_d, log_loss, delta: float) -> np.ndarray:
    """The Huber objective at every start at once (starts: [k, 5])."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.repeat(e, len(log_n), axis=1)])
    r = logsumexp(terms, axis=0) - log_loss
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(1)


def fit_parametric(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    delta: float = HUBER_DELTA,
    grid=None,
    per_exponents: int = 2,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Best (a, b, e, alpha, beta), and the distinct local optima found.

    The objective is evaluated at every point of the starting grid (the paper's 4,500 by
    default, vectorised: milliseconds), and L-BFGS runs from the ``per_exponents`` best points
    of each (alpha, beta) pair of the grid (50 runs, not 4,500)."""
    grid = grid or CHINCHILLA_GRID
    starts = np.array(
        [
            (a, b, e, alpha, beta)
            for alpha, beta, e, a, b in itertools.product(
                grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"]
            )
        ]
    )
    args = (np.log(n), np.log(d), np.log(loss), delta)
    values = _grid_objective(starts, *args)
    # The best few grid points per (alpha, beta) pair: the basins differ mostly in the exponents,
    # and the overall best grid points tend to crowd into one of them.
    chosen = []
    for key in np.unique(starts[:, 3:], axis=0):
        members = np.flatnonzero((starts[:, 3:] == key).all(axis=1))
        chosen.extend(members[np.argsort(values[members])[:per_exponents]])
    (_, theta), solutions = _minimise(starts[chosen], *args)
    solutions.sort(key=lambda s: s[0])
    distinct: list[np.ndarray] = []
    for _, x in solutions:
        if all(np.abs(x - y).max() > 1e-2 for y in distinct):
            distinct.append(x)
        if len(distinct) == 8:
            break
    return theta, distinct


def law_from_theta(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def predict_loss(law: dict, n, d):
    return law["E"] + law["A"] / np.power(n, law["alpha"]) + law["B"] / np.power(d, law["beta"])


def optimal_allocation(law: dict, flops, kappa: float = 6.0) -> tuple:
    """(N_opt, D_opt) minimising L(N, D) subject to kappa N D = C."""
    alpha, beta = law["alpha"], law["beta"]
    g = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
    c = np.asarray(flops, dtype=float) / kappa
    return g * c ** (beta / (alpha + beta)), c ** (alpha / (alpha + beta)) / g


def approach3(runs: Runs, delta: float = HUBER_DELTA, grid=None) -> dict:
    if len(runs.n) < 5:
        raise FitError(f"approach 3 fits five parameters: needs >= 5 runs, got {len(runs.n)}")
    theta, starts = fit_parametric(runs.n, runs.d, runs.loss, delta, grid)
    law = law_from_theta(theta)
    alpha, beta = law["alpha"], law["beta"]
    return {
        **law,
        "a": beta / (alpha + beta),
        "b": alpha / (alpha + beta),
        "theta": theta.tolist(),
        "starts": [s.tolist() for s in starts],
        "kappa": runs.kappa,
    }


# ---------------------------------------------------------------- bootstrap and the report


def _resample(runs: Runs, rng: np.random.Generator, by_budget: bool) -> Runs:
    """Runs drawn with replacement: over all of them, or (``by_budget``) within each IsoFLOP
    budget, runs without a budget forming one more group, so that points with no budgets at
    all (published N, D, loss) are resampled as points."""
    groups = [np.arange(len(runs.n))]
    if by_budget:
        finite = np.isfinite(runs.budget)
        groups = [np.flatnonzero(runs.budget == b) for b in np.unique(runs.budget[finite])]
        if not finite.all():
            groups.append(np.flatnonzero(~finite))
    return runs.take(np.concatenate([rng.choice(group, len(group)) for group in groups]))


def bootstrap(
    runs: Runs,
    samples: int = 200,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    approaches: tuple[str, ...] = ("approach1", "approach2", "approach3"),
) -> dict:
    """Refits of ``approaches`` on resampled runs; approach 3 restarts from the full fit's local
    optima. Leave out the approaches that cannot fit the full data: their resamples fail too."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[dict]] = {name: [] for name in approaches}
    failed = {name: 0 for name in approaches}
    if "approach3" in approaches:
        full3 = approach3(runs, delta)
        starts = [np.array(s) for s in full3["starts"][:3]]  # the best distinct optima
    for _ in range(samples):
        for name, fn in (("approach1", approach1), ("approach2", approach2)):
            if name not in approaches:
                continue
            try:
                draws[name].append(fn(_resample(runs, rng, by_budget=name == "approach2")))
            except (FitError, np.linalg.LinAlgError):
                failed[name] += 1
        if "approach3" not in approaches:
            continue
        sample = _resample(runs, rng, False)
        try:
            (_, theta), _ = _minimise(
                starts,
                np.log(sample.n),
                np.log(sample.d),
                np.log(sample.loss),
                delta,
                BOOTSTRAP_LBFGS,
            )
            law = law_from_theta(theta)
            law["a"] = law["beta"] / (law["alpha"] + law["beta"])
            law["b"] = law["alpha"] / (law["alpha"] + law["beta"])
            law["kappa"] = sample.kappa
            draws["approach3"].append(law)
        except FitError:
            failed["approach3"] += 1
    return {"draws": draws, "failed": failed, "samples": samples}


def predict_at(fit: dict, approach: str, flops: float, kappa: float) -> dict:
    """N_opt, D_opt and loss for a compute budget under one approach's fit."""
    if approach == "approach3":
        n, d = optimal_allocation(fit, flops, fit.get("kappa", kappa))
        return {"n_opt": float(n), "d_opt": float(d), "loss": float(predict_loss(fit, n, d))}
    return {
        "n_opt": fit["k_n"] * flops ** fit["a"],
        "d_opt": fit["k_d"] * flops ** fit["b"],
        "loss": fit["k_loss"] * flops ** fit["loss_exp"],
    }


def fit_all(
    rows: list[dict],
    params: str = "active_params",
    samples: int = 200,
    budget: float | None = None,
    seed: int = 0,
) -> dict:
    """All three approaches with 95% bootstrap CIs, predictions at ``budget`` (default: the
    largest fitted run's FLOPs x 4) and the error on held-out runs."""
    fitted = [r for r in rows if not r.get("holdout")]
    held = [r for r in rows if r.get("holdout")]
    runs = load_runs(fitted, params)
    kappa = runs.kappa
    budget = budget or 4 * float(runs.c.max())
    report: dict = {"runs": len(fitted), "params_column": params, "kappa": kappa, "budget": budget}
    fits = {}
    for name, fn in (("approach1", approach1), ("approach2", approach2), ("approach3", approach3)):
        try:
            fits[name] = fn(runs)
        except FitError as error:
            report.setdefault("errors", {})[name] = str(error)
    boot = (
        bootstrap(runs, samples, seed, approaches=tuple(fits))
        if samples and fits
        else {"draws": {}, "failed": {}}
    )
    keys = {
        "approach1": ("a", "b"),
        "approach2": ("a", "b"),
        "approach3": ("E", "A", "B", "alpha", "beta", "a", "b"),
    }
    for name, fit in fits.items():
        draws = boot["draws"].get(name, [])
        entry = {"params": {}, "prediction": {}}
        for key in keys[name]:
            entry["params"][key] = {"value": fit[key], "ci": _ci([d[key] for d in draws])}
        point = predict_at(fit, name, budget, kappa)
        for key, value in point.items():
            samples_at = [predict_at(d, name, budget, kappa)[key] for d in draws]
            entry["prediction"][key] = {"value": value, "ci": _ci(samples_at)}
        entry["bootstrap_failed"] = boot["failed"].get(name, 0)
        report[name] = entry
    report["fits"] = fits
    report["holdout"] = [_holdout_error(r, fits, kappa, params) for r in held]
    return report


def _holdout_error(row: dict, fits: dict, kappa: float, params: str) -> dict:
    out = {"name": row["name"], "flops": row["flops"], "observed": row["val_loss"]}
    if "approach3" in fits:
        predicted = float(predict_loss(fits["approach3"], row[params], row["tokens"]))
        out["approach3_predicted"] = predicted
        out["approach3_error_pct"] = 100 * (predicted - row["val_loss"]) / row["val_loss"]
    if "approach2" in fits:  # the compute-optimal loss at that budget: a lower bound
        predicted = predict_at(fits["approach2"], "approach2", row["flops"], kappa)["loss"]
        out["approach2_optimal_loss"] = predicted
        out["approach2_error_pct"] = 100 * (predicted - row["val_loss"]) / row["val_loss"]
    return out
