"""Orbax checkpoints: async, atomic, keep-last-K, checksummed, and never lost to a passing fault.

Each step saves the train state (params, optimizer state, step, RNG key) and the data iterator's
state. Orbax writes into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the latest. Once a save is durable we add a manifest of every
file's size and CRC32: orbax restores flipped bytes without complaint, so the manifest is what
proves a checkpoint corrupt.

Only a checkpoint proven corrupt (a file missing, truncated or changed against its manifest,
orbax's own corruption errors where there is no manifest, NaN/inf values) is set aside, and only
by training; eval and generate skip it and touch nothing. Any other failure (an I/O error, out of
memory, a version mismatch) stops with CheckpointReadError and leaves every file where it is.
A failed background save surfaces at the next step as CheckpointSaveError, naming the last
durable step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from research.config import ResearchError
from research.storage import (
    crc32,
    file_size,
    files_under,
    is_remote,
    run_path,
    stored_checksums,
    write_text_atomic,
)

log = logging.getLogger(__name__)

MANIFEST = "research_manifest.json"
# Messages of orbax / TensorStore that say the bytes on disk are wrong (not that reading failed).
_CORRUPTION_MARKERS = (
    "DATA_LOSS",
    "OUT_OF_RANGE",
    "Truncated",
    "not found in the checkpoint",
    'Error opening "zarr" driver',
    "checksum",
    "corrupt",
)


class _QuietOrbaxSaveErrors(logging.Filter):
    """Orbax logs each failed background write with a full traceback from every thread involved
    (hundreds of lines); Checkpointer.poll reports the failure once, with the fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return "orbax" not in record.pathname and "orbax" not in str(record.getMessage())


_quiet_orbax = _QuietOrbaxSaveErrors()


class CheckpointError(ResearchError):
    """A checkpoint that cannot be used as it is; the message says what to do."""


class CheckpointLayoutError(CheckpointError):
    """A readable checkpoint whose parameter tree is not this model's: not corruption, so it is
    reported instead of being moved aside."""


class CheckpointReadError(CheckpointError):
    """Reading failed for a reason other than proven corruption; nothing was moved."""


class CheckpointSaveError(CheckpointError):
    """A save did not become durable; the message names the last durable step."""


@dataclass
class Restored:
    step: int
    state: Any
    data_state: dict | None


class Checkpointer:
    """Saves and restores a run's checkpoints; ``read_only`` never writes or moves anything."""

    def __init__(
        self,
        directory: Path | str,
        keep: int = 3,
        use_async: bool = True,
        read_only: bool = False,
        on_durable: Callable[[int], None] | None = None,
        on_save: Callable[[int], None] | None = None,
    ):
        """``on_durable(step)`` is called once each save is known to be on disk for good;
        ``on_save(step)`` just before each save starts (orbax may finalise it any time after).
        ``directory``: a local path or a ``gs://`` URL (orbax 0.12.8 refuses ``s3://``)."""
        directory = run_path(directory)
        if not is_remote(directory):  # os.path: etils 1.12's PosixGPath has no .absolute()
            directory = run_path(os.path.abspath(directory))
        self.directory = directory
        self.on_durable, self.on_save = on_durable, on_save
        for logger in ("absl", "asyncio"):  # added once: a logger's filters are a set
            logging.getLogger(logger).addFilter(_quiet_orbax)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=use_async and not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.durable_step = self.manager.latest_step()
        self._pending: int | None = None

    # ---- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Start writing a checkpoint in the background (a previous failure is raised first)."""
        self.poll(block=True)  # orbax waits for the previous save anyway; surface its outcome
        if self.on_save:
            self.on_save(step)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )
        self._pending = step

    def poll(self, block: bool = False) -> int | None:
        """The step of a save that has just become durable, else None (nothing pending, or still
        writing without ``block``). A save that failed raises CheckpointSaveError."""
        if self._pending is None or (not block and self.manager.is_saving_in_progress()):
            return None
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.reload()
            failure = None if step in self.manager.all_steps() else "it was not finalised"
        except Exception as error:  # noqa: BLE001 - orbax re-raises the writer's own error
            failure = f"{type(error).__name__}: {str(error)[:300]}"
        if failure:
            raise CheckpointSaveError(
                f"saving checkpoint {step} to {self.directory} failed ({failure}). The last "
                f"durable checkpoint is step {self.durable_step}; free space or fix the storage, "
                "then re-run the same command to resume from it."
            )
        if jax.process_index() == 0:
            write_manifest(self.directory / str(step))
        self.durable_step = step
        if self.on_durable:
            self.on_durable(step)
        return step

    def close(self, quiet: bool = False) -> None:
        """Wait for the last save (raising if it failed, unless ``quiet``: the caller is already
        handling another error) and release orbax's threads."""
        try:
            self.poll(block=True)
        except CheckpointSaveError:
            if not quiet:
                raise  # after a failed save, closing orbax only adds its own tracebacks
            return
        self.manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # ---- restoring ----------------------------------------------------------------------------

    def restore_latest(self, abstract_state: Any, params_only: bool = False) -> Restored | None:
        """The newest usable checkpoint, or None if there is none.

        ``params_only`` reads just ``abstract_state["params"]`` (no optimizer moments allocated).
        Proven-corrupt checkpoints are set aside (training) or skipped (read-only); any other
        failure raises CheckpointReadError and changes nothing on disk.
        """
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            self._check_layout(step, abstract_state)
            step_dir = self.directory / str(step)
            problem = verify_manifest(step_dir)
            if problem is None:
                try:
                    restored = self._restore(step, abstract_state, params_only)
                except Exception as error:  # noqa: BLE001 - classified just below
                    if (step_dir / MANIFEST).exists() or not _is_corruption(error, step_dir):
                        raise CheckpointReadError(
                            f"could not read checkpoint {step} in {self.directory} "
                            f"({type(error).__name__}: {str(error)[:300]}). It is not known to be "
                            "corrupt, so nothing was moved; fix the cause (storage, memory, "
                            "versions) and re-run."
                        ) from error
                    problem = f"{type(error).__name__}: {str(error)[:200]}"
                else:
                    if _all_finite(restored.state):
                        return restored
                    problem = "it holds NaN or inf values"
            self._give_up_on(step, problem)
        return None

    def _restore(self, step: int, abstract_state: Any, params_only: bool) -> Restored:
        if params_only:
            item = {"params": abstract_state["params"]}
            state_args = ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
            restored = self.manager.restore(step, args=ocp.args.Composite(state=state_args))
            return Restored(step, restored.state, None)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return Restored(step, restored.state, dict(restored.data))

    def _give_up_on(self, step: int, problem: str) -> None:
        if self.read_only:
            print(
                f"warning: checkpoint {step} is corrupt ({problem}); skipped, trying the previous"
            )
            return
        aside = self._move_aside(step)
        log.warning("checkpoint %d is corrupt (%s); moved to %s", step, problem, aside)
        print(f"warning: checkpoint {step} is corrupt ({problem}); moved to {aside}")

    def _check_layout(self, step: int, abstract_state: Any) -> None:
        """Refuse a checkpoint whose parameters are laid out differently (model.scan_layers keeps
        the blocks stacked, ``stacked_blocks``; without it they are ``blocks/i``)."""
        try:
            with ocp.StandardCheckpointer() as reader:
                metadata = reader.metadata(self.directory / str(step) / "state").item_metadata
            saved, expected = set(metadata.tree["params"]), set(abstract_state["params"])
        except Exception:  # noqa: BLE001 - no metadata to compare: the restore decides
            return
        if saved == expected:
            return
        message = (
            f"checkpoint {step} in {self.directory} holds parameters {sorted(saved)}, this "
            f"model has {sorted(expected)}"
        )
        if {"blocks", "stacked_blocks"} & (saved ^ expected):
            was = "true" if "stacked_blocks" in saved else "false"
            message += (
                f". It was saved with model.scan_layers={was}: set model.scan_layers={was} "
                "to restore it, or convert the parameters with research.models.stack."
                "stack_layers / unstack_layers"
            )
        raise CheckpointLayoutError(message)

    def _move_aside(self, step: int):
        source = self.directory / str(step)
        target = self.directory.parent / "checkpoints_unreadable" / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmtree()
        source.rename(target)  # a local rename; on an object store a copy, then a delete
        self.manager.reload()
        return target


