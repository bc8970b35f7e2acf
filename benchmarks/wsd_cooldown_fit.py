"""WSD cooldown branches vs separate runs: approach-3 fits side by side, their predicted losses,
and the compute the branches need as a fraction of the separate runs'.

    research sweep wsd_cooldown_shakespeare
    python benchmarks/wsd_cooldown_fit.py runs/wsd_cooldown_shakespeare \
        --plot docs/scaling/wsd_cooldown.png

Reads the sweep's results.jsonl: rows of kind ``branch`` (and their ``stable`` runs, for the
compute), and rows tagged ``method`` = ``separate`` (the same WSD configs trained from step 0)
or ``cosine`` (a cosine schedule per budget, if the sweep has them). Fits L(N, D) = E + A/N^alpha
+ B/D^beta to each group (research.scaling.fits.approach3, N = total parameters by default) and
prints each fit's compute-optimal loss at the grid's smallest, middle and largest compute and at
4x the largest (an extrapolation), and each fit's prediction at every grid point, with the
relative difference to the separate runs' fit.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np

from research.scaling.fits import approach3, load_runs, optimal_allocation, predict_loss
from research.scaling.sweep import read_results


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load}"


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    out = {
        "branches": [r for r in rows if r.get("kind") == "branch"],
        "separate": [r for r in rows if r.get("method") == "separate"],
        "cosine": [r for r in rows if r.get("method") == "cosine"],
    }
    return {k: v for k, v in out.items() if v}


def compute_fraction(rows: list[dict]) -> tuple[float, float]:
    """(FLOPs, wall seconds) of stable runs + branches over those of the separate runs."""
    branch_way = [r for r in rows if r.get("kind") in ("stable", "branch")]
    separate = [r for r in rows if r.get("method") == "separate"]
    flops = sum(r["own_flops"] for r in branch_way) / sum(r["flops"] for r in separate)
    wall = sum(r["wall_seconds"] for r in branch_way) / sum(r["wall_seconds"] for r in separate)
    return flops, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the sweep folder (holds results.jsonl)")
    parser.add_argument("--params", default="params", help="the N column (default: total)")
    parser.add_argument("--plot", help="write loss vs tokens (branches over separate runs) here")
    args = parser.parse_args()

    rows = read_results(Path(args.root))
    by_group = groups(rows)
    if "branches" not in by_group or "separate" not in by_group:
        raise SystemExit(f"{args.root} needs branch rows and method=separate rows")
    print(f"machine: {machine()}")

    # The same (N, D) points both ways: the branches' losses against the separate runs'.
    separate = {(r[args.params], r["tokens"]): r for r in by_group["separate"]}
    diffs = [
        r["val_loss"] / separate[(r[args.params], r["tokens"])]["val_loss"] - 1
        for r in by_group["branches"]
        if (r[args.params], r["tokens"]) in separate
    ]
    print(
        f"observed val loss, branch vs separate run at the same N, D ({len(diffs)} points): "
        f"max |rel diff| {max(abs(d) for d in diffs):.2e}"
    )

    fits = {
        name: approach3(load_runs(group, args.params, curves=False))
        for name, group in by_group.items()
        if len(group) >= 5  # approach 3 has five parameters
    }
    print(f"\napproach 3, N = {args.params}:")
    for name, fit in fits.items():
        print(
            f"  {name:<9} E = {fit['E']:.4f}, A = {fit['A']:.4g}, B = {fit['B']:.4g}, "
            f"alpha = {fit['alpha']:.3f}, beta = {fit['beta']:.3f}, a = {fit['a']:.3f}, "
            f"b = {fit['b']:.3f} ({len(by_group[name])} runs)"
        )

    reference = fits["separate"]
    kappa = reference["kappa"]
    grid_c = np.array([r["flops"] for r in by_group["separate"]], dtype=float)
    budgets = [grid_c.min(), float(np.exp(np.log(grid_c).mean())), grid_c.max(), 4 * grid_c.max()]
    labels = ["grid min", "grid mid", "grid max", "4x max (extrapolated)"]
    names = list(fits)
    print("\ncompute-optimal loss L_opt(C) of each fit (rel diff to the separate runs' fit):")
    print(f"  {'C (FLOPs)':<30}" + "".join(f"{n:>24}" for n in names))
    worst = {n: 0.0 for n in names}
    for label, c in zip(labels, budgets, strict=True):
        cells = []
        for name in names:
            n_opt, d_opt = optimal_allocation(fits[name], c, kappa)
            loss = float(predict_loss(fits[name], n_opt, d_opt))
            n_ref, d_ref = optimal_allocation(reference, c, kappa)
            ref = float(predict_loss(reference, n_ref, d_ref))
            worst[name] = max(worst[name], abs(loss / ref - 1))
            cells.append(f"{loss:.4f} ({loss / ref - 1:+.3%})")
        print(f"  {f'{c:.3g} {label}':<30}" + "".join(f"{cell:>24}" for cell in cells))
    points = [(float(r[args.params]), float(r["tokens"])) for r in by_group["separate"]]
    n, d = np.array(points).T
    on_grid = {
        name: float(
            np.abs(predict_loss(fits[name], n, d) / predict_loss(reference, n, d) - 1).max()
        )
        for name in names
    }
    print(
        "\nmax |rel diff| to the separate runs' fit: "
        + ", ".join(
            f"{name}: {worst[name]:.3%} at L_opt, {on_grid[name]:.3%} on the grid's points"
            for name in names
            if name != "separate"
        )
    )
    flops, wall = compute_fraction(rows)
    print(
        f"compute of stable runs + branches / separate runs: {flops:.3f} of the FLOPs "
        f"({1 / flops:.2f}x less), {wall:.3f} of the wall time"
    )
    if args.plot:
        plot(by_group, rows, fits, args.params, Path(args.plot))
        print(f"wrote {args.plot}")


def plot(by_group: dict, rows: list[dict], fits: dict, params: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r[params] for r in by_group["separate"]})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    style = {
        "separate": dict(marker="o", s=70, facecolors="none", label="separate WSD runs"),
        "branches": dict(marker="x", s=40, label="cooldown branches"),
        "cosine": dict(marker="^", s=30, facecolors="none", label="separate cosine runs"),
    }
    for name, group in by_group.items():
        for size, color in zip(sizes, colors, strict=True):
            pts = sorted((r["tokens"], r["val_loss"]) for r in group if r[params] == size)
            if not pts:
                continue
            x, y = np.array(pts).T
            kwargs = dict(style[name])
            kwargs["label"] = kwargs["label"] if size == sizes[0] else None
            if kwargs.get("facecolors") == "none":
                kwargs["edgecolors"] = color
            else:
                kwargs["color"] = color
            ax.scatter(x, y, **kwargs)
    for size, color in zip(sizes, colors, strict=True):  # where each cooldown started from
        stable = [r for r in rows if r.get("kind") == "stable" and r[params] == size]
        x, y = stable_curve(stable[0]) if stable else ([], [])
        ax.plot(x, y, ".-", color=color, lw=0.6, ms=4, alpha=0.6)
    ax.plot(
        [], [], "k.-", lw=0.6, ms=4, alpha=0.6, label="stable run (constant LR), at branch points"
    )
    tokens = np.geomspace(
        min(r["tokens"] for r in rows if r.get("kind") == "branch") / 1.5,
        max(r["tokens"] for r in rows if r.get("kind") == "branch") * 1.5,
        50,
    )
    for size, color in zip(sizes, colors, strict=True):
        ax.plot(tokens, predict_loss(fits["branches"], size, tokens), "--", color=color, lw=1)
        ax.plot(tokens, predict_loss(fits["separate"], size, tokens), ":", color=color, lw=1)
        ax.text(tokens[-1], predict_loss(fits["branches"], size, tokens[-1]), f" N={size:,.0f}")
    ax.plot([], [], "k--", lw=1, label="approach-3 fit to branches")
    ax.plot([], [], "k:", lw=1, label="approach-3 fit to separate runs")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("WSD cooldown branches vs separate runs (tinyshakespeare, char)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200)


def stable_curve(row: dict) -> tuple[list[float], list[float]]:
    """(tokens, val loss) of a stable run at its branch points (evaluated as each segment ends)."""
    import json

    points = {}
    for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/loss" in record:
            points[record["tokens"]] = record["val/loss"]
    return sorted(points), [points[t] for t in sorted(points)]


if __name__ == "__main__":
    main()
