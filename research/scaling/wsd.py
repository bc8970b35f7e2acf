"""Warmup-stable-decay cooldown sweeps (Hägele et al. 2024): the loss at several token budgets
from one long run per model size instead of one run per budget.

Per model size, one *stable* run trains at a constant LR after warmup up to the last branch
point. A token budget D_i (T_i steps) gets a *branch*: it restores the stable run's state at
step b_i = T_i - decay_steps(T_i) (params, optimizer state, step, RNG key and the loader's
position: the whole orbax checkpoint) and decays the LR linearly to T_i. Its LR at every step is
then that of a separate ``optim.schedule=wsd`` run of T_i steps, and with the same data order
and seed it computes the same steps: a branch *is* that run, for (1 - f) of its compute shared.

The stable run is trained in segments, one per branch point; after each, its checkpoint at that
step is copied to ``<stable run>/branch_points/<step>`` (the run's own checkpoints are pruned to
the last K). A branch starts by copying its branch point into its own ``checkpoints/`` and then
trains as any run: a killed branch resumes from its newest checkpoint, a killed stable run from
its own, and branch points already copied are not retrained.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from research.config import ConfigError, ExperimentConfig, apply_overrides, flatten
from research.scaling.shapes import shape_for_params
from research.scaling.sweep import SweepRun, _short, _vocab_size, tokens_per_step
from research.train.optimizer import wsd_decay_steps

BRANCH_POINTS = "branch_points"
# What a branch may change against its stable run; anything else would not continue that run.
_BRANCH_MAY_CHANGE = {
    "name",
    "optim.schedule",
    "optim.decay_fraction",
    "train.steps",
    "train.run_dir",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_tokens",
}


def branch_step(total_steps: int, cooldown_fraction: float) -> int:
    """The step a cooldown to ``total_steps`` starts from: where a WSD run's decay begins."""
    return total_steps - wsd_decay_steps(total_steps, cooldown_fraction)


def wsd_branches(
    base: ExperimentConfig,
    sizes: Iterable[float],
    token_budgets: Iterable[float],
    cooldown_fraction: float = 0.2,
    aspect_ratio: float = 32.0,
    head_dim: int = 16,
) -> list[SweepRun]:
    """For each target size (non-embedding params, shaped as in ``isoflop_grid``): one stable run
    and one cooldown branch per token budget, stable run first. ``base.optim`` gives the LR,
    warmup and floor; budgets must increase and give distinct step counts."""
    budgets = [float(d) for d in token_budgets]
    if not budgets or any(b <= 0 for b in budgets):
        raise ConfigError(f"token budgets must be positive numbers of tokens, got {budgets}")
    if any(later <= earlier for earlier, later in zip(budgets, budgets[1:], strict=False)):
        raise ConfigError(
            f"token budgets {budgets} must increase strictly: list each budget once, smallest "
            "first (each one's branch starts later in the same stable run)"
        )
    if not 0.0 < cooldown_fraction < 1.0:
        raise ConfigError(
            f"cooldown_fraction={cooldown_fraction} must be in (0, 1): the share of each budget "
            "spent decaying the LR (Hägele et al. use 0.1-0.2)"
        )
    runs: list[SweepRun] = []
    for target in sizes:
        cfg = ExperimentConfig.from_dict(base.to_dict())
        cfg.model, size = shape_for_params(
            target, cfg.model, aspect_ratio, head_dim, _vocab_size(cfg)
        )
        per_step = tokens_per_step(cfg)
        totals = [round(d / per_step) for d in budgets]
        if len(set(totals)) < len(totals) or min(totals) < 2:
            raise ConfigError(
                f"token budgets {budgets} round to steps {totals} of {per_step} tokens: each "
                "budget needs its own step count of at least 2; spread the budgets further"
            )
        points = [branch_step(t, cooldown_fraction) for t in totals]
        if cfg.optim.warmup_steps >= points[0]:
            raise ConfigError(
                f"optim.warmup_steps={cfg.optim.warmup_steps} reaches the first branch point "
                f"(step {points[0]} of {totals[0]}): a cooldown would start during warmup. "
                "Lower the warmup or raise the smallest token budget"
            )
        label = f"N{_short(size.non_embedding_params)}"
        stable = ExperimentConfig.from_dict(cfg.to_dict())
        stable.optim.schedule = "constant"
        stable.train.steps = points[-1]
        stable.name = f"{base.name}-{label}-stable"
        runs.append(SweepRun(f"{label}-stable", stable, kind="stable", branch_steps=tuple(points)))
        for budget, total, point in zip(budgets, totals, points, strict=True):
            branch = ExperimentConfig.from_dict(cfg.to_dict())
            branch.optim.schedule = "wsd"
            branch.optim.decay_fraction = cooldown_fraction
            branch.train.steps = total
            name = f"{label}-D{_short(budget)}"
            branch.name = f"{base.name}-{name}"
            runs.append(
                SweepRun(name, branch, kind="branch", stable=f"{label}-stable", branch_step=point)
            )
    return runs


def separate_runs(runs: list[SweepRun], prefix: str = "sep-") -> list[SweepRun]:
    """Each branch as an ordinary run from step 0 (same config: same schedule, data, seed): the
    expensive way the branches replace, for comparing the two."""
    separate = []
    for run in runs:
        if run.kind == "branch":
            cfg = ExperimentConfig.from_dict(run.config.to_dict())
            cfg.name = f"{cfg.name}-separate"
            separate.append(SweepRun(prefix + run.name, cfg, tags={"method": "separate"}))
    return separate


