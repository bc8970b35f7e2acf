"""`research sweep | fit | forecast`: the scaling-study commands (parsers and handlers).

Imports of JAX and the heavy modules happen inside the handlers, after runtime.setup().
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research.cli_types import non_negative_int, positive_float, positive_int, unit_fraction

FMT = argparse.RawDescriptionHelpFormatter


def _sweep_root(args) -> Path:
    if args.root:
        from research.storage import run_path

        return run_path(args.root)  # a folder or a gs:// URL
    from research.config import find_experiment

    return Path("runs") / find_experiment(args.experiment).stem


def _throughput(root: Path, mfu: float) -> tuple[float, str]:
    """FLOP/s for time estimates: measured on this sweep's finished runs, else peak x MFU."""
    from research.scaling.sweep import read_results

    rows = [r for r in read_results(root) if r.get("wall_seconds")]
    if rows:
        rate = sum(r["flops"] for r in rows) / sum(r["wall_seconds"] for r in rows)
        return rate, f"measured on {len(rows)} finished runs"
    from research.train.accounting import job_peak

    peak = job_peak()
    if peak.total is None:  # job_peak warned: no figure for this accelerator
        return float("nan"), "no peak FLOP/s known for this device: no time estimate"
    return peak.total * mfu, f"peak ({peak.source}) x assumed MFU {mfu:.0%}"


def cmd_sweep(args) -> None:
    from research.config import validate
    from research.scaling.sweep import (
        load_sweep,
        manifest_lines,
        read_results,
        run_sweep,
        select,
    )

    root = _sweep_root(args)
    runs = select(load_sweep(args.experiment, args.overrides), args.only)
    for run in runs:  # every run's config, before the first one starts
        validate(run.config)
    if args.manifest:
        lines = list(manifest_lines(runs, args.experiment, root, args.overrides))
        Path(args.manifest).write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} commands to {args.manifest} (one per run; each appends its row)")
        return
    if args.dry_run:
        _print_plan(runs, root, args.mfu, {r["name"] for r in read_results(root)})
        return
    for row in run_sweep(runs, root, progress=not args.quiet):
        print(
            f"[sweep] {row['name']}: val loss {row['val_loss']:.4f}, "
            f"{row['flops']:.3g} FLOPs, {row['wall_seconds']:.0f} s -> {root / 'results.jsonl'}",
            flush=True,
        )
    print(f"sweep complete: {root / 'results.jsonl'}; ledger {root / 'ledger.json'}")


def _print_plan(runs, root: Path, mfu: float, done: set[str]) -> None:
    from research.config import EnergyConfig
    from research.scaling.forecast import device_estimate
    from research.scaling.sweep import plan

    rate, how = _throughput(root, mfu)
    rows = plan(runs, root, rate, done)
    print(
        f"{'run':<22} {'status':<6} {'shape':<10} {'params':>9} {'tokens':>10} {'FLOPs':>9} "
        f"{'est time':>9}"
    )
    for row in rows:
        print(
            f"{row['name']:<22} {row['status']:<6} {row['shape']:<10} "
            f"{row['non_embedding_params']:>9,} {row['tokens']:>10,} {row['flops']:>9.3g} "
            f"{row['est_seconds'] / 60:>7.1f} m"
        )
    todo = [r for r in rows if r["status"] == "todo"]
    seconds = sum(r["est_seconds"] for r in todo)
    estimate = device_estimate(seconds, runs[0].config.energy if runs else EnergyConfig())
    print(
        f"{len(rows)} runs ({len(todo)} to do): {sum(r['flops'] for r in rows):.3g} FLOPs; "
        f"left: ~{seconds / 60:.0f} min at {rate / 1e9:.1f} GFLOP/s ({how}), "
        f"{estimate['energy_kwh']:.3g} kWh, {estimate['co2_kg']:.3g} kg CO2eq, "
        f"${estimate['cost_usd']:.2f} ({estimate['hardware']}, {estimate['method']})"
    )


def results_rows(path: str, params: str = "active_params") -> list[dict]:
    """The rows of a sweep's results (a folder or the file); a bad line is named with the fix."""
    from research.config import ConfigError
    from research.scaling.sweep import RESULTS

    target = Path(path)
    if target.is_dir():
        target = target / RESULTS
    rows = []
    if target.is_file():
        for number, line in enumerate(target.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{target} line {number} is not JSON ({error.msg}); each line of "
                    f"{RESULTS} is one run's row: fix or delete that line"
                ) from None
            needed = ("name", "flops", "tokens", "val_loss", params)
            missing = [k for k in needed if k not in row] if isinstance(row, dict) else needed
            if missing:
                raise ConfigError(
                    f"{target} line {number} is not a sweep result (missing {missing}); give "
                    f"the {RESULTS} that `research sweep` writes"
                )
            if row.get("kind") != "stable":  # a WSD stable run's loss is at peak LR: no point
                rows.append(row)
    if not rows:
        raise ConfigError(
            f"no results in {path}: give a sweep folder or its {RESULTS} "
            "(run `research sweep EXPERIMENT` first)"
        )
    return rows


