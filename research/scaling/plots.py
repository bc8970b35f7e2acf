"""Figures of a scaling study (matplotlib, PNG at print resolution or SVG): IsoFLOP curves
with their parabolas, N_opt(C) and D_opt(C) frontiers, approach-3 loss contours, predicted vs
observed loss. Axes carry their units (parameters, tokens, FLOPs, nats/token)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from research.scaling.fits import Runs, optimal_allocation, predict_loss

DPI = 200  # PNGs at print resolution (>= 150 dpi)
PARAMS = "parameters N"
TOKENS = "training tokens D"
FLOPS = "training compute C (FLOPs)"
LOSS = "loss (nats/token)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _holdout_points(held: list[dict], params: str):
    return (
        np.array([r[params] for r in held], dtype=float),
        np.array([r["tokens"] for r in held], dtype=float),
        np.array([r["flops"] for r in held], dtype=float),
        np.array([r["val_loss"] for r in held], dtype=float),
    )


def isoflop_curves(ax, runs: Runs, fits: dict) -> None:
    budgets = sorted({b for b in runs.budget if np.isfinite(b)})
    colors = _pyplot().cm.viridis(np.linspace(0, 0.85, max(len(budgets), 1)))
    vertices = {v["budget"]: v for v in fits.get("approach2", {}).get("vertices", [])}
    for color, budget in zip(colors, budgets, strict=True):
        mask = runs.budget == budget
        ax.scatter(runs.n[mask], runs.loss[mask], color=color, label=f"C = {budget:.2g} FLOPs")
        if budget in vertices:
            v = vertices[budget]
            x = np.linspace(np.log(runs.n[mask].min()) - 0.3, np.log(runs.n[mask].max()) + 0.3)
            ax.plot(np.exp(x), np.polyval(v["parabola_n"], x), color=color, alpha=0.7)
            ax.plot(v["n_opt"], v["loss_opt"], "*", color=color, markersize=12, mec="k")
    ax.set_xscale("log")
    ax.set_xlabel(PARAMS)
    ax.set_ylabel(f"final validation {LOSS}")
    ax.set_title(
        "IsoFLOP curves: one compute budget each\n(lines: approach 2 parabolas, * = N_opt)"
    )
    ax.legend(fontsize=8, title="budget")


def frontiers(axes, runs: Runs, fits: dict, held: list[dict], params: str) -> None:
    c_line = np.geomspace(runs.c.min() / 2, max([runs.c.max(), *(r["flops"] for r in held)]) * 2)
    labels = (
        (axes[0], "n", "N_opt(C): best model size per budget", "N_opt (parameters)"),
        (axes[1], "d", "D_opt(C): best token count per budget", "D_opt (tokens)"),
    )
    for ax, key, label, ylabel in labels:
        if "approach1" in fits:
            env, fit = fits["approach1"]["envelope"], fits["approach1"]
            ax.scatter(
                env["flops"], env[key], s=8, color="C0", alpha=0.5, label="approach 1: envelope"
            )
            ax.plot(c_line, fit[f"k_{key}"] * c_line ** fit["a" if key == "n" else "b"], "C0-")
        if "approach2" in fits:
            fit = fits["approach2"]
            points = [(v["flops"], v[f"{key}_opt"]) for v in fit["vertices"]]
            ax.scatter(
                *zip(*points, strict=True),
                color="C1",
                marker="s",
                label="approach 2: IsoFLOP minima",
            )
            ax.plot(c_line, fit[f"k_{key}"] * c_line ** fit["a" if key == "n" else "b"], "C1--")
        if "approach3" in fits:
            n, d = optimal_allocation(fits["approach3"], c_line, fits["approach3"]["kappa"])
            ax.plot(c_line, n if key == "n" else d, "C2:", label="approach 3: L(N, D) fit")
        if held:
            hn, hd, hc, _ = _holdout_points(held, params)
            ax.scatter(hc, hn if key == "n" else hd, color="r", marker="x", label="held-out run")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(FLOPS)
        ax.set_ylabel(ylabel)
        ax.set_title(label)
        ax.legend(fontsize=8)


def contours(ax, runs: Runs, fits: dict, held: list[dict], params: str) -> None:
    law = fits["approach3"]
    hn, hd, _, _ = _holdout_points(held, params) if held else (np.zeros(0),) * 4
    n_all, d_all = np.concatenate([runs.n, hn]), np.concatenate([runs.d, hd])
    n_grid = np.geomspace(n_all.min() / 2, n_all.max() * 2, 120)
    d_grid = np.geomspace(d_all.min() / 2, d_all.max() * 2, 120)
    nn, dd = np.meshgrid(n_grid, d_grid)
    levels = np.quantile(predict_loss(law, nn, dd), np.linspace(0.02, 0.9, 14))
    cs = ax.contour(nn, dd, predict_loss(law, nn, dd), levels=np.unique(levels), cmap="viridis")
    ax.clabel(cs, fontsize=7, fmt="%.2f")
    c_line = np.geomspace((runs.c.min()) / 4, (runs.c.max()) * 16)
    n_opt, d_opt = optimal_allocation(law, c_line, law["kappa"])
    ax.plot(n_opt, d_opt, "r-", label="efficient frontier (best N, D per FLOPs)")
    ax.scatter(runs.n, runs.d, c="k", s=12, label="fitted runs")
    if held:
        ax.scatter(hn, hd, color="r", marker="x", s=50, label="held-out run")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_grid[0], n_grid[-1])
    ax.set_ylim(d_grid[0], d_grid[-1])
    ax.set_xlabel(PARAMS)
    ax.set_ylabel(TOKENS)
    ax.set_title("approach 3: contours of fitted L(N, D), nats/token")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)


def predicted_vs_observed(ax, runs: Runs, fits: dict, held: list[dict], params: str) -> None:
    law = fits["approach3"]
    predicted = predict_loss(law, runs.n, runs.d)
    ax.scatter(runs.loss, predicted, c="k", s=14, label="fitted runs")
    values = [runs.loss, predicted]
    if held:
        hn, hd, _, hl = _holdout_points(held, params)
        hp = predict_loss(law, hn, hd)
        ax.scatter(hl, hp, color="r", marker="x", s=60, label="held-out run")
        values += [hl, hp]
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    pad = 0.02 * (high - low)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=0.8)
    ax.set_xlabel(f"observed {LOSS}")
    ax.set_ylabel(f"approach 3 predicted {LOSS}")
    ax.set_title("predicted vs observed (dashed: equal)")
    ax.legend(fontsize=8)


def save_all(
    runs: Runs, fits: dict, held: list[dict], params: str, out: Path, fmt: str = "png"
) -> list[Path]:
    """Write each figure that the available fits support; returns the paths written."""
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out / f"{name}.{fmt}"
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)

    if np.isfinite(runs.budget).any():  # published points have no IsoFLOP budgets
        fig, ax = plt.subplots(figsize=(6, 4.2))
        isoflop_curves(ax, runs, fits)
        save(fig, "isoflop_curves")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    frontiers(axes, runs, fits, held, params)
    save(fig, "frontiers")
    if "approach3" in fits:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        contours(ax, runs, fits, held, params)
        save(fig, "approach3_contours")
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        predicted_vs_observed(ax, runs, fits, held, params)
        save(fig, "predicted_vs_observed")
    return written
