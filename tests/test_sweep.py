"""Sweeps end to end: IsoFLOP grids, an interrupted sweep resumed exactly, finished runs skipped,
a changed sweep refused, the dry-run/manifest commands, TensorBoard hparams, the notebook."""

import json
import os
from pathlib import Path

import pytest

from research.cli import main as cli_main
from research.config import ConfigError, load_experiment
from research.models.accounting import count_params
from research.scaling import sweep as sweep_mod
from research.train import checkpoint

REPO = Path(__file__).resolve().parents[1]

SWEEP_FILE = """
from research.config import load_experiment
from research.scaling.sweep import SweepRun

def sweep():
    for name, width in (("narrow", 16), ("wide", WIDE)):
        cfg = load_experiment("tiny", [
            f"model.d_model={width}", "train.steps=40", "train.checkpoint_every=20",
            "train.sample_tokens=0", "train.eval_batches=2", "mesh.data=1",
        ])
        yield SweepRun(name, cfg, budget=1e9)
"""


def write_sweep(folder: Path, wide: int = 32) -> Path:
    path = folder / "two_runs.py"
    path.write_text(SWEEP_FILE.replace("WIDE", str(wide)))
    return path


def test_isoflop_grid_spends_each_budget_on_every_size():
    base = load_experiment("isoflop_shakespeare")
    runs = sweep_mod.isoflop_grid(
        base, [1e11, 4e11], sizes=[6e3, 25e3], aspect_ratio=16, head_dim=8
    )
    assert [r.budget for r in runs] == [1e11, 1e11, 4e11, 4e11]
    for run in runs:
        size = count_params(run.config.model.resolved(vocab_size=65))
        step_flops = size.flops_per_token * sweep_mod.tokens_per_step(run.config)
        assert abs(run.config.train.steps * step_flops - run.budget) <= step_flops / 2
        assert run.name.startswith("C1e11-N" if run.budget == 1e11 else "C4e11-N")
    small, large = runs[0].config.model, runs[1].config.model
    assert small.d_model < large.d_model and runs[0].config.train.steps > runs[1].config.train.steps
    with pytest.raises(ConfigError, match="steps"):
        sweep_mod.isoflop_run(base, 1e8, 5e4)


class Killed(Exception):
    pass


def test_interrupted_sweep_resumes_exactly_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    experiment = str(write_sweep(tmp_path))
    runs = sweep_mod.load_sweep(experiment, ["log.progress=false"])
    original_save = checkpoint.Checkpointer.save

    def crash_after_first_save(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        self.close()
        raise Killed("simulated kill after the step-20 checkpoint")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", crash_after_first_save)
    root = tmp_path / "sweep"
    with pytest.raises(Killed):
        list(sweep_mod.run_sweep(runs, root, progress=False))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
    assert sweep_mod.read_results(root) == []

    rows = list(sweep_mod.run_sweep(runs, root, progress=False))
    assert [r["name"] for r in rows] == ["narrow", "wide"]
    assert "resumed" in capsys.readouterr().out
    narrow = rows[0]
    assert narrow["steps"] == 40 and narrow["tokens"] == 40 * 8 * 32  # both calls' tokens
    assert narrow["energy_method"] == "tdp-estimate" and narrow["energy_kwh"] > 0

    reference = list(sweep_mod.run_sweep(runs[:1], tmp_path / "straight", progress=False))[0]
    assert narrow["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)

    assert list(sweep_mod.run_sweep(runs, root, progress=False)) == []  # all finished: skipped
    total = json.loads((root / "ledger.json").read_text())
    ledgers = [json.loads((root / n / "ledger.json").read_text()) for n in ("narrow", "wide")]
    assert total["runs"] == 2 and total["energy_kwh"] == pytest.approx(
        sum(x["energy_kwh"] for x in ledgers)
    )
    # The killed call's steps up to its durable step-20 checkpoint are in the ledger once; the
    # resumed call added the other 20.
    assert ledgers[0]["tokens"] == 40 * 8 * 32 and ledgers[1]["tokens"] == 40 * 8 * 32

    changed = sweep_mod.load_sweep(str(write_sweep(tmp_path, wide=48)), ["log.progress=false"])
    with pytest.raises(ConfigError, match="different config"):
        list(sweep_mod.run_sweep(changed, root, progress=False))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "wide")).Reload()
    assert "hparams/val_loss" in events.Tags()["scalars"]
    assert any(t.startswith("_hparams_") for t in events.Tags()["tensors"])


def test_dry_run_and_manifest_commands(tmp_path, capsys):
    experiment = str(write_sweep(tmp_path))
    manifest = tmp_path / "jobs.txt"
    args = ["sweep", experiment, "--root", str(tmp_path / "s")]
    assert cli_main([*args, "--manifest", str(manifest), "--set", "train.seed=3"]) == 0
    lines = manifest.read_text().splitlines()
    assert len(lines) == 2 and lines[1].endswith("--only wide --set train.seed=3")
    assert cli_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "narrow" in out and "todo" in out and "kWh" in out
    assert cli_main([*args, "--only", "nosuch"]) == 2
    assert "unknown runs" in capsys.readouterr().err


def test_sweep_file_without_sweep_function_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("from research.config import ExperimentConfig\ndef config():\n    return 1\n")
    with pytest.raises(ConfigError, match="no sweep"):
        sweep_mod.load_sweep(str(path))


def run_notebook(folder: Path, env: dict) -> str:
    """Execute notebooks/scaling_laws.ipynb in ``folder`` with ``env``; its printed text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "scaling_laws.ipynb", as_version=4)
    env = {"PYTHONPATH": str(REPO), **env}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": folder}}
        ).execute()
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def test_notebook_runs_fit_and_plots(tmp_path):
    """The Colab notebook end to end on CPU, loading a small sweep's results."""
    from test_scaling import synthetic_runs

    runs = synthetic_runs()
    root = tmp_path / "results"
    root.mkdir()
    with open(root / "results.jsonl", "w") as f:
        for name, n, d, c, loss in zip(runs.names, runs.n, runs.d, runs.c, runs.loss, strict=True):
            row = dict(name=name, active_params=n, params=n, tokens=d, flops=c, val_loss=loss)
            f.write(json.dumps({**row, "budget": c, "steps": 1, "run_dir": str(root)}) + "\n")
    outputs = run_notebook(tmp_path, {"SCALING_RESULTS": str(root), "SCALING_BOOTSTRAP": "5"})
    assert "approach3" in outputs and "N_opt" in outputs
    assert (root / "fit" / "isoflop_curves.png").exists()


@pytest.mark.slow
def test_notebook_runs_the_tiny_sweep(tmp_path):
    """As on Colab: no results given, so it trains isoflop_shakespeare (minutes), then fits."""
    outputs = run_notebook(tmp_path, {"SCALING_RESULTS": "", "SCALING_BOOTSTRAP": "20"})
    rows = (tmp_path / "runs" / "isoflop_shakespeare" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 12
    assert "approach2 (IsoFLOP parabolas): a = " in outputs  # every budget has a minimum
