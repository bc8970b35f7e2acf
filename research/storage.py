"""Run directories on local disk or on object storage (``gs://``, ``s3://``) through one path type.

Everything that touches a run directory (the builder, checkpoints and their manifests, metrics,
TensorBoard, the ledger, sweeps) takes its paths from ``run_path``: an etils ``epath.Path``,
which is the os module for a local path and fsspec (gcsfs, s3fs) for a URL, with pathlib's API.
Orbax takes the same ``epath.Path``. Two things differ on an object store and are handled here:
an object cannot be appended to (``AppendFile`` keeps a local copy and uploads it whole), and
there is no atomic rename (but a single object write is atomic: it appears whole or not at all).

Every whole-object write of a run's files during training (metrics, TensorBoard events, the
ledger, manifests) goes through ``write_with_retries``: a transient store error (HTTP 5xx, 408,
429, a dropped connection, a timeout) is retried with exponential backoff, a bounded number of
times, beyond the driver's own per-request retries; one that persists, or a permanent one, is a
``StorageError`` naming the object and the fix. A failed write leaves the previous object whole,
and what was not uploaded is kept on local disk and named in the error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import fsspec
from etils import epath

from research.config import ResearchError

URL_SCHEMES = ("gs://", "s3://")
# What a scheme needs installed (etils reaches it through fsspec), and the extra that has it.
_PACKAGES = {"gs": ("gcsfs", "gcs")}
# Writes to an object store: attempts in all, and the first wait (doubled after each failure;
# 1 + 2 + 4 s here), on top of the driver's own retries of each request.
WRITE_ATTEMPTS = 4
WRITE_BACKOFF_SECONDS = 1.0
# Exceptions from these packages are the storage drivers' (gcsfs' HttpError, aiohttp, ...).
_DRIVER_MODULES = ("gcsfs", "s3fs", "aiohttp", "requests", "urllib3", "google", "botocore")
_sleep = time.sleep  # tests replace it: backoff without the wait
log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(ResearchError):
    """A run directory that cannot be used: an unknown scheme, a missing driver, an unreachable
    bucket or missing credentials. The message names the URL and the fix."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an object-store URL (``gs://``, ``s3://``) rather than a local path."""
    return os.fspath(path).startswith(URL_SCHEMES)


def run_path(path: str | os.PathLike) -> epath.Path:
    """``path`` (a local path or a ``gs://``/``s3://`` URL) as an ``epath.Path``.

    Local paths keep their meaning exactly (relative stays relative); another scheme is an error
    here rather than a folder named ``memory:`` in the working directory."""
    text = os.fspath(path)
    if "://" in text and not is_remote(text):
        raise StorageError(
            f"{text}: a run directory is a local path or a gs:// or s3:// URL; "
            f"{text.split('://')[0]}:// is not supported"
        )
    return epath.Path(text)


def check_writable(directory: epath.Path) -> None:
    """For a URL, prove the run directory can be written (one small object written and deleted),
    so that a missing bucket, missing credentials or an absent driver stop the run at once with
    one line, before any data or model work. Local paths: nothing (the builder creates them)."""
    if not is_remote(directory):
        return
    url = os.fspath(directory)
    scheme = url[: url.index("://")]
    if scheme == "s3":  # orbax 0.12.8 keeps only gs:// in its path normalisation
        raise StorageError(
            f'{url}: orbax cannot write checkpoints to s3:// at this version ("Checkpoint path '
            'should be absolute"); train into gs:// or a local path and copy the run to S3'
        )
    try:
        fsspec.get_filesystem_class(scheme)  # gcsfs / s3fs, the drivers etils epath uses
    except ImportError:
        module, extra = _PACKAGES[scheme]
        raise StorageError(
            f"{url}: {scheme}:// run directories need {module}; pip install {module} "
            f"(or this package's `{extra}` extra)"
        ) from None
    # A name of its own: every host of a multi-host run probes at once (before JAX starts).
    probe = directory / f".research-write-probe-{uuid.uuid4().hex}"
    driver_log = logging.getLogger(_PACKAGES[scheme][0])
    level = driver_log.level
    driver_log.setLevel(logging.CRITICAL)  # its retries' tracebacks: the error below says it all
    try:
        probe.write_text("probe")
        probe.unlink()
    except Exception as error:  # noqa: BLE001 - auth, HTTP, DNS and bucket errors vary by driver
        raise StorageError(
            f"cannot write to {url} ({type(error).__name__}: {str(error)[:200]}). Check that the "
            "bucket exists and that this machine has credentials that may write to it (gs://: "
            "`gcloud auth application-default login` or GOOGLE_APPLICATION_CREDENTIALS; s3://: "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials)"
        ) from None
    finally:
        driver_log.setLevel(level)


def is_storage_error(error: BaseException) -> bool:
    """An error of the store or the network (not a bug in the caller): an OSError, a timeout,
    or an exception of a storage driver (gcsfs' HttpError, aiohttp's ClientError, ...)."""
    module = type(error).__module__.split(".")[0]
    return isinstance(error, (OSError, TimeoutError)) or module in _DRIVER_MODULES


def is_transient(error: BaseException) -> bool:
    """Worth retrying: a storage error other than a missing object/bucket or a refusal, and, where
    the driver gives an HTTP status, a 5xx, 408 or 429 (gcsfs' own list of retriable codes)."""
    if not is_storage_error(error) or isinstance(error, (FileNotFoundError, PermissionError)):
        return False
    code = getattr(error, "code", None)
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    return not isinstance(code, int) or code >= 500 or code in (408, 429)


