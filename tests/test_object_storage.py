"""Run directories on object storage, for real, against a local GCS emulator (gcp-storage-emulator,
pure Python) through gcsfs (etils epath, fsspec) and TensorStore's GCS driver (orbax).

Skips cleanly where gcsfs or the emulator is not installed (neither is in the `test` extra;
tests/test_storage.py checks the non-orbax parts on an in-memory gs:// everywhere). A tiny
model trains into gs://, is interrupted after a checkpoint, resumes with the same command and
ends with the losses, ledger and checkpoints of an uninterrupted local run.
"""

import json
import socket

import numpy as np
import pytest


@pytest.fixture
def gcs(monkeypatch):
    """A gs://runs bucket in an in-memory emulator, with gcsfs and TensorStore pointed at it."""
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _send_generations(monkeypatch)
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="runs")
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's arrays
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    import fsspec
    from etils.epath import backend

    fsspec.config.conf.pop("gcs", None)
    fsspec.get_filesystem_class("gs").clear_instance_cache()  # each test has its own port
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield "gs://runs"
    server.stop()
    backend.fsspec_backend._get_filesystem.cache_clear()


def _send_generations(monkeypatch):
    """The emulator omits GCS's x-goog-generation header on object reads, which TensorStore's
    conditional reads of an OCDBT manifest need ("Malformed StorageGeneration" otherwise): add
    it, as GCS sends it."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        params = request.params
        try:
            generation = storage.get_file_obj(params["bucket_name"], params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the response already says so
            return
        response["x-goog-generation"] = generation["generation"]

    monkeypatch.setattr(objects, "download", download_with_generation)


def test_orbax_checkpoints_save_and_restore_at_a_gs_url(gcs):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from etils import epath

    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7)}
    with ocp.CheckpointManager(epath.Path(f"{gcs}/run/checkpoints")) as manager:
        manager.save(7, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        assert manager.all_steps() == [7]
        back = manager.restore(7, args=ocp.args.StandardRestore(state))
    np.testing.assert_array_equal(back["w"], state["w"])


def test_our_tensorboard_writer_at_a_gs_url_keeps_every_flushed_event(gcs):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from research.train.metrics import TensorBoardWriter

    writer = TensorBoardWriter(f"{gcs}/run")
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.flush()  # GCS objects cannot be appended to: each flush rewrites the object
    writer.close()
    from etils import epath

    (events,) = [p for p in epath.Path(f"{gcs}/run").iterdir() if "tfevents" in p.name]
    steps = [e.step for e in EventFileLoader(str(events)).Load() if e.summary.value]
    assert steps == [0, 1, 2]


TINY = [
    "--set=log.progress=false",
    "--set=train.sample_tokens=0",
    "--set=mesh.data=1",
    "--set=train.steps=40",
    "--set=train.checkpoint_every=20",
    "--set=train.eval_every=0",
    "--set=train.log_every=5",
]


class _Killed(Exception):
    """Stands for the process being killed: nothing after it is closed or uploaded."""


def _losses(metrics: str) -> dict[int, float]:
    """train/loss by step; later rows (a resumed run) win."""
    rows = [json.loads(line) for line in metrics.splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_run_at_a_gs_url_trains_resumes_and_matches_a_local_run(gcs, tmp_path, monkeypatch):
    from etils import epath

    from research.cli import main as cli_main
    from research.train.checkpoint import MANIFEST, verify_manifest
    from research.train.metrics import MetricsLogger

    assert cli_main(["train", "tiny", f"--set=train.run_dir={tmp_path / 'local'}", *TINY]) == 0
    url = f"{gcs}/team/tiny"
    command = ["train", "tiny", f"--set=train.run_dir={url}", *TINY]
    scalars = MetricsLogger.scalars

    def killed_after_step_30(self, step, values, tokens=None):
        if step > 30:
            raise _Killed
        return scalars(self, step, values, tokens)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLogger, "scalars", killed_after_step_30)
        with pytest.raises(_Killed):
            cli_main(command)
    run = epath.Path(url)
    # Uploaded whole when checkpoint 20 became durable (seen by a poll between steps 20 and 30).
    assert 20 <= max(_losses((run / "metrics.jsonl").read_text())) <= 30
    assert cli_main(command) == 0  # the same command resumes from gs://
    local = tmp_path / "local"
    assert _losses((run / "metrics.jsonl").read_text()) == _losses(
        (local / "metrics.jsonl").read_text()
    )
    remote_ledger = json.loads((run / "ledger.json").read_text())
    local_ledger = json.loads((local / "ledger.json").read_text())
    assert remote_ledger["tokens"] == local_ledger["tokens"] == 40 * 8 * 32
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["20", "40"]
    assert (run / "checkpoints" / "40" / MANIFEST).exists()
    assert verify_manifest(run / "checkpoints" / "40") is None
    assert json.loads((run / "config.json").read_text())["run"]["command"]
    assert any("tfevents" in p.name for p in run.iterdir())
    assert cli_main(["eval", url]) == 0  # read back from the bucket, params only
    # The manifest holds the store's own CRC32C (no download); a replaced object is caught.
    manifest = json.loads((run / "checkpoints" / "40" / MANIFEST).read_text())["files"]
    assert all("crc32c" in entry for entry in manifest.values())
    metadata = run / "checkpoints" / "40" / "_CHECKPOINT_METADATA"
    text = metadata.read_text()
    metadata.write_text(text.replace("0", "1", 1) if "0" in text else text.replace("1", "0", 1))
    problem = verify_manifest(run / "checkpoints" / "40")
    assert problem == "_CHECKPOINT_METADATA does not match its checksum"


SWEEP = """
from research.config import load_experiment
from research.scaling.sweep import SweepRun