def _ci(entry: dict, fmt: str = ".3g") -> str:
    low, high = entry["ci"]
    ci = f" [{low:{fmt}}, {high:{fmt}}]" if low == low else ""  # nan: no bootstrap
    return f"{entry['value']:{fmt}}{ci}"


def print_fit_report(report: dict) -> None:
    names = {"approach1": "envelope", "approach2": "IsoFLOP parabolas", "approach3": "parametric"}
    print(
        f"{report['runs']} runs fitted (N = {report['params_column']}; "
        f"C = {report['kappa']:.2f} N D; 95% bootstrap CIs)"
    )
    for name, label in names.items():
        if name not in report:
            print(f"{name} ({label}): not fitted: {report['errors'][name]}")
            continue
        entry = report[name]
        params = ", ".join(f"{k} = {_ci(v)}" for k, v in entry["params"].items())
        print(f"{name} ({label}): {params}")
    print(f"at C = {report['budget']:.3g} FLOPs:")
    for name in names:
        if name in report:
            p = report[name]["prediction"]
            kind = "train loss, envelope" if name == "approach1" else "val loss"
            print(
                f"  {name}: N_opt = {_ci(p['n_opt'])}, D_opt = {_ci(p['d_opt'])}, "
                f"loss = {_ci(p['loss'], '.4f')} ({kind})"
            )
    for row in report["holdout"]:
        text = f"held-out {row['name']} (C = {row['flops']:.3g}): observed {row['observed']:.4f}"
        if "approach3_predicted" in row:
            text += (
                f"; approach 3 predicts {row['approach3_predicted']:.4f} "
                f"({row['approach3_error_pct']:+.2f}%)"
            )
        if "approach2_optimal_loss" in row:
            text += (
                f"; approach 2's compute-optimal loss {row['approach2_optimal_loss']:.4f} "
                f"({row['approach2_error_pct']:+.2f}%)"
            )
        print(text)


def _fit_rows(args) -> tuple[list[dict], Path]:
    """The rows to fit (a sweep's results, or --csv published points) and the output folder."""
    from research.config import ConfigError
    from research.scaling.points import read_points

    if bool(args.results) == bool(args.csv):
        raise ConfigError(
            "give either a sweep folder (or its results.jsonl) or --csv FILE, e.g. "
            "`research fit runs/isoflop_cpu` or `research fit --csv points.csv`"
        )
    if args.csv:
        rows = read_points(args.csv, args.params)
        out = Path("runs") / f"fit_{Path(args.csv).stem}"
    else:
        rows = results_rows(args.results, args.params)
        target = Path(args.results)
        out = (target if target.is_dir() else target.parent) / "fit"
    return rows, Path(args.out) if args.out else out


def cmd_fit(args) -> None:
    from research.config import ConfigError
    from research.scaling.fits import FitError, fit_all, load_runs
    from research.scaling.plots import save_all

    rows, out = _fit_rows(args)
    try:
        report = fit_all(rows, args.params, args.bootstrap, args.budget, args.seed)
    except FitError as error:
        raise ConfigError(str(error)) from None
    print_fit_report(report)
    out.mkdir(parents=True, exist_ok=True)
    fits = report.pop("fits")
    plain = {name: {k: v for k, v in fit.items() if k != "envelope"} for name, fit in fits.items()}
    (out / "fit.json").write_text(json.dumps({**report, "fits": plain}, indent=2))
    if not args.no_plots:
        runs = load_runs([r for r in rows if not r.get("holdout")], args.params)
        held = [r for r in rows if r.get("holdout")]
        for path in save_all(runs, fits, held, args.params, out, args.format):
            print(f"wrote {path}")
    print(f"wrote {out / 'fit.json'}")


def cmd_forecast(args) -> None:
    from research.config import ConfigError
    from research.scaling.forecast import PUBLISHED, Plan, forecast

    published = None
    if args.case:
        plan, published = PUBLISHED[args.case]
    else:
        if not (args.params and args.tokens and args.hardware):
            raise ConfigError(
                "forecast needs --params, --tokens and --hardware (or --case gpt3|bloom), e.g. "
                "research forecast --params 1.3e9 --tokens 26e9 --hardware H100 --devices 8"
            )
        plan = Plan(
            params=args.params,
            tokens=args.tokens,
            hardware=args.hardware,
            devices=args.devices,
            mfu=args.mfu,
            power_fraction=args.power_fraction,
            pue=args.pue,
            grid_kg_co2_per_kwh=args.grid,
            price_per_device_hour=args.price,
            flops=args.flops,
            device_hours=args.device_hours,
            peak_flops=args.peak_tflops * 1e12,
            tdp_w=args.tdp,
        )
    result = forecast(plan)
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    print(
        f"{result['params']:.3g} params x {result['tokens']:.3g} tokens = {result['flops']:.3g} "
        f"FLOPs on {result['devices']:,} x {result['hardware']} "
        f"(peak {result['peak_flops'] / 1e12:.0f} TFLOP/s, TDP {result['tdp_w']:.0f} W"
        f"{' (estimate)' if result['tdp_source'] == 'estimate' else ''}, MFU {mfu})"
    )
    print(
        f"time {result['days']:.1f} days, {result['device_hours']:,.0f} device-hours; energy "
        f"{result['energy_mwh']:,.1f} MWh (power {result['power_fraction']:.2f} x TDP, PUE "
        f"{result['pue']}); {result['co2_t']:,.1f} t CO2eq at {result['grid_kg_co2_per_kwh']} "
        f"kg/kWh; ${result['cost_usd']:,.0f} at ${result['price_per_device_hour']:.2f}/device-hour"
    )
    if published:
        print(
            "published: "
            + ", ".join(f"{k} {v:,}" for k, v in published.items())
            + f" -> energy {100 * (result['energy_mwh'] / published['energy_mwh'] - 1):+.1f}%"
        )
    if args.json:
        print(json.dumps(result, indent=2))


