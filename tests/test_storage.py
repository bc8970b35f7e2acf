"""Run files on an object store, fast: an in-memory gs:// (fsspec's memory file system, refusing
appends as an object store does) stands in for GCS, so metrics, TensorBoard, the ledger, the
checkpoint manifests and the --restart set-aside are checked without an emulator or orbax
(tests/test_object_storage.py trains against a real GCS emulator where one is installed)."""

import json

import fsspec
import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

from research import storage
from research.storage import StorageError, run_path


class _ObjectStore(MemoryFileSystem):
    """gs:// in memory: objects are written whole, never appended to."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs' option
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: an object cannot be appended to")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def bucket(monkeypatch):
    """gs://bucket in memory, for etils epath and fsspec alike."""
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(_registry, protocol, _ObjectStore)
    _ObjectStore.store.clear()
    _ObjectStore.pseudo_dirs[:] = [""]
    _ObjectStore.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the file system
    yield "gs://bucket"
    backend.fsspec_backend._get_filesystem.cache_clear()
    _ObjectStore.clear_instance_cache()


def _object(url: str) -> bytes:
    return fsspec.filesystem("gs").cat_file(url)


def test_metrics_reach_the_bucket_whole_at_each_flush_and_a_resume_adds_to_them(bucket):
    from research.train.metrics import MetricsLogger

    logger = MetricsLogger(f"{bucket}/run", tensorboard=True)
    logger.scalars(5, {"train/loss": 3.0})
    assert not run_path(f"{bucket}/run/metrics.jsonl").exists()  # local until a flush
    logger.flush()  # the trainer flushes as each checkpoint becomes durable
    logger.scalars(10, {"train/loss": 2.0})
    logger.close()
    resumed = MetricsLogger(f"{bucket}/run", tensorboard=False)  # the same command, again
    resumed.scalars(15, {"train/loss": 1.0})
    resumed.close()
    rows = [json.loads(line) for line in _object(f"{bucket}/run/metrics.jsonl").splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(5, 3.0), (10, 2.0), (15, 1.0)]
    events = [p.name for p in run_path(f"{bucket}/run").iterdir() if "tfevents" in p.name]
    assert len(events) == 1


def test_the_ledger_accumulates_in_the_bucket(bucket):
    import jax

    from research.config import MeshConfig
    from research.parallel.mesh import make_mesh
    from research.train.accounting import Peak
    from research.train.ledger import record_work

    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    peak = Peak(per_chip=None, chips=1, source="unknown")
    record_work(f"{bucket}/run", 100, 1e6, 2.0, mesh, peak)
    record_work(f"{bucket}/run", 50, 5e5, 1.0, mesh, peak)
    ledger = json.loads(_object(f"{bucket}/run/ledger.json"))
    assert ledger["tokens"] == 150 and ledger["wall_seconds"] == 3.0


def test_checkpoint_manifests_in_the_bucket_prove_changed_bytes(bucket):
    from research.train.checkpoint import MANIFEST, verify_manifest, write_manifest

    step = run_path(f"{bucket}/run/checkpoints/20")
    (step / "state" / "d").mkdir(parents=True, exist_ok=True)
    (step / "state" / "d" / "chunk").write_bytes(b"\x00" * 100)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    write_manifest(step)
    files = json.loads((step / MANIFEST).read_text())["files"]
    assert sorted(files) == ["_CHECKPOINT_METADATA", "state/d/chunk"]
    assert files["state/d/chunk"]["size"] == 100
    assert verify_manifest(step) is None
    (step / "state" / "d" / "chunk").write_bytes(b"\x01" + b"\x00" * 99)
    assert verify_manifest(step) == "state/d/chunk does not match its checksum"
    (step / "state" / "d" / "chunk").unlink()
    assert verify_manifest(step) == "state/d/chunk is missing"


def test_restart_sets_the_previous_run_aside_in_the_bucket(bucket):
    from research.run.restart import set_aside

    run = run_path(f"{bucket}/run")
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    (run / "checkpoints" / "5").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "5" / "x").write_text("x")
    (run / "events.out.tfevents.1.host").write_bytes(b"e")
    set_aside(run)
    names = sorted(p.name for p in run.iterdir())
    assert not {"metrics.jsonl", "checkpoints", "events.out.tfevents.1.host"} & set(names)
    assert any(n.startswith("metrics.before-restart-") for n in names)
    assert any(n.startswith("checkpoints.before-restart-") for n in names)
    (kept,) = [n for n in names if n.startswith("tensorboard.before-restart-")]
    assert [p.name for p in (run / kept).iterdir()] == ["events.out.tfevents.1.host"]


