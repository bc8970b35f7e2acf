"""WSD cooldown sweeps: a branch's LR and final weights equal a separate WSD run's, a killed
branch resumes from its own checkpoint, a finished stable run is not retrained, rows and the
ledger count the stable run once, and bad grids are clear errors."""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from research.config import ConfigError, load_experiment
from research.scaling import sweep as sweep_mod
from research.scaling import wsd
from research.train import checkpoint
from research.train.optimizer import learning_rate_schedule

TOKENS_PER_STEP = 4 * 16  # batch 4 x seq 16


def base(*extra: str):
    return load_experiment(
        "tiny",
        [
            "model.seq_len=16",
            "train.batch_size=4",
            "optim.warmup_steps=2",
            "optim.min_lr_ratio=0.1",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.checkpoint_every=18",  # saves: end of each run, and step 18
            "train.log_every=1",
            "train.sample_tokens=0",
            "mesh.data=1",
            "log.progress=false",
            *extra,
        ],
    )


def grid(steps=(10, 20), fraction=0.2):
    budgets = [s * TOKENS_PER_STEP for s in steps]
    return wsd.wsd_branches(base(), [8e3], budgets, fraction, aspect_ratio=16, head_dim=8)


def reference_lr(step: int, total: int, peak: float, warmup: int, floor: float, f: float):
    """WSD written out by hand: linear warmup, flat, linear decay over the last int(f T) steps."""
    decay = max(1, int(total * f))
    if step < warmup:
        return peak * step / warmup
    if step < total - decay:
        return peak
    return peak + (floor - peak) * (step - (total - decay)) / decay


def test_branch_lr_equals_a_separate_wsd_run_at_every_step():
    runs = wsd.wsd_branches(
        base("optim.warmup_steps=7"), [8e3], [50 * 64, 130 * 64, 333 * 64], 0.2, 16, 8
    )
    stable, branches = runs[0], runs[1:]
    assert stable.kind == "stable" and stable.config.optim.schedule == "constant"
    assert stable.branch_steps == (40, 104, 267) and stable.config.train.steps == 267
    stable_lr = learning_rate_schedule(stable.config.optim, stable.config.train.steps)
    for branch in branches:
        total, opt = branch.config.train.steps, branch.config.optim
        own_lr = learning_rate_schedule(opt, total)
        floor = opt.lr * opt.min_lr_ratio
        for step in range(total):  # the LR the optimizer applies at the update from `step`
            lr = stable_lr(step) if step < branch.branch_step else own_lr(step)
            want = reference_lr(step, total, opt.lr, 7, floor, 0.2)
            assert float(lr) == pytest.approx(want, rel=1e-6, abs=1e-12), (branch.name, step)


def final_params(run_dir: Path) -> dict:
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as reader:
        state = reader.restore(run_dir / "checkpoints" / str(steps[-1]) / "state")
    return {"step": steps[-1], "params": state["params"]}


class Killed(Exception):
    pass


def test_branches_equal_separate_runs_and_resume_after_a_kill(tmp_path, monkeypatch):
    runs = grid()
    runs = runs + wsd.separate_runs(runs[2:])  # the long branch's twin (the short one's: slow)
    names = [r.name for r in runs]
    stable, short, long = names[:3]
    root = tmp_path / "sweep"
    original_save = checkpoint.Checkpointer.save

    def kill_long_branch(self, step, *args, **kwargs):
        original_save(self, step, *args, **kwargs)
        if self.directory.parent.name == long and step == 18:
            self.close()
            raise Killed("simulated kill of the long branch after its step-18 checkpoint")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", kill_long_branch)
    with pytest.raises(Killed):
        list(sweep_mod.run_sweep(runs, root, progress=False))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
    assert [r["name"] for r in sweep_mod.read_results(root)] == [stable, short]
    assert sorted(p.name for p in (root / stable / wsd.BRANCH_POINTS).iterdir()) == ["16", "8"]

    rows = list(sweep_mod.run_sweep(runs, root, progress=False))
    assert [r["name"] for r in rows] == [long, "sep-" + long]  # the stable run is not redone
    rows = {r["name"]: r for r in sweep_mod.read_results(root)}
    assert rows[stable]["kind"] == "stable" and rows[stable]["steps"] == 16
    for name, total, point in ((short, 10, 8), (long, 20, 16)):
        branch = rows[name]
        assert (branch["kind"], branch["stable_run"], branch["branch_step"]) == (
            "branch",
            stable,
            point,
        )
        assert branch["steps"] == total
        assert branch["own_flops"] == pytest.approx(branch["flops"] * (total - point) / total)
    for name, total, point in ((long, 20, 16),):
        branch, separate = rows[name], rows["sep-" + name]
        # The exactness test: same data order, same seed, same LR at every step -> same weights.
        mine, theirs = final_params(root / name), final_params(root / ("sep-" + name))
        assert mine["step"] == theirs["step"] == total
        for a, b in zip(jax_leaves(mine["params"]), jax_leaves(theirs["params"]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert branch["val_loss"] == separate["val_loss"]
        assert logged_lr(root / name, point) == logged_lr(root / ("sep-" + name), point)

    # The ledger counts the stable run once and each branch only from its branch point.
    ledger = json.loads((root / "ledger.json").read_text())
    assert ledger["flops"] == pytest.approx(sum(r["own_flops"] for r in rows.values()))
    branch_way = sum(r["own_flops"] for r in rows.values() if r["kind"] != "run")
    separate_way = sum(r["flops"] for r in rows.values() if r["kind"] == "run")
    assert branch_way / separate_way == pytest.approx((16 + 2 + 4) / 20)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def logged_lr(run_dir: Path, after: int) -> list[float]:
    """The LR a run logged at each step after ``after`` (the steps a branch trained itself)."""
    lrs = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/lr" in record and record["step"] > after:
            lrs[record["step"]] = record["train/lr"]
    assert lrs, f"no train/lr in {run_dir}/metrics.jsonl"
    return [lrs[s] for s in sorted(lrs)]


def test_bad_grids_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="increase strictly"):
        wsd.wsd_branches(base(), [8e3], [20 * 64, 10 * 64], aspect_ratio=16, head_dim=8)
    with pytest.raises(ConfigError, match="warmup"):
        wsd.wsd_branches(base("optim.warmup_steps=9"), [8e3], [10 * 64, 20 * 64], 0.2, 16, 8)
    runs = grid()
    stable, short, long = runs
    stable.branch_steps, stable.config.train.steps = (8,), 8  # the long branch is beyond it
    with pytest.raises(ConfigError, match="not a branch point"):
        wsd.check_branches(runs, tmp_path)
    with pytest.raises(ConfigError, match="not in this sweep"):
        wsd.check_branches([short], tmp_path)
    changed = grid()
    changed[2].config.optim.lr = 1e-2
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        wsd.check_branches(changed, tmp_path)
    assert [r.name for r in wsd.check_branches(changed[1:2] + changed[:1], tmp_path)] == [
        changed[0].name,
        changed[1].name,
    ]


def test_fits_leave_stable_runs_out(tmp_path):
    from research.scaling.commands import results_rows

    row = {"name": "a", "flops": 1.0, "tokens": 1.0, "val_loss": 2.0, "active_params": 1.0}
    rows = [{**row, "name": "s", "kind": "stable"}, {**row, "name": "b", "kind": "branch"}, row]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["name"] for r in results_rows(str(tmp_path))] == ["b", "a"]