def sweep():
    cfg = load_experiment("tiny", [
        "train.steps=20", "train.checkpoint_every=20", "train.sample_tokens=0",
        "train.eval_batches=2", "mesh.data=1", "log.progress=false",
    ])
    yield SweepRun("narrow", cfg, budget=1e9)
"""


@pytest.mark.slow  # ~11 s; its fast twin: test_storage.py's results append in a bucket
def test_a_sweep_with_a_gs_root_writes_its_results_and_ledger_there(gcs, tmp_path):
    from etils import epath

    from research.cli import main as cli_main

    experiment = tmp_path / "one_run.py"
    experiment.write_text(SWEEP)
    root = epath.Path(f"{gcs}/sweeps/one")
    assert cli_main(["sweep", str(experiment), "--root", str(root), "--quiet"]) == 0
    (row,) = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert row["name"] == "narrow" and row["run_dir"] == f"{root}/narrow"
    assert json.loads((root / "ledger.json").read_text())["tokens"] == 20 * 8 * 32
    events = [p for p in (root / "narrow").iterdir() if "tfevents" in p.name]
    assert len(events) == 2  # the run's scalars and the sweep's hparams summary
    assert cli_main(["sweep", str(experiment), "--root", str(root), "--quiet"]) == 0  # done: skip
    assert len((root / "results.jsonl").read_text().splitlines()) == 1


def test_a_missing_bucket_is_one_error_line_before_any_work(gcs, capsys):
    from research.cli import main as cli_main

    assert cli_main(["train", "tiny", "--set=train.run_dir=gs://no-such-bucket/x", *TINY]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: cannot write to gs://no-such-bucket/x (")
    assert "bucket exists" in line and "prepare:" not in captured.out  # before the data


def test_a_bucket_that_keeps_failing_a_flush_stops_the_run_with_one_line(gcs, monkeypatch, capsys):
    """Transient errors are retried (tests/test_storage.py); here every upload of metrics.jsonl
    fails as gcsfs fails once its own retries of a 503 are spent: one error line, exit 2."""
    from research import storage
    from research.cli import main as cli_main

    class HttpError(Exception):  # gcsfs.retry.HttpError's module and status
        __module__, code = "gcsfs.retry", 503

    def unavailable(self):
        raise HttpError("Service Unavailable, 503")

    monkeypatch.setattr(storage.AppendFile, "_upload", unavailable)
    monkeypatch.setattr(storage, "_sleep", lambda seconds: None)
    url = f"{gcs}/team/flaky"
    short = [a for a in TINY if "steps=" not in a and "every=" not in a]
    args = [*short, "--set=train.steps=10", "--set=train.checkpoint_every=5"]
    assert cli_main(["train", "tiny", f"--set=train.run_dir={url}", *args]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error")]  # TensorStore logs too
    assert line.startswith(f"error: writing {url}/metrics.jsonl failed 4 times (HttpError: ")
    assert "kept in " in line and line.endswith("(step 5)")


def test_restart_in_a_real_bucket_copies_checks_and_then_deletes(gcs):
    """gcsfs against the emulator: server-side copies checked by size and CRC32C."""
    from etils import epath

    from research.run.restart import prepare_run_dir

    run = epath.Path(f"{gcs}/team/restarted")
    (run / "checkpoints" / "5" / "state").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "5" / "state" / "chunk").write_bytes(b"\x01" * 1000)
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    (run / "config.json").write_text("{}")
    prepare_run_dir(run, restart=True)
    names = sorted(p.name for p in run.iterdir())
    assert "config.json" in names and len(names) == 3, names  # checkpoints, metrics: moved
    (kept,) = [n for n in names if n.startswith("checkpoints.before-restart-")]
    assert (run / kept / "5" / "state" / "chunk").read_bytes() == b"\x01" * 1000
