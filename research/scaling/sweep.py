"""Sweeps: named run configs from an experiment file's ``sweep()``, run one after another.

An experiment file's ``sweep()`` yields ``SweepRun``s (or ``(name, ExperimentConfig)`` pairs).
``isoflop_grid`` builds the usual one: for each compute budget C, models of several sizes N
(shapes from ``shapes.shape_for_params``), each trained for D = C / (FLOPs per token) tokens.

``run_sweep`` trains them in order under one root (``ROOT/<run name>/``), skips runs already in
``ROOT/results.jsonl``, resumes an interrupted one from its checkpoints, appends one row per
finished run, writes TensorBoard hparams so ``tensorboard --logdir ROOT`` compares them, and
sums the runs' ledgers into ``ROOT/ledger.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from research.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    find_experiment,
    load_module,
)
from research.models.accounting import ModelSize, count_params
from research.scaling.shapes import shape_for_params
from research.storage import (
    StorageError,
    append_text,
    check_writable,
    is_remote,
    local_folder,
    run_path,
    write_text_atomic,
)

RESULTS = "results.jsonl"


@dataclass
class SweepRun:
    name: str
    config: ExperimentConfig
    budget: float | None = None  # the IsoFLOP budget (FLOPs) this run belongs to, if any
    holdout: bool = False  # trained and recorded, but left out of fits: a prediction test
    tags: dict = field(default_factory=dict)  # extra columns for the results table
    # WSD cooldown sweeps (scaling/wsd.py): "stable" trains at a constant LR to its last branch
    # point; a "branch" starts from stable run ``stable`` at ``branch_step`` and decays the LR.
    kind: str = "run"
    stable: str | None = None
    branch_step: int = 0
    branch_steps: tuple[int, ...] = ()


def _short(x: float) -> str:
    """1.2e12 -> '1.2e12', 56000 -> '56k': compact, filesystem-safe labels for run names."""
    if x >= 1e6 and x < 1e9:
        return f"{x / 1e6:.3g}M"
    if x >= 1e3 and x < 1e6:
        return f"{x / 1e3:.3g}k"
    return f"{x:.2g}".replace("e+", "e")


def _vocab_size(cfg: ExperimentConfig) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from research.run.builder import prepared_data  # the tokenizer decides (once per process)

    return prepared_data(cfg).vocab_size


def tokens_per_step(cfg: ExperimentConfig) -> int:
    return cfg.train.batch_size * cfg.model.seq_len


def isoflop_run(
    base: ExperimentConfig,
    budget: float,
    target_params: float,
    aspect_ratio: float = 32.0,
    head_dim: int = 16,
    flops: str = "exact",
    min_steps: int = 100,
    name: str | None = None,
    holdout: bool = False,
) -> SweepRun:
    """One run of ~target_params non-embedding parameters trained on ``budget`` FLOPs.

    ``flops="exact"`` spends the budget with the exact per-token count (attention included,
    accounting.count_params); ``flops="6N"`` uses Chinchilla's C = 6 N D with N the total
    parameters. Steps are rounded to whole batches, so a run's real FLOPs differ from the
    budget by less than half a step (its row records the real figure)."""
    if budget <= 0:
        raise ConfigError(f"IsoFLOP budget must be positive, got {budget}")
    if flops not in ("exact", "6N"):
        raise ConfigError(f"flops='{flops}': use 'exact' (attention included) or '6N'")
    cfg = ExperimentConfig.from_dict(base.to_dict())
    cfg.model, size = shape_for_params(
        target_params, cfg.model, aspect_ratio, head_dim, _vocab_size(cfg)
    )
    per_token = size.flops_per_token if flops == "exact" else 6.0 * size.total_params
    steps = round(budget / per_token / tokens_per_step(cfg))
    if steps < min_steps:
        raise ConfigError(
            f"budget {budget:.3g} FLOPs gives a {size.non_embedding_params:,}-parameter model only "
            f"{steps} steps of {tokens_per_step(cfg)} tokens (fewer than {min_steps}): raise the "
            "budget, shrink the batch or drop this size"
        )
    cfg.train.steps = steps
    # Schedules scale with the run: warmup 5% (at most 200 steps); checkpoints and evals 4 per run.
    cfg.optim.warmup_steps = min(200, max(1, steps // 20))
    cfg.train.checkpoint_every = max(1, steps // 4)
    if not cfg.train.eval_every:  # val curves, not one point at the end
        cfg.train.eval_every = max(1, steps // 4)
    label = name or f"C{_short(budget)}-N{_short(size.non_embedding_params)}"
    cfg.name = f"{base.name}-{label}"
    return SweepRun(label, cfg, budget=budget, holdout=holdout)


def isoflop_grid(
    base: ExperimentConfig,
    budgets: Iterable[float],
    sizes: Iterable[float] | None = None,
    n_sizes: int = 5,
    spread: float = 4.0,
    tokens_per_param: float = 20.0,
    **kwargs,
) -> list[SweepRun]:
    """For each budget, models of several sizes: explicit ``sizes`` (non-embedding params), or
    ``n_sizes`` log-spaced over [N0 / spread, N0 x spread] around Chinchilla's rule of thumb
    N0 = sqrt(C / (6 x tokens_per_param)). Sizes that round to the same shape are kept once."""
    runs: list[SweepRun] = []
    for budget in budgets:
        if sizes is None:
            centre = math.sqrt(budget / (6 * tokens_per_param))
            targets = [
                centre * spread ** (2 * i / (n_sizes - 1) - 1) if n_sizes > 1 else centre
                for i in range(n_sizes)
            ]
        else:
            targets = list(sizes)
        seen = set()
        for target in targets:
            run = isoflop_run(base, budget, target, **kwargs)
            if run.name not in seen:
                seen.add(run.name)
                runs.append(run)
    return runs


def isoflop_with_holdout(
    base: ExperimentConfig,
    budgets: Iterable[float],
    tokens_per_param: float = 20.0,
    holdout_multiple: float = 4.0,
    **kwargs,
) -> list[SweepRun]:
    """An IsoFLOP grid plus one held-out run at ``holdout_multiple`` x the largest budget, sized
    by the same rule of thumb as the grid's centre (chosen before any fit, so the fit's
    prediction of its loss is a fair test)."""
    budgets = list(budgets)
    shape = {k: v for k, v in kwargs.items() if k in ("aspect_ratio", "head_dim", "flops")}
    runs = isoflop_grid(base, budgets, tokens_per_param=tokens_per_param, **kwargs)
    budget = holdout_multiple * max(budgets)
    size = math.sqrt(budget / (6 * tokens_per_param))
    runs.append(isoflop_run(base, budget, size, holdout=True, **shape))
    return runs


def load_sweep(experiment: str, overrides: list[str] | None = None) -> list[SweepRun]:
    """The runs of an experiment file's ``sweep()``, with --set overrides applied to each."""
    path = find_experiment(experiment)
    module = load_module(path)
    if not hasattr(module, "sweep"):
        raise ConfigError(
            f"{path} defines no sweep() function; a sweep file yields SweepRun(name, config) or "
            "(name, config) pairs, e.g. from research.scaling.sweep.isoflop_grid"
        )
    runs: list[SweepRun] = []
    for item in module.sweep():
        run = item if isinstance(item, SweepRun) else SweepRun(*item)
        if not isinstance(run.config, ExperimentConfig):
            raise ConfigError(f"{path}: sweep run '{run.name}' has no ExperimentConfig")
        run.config = apply_overrides(run.config, overrides or [])
        runs.append(run)
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: sweep() yields duplicate run names {duplicates}")
    return runs


