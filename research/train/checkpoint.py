"""Orbax checkpoints: async, atomic, keep-last-K, and a fallback past unreadable ones.

Each step saves the train state (params, optimizer state, step, RNG key) and the data iterator's
state. Orbax writes into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the latest. If the newest one is unreadable anyway (a disk
error, a truncated copy), it is moved aside, never deleted, and the one before it is used.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointLayoutError(ValueError):
    """A readable checkpoint whose parameter tree is not this model's: not corruption, so it is
    reported instead of being moved aside."""


class Checkpointer:
    def __init__(self, directory: Path, keep: int, use_async: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest readable checkpoint as (step, state, data_state); None if there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            self._check_layout(step, abstract_state)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
                _check_finite(restored.state)
                return step, restored.state, dict(restored.data)
            except Exception as error:  # noqa: BLE001 - any failure means "unreadable"
                aside = self._move_aside(step)
                log.warning(
                    "checkpoint at step %d is unreadable (%s: %s); moved it to %s and falling "
                    "back to the previous one",
                    step,
                    type(error).__name__,
                    str(error)[:200],
                    aside,
                )
                print(
                    f"warning: checkpoint {step} is unreadable ({type(error).__name__}); "
                    f"moved to {aside}, trying the previous one"
                )
        return None

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

    def _move_aside(self, step: int) -> Path:
        source = self.directory / str(step)
        target = self.directory.parent / "checkpoints_unreadable" / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(source), str(target))
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_finite(state: Any) -> None:
    """Checked on device: only one boolean per array comes back to the host."""
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    if floats and not all(bool(jnp.isfinite(x).all()) for x in floats):
        raise ValueError("restored values contain NaN or inf")
