"""Fits on published points (N, D, loss without IsoFLOP budgets or training curves): the
bootstrap resamples points, `research fit --csv` reads them with clear errors, and the saved
figures are at print resolution with units on their axes."""

import numpy as np

from research.scaling import fits

# Hoffmann et al. 2022, approach 3: L(N, D) = E + A / N^alpha + B / D^beta.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def law_points(count: int = 40, noise: float = 0.005, seed: int = 0):
    """N, D log-uniform over Chinchilla's range (44M-16B parameters, 5B-500B tokens), losses
    from the law with log-normal noise."""
    rng = np.random.default_rng(seed)
    n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), count))
    d = np.exp(rng.uniform(np.log(5e9), np.log(5e11), count))
    return n, d, fits.predict_loss(CHINCHILLA, n, d) * np.exp(rng.normal(0, noise, count))


def point_rows(n, d, loss) -> list[dict]:
    return [
        {"name": f"p{i}", "active_params": a, "tokens": b, "flops": 6 * a * b, "val_loss": c}
        for i, (a, b, c) in enumerate(zip(n, d, loss, strict=True))
    ]


def test_bootstrap_on_points_without_budgets_resamples_points(tmp_path):
    """Was an IndexError in _resample: no budgets left it no group to draw from."""
    rows = [{**r, "run_dir": str(tmp_path), "steps": 1} for r in point_rows(*law_points(12))]
    report = fits.fit_all(rows, samples=8, seed=0)
    assert "IsoFLOP budgets" in report["errors"]["approach2"]
    assert "training curves" in report["errors"]["approach1"]
    assert report["approach3"]["bootstrap_failed"] == 0
    for entry in report["approach3"]["params"].values():
        low, high = entry["ci"]
        assert np.isfinite(low) and low <= high
    runs = fits.load_runs(rows)
    sample = fits._resample(runs, np.random.default_rng(0), by_budget=True)
    assert len(sample.names) == len(rows) and set(sample.names) <= set(runs.names)
    assert len(set(sample.names)) < len(rows)  # drawn with replacement


def test_bootstrap_refit_reaches_the_minimum_of_a_full_grid_refit():
    """The bootstrap refits from the full fit's optimum; they must get as low as the slow
    reference (L-BFGS from the paper's whole starting grid), not stop at their start."""
    n, d, loss = law_points()
    theta, _ = fits.fit_parametric(n, d, loss)
    rng = np.random.default_rng(3)
    for _ in range(3):
        index = rng.integers(0, len(n), len(n))
        args = (np.log(n[index]), np.log(d[index]), np.log(loss[index]), fits.HUBER_DELTA)
        (refit, _), _ = fits._minimise([theta], *args, fits.BOOTSTRAP_LBFGS)
        reference, _ = fits.fit_parametric(n[index], d[index], loss[index])
        assert refit <= fits._objective(reference, *args)[0] * (1 + 1e-3)
