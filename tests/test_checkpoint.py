"""Checkpoints never lose a run: transient read errors touch nothing, only proven corruption is
set aside (and only by training), and a failed background save stops the run with one message."""

import json
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from research.cli import main as cli_main
from research.train import checkpoint as checkpoint_module
from research.train.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointReadError,
    CheckpointSaveError,
)

TINY = ["--set=log.progress=false", "--set=train.sample_tokens=0", "--set=mesh.data=1"]


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((64, 32), value), "b": jnp.arange(8.0)}}


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _saved(directory: Path, steps=(1, 2)) -> Path:
    saver = Checkpointer(directory, keep=5, use_async=False)
    for step in steps:
        saver.save(step, _state(float(step)), {"position": step})
    saver.close()
    return directory


def _flaky_restore(monkeypatch, error: Exception) -> list:
    """Orbax's restore raises ``error`` once per call (as a flaky disk or mount would)."""
    calls = []

    def restore(self, *args, **kwargs):
        calls.append(args)
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    return calls


def _biggest_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_durable_save_writes_a_manifest_and_restores(tmp_path):
    directory = _saved(tmp_path / "ck")
    manifest = json.loads((directory / "2" / MANIFEST).read_text())["files"]
    assert any(name.startswith("state/") for name in manifest)
    restored = Checkpointer(directory).restore_latest(_abstract(_state(0.0)))
    assert restored.step == 2 and restored.data_state == {"position": 2}
    assert float(restored.state["params"]["w"][0, 0]) == 2.0


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), MemoryError("host OOM")])
@pytest.mark.parametrize("read_only", [False, True])
def test_transient_restore_error_stops_and_moves_nothing(tmp_path, monkeypatch, error, read_only):
    directory = _saved(tmp_path / "ck")
    before = sorted(p.name for p in directory.iterdir())
    _flaky_restore(monkeypatch, error)
    with pytest.raises(CheckpointReadError, match="nothing was moved"):
        Checkpointer(directory, read_only=read_only).restore_latest(_abstract(_state(0.0)))
    assert sorted(p.name for p in directory.iterdir()) == before
    assert not (tmp_path / "checkpoints_unreadable").exists()


def test_flipped_bytes_are_caught_by_the_manifest_and_set_aside(tmp_path):
    """Orbax itself restores flipped bytes without complaint: the checksum is the proof."""
    directory = _saved(tmp_path / "ck")
    victim = _biggest_file(directory / "2")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    reader = Checkpointer(directory, read_only=True)  # eval: skips it, moves nothing
    assert reader.restore_latest(_abstract(_state(0.0))).step == 1
    assert (directory / "2").exists() and not (tmp_path / "checkpoints_unreadable").exists()

    restored = Checkpointer(directory).restore_latest(_abstract(_state(0.0)))  # training
    assert restored.step == 1
    assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()  # moved aside, not deleted


def test_truncated_file_without_manifest_is_orbax_corruption(tmp_path):
    directory = _saved(tmp_path / "ck")
    (directory / "2" / MANIFEST).unlink()  # a checkpoint from before manifests
    victim = _biggest_file(directory / "2")
    victim.write_bytes(victim.read_bytes()[:10])
    assert Checkpointer(directory).restore_latest(_abstract(_state(0.0))).step == 1
    assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()


def test_params_only_restore_reads_no_optimizer_state(tmp_path):
    saver = Checkpointer(tmp_path / "ck", use_async=False)
    saver.save(3, {**_state(3.0), "opt_state": {"mu": jnp.ones((64, 32))}}, {})
    saver.close()
    restored = Checkpointer(tmp_path / "ck", read_only=True).restore_latest(
        _abstract(_state(0.0)), params_only=True
    )
    assert set(restored.state) == {"params"} and restored.step == 3


def _fail_commit(monkeypatch, fail_on: int) -> None:
    """Orbax's final write of the ``fail_on``-th save raises ENOSPC, in its background thread.
    (A private orbax module: where it is missing, the real full-disk test below still runs.)"""
    async_path = pytest.importorskip("orbax.checkpoint._src.path.async_path")

    original, count = async_path.write_text, {"commits": 0}

    async def write_text(path, text, *args, **kwargs):
        path = Path(str(path))
        if path.name == "commit_success.txt" and path.parent.name[:1].isdigit():
            count["commits"] += 1  # the step's own commit marker, written last
            if count["commits"] == fail_on:
                raise OSError(28, "No space left on device")
        return await original(path, text, *args, **kwargs)

    monkeypatch.setattr(async_path, "write_text", write_text)


