"""End-to-end training: resume after a real SIGKILL, checkpoint fallback, divergence, sharding."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics

from research.cli import main as cli_main
from research.config import ConfigError
from research.run import train
from research.train.loop import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def _cli(run_dir: Path, *overrides: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "research.cli",
        "train",
        "tiny",
        f"--set=train.run_dir={run_dir}",
        "--set=log.progress=false",
    ]
    return args + [f"--set={o}" for o in overrides]


RESUME_SETTINGS = (
    "train.steps=1000",
    "train.checkpoint_every=250",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "mesh.data=1",
)


def test_resume_after_sigkill_gives_identical_losses(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(
        _cli(straight, *RESUME_SETTINGS), check=True, env=env, cwd=REPO, capture_output=True
    )

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli(killed, *RESUME_SETTINGS),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill past the step-500 checkpoint, mid-way to 750
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and (killed / "checkpoints" / "500").exists():
                if len(metrics.read_text().splitlines()) >= 600:
                    break
            time.sleep(0.05)
            assert process.poll() is None, "the run ended before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(read_metrics(killed)) < 1000
    subprocess.run(
        _cli(killed, *RESUME_SETTINGS), check=True, env=env, cwd=REPO, capture_output=True
    )

    expected, resumed = read_metrics(straight), read_metrics(killed)
    assert sorted(resumed) == sorted(expected) == list(range(1, 1001))
    for step in expected:
        assert resumed[step]["train/loss"] == expected[step]["train/loss"], step
    # The killed call's work up to its last checkpoint (step 500) stayed in the ledger; the
    # steps it ran past that were redone after the resume and are counted once.
    ledgers = [json.loads((run / "ledger.json").read_text()) for run in (straight, killed)]
    assert ledgers[1]["tokens"] == ledgers[0]["tokens"]
    assert ledgers[1]["flops"] == ledgers[0]["flops"]
    assert ledgers[1]["energy_kwh"] > 0


def _corrupt(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            path.write_bytes(b"\x00garbage" * 7)


# End to end through train(); test_checkpoint.py covers each corruption case in seconds.
@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_previous(tiny_config, capsys):
    cfg = tiny_config("train.steps=50", "train.checkpoint_every=25", "train.log_every=1")
    first = train(cfg)
    run_dir = Path(first.run_dir)  # an epath.Path, whose rglob refuses **
    _corrupt(run_dir / "checkpoints" / "50")

    again = train(tiny_config("train.steps=50", "train.checkpoint_every=25", "train.log_every=1"))
    out = capsys.readouterr().out
    assert "checkpoint 50 is corrupt" in out and "resumed" in out and "from step 25" in out
    assert (run_dir / "checkpoints_unreadable" / "50").exists()  # moved aside, not deleted
    assert again.step == 50 and again.train_loss == pytest.approx(first.train_loss, abs=0)
    ledger = json.loads((run_dir / "ledger.json").read_text())  # steps 26-50 trained twice:
    assert ledger["tokens"] == 50 * 8 * 32 and ledger["redone_tokens"] == 25 * 8 * 32  # once


def test_checkpoint_of_the_other_scan_layout_is_refused_not_moved_aside(tmp_path):
    """scan_layers changes the parameter tree: restoring across it names the setting, and the
    checkpoint stays where it is (it is not unreadable, only for the other layout)."""
    import jax.numpy as jnp

    from research.train.checkpoint import Checkpointer, CheckpointLayoutError

    saver = Checkpointer(tmp_path / "checkpoints", 2, use_async=False)
    saver.save(3, {"params": {"blocks": {0: {"w": jnp.ones(2)}}}}, {})
    saver.close()
    stacked = {"params": {"stacked_blocks": {0: {"w": jnp.ones((1, 2))}}}}
    restorer = Checkpointer(tmp_path / "checkpoints", 2, use_async=False)
    with pytest.raises(CheckpointLayoutError, match="saved with model.scan_layers=false"):
        restorer.restore_latest(stacked)
    restorer.close()
    assert (tmp_path / "checkpoints" / "3").is_dir()


def test_divergence_stops_with_a_clear_message(tiny_config):
    cfg = tiny_config(
        "optim.lr=1e30",
        "optim.clip_norm=0",
        "train.checkpoint_every=10",
        "train.log_every=1",
        "optim.warmup_steps=0",
    )
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(cfg)


def test_sharded_run_matches_single_device(tiny_config, tmp_path):
    common = (
        "train.steps=6",
        "train.log_every=1",
        "train.sample_tokens=0",
        "train.checkpoint_every=0",
        "train.eval_every=0",
    )
    single = train(tiny_config(*common, "mesh.data=1", f"train.run_dir={tmp_path / 'one'}"))
    sharded = train(tiny_config(*common, "mesh.data=8", f"train.run_dir={tmp_path / 'eight'}"))
    a, b = read_metrics(single.run_dir), read_metrics(sharded.run_dir)
    for step in range(1, 7):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5)


def test_changed_config_on_existing_run_is_refused(tiny_config):
    train(tiny_config("train.steps=2", "train.sample_tokens=0"))
    with pytest.raises(ConfigError, match="model.d_model"):
        train(tiny_config("train.steps=2", "model.d_model=64"))
    # scan_layers lays the parameters out differently: part of a run's identity too
    with pytest.raises(ConfigError, match="model.scan_layers: False -> True"):
        train(tiny_config("train.steps=2", "model.scan_layers=true"))


def test_bad_mesh_is_a_clear_error(tiny_config):
    from research.parallel.mesh import MeshShapeError

    with pytest.raises(MeshShapeError, match="does not divide"):
        train(tiny_config("mesh.data=3"))


def test_tensorboard_events_and_ledger(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_config("train.steps=20", "train.eval_every=10"))
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    tags = events.Tags()["tensors"]  # scalars are float32 tensors, as tf.summary writes them
    for tag in (
        "train/loss",
        "val/loss",
        "val/bpb",
        "train/lr",
        "perf/tokens_per_second",
        "perf/mfu",
        "perf/peak_flops",
        "train/grad_norm",
    ):
        assert tag in tags, tag
    assert [e.step for e in events.Tensors("val/loss")] == [10, 20]
    ledger = (result.run_dir / "ledger.json").read_text()
    assert '"tokens": 5120' in ledger  # 20 steps x 8 sequences x 32 tokens
    # The MFU denominator is recorded: this CPU's cached ceiling, one chip for 8 XLA devices.
    assert '"peak_flops_source": "cpu-measured-cached:' in ledger and '"device_count": 1' in ledger
    assert (result.run_dir / "config.json").exists()


def test_cli_generate_and_eval(tiny_config, capsys):
    result = train(tiny_config("train.steps=10"))
    capsys.readouterr()
    assert (
        cli_main(["generate", str(result.run_dir), "--prompt", "ROMEO:", "--max-tokens", "20"]) == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.strip()) >= 20
    assert cli_main(["eval", str(result.run_dir)]) == 0
    assert '"val_loss"' in capsys.readouterr().out


def test_cli_reports_config_errors(capsys):
    assert cli_main(["train", "tiny", "--set", "model.n_layer=2"]) == 2
    err = capsys.readouterr().err
    assert "Unknown config key 'model.n_layer'" in err and "n_layers" in err
    assert cli_main(["train", "tiny", "--set", "data.corpus=/no/such/corpus"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_help_has_examples():
    for command in ("train", "prepare", "generate", "eval", "info"):
        out = subprocess.run(
            [sys.executable, "-m", "research.cli", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "example" in out


def test_generate_is_seeded(tiny_config, capsys):
    result = train(tiny_config("train.steps=5", "train.sample_tokens=0"))
    capsys.readouterr()
    outs = []
    for _ in range(2):
        cli_main(["generate", str(result.run_dir), "--max-tokens", "30", "--seed", "3"])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert np.unique(list(outs[0])).size > 3


# test_losses.py checks accumulated gradients against a hand-written loss in less time.
@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tiny_config, tmp_path):
    common = (
        "train.steps=4",
        "train.log_every=1",
        "train.sample_tokens=0",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "mesh.data=1",
    )
    whole = train(tiny_config(*common, f"train.run_dir={tmp_path / 'a'}"))
    accumulated = train(
        tiny_config(*common, "optim.grad_accum=4", f"train.run_dir={tmp_path / 'b'}")
    )
    a, b = read_metrics(whole.run_dir), read_metrics(accumulated.run_dir)
    for step in range(1, 5):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5)
        assert a[step]["train/grad_norm"] == pytest.approx(b[step]["train/grad_norm"], rel=1e-4)


def test_restart_keeps_the_previous_run(tiny_config):
    first = train(tiny_config("train.steps=6", "train.checkpoint_every=3", "train.sample_tokens=0"))
    again = train(
        tiny_config("train.steps=6", "train.checkpoint_every=3", "train.sample_tokens=0"),
        resume=False,
    )
    assert again.step == 6 and again.train_loss == first.train_loss
    kept = [p.name for p in first.run_dir.iterdir() if "before-restart" in p.name]
    assert any(name.startswith("checkpoints.before-restart") for name in kept)
    assert any(name.startswith("tensorboard.before-restart") for name in kept)  # old events


def test_cli_prepare_reports_dedup(capsys):
    assert cli_main(["prepare", "tiny"]) == 0
    out = capsys.readouterr().out
    assert '"duplicates_dropped"' in out and '"sha256"' in out


def test_eval_with_eval_batches_does_not_depend_on_the_device_count(tiny_config):
    """The windows evaluated are fixed by the config; rows are padded up to a multiple of the
    data-parallel size instead of shrunk to one (1, 2, 3 and 4 devices used to differ)."""
    import jax

    from research.config import MeshConfig
    from research.infer.evaluate import Evaluator
    from research.parallel.mesh import make_mesh
    from research.run import resolve_config
    from research.train.state import build_model

    cfg, data = resolve_config(tiny_config("train.eval_batches=2", "train.batch_size=6"))
    losses = []
    for devices in (1, 3):  # 3 rows of 8 do not divide: the case that used to differ
        mesh = make_mesh(MeshConfig(data=devices), devices=jax.devices()[:devices])
        graphdef, params = build_model(cfg.model, 0, mesh)
        evaluate = Evaluator(graphdef, data, mesh, cfg.model.seq_len, 6, max_batches=2)
        losses.append(evaluate(params)[0])
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)


# Run in a child process: finalise checkpoint 20 (orbax has renamed it into place), then SIGKILL
# the process before the poll that reports it durable (and adds its steps to the ledger) runs.
_KILL_AFTER_FINALISE = """
import os, signal, sys
from research.cli import main
from research.train.checkpoint import Checkpointer

poll = Checkpointer.poll

def poll_then_die(self, block=False):
    if self._pending == 20:
        self.manager.wait_until_finished()  # checkpoint 20 is complete on disk
        os.kill(os.getpid(), signal.SIGKILL)
    return poll(self, block)

Checkpointer.poll = poll_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_finalising_and_recording_a_checkpoint_is_counted_once(tmp_path):
    """The restored state holds 30 steps; the ledger must count each of them once, including
    the 10 of the checkpoint that was complete on disk but not yet in the ledger."""
    settings = ("train.steps=30", "train.checkpoint_every=10", "train.eval_every=0")
    settings += ("train.sample_tokens=0", "mesh.data=1", "train.log_every=5")
    run_dir = tmp_path / "run"
    args = _cli(run_dir, *settings)[3:]  # after `python -m research.cli`
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_FINALISE, *args], cwd=REPO, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (run_dir / "checkpoints" / "20").is_dir()
    first = json.loads((run_dir / "ledger.json").read_text())
    assert cli_main(args) == 0  # resumes from step 20
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["tokens"] == 30 * 8 * 32
    assert ledger["flops"] == pytest.approx(3 * first["flops"] / (first["tokens"] / 2560))
