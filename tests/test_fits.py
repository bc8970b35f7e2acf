"""Fits on published points (N, D, loss without IsoFLOP budgets or training curves): the
bootstrap resamples points, `research fit --csv` reads them with clear errors, and the saved
figures are at print resolution with units on their axes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from research.config import ConfigError
from research.scaling import fits
from research.scaling.points import read_points, write_points

# Hoffmann et al. 2022, approach 3: L(N, D) = E + A / N^alpha + B / D^beta.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
REPO = Path(__file__).resolve().parents[1]


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


def test_fit_csv_recovers_chinchilla_within_its_cis(tmp_path, capsys):
    from research.cli import main as cli_main

    n, d, loss = law_points()
    path = tmp_path / "published.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Params", "D", "Loss", "source"])  # any case; extra columns ignored
        writer.writerows([a, b, c, "synthetic"] for a, b, c in zip(n, d, loss, strict=True))
    out = tmp_path / "fit"
    args = ["fit", "--csv", str(path), "--bootstrap", "40", "--out", str(out), "--no-plots"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "approach1 (envelope): not fitted" in printed
    assert "approach2 (IsoFLOP parabolas): not fitted" in printed
    assert "approach3 (parametric): E = " in printed
    report = json.loads((out / "fit.json").read_text())
    law = {}
    for key, true in CHINCHILLA.items():
        entry = report["approach3"]["params"][key]
        low, high = entry["ci"]
        assert low <= true <= high, (key, entry)
        law[key] = entry["value"]
    check_n = np.array([4e8, 2.8e9, 7e10])  # inside the points, and Chinchilla 70B / 1.4T
    check_d = np.array([8e9, 6e10, 1.4e12])
    predicted = fits.predict_loss(law, check_n, check_d)
    np.testing.assert_allclose(
        predicted, fits.predict_loss(CHINCHILLA, check_n, check_d), rtol=0.01
    )


def test_csv_compute_column_gives_tokens_by_6nd(tmp_path):
    n, d, loss = law_points(count=6)
    path = tmp_path / "c.csv"
    path.write_text(
        "N,FLOPS,val_loss\n"
        + "".join(f"{a},{6 * a * b},{c}\n" for a, b, c in zip(n, d, loss, strict=True))
    )
    rows = read_points(path)
    np.testing.assert_allclose([r["tokens"] for r in rows], d, rtol=1e-12)
    np.testing.assert_allclose([r["flops"] for r in rows], 6 * n * d, rtol=1e-12)
    assert [r["active_params"] for r in rows] == list(n)


@pytest.mark.parametrize(
    "text, message",
    [
        ("N,loss\n1e9,2.1\n", "missing column.*d or tokens"),
        ("params,tokens\n1e9,2e10\n", "missing column.*loss or val_loss"),
        (
            "N,D,loss\n" + "1e9,2e10,2.1\n" * 5 + "1e9,2e10,n/a\n",
            "line 7.*'loss'.*'n/a'.*not a number",
        ),
        ("N,D,loss\n" + "1e9,2e10,2.1\n" * 4 + "-1e9,2e10,2.1\n", "line 6.*positive"),
        ("N,D,loss\n" + "1e9,2e10,2.1\n" * 4, "4 point.*at least 5"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_points(path)


def test_fit_command_usage_errors_exit_2(tmp_path, capsys):
    from research.cli import main as cli_main

    assert cli_main(["fit"]) == 2
    assert "--csv" in capsys.readouterr().err
    assert cli_main(["fit", "--csv", str(tmp_path / "none.csv")]) == 2
    assert "no CSV file" in capsys.readouterr().err


def test_example_csv_is_the_published_law(tmp_path):
    """docs/scaling/chinchilla_points.csv: Hoffmann et al.'s law with 0.5% noise, nothing else."""
    rows = read_points(REPO / "docs" / "scaling" / "chinchilla_points.csv")
    n = np.array([r["active_params"] for r in rows])
    d = np.array([r["tokens"] for r in rows])
    loss = np.array([r["val_loss"] for r in rows])
    assert len(rows) >= 20
    np.testing.assert_allclose(loss, fits.predict_loss(CHINCHILLA, n, d), rtol=0.02)
    again = read_points(write_points(tmp_path / "again.csv", n, d, loss))
    np.testing.assert_allclose([r["val_loss"] for r in again], loss, rtol=1e-4)


def test_saved_figures_are_print_resolution_with_units(tmp_path):
    from PIL import Image
    from test_scaling import synthetic_runs

    from research.scaling import plots

    runs = synthetic_runs()
    found = {"approach2": fits.approach2(runs), "approach3": fits.approach3(runs)}
    written = plots.save_all(runs, found, [], "active_params", tmp_path)
    assert {p.stem for p in written} == {
        "isoflop_curves",
        "frontiers",
        "approach3_contours",
        "predicted_vs_observed",
    }
    for path in written:
        assert min(Image.open(path).info["dpi"]) >= 150, path
    plt = plots._pyplot()
    fig, axes = plt.subplots(1, 5)
    plots.isoflop_curves(axes[0], runs, found)
    plots.frontiers(axes[1:3], runs, found, [], "active_params")
    plots.contours(axes[3], runs, found, [], "active_params")
    plots.predicted_vs_observed(axes[4], runs, found, [], "active_params")
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes]
    plt.close(fig)
    assert labels[0] == ("parameters N", "final validation loss (nats/token)")
    assert labels[1] == ("training compute C (FLOPs)", "N_opt (parameters)")
    assert labels[2] == ("training compute C (FLOPs)", "D_opt (tokens)")
    assert labels[3] == ("parameters N", "training tokens D")
    assert all("nats/token" in label for label in labels[4])
    budgets = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert budgets and all(t.endswith(" FLOPs") for t in budgets)
    # Published points have no budgets: no IsoFLOP figure, the others still drawn.
    points = fits.load_runs(point_rows(*law_points(12)))
    law = {"approach3": fits.approach3(points)}
    names = {p.stem for p in plots.save_all(points, law, [], "active_params", tmp_path / "p")}
    assert names == {"frontiers", "approach3_contours", "predicted_vs_observed"}