def check_branches(runs: list[SweepRun], root: Path) -> list[SweepRun]:
    """The runs with each stable run moved before its first branch; a branch whose stable run
    is missing (and has not left its branch point in ``root``), starts beyond it, or changes
    more than the schedule and length is a ConfigError."""
    by_name = {r.name: r for r in runs}
    ordered: list[SweepRun] = []
    placed: set[str] = set()
    for run in runs:
        if run.kind not in ("run", "stable", "branch"):
            raise ConfigError(f"sweep run '{run.name}': kind='{run.kind}'; use run, stable, branch")
        if run.kind == "branch":
            stable = by_name.get(run.stable or "")
            if stable is None:
                if not (snapshot_dir(root, run.stable or "") / str(run.branch_step)).is_dir():
                    raise ConfigError(
                        f"branch '{run.name}' starts from stable run '{run.stable}', which is "
                        f"not in this sweep and has no branch point {run.branch_step} in "
                        f"{root}: include the stable run (e.g. in --only) so it trains first"
                    )
            else:
                _check_branch(run, stable)
                if stable.name not in placed:
                    ordered.append(stable)
                    placed.add(stable.name)
        if run.name not in placed:
            ordered.append(run)
            placed.add(run.name)
    return ordered


def _check_branch(run: SweepRun, stable: SweepRun) -> None:
    if stable.kind != "stable":
        raise ConfigError(f"branch '{run.name}' names '{stable.name}', which is not a stable run")
    if run.branch_step not in stable.branch_steps or run.branch_step > stable.config.train.steps:
        raise ConfigError(
            f"branch '{run.name}' starts at step {run.branch_step}, which is not a branch point "
            f"of stable run '{stable.name}' (steps {list(stable.branch_steps)}, trained to "
            f"{stable.config.train.steps}); add it to the stable run's branch_steps"
        )
    if run.branch_step >= run.config.train.steps:
        raise ConfigError(
            f"branch '{run.name}' starts at step {run.branch_step} but has only "
            f"{run.config.train.steps} steps: a branch needs steps after its branch point"
        )
    expected = branch_step(run.config.train.steps, run.config.optim.decay_fraction)
    if run.config.optim.schedule != "wsd" or run.branch_step != expected:
        raise ConfigError(
            f"branch '{run.name}' must decay like a WSD run of its length: optim.schedule=wsd "
            f"(it is {run.config.optim.schedule}) starting at step {expected} (its branch "
            f"point is {run.branch_step}); build branches with wsd_branches"
        )
    mine, theirs = flatten(run.config.to_dict()), flatten(stable.config.to_dict())
    keys = (set(mine) | set(theirs)) - _BRANCH_MAY_CHANGE
    changed = sorted(k for k in keys if mine.get(k) != theirs.get(k))
    if changed:
        raise ConfigError(
            f"branch '{run.name}' differs from its stable run '{stable.name}' in {changed[:6]}: "
            "a branch continues that run, so only the schedule and length may change"
        )


def snapshot_dir(root: Path, stable_name: str) -> Path:
    return Path(root) / stable_name / BRANCH_POINTS


def train_stable(run: SweepRun, cfg: ExperimentConfig, root: Path, train):
    """Train the stable run segment by segment, copying its checkpoint at each branch point
    (points already copied are not retrained); returns the last ``train`` result."""
    result = None
    snapshots = snapshot_dir(root, run.name)
    for step in sorted(run.branch_steps):
        if (snapshots / str(step)).is_dir():
            continue
        segment = apply_overrides(cfg, [f"train.steps={step}"])
        result = train(segment, resume=True)
        if result.step != step:  # it was trained past this point before the point was added
            raise ConfigError(
                f"stable run '{run.name}' is already at step {result.step}, past branch point "
                f"{step}, and kept no checkpoint there (were budgets added to the sweep?); "
                "retrain it under a new --root"
            )
        _copy_dir(result.run_dir / "checkpoints" / str(step), snapshots / str(step))
    if result is None:  # every point was copied before a kill: the run is complete
        result = train(cfg, resume=True)
    return result


def seed_branch(run: SweepRun, cfg: ExperimentConfig, root: Path) -> None:
    """Give a branch its start: the stable run's checkpoint at the branch point, unless the branch
    already has checkpoints of its own (a resumed branch continues from its newest)."""
    checkpoints = Path(cfg.train.run_dir) / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return
    source = snapshot_dir(root, run.stable or "") / str(run.branch_step)
    if not source.is_dir():
        raise ConfigError(
            f"branch '{run.name}' needs {source} (stable run '{run.stable}' at step "
            f"{run.branch_step}); train the stable run first, or, if it is finished without "
            "this point (budgets added since), retrain the sweep under a new --root"
        )
    _copy_dir(source, checkpoints / str(run.branch_step))


def _copy_dir(source: Path, target: Path) -> None:
    """Copy a checkpoint folder so that ``target`` appears complete or not at all."""
    if not source.is_dir():
        raise ConfigError(f"expected checkpoint {source} is missing; re-run to retrain it")
    # Beside the folder, not in it: orbax lists every entry of a checkpoints folder.
    partial = target.parent.parent / f".{target.parent.name}-{target.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, partial)
    partial.rename(target)


def row_fields(run: SweepRun, step_flops: float, steps: int) -> dict:
    """Columns of a results row: which runs are branches of which stable run, and the compute
    this run added (a branch's first ``branch_step`` steps are its stable run's, counted there)."""
    own = steps - run.branch_step if run.kind == "branch" else steps
    return {
        "kind": run.kind,
        "stable_run": run.stable,
        "branch_step": run.branch_step if run.kind == "branch" else None,
        "own_flops": own * step_flops,
    }