def config_hash(cfg: ExperimentConfig) -> str:
    """Identity of a run's config, ignoring where it is written and how it is displayed."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k != "run_dir"}
    data["log"] = {}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def read_results(root: Path | str) -> list[dict]:
    path = run_path(root) / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _size(run: SweepRun) -> ModelSize:
    from research.run.builder import resolve_config

    return count_params(resolve_config(run.config)[0].model)


def planned_flops(run: SweepRun) -> tuple[ModelSize, int, float]:
    size = _size(run)
    tokens = run.config.train.steps * tokens_per_step(run.config)
    return size, tokens, tokens * size.flops_per_token


def plan(runs: list[SweepRun], root: Path, flops_per_second: float, done: set[str]) -> list[dict]:
    """One row per run: shape, tokens, FLOPs, estimated hours and whether it is already done."""
    rows = []
    for run in runs:
        size, tokens, flops = planned_flops(run)
        if run.kind == "branch":  # its first branch_step steps are its stable run's
            flops *= 1 - run.branch_step / run.config.train.steps
        rows.append(
            {
                "name": run.name,
                "status": "done" if run.name in done else "todo",
                "budget": run.budget,
                "holdout": run.holdout,
                "shape": f"L{run.config.model.n_layers} d{run.config.model.d_model}",
                "params": size.total_params,
                "non_embedding_params": size.non_embedding_params,
                "tokens": tokens,
                "flops": flops,
                "est_seconds": flops / flops_per_second,
            }
        )
    return rows


def manifest_lines(runs: list[SweepRun], experiment: str, root: Path, overrides: list[str]):
    """One shell command per run, for a cluster scheduler (each appends its own result row)."""
    path = find_experiment(experiment).resolve()
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    folder = root if is_remote(root) else Path(root).resolve()
    head = f"research sweep {shlex.quote(str(path))} --root {shlex.quote(str(folder))}"
    for run in runs:
        yield f"{head} --only {shlex.quote(run.name)}" + (f" {sets}" if sets else "")


def _write_hparams(run: SweepRun, row: dict, logdir: Path) -> None:
    """TensorBoard's HParams dashboard: this run's knobs and final metrics, in its own logdir."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import summary_v2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    hparams = {
        "budget": float(row["budget"] or 0.0),
        "non_embedding_params": float(row["non_embedding_params"]),
        "tokens": float(row["tokens"]),
        "n_layers": run.config.model.n_layers,
        "d_model": run.config.model.d_model,
        "lr": run.config.optim.lr,
        "holdout": run.holdout,
    }
    with local_folder(run_path(logdir)) as folder:  # a gs:// logdir gets the file whole
        writer = EventFileWriter(folder)
        now = time.time()
        writer.add_event(
            event_pb2.Event(wall_time=now, step=0, summary=summary_v2.hparams_pb(hparams, run.name))
        )
        for key in ("val_loss", "train_loss", "flops", "energy_kwh"):
            if row.get(key) is not None:
                value = summary_pb2.Summary.Value(
                    tag=f"hparams/{key}", simple_value=float(row[key])
                )
                event = event_pb2.Event(
                    wall_time=now,
                    step=run.config.train.steps,
                    summary=summary_pb2.Summary(value=[value]),
                )
                writer.add_event(event)
        writer.close()