def add_scaling_commands(sub, add_experiment_args) -> None:
    p = sub.add_parser(
        "sweep",
        help="run an experiment file's sweep() (skips finished runs, resumes a cut one)",
        formatter_class=FMT,
        epilog="examples:\n  research sweep isoflop_shakespeare --dry-run\n"
        "  research sweep isoflop_cpu                   # -> runs/isoflop_cpu/results.jsonl\n"
        "  research sweep isoflop_gpu --manifest jobs.txt  # one command per run\n"
        "  research sweep wsd_cooldown_shakespeare      # WSD stable runs + cooldown branches\n"
        "  tensorboard --logdir runs/isoflop_cpu        # all runs side by side (HParams tab)",
    )
    add_experiment_args(p)
    p.add_argument("--root", help="sweep folder (default: runs/<experiment>)")
    p.add_argument("--dry-run", action="store_true", help="list runs, FLOPs, time, energy, cost")
    p.add_argument("--manifest", metavar="FILE", help="write one command per run instead")
    p.add_argument("--only", metavar="NAMES", help="comma-separated run names to run")
    p.add_argument(
        "--mfu", type=unit_fraction, default=0.3, help="assumed MFU for --dry-run before any run"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "fit",
        help="Chinchilla approaches 1-3 with bootstrap CIs, predictions and plots",
        formatter_class=FMT,
        epilog="examples:\n  research fit runs/isoflop_cpu\n"
        "  research fit runs/isoflop_cpu/results.jsonl --budget 1e15 --format svg\n"
        "  research fit --csv docs/scaling/chinchilla_points.csv   # published N, D, loss",
    )
    p.add_argument("results", nargs="?", help="a sweep folder or its results.jsonl")
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="published points instead: columns N, D (or C: D = C / 6N), loss (any case); "
        "approach 3 only",
    )
    p.add_argument(
        "--params",
        default="active_params",
        choices=["active_params", "params", "non_embedding_params"],
        help="which parameter count is N (default: active, = total for dense models)",
    )
    p.add_argument(
        "--budget", type=positive_float, help="FLOPs to predict at (default: 4x the largest run)"
    )
    p.add_argument(
        "--bootstrap", type=non_negative_int, default=200, help="bootstrap resamples (0: no CIs)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", help="folder for fit.json and plots (default: RESULTS/fit, runs/fit_<csv name>)"
    )
    p.add_argument("--format", default="png", choices=["png", "svg"])
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "forecast",
        help="time, energy, CO2 and cost of a planned training run",
        formatter_class=FMT,
        epilog="examples:\n  research forecast --params 7e9 --tokens 2e12 --hardware H100 "
        "--devices 1024 --mfu 0.4\n  research forecast --case gpt3      # published inputs\n"
        "  research forecast --case bloom",
    )
    p.add_argument("--case", choices=["gpt3", "bloom"], help="a published run's documented inputs")
    p.add_argument("--params", type=float, help="parameters N")
    p.add_argument("--tokens", type=float, help="training tokens D")
    p.add_argument(
        "--hardware",
        help="accelerator: H100, H200, A100, V100, L40S, L4, A10, TPU v3, TPU v4, TPU v5e, "
        "TPU v5p, TPU v6e",
    )
    p.add_argument("--devices", type=positive_int, default=1)
    p.add_argument("--mfu", type=unit_fraction, default=0.4, help="model FLOPs utilisation")
    p.add_argument("--power-fraction", type=float, default=1.0, help="mean draw / TDP")
    p.add_argument("--pue", type=float, default=1.1)
    p.add_argument("--grid", type=float, default=0.4, help="kg CO2eq per kWh")
    p.add_argument("--price", type=float, default=0.0, help="USD per device-hour (0: table)")
    p.add_argument("--flops", type=float, default=0.0, help="training FLOPs (0: 6ND)")
    p.add_argument("--device-hours", type=float, default=0.0, help="known device-hours")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak per device (0: table)")
    p.add_argument("--tdp", type=float, default=0.0, help="board power W (0: table)")
    p.add_argument("--json", action="store_true", help="also print every figure as JSON")
    p.set_defaults(func=cmd_forecast)