def write_manifest(step_dir: Path | str) -> None:
    """Record every file's size and CRC32 (atomically: a half-written manifest never exists).
    In a bucket, the size and CRC32C the store computed on upload (one listing, no download)."""
    step_dir = run_path(step_dir)
    ours = (MANIFEST, f".{MANIFEST}.tmp")
    stored = stored_checksums(step_dir)
    if stored is not None:
        files = {k: v for k, v in sorted(stored.items()) if k.split("/")[-1] not in ours}
    else:
        files = {
            str(path.relative_to(step_dir)): {"size": file_size(path), "crc32": crc32(path)}
            for path in sorted(files_under(step_dir))
            if path.name not in ours
        }
    write_text_atomic(step_dir / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_manifest(step_dir: Path | str) -> str | None:
    """What is wrong with a checkpoint's files against its manifest; None if nothing (or no
    manifest: checkpoints from before manifests, or a crash just after the save)."""
    step_dir = run_path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError):
        return "its manifest is unreadable"
    stored = None
    for name, expected in files.items():
        if "crc32c" in expected:  # written in a bucket: against the store's own checksums
            if stored is None:
                stored = stored_checksums(step_dir) or {}
            if name not in stored:
                return f"{name} is missing"
            size = stored[name]["size"]
            if size != expected["size"]:
                return f"{name} has {size} bytes, {expected['size']} were written"
            if stored[name]["crc32c"] != expected["crc32c"]:
                return f"{name} does not match its checksum"
            continue
        file = step_dir / name
        if not file.exists():
            return f"{name} is missing"
        size = file_size(file)
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written"
        if crc32(file) != expected["crc32"]:
            return f"{name} does not match its checksum"
    return None


def _is_corruption(error: BaseException, step_dir: Path) -> bool:
    """Without a manifest: does the error say the checkpoint's own bytes are bad or missing?
    I/O errors, memory and anything unrecognised are not proof."""
    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, (MemoryError, PermissionError)) for e in chain):
        return False
    if any(isinstance(e, OSError) and not isinstance(e, FileNotFoundError) for e in chain):
        return False
    if any(isinstance(e, json.JSONDecodeError) for e in chain):
        return True
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return step_dir.is_dir()  # a file gone from a checkpoint that is there
    text = " ".join(str(e) for e in chain)
    return any(marker in text for marker in _CORRUPTION_MARKERS)


def _all_finite(state: Any) -> bool:
    """Checked on device: only one boolean per array comes back to the host."""
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(jnp.isfinite(x).all()) for x in floats)