def _result_row(run: SweepRun, result, ledger: dict, seconds: float) -> dict:
    from research.scaling.wsd import row_fields

    size = _size(run)
    return {
        "name": run.name,
        "budget": run.budget,
        "holdout": run.holdout,
        "config_hash": config_hash(run.config),
        "n_layers": run.config.model.n_layers,
        "d_model": run.config.model.d_model,
        "params": size.total_params,
        "non_embedding_params": size.non_embedding_params,
        "active_params": size.active_params,
        "flops_per_token": size.flops_per_token,
        # The model's tokens and FLOPs; the ledger's only count calls that reached their end.
        "tokens": result.step * tokens_per_step(run.config),
        "flops": result.step * tokens_per_step(run.config) * size.flops_per_token,
        "steps": result.step,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_bpb": result.val_bpb,
        "wall_seconds": ledger["wall_seconds"],
        "tokens_per_second": ledger["tokens"] / max(ledger["wall_seconds"], 1e-9),
        "this_call_seconds": seconds,
        "device_kind": ledger.get("device_kind"),
        "device_hours": ledger.get("device_hours"),
        "energy_method": ledger.get("energy_method"),
        "energy_kwh": ledger.get("energy_kwh"),
        "co2_kg": ledger.get("co2_kg"),
        "cost_usd": ledger.get("cost_usd"),
        "run_dir": str(result.run_dir),
        **row_fields(run, tokens_per_step(run.config) * size.flops_per_token, result.step),
        **run.tags,
        "config": run.config.to_dict(),
    }


def write_sweep_ledger(root: Path) -> dict:
    from research.train.ledger import sum_ledgers

    ledgers = []
    for row in read_results(root):
        path = run_path(row["run_dir"]) / "ledger.json"
        if path.exists():
            ledgers.append(json.loads(path.read_text()))
    total = sum_ledgers(ledgers)
    write_text_atomic(run_path(root) / "ledger.json", json.dumps(total, indent=2))
    return total


def run_sweep(runs: list[SweepRun], root: Path, progress: bool = True) -> Iterator[dict]:
    """Train each run not yet in ROOT/results.jsonl; yields each new result row."""
    import jax

    from research.run import train
    from research.scaling import wsd
    from research.train.metrics import events_dir

    root = run_path(root)  # a local folder or a gs:// URL
    if is_remote(root) and any(run.kind in ("stable", "branch") for run in runs):
        raise StorageError(
            f"{root}: WSD sweeps (stable runs and their branches) copy checkpoint folders, "
            "which is only built for a local --root; use a local --root for this sweep"
        )
    check_writable(root)
    root.mkdir(parents=True, exist_ok=True)
    finished = {row["name"]: row for row in read_results(root)}
    for run in wsd.check_branches(runs, root):  # stable runs before their branches
        if run.name in finished:
            if finished[run.name]["config_hash"] != config_hash(run.config):
                raise ConfigError(
                    f"{root}/{RESULTS} has a finished run '{run.name}' with a different config; "
                    "the sweep file changed. Use a new --root, or remove that row and its folder."
                )
            continue
        cfg = apply_overrides(run.config, [f"train.run_dir={root / run.name}"])
        cfg.log.progress = progress
        start = time.perf_counter()
        if run.kind == "stable":  # in segments, keeping its checkpoint at each branch point
            result = wsd.train_stable(run, cfg, root, train)
        else:
            if run.kind == "branch":
                wsd.seed_branch(run, cfg, root)
            result = train(cfg, resume=True)  # an interrupted run resumes from its checkpoints
        ledger = json.loads((result.run_dir / "ledger.json").read_text())
        row = _result_row(run, result, ledger, time.perf_counter() - start)
        _write_hparams(run, row, events_dir(result.run_dir))
        # One short append per run: safe for parallel jobs on a local disk (not on gs://).
        append_text(root / RESULTS, json.dumps(row) + "\n")
        write_sweep_ledger(root)
        jax.clear_caches()  # compiled programs of earlier shapes are not needed again
        yield row


def select(runs: list[SweepRun], only: str | None) -> list[SweepRun]:
    """The runs named in a comma-separated --only list (all when None); unknown names fail."""
    if not only:
        return runs
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    by_name = {r.name: r for r in runs}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ConfigError(
            f"--only names unknown runs {missing}; this sweep has: {', '.join(by_name)}"
        )
    return [by_name[n] for n in wanted]