def test_an_unwritable_bucket_is_one_clear_error_naming_the_url(bucket, monkeypatch):
    def refuse(self, path, mode="rb", **kwargs):
        raise PermissionError("403 Forbidden: caller does not have storage.objects.create")

    monkeypatch.setattr(_ObjectStore, "_open", refuse)
    with pytest.raises(StorageError, match=r"cannot write to gs://bucket/run .*403.*credentials"):
        storage.check_writable(run_path(f"{bucket}/run"))


def test_unsupported_schemes_are_refused_with_the_fix():
    with pytest.raises(StorageError, match="memory:// is not supported"):
        run_path("memory://x/run")
    with pytest.raises(StorageError, match="orbax cannot write checkpoints to s3://"):
        storage.check_writable(run_path("s3://bucket/run"))


def test_local_paths_keep_their_meaning(tmp_path):
    assert str(run_path("runs/x")) == "runs/x"
    assert not storage.is_remote(tmp_path) and storage.is_remote("gs://b/x")
    path = run_path(tmp_path) / "a.json"
    storage.write_text_atomic(path, "{}")
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_missing_driver_names_the_package_to_install(monkeypatch):
    def absent(protocol):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "get_filesystem_class", absent)
    with pytest.raises(StorageError, match=r"gs://bucket/run: gs:// run directories need gcsfs"):
        storage.check_writable(run_path("gs://bucket/run"))


def test_a_sweeps_results_grow_by_whole_rewrites_in_the_bucket(bucket):
    from research.scaling.sweep import RESULTS, read_results

    root = run_path(f"{bucket}/sweep")
    for name in ("narrow", "wide"):  # what run_sweep does after each finished run
        storage.append_text(root / RESULTS, json.dumps({"name": name}) + "\n")
    assert [row["name"] for row in read_results(f"{bucket}/sweep")] == ["narrow", "wide"]


def _failing_writes(monkeypatch, times: int, error: Exception) -> list[float]:
    """The next ``times`` object writes fail with ``error``; returns the backoff waits taken."""
    opened = _ObjectStore._open
    left = [times]

    def flaky(self, path, mode="rb", **kwargs):
        if "w" in mode and left[0] > 0:
            left[0] -= 1
            raise error
        return opened(self, path, mode, **kwargs)

    monkeypatch.setattr(_ObjectStore, "_open", flaky)
    waits: list[float] = []
    monkeypatch.setattr(storage, "_sleep", waits.append)
    return waits


class _Http503(Exception):
    """What gcsfs raises once its own retries of a 503 are spent (gcsfs.retry.HttpError)."""

    __module__ = "gcsfs.retry"
    code = 503


def test_a_transient_error_while_flushing_metrics_is_retried_with_backoff(bucket, monkeypatch):
    from research.train.metrics import MetricsLogger

    logger = MetricsLogger(f"{bucket}/run", tensorboard=False)
    logger.scalars(5, {"train/loss": 3.0})
    waits = _failing_writes(monkeypatch, 2, _Http503("Service Unavailable, 503"))
    logger.flush()
    assert waits == [1.0, 2.0]  # two failures, then the write went through
    rows = [json.loads(line) for line in _object(f"{bucket}/run/metrics.jsonl").splitlines()]
    assert rows == [{"step": 5, "train/loss": 3.0}]


def test_a_persistent_storage_error_names_the_object_and_loses_nothing(bucket, monkeypatch):
    from research.train.metrics import MetricsLogger

    logger = MetricsLogger(f"{bucket}/run", tensorboard=False)
    logger.scalars(5, {"train/loss": 3.0})
    logger.flush()
    logger.scalars(10, {"train/loss": 2.0})
    waits = _failing_writes(monkeypatch, 99, ConnectionResetError(104, "Connection reset"))
    with pytest.raises(StorageError) as caught:
        logger.flush()
    message = str(caught.value)
    assert waits == [1.0, 2.0, 4.0] and "failed 4 times (ConnectionResetError" in message
    assert message.startswith(f"writing {bucket}/run/metrics.jsonl failed")
    assert "credentials" in message and "re-run the same command" in message
    assert _object(f"{bucket}/run/metrics.jsonl") == b'{"step": 5, "train/loss": 3.0}\n'
    kept = message.split("kept in ")[1].split(".")[0] + ".jsonl"
    with open(kept) as file:
        assert [json.loads(line)["step"] for line in file] == [5, 10]  # every row, locally


