"""``research train --restart``: set the previous run's files aside (``NAME.before-restart-STAMP``,
never deleted) before a fresh start, safely on local disk and on an object store.

Locally each item is one atomic rename. An object store has no rename: moving a folder is a
copy of each object and then a delete of each, so a kill in the middle left parts of the old run
under both names (or some old checkpoints in place), and the next command resumed from, or set
aside again, a half-moved run. So the moves are journaled: ``restart-in-progress.json`` lists
every move and is written first (one atomic write); each item is then copied, checked against
its source by listing (size and the store's CRC32C), and only then deleted; the journal goes
last. Every step is safe to repeat, and the next ``train`` on the run directory (with or without
``--restart``) finishes a journal it finds before it reads a checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import fsspec
import jax
from etils import epath

from research.storage import StorageError, is_remote, write_text_atomic, write_with_retries

JOURNAL = "restart-in-progress.json"
ITEMS = ("checkpoints", "metrics.jsonl", "tensorboard", "ledger.json", "memory.json")
EVENTS = "events.out.tfevents.*"  # TensorBoard event files in the run directory itself


def prepare_run_dir(run_dir: epath.Path, restart: bool) -> None:
    """Finish a --restart that was interrupted, then, with ``restart``, set the run aside.
    Process 0 moves; every process waits for it before reading checkpoints."""
    if jax.process_index() == 0:
        if (run_dir / JOURNAL).exists():
            print(f"restart: finishing the interrupted --restart of {run_dir}")
            _apply(run_dir, json.loads((run_dir / JOURNAL).read_text())["moves"])
        if restart:
            set_aside(run_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("research-restart")


def set_aside(run_dir: epath.Path) -> None:
    """Move the previous run's checkpoints, logs, ledger and events under kept names."""
    moves = _plan(run_dir)
    if moves:
        _apply(run_dir, moves)


def _plan(run_dir: epath.Path) -> list[tuple[str, str]]:
    """``[(name, kept name)]`` relative to ``run_dir``, under a stamp no existing name uses."""
    base = time.strftime("%Y%m%d-%H%M%S")
    names = [name for name in ITEMS if (run_dir / name).exists()]
    events = sorted(path.name for path in run_dir.glob(EVENTS))
    for attempt in range(1, 1000):
        stamp = base if attempt == 1 else f"{base}-{attempt}"
        moves = [(name, _kept(name, stamp)) for name in names]
        moves += [(name, f"tensorboard.before-restart-{stamp}/{name}") for name in events]
        if not any((run_dir / kept.split("/")[0]).exists() for _, kept in moves):
            return moves
    raise StorageError(f"{run_dir}: too many runs set aside at {base}; remove some")


def _kept(name: str, stamp: str) -> str:
    stem, dot, suffix = name.partition(".")
    return f"{stem}.before-restart-{stamp}{dot}{suffix}"


def _apply(run_dir: epath.Path, moves: list) -> None:
    """Write the journal, make each move, remove the journal; safe to call again after a kill."""
    write_text_atomic(run_dir / JOURNAL, json.dumps({"moves": moves}, indent=1))
    for name, kept in moves:
        if _move(run_dir, name, kept) and "/" not in kept:
            print(f"restart: kept the previous {name} as {kept}")
    if any("/" in kept for _, kept in moves):
        print(f"restart: kept the previous TensorBoard events in {moves[-1][1].split('/')[0]}")
    (run_dir / JOURNAL).unlink()


def _move(run_dir: epath.Path, name: str, kept: str) -> bool:
    """Move one item (a file or a folder); False if it is gone already (moved before a kill)."""
    source, target = run_dir / name, run_dir / kept
    if not is_remote(run_dir):
        if not source.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)  # atomic, file or folder
        return True
    fs, source_key = fsspec.core.url_to_fs(os.fspath(source))
    target_key = fs._strip_protocol(os.fspath(target))
    fs.invalidate_cache()  # TensorStore wrote the checkpoints, not this client
    objects = fs.find(source_key)
    if not objects:
        return False
    pairs = [(key, target_key + key[len(source_key) :]) for key in objects]
    for key, copy in pairs:  # server-side copies; each is one whole object, safe to repeat
        write_with_retries(
            epath.Path(fs.unstrip_protocol(copy)), lambda k=key, c=copy: fs.copy(k, c)
        )
    fs.invalidate_cache()
    for key, copy in pairs:  # nothing is deleted until every copy is proven whole
        if not _same_object(fs.info(key), fs.info(copy)):
            raise StorageError(
                f"--restart: the copy of {key} at {copy} differs from it; nothing was deleted. "
                "Re-run the same command to copy it again"
            )
    fs.rm(source_key, recursive=True)  # what was listed, every object of it copied
    return True


def _same_object(source: dict, copy: dict) -> bool:
    if source.get("size") != copy.get("size"):
        return False
    crc = source.get("crc32c")
    return crc is None or crc == copy.get("crc32c")