def test_failed_async_save_surfaces_with_the_last_durable_step(tmp_path, monkeypatch):
    _fail_commit(monkeypatch, fail_on=2)
    saver = Checkpointer(tmp_path / "ck", use_async=True)
    saver.save(10, _state(1.0), {})
    assert saver.poll(block=True) == 10 and saver.durable_step == 10
    saver.save(20, _state(2.0), {})
    with pytest.raises(
        CheckpointSaveError, match="checkpoint 20 .* last durable checkpoint is step 10"
    ):
        saver.poll(block=True)
    saver.close()
    assert saver.latest_step() == 10


def _finished_tiny_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    assert cli_main(["train", "tiny", f"--set=train.run_dir={run_dir}", *TINY]) == 0
    return run_dir


def test_cli_transient_restore_error_exits_2_and_keeps_the_run(tmp_path, monkeypatch, capsys):
    """The issue's reproduction: OSError(5) on every restore of a finished run used to move both
    checkpoints aside, retrain from step 0 with exit 0 and double the ledger's tokens."""
    run_dir = _finished_tiny_run(tmp_path)
    ledger = (run_dir / "ledger.json").read_text()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    capsys.readouterr()
    _flaky_restore(monkeypatch, OSError(5, "Input/output error"))

    assert cli_main(["train", "tiny", f"--set=train.run_dir={run_dir}", *TINY]) == 2
    assert cli_main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: could not read checkpoint 50") == 2 and "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    assert not (run_dir / "checkpoints_unreadable").exists()
    assert (run_dir / "ledger.json").read_text() == ledger


def test_cli_failed_final_save_exits_2_and_ledger_counts_durable_work(
    tmp_path, monkeypatch, capsys
):
    _fail_commit(monkeypatch, fail_on=2)  # tiny saves at 25 and 50: the final one fails
    run_dir = tmp_path / "run"
    assert cli_main(["train", "tiny", f"--set=train.run_dir={run_dir}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "saving checkpoint 50" in err and "last durable checkpoint is step 25" in err
    assert "Traceback" not in err and len(err.splitlines()) <= 3
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["tokens"] == 25 * 8 * 32  # 25 steps of batch 8 x 32 tokens, not 50


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount(8)")
def test_full_disk_surfaces_before_the_next_checkpoint(tmp_path, capsys):
    """A real full filesystem (a small tmpfs), where the machine allows mounting one."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mountpoint)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run_dir = mountpoint / "run"
        status = cli_main(
            [
                "train",
                "tiny",
                f"--set=train.run_dir={run_dir}",
                *TINY,
                "--set=train.steps=400",
                "--set=train.checkpoint_every=20",
                "--set=train.log_every=1",
                "--set=log.tensorboard=false",
            ]
        )
        err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err
        assert "No space left on device" in err or "RESOURCE_EXHAUSTED" in err
        durable = int(err.split("last durable checkpoint is step ")[1].split(";")[0])
        ledger = json.loads((run_dir / "ledger.json").read_text())
        assert ledger["tokens"] == durable * 8 * 32
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


def test_a_full_disk_while_logging_stops_cleanly_and_resumes(tmp_path, capsys, monkeypatch):
    """The disk may fill at a metrics write rather than a save: the same clean stop (one
    error line naming the last durable checkpoint, exit 2), then the same command resumes."""
    import errno

    from research.train.metrics import MetricsLogger

    scalars = MetricsLogger.scalars

    def full_after_step_30(self, step, values, tokens=None):
        if step > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return scalars(self, step, values, tokens)

    command = [
        "train",
        "tiny",
        f"--set=train.run_dir={tmp_path / 'run'}",
        *TINY,
        "--set=train.steps=40",
        "--set=train.checkpoint_every=20",
        "--set=train.eval_every=0",
        "--set=log.tensorboard=false",
    ]
    with monkeypatch.context() as patch:
        patch.setattr(MetricsLogger, "scalars", full_after_step_30)
        assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    assert "last durable checkpoint is step 20;" in err
    assert cli_main(command) == 0
    assert "from step 20" in capsys.readouterr().out  # resumed from the durable checkpoint


def test_is_corruption_classification(tmp_path):
    step_dir = tmp_path / "7"
    step_dir.mkdir()
    is_corruption = checkpoint_module._is_corruption
    assert not is_corruption(OSError(5, "Input/output error"), step_dir)
    assert not is_corruption(MemoryError(), step_dir)
    assert not is_corruption(RuntimeError("version mismatch"), step_dir)
    assert is_corruption(ValueError("DATA_LOSS: bad block"), step_dir)
    assert is_corruption(FileNotFoundError("gone"), step_dir)
    assert not is_corruption(FileNotFoundError("gone"), tmp_path / "missing")