def test_the_ledger_write_is_retried_and_a_refusal_is_not(bucket, monkeypatch):
    import jax

    from research.config import MeshConfig
    from research.parallel.mesh import make_mesh
    from research.train.accounting import Peak
    from research.train.ledger import record_work

    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    peak = Peak(per_chip=None, chips=1, source="unknown")
    waits = _failing_writes(monkeypatch, 1, TimeoutError("timed out"))
    record_work(f"{bucket}/run", 100, 1e6, 2.0, mesh, peak)
    assert waits == [1.0] and json.loads(_object(f"{bucket}/run/ledger.json"))["tokens"] == 100
    waits = _failing_writes(monkeypatch, 1, PermissionError("403 Forbidden"))
    with pytest.raises(StorageError, match=r"ledger.json failed \(PermissionError: 403"):
        record_work(f"{bucket}/run", 50, 5e5, 1.0, mesh, peak)
    assert waits == []  # not worth retrying
    assert json.loads(_object(f"{bucket}/run/ledger.json"))["tokens"] == 100


def test_which_storage_errors_are_transient():
    class Http(_Http503):
        __module__ = "gcsfs.retry"

        def __init__(self, code):
            self.code = code

    assert storage.is_transient(Http(503)) and storage.is_transient(Http("429"))
    assert not storage.is_transient(Http(400)) and not storage.is_transient(FileNotFoundError())
    try:  # the driver's own class, where it is installed (not in the test extra)
        from gcsfs.retry import HttpError
    except ImportError:
        pass
    else:
        assert storage.is_transient(HttpError({"code": 503, "message": "Backend Error"}))
        assert not storage.is_transient(HttpError({"code": 400, "message": "Bad Request"}))
    assert storage.is_transient(ConnectionResetError()) and storage.is_transient(TimeoutError())
    assert not storage.is_storage_error(TypeError()) and not storage.is_transient(KeyError())


class _Killed(BaseException):
    """Stands for the process being killed in the middle of a --restart."""


def _old_run(run) -> dict[str, bytes]:
    """A previous run's files in ``run``; returns {path relative to run: bytes}."""
    files = {
        "metrics.jsonl": b'{"step": 10}\n',
        "ledger.json": b'{"tokens": 10}',
        "events.out.tfevents.1.host": b"events",
        **{f"checkpoints/{s}/state/{n}": f"{s}{n}".encode() for s in (5, 10) for n in "abc"},
    }
    for name, data in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    return files


def _objects(run) -> dict[str, bytes]:
    fs = fsspec.filesystem("gs")
    root = fs._strip_protocol(str(run))
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


@pytest.mark.parametrize("killed_in", ["cp_file", "rm_file"])
def test_an_interrupted_restart_in_the_bucket_is_finished_by_the_next_command(
    bucket, monkeypatch, killed_in
):
    """A bucket has no rename (copy, then delete): a kill mid-way must not leave the old run
    split between its names; the next command (a resume here) finishes the set-aside first."""
    from research.run.restart import prepare_run_dir

    run = run_path(f"{bucket}/run")
    old = _old_run(run)
    original, calls = getattr(_ObjectStore, killed_in), [0]

    def dies_on_the_fourth_call(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise _Killed
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(_ObjectStore, killed_in, dies_on_the_fourth_call)
        with pytest.raises(_Killed):
            prepare_run_dir(run, restart=True)
    prepare_run_dir(run, restart=False)  # the same command without --restart: a resume
    now = _objects(run)
    (stamp,) = {n.split("before-restart-")[1].split("/")[0].split(".")[0] for n in now}
    events = "events.out.tfevents.1.host"
    moved = {
        "metrics.jsonl": f"metrics.before-restart-{stamp}.jsonl",
        "ledger.json": f"ledger.before-restart-{stamp}.json",
        events: f"tensorboard.before-restart-{stamp}/{events}",
    }
    expected = {
        moved.get(name, name.replace("checkpoints/", f"checkpoints.before-restart-{stamp}/")): data
        for name, data in old.items()
    }
    assert now == expected  # every old object once, under its kept name; nothing else


def test_an_interrupted_local_restart_is_finished_by_the_next_command(tmp_path, monkeypatch):
    import os

    from research.run.restart import JOURNAL, prepare_run_dir

    old = _old_run(run_path(tmp_path))
    rename, calls = os.rename, [0]

    def dies_on_the_second_rename(source, target):
        calls[0] += 1
        if calls[0] == 2:
            raise _Killed
        rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", dies_on_the_second_rename)
        with pytest.raises(_Killed):
            prepare_run_dir(run_path(tmp_path), restart=True)
    assert (tmp_path / JOURNAL).exists() and (tmp_path / "ledger.json").exists()
    prepare_run_dir(run_path(tmp_path), restart=False)
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert len(files) == len(old) and all("before-restart-" in name for name in files)