def write_with_retries(
    path: epath.Path, write: Callable[[], T], keep: Callable[[], str] | None = None
) -> T:
    """``write()`` (one whole-object write of ``path``, safe to repeat), retried with backoff
    while the store's errors are transient. A failure that persists, or a permanent one, raises
    StorageError naming ``path`` and the fix, and where ``keep()`` (called then) put the local
    copy of what was not uploaded. A local path is written once: its errors are the caller's."""
    if not is_remote(path):
        return write()
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return write()
        except Exception as error:
            if not is_storage_error(error):
                raise  # a bug, not the store: its own traceback
            if not is_transient(error) or attempt == WRITE_ATTEMPTS:
                failure = error
                break
            wait = WRITE_BACKOFF_SECONDS * 2 ** (attempt - 1)
            log.warning("writing %s failed (%r); retrying in %.0f s", path, error, wait)
            _sleep(wait)
    tries = f" {attempt} times" if attempt > 1 else ""
    unsent = f"; what was not uploaded is kept in {keep()}" if keep else ""
    raise StorageError(
        f"writing {os.fspath(path)} failed{tries} ({type(failure).__name__}: "
        f"{str(failure)[:200]}). The copy already in the bucket is unchanged{unsent}. Check the "
        "bucket, this machine's network and its credentials (gs://: `gcloud auth "
        "application-default login` or GOOGLE_APPLICATION_CREDENTIALS), then re-run the same "
        "command to resume from the last durable checkpoint"
    ) from failure


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write ``path`` so that no reader ever sees half of it: locally a temporary file renamed
    over it (``os.replace``); on an object store one object write, which is atomic already
    (retried while the store's errors are transient)."""
    if is_remote(path):
        write_with_retries(path, lambda: path.write_text(text))
        return
    temporary = path.parent / f".{path.name}.tmp"
    temporary.write_text(text)
    os.replace(temporary, path)


def append_text(path: epath.Path, text: str) -> None:
    """Add ``text`` to the end of ``path``: locally one short append (safe for parallel writers);
    an object cannot be appended to, so for a URL it is read and written back whole (parallel
    writers to one object can lose each other's lines: last write wins)."""
    if not is_remote(path):
        with open(path, "a") as file:
            file.write(text)
        return
    previous = path.read_text() if path.exists() else ""
    write_with_retries(path, lambda: path.write_text(previous + text))


@contextlib.contextmanager
def local_folder(directory: epath.Path) -> Iterator[str]:
    """A local folder to write files for ``directory`` into: ``directory`` itself when local; for
    a URL a temporary folder whose files are uploaded into it, each whole, on leaving."""
    if not is_remote(directory):
        yield os.fspath(directory)
        return
    with tempfile.TemporaryDirectory(prefix="research-") as local:
        yield local
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as source:
                with (directory / name).open("wb") as target:
                    shutil.copyfileobj(source, target)


def files_under(directory: epath.Path) -> Iterator[epath.Path]:
    """Every file below ``directory``, recursively (epath's ``rglob`` refuses ``**``)."""
    top = None
    for root, _, names in directory.walk():  # top first; fsspec gives roots without gs://
        top = os.fspath(root) if top is None else top
        relative = os.path.relpath(os.fspath(root), top)
        folder = directory if relative == "." else directory / relative
        for name in names:
            yield folder / name


def stored_checksums(directory: epath.Path) -> dict[str, dict] | None:
    """For a URL, ``{name relative to directory: {"size", "crc32c"}}`` of every object below it,
    from one listing: the store's own CRC32C, computed as each object was uploaded, so nothing
    is downloaded (checksumming a checkpoint by reading it back would download all of it at each
    save). None for a local path, or where the store reports no CRC32C (s3://)."""
    if not is_remote(directory):
        return None
    fs, root = fsspec.core.url_to_fs(os.fspath(directory))
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # TensorStore wrote these objects, not this client
    found = {}
    for path, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory":
            continue
        if not info.get("crc32c"):
            return None
        found[path[len(root) + 1 :]] = {"size": int(info["size"]), "crc32c": info["crc32c"]}
    return found


def file_size(path: epath.Path) -> int:
    return path.stat().length


def crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


class AppendFile:
    """A text file opened for appending, on any storage.

    A local path is appended to in place. An object cannot be appended to, so for a URL the file
    is kept in a local temporary copy (seeded with the object, if there is one: a resumed run
    goes on adding to it) and uploaded whole at each ``flush``: one object write, so a reader
    sees the previous or the new version, never a part."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._local: str | None = None
        if is_remote(path):
            # Removed at close, or when the process ends after an error that skipped the close.
            self._folder = tempfile.TemporaryDirectory(prefix="research-")
            self._local = os.path.join(self._folder.name, path.name)
            if path.exists():
                with path.open("rb") as remote, open(self._local, "wb") as local:
                    shutil.copyfileobj(remote, local)
            self._file = open(self._local, "a")
        else:
            self._file = open(path, "a")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self, upload: bool = True) -> None:
        """Flush the local file; for a URL, ``upload`` also copies it whole to the object."""
        self._file.flush()
        if self._local is not None and upload:
            write_with_retries(self.path, self._upload, keep=self._keep)

    def _upload(self) -> None:
        with open(self._local, "rb") as local, self.path.open("wb") as remote:
            shutil.copyfileobj(local, remote)

    def _keep(self) -> str:
        """A copy of the local file outside the temporary folder (removed at exit)."""
        kept = os.path.join(tempfile.mkdtemp(prefix="research-unsent-"), self.path.name)
        shutil.copy(self._local, kept)
        return kept

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
        if self._local is not None:
            self._folder.cleanup()
