"""Run files on object storage, for real, against a local GCS emulator (gcp-storage-emulator,
pure Python) through gcsfs (etils epath, fsspec) and TensorStore's GCS driver (orbax).

Skips cleanly where gcsfs or the emulator is not installed (neither is in the `test` extra).
What these establish is the ground the run directory would stand on (README: Data at scale,
"Run directories on object storage"): orbax checkpoints and our TensorBoard writer work at a
gs:// URL (the writer copies its local event file whole at each flush: tensorboard's own
fsspec path overwrites the object with each flush's events alone); the run directory itself is
still a local path in the trainer.
"""

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
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="runs")
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's arrays
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    import fsspec

    fsspec.config.conf.pop("gcs", None)
    yield "gs://runs"
    server.stop()


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
