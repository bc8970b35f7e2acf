"""What a run ran on: code version, command, library versions, devices and mesh.

Saved beside the config (config.json) and shown in TensorBoard's Text tab, so that a curve can be
traced back to the commit, the command line and the machine that produced it.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax

# Distributions whose versions change numbers: the stack from the compiler up to checkpoints.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def git_state(path: Path | str | None = None) -> dict:
    """{"sha", "dirty"} of the git repository holding ``path`` (default: this package's code).

    ``dirty`` counts modified and untracked (not ignored) files: an uncommitted experiment file
    makes the commit alone insufficient to reproduce the run. Both are None outside a repository
    or without a ``git`` binary; this never raises, since metadata must not stop a run.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    if where.is_file():
        where = where.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(where), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"sha": sha.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_metadata(mesh_shape: dict[str, int] | None = None, code_path: Path | str | None = None):
    """Everything needed to say what produced a run, as a JSON-ready dict.

    ``mesh_shape``: the mesh's axis sizes (``dict(mesh.shape)``); ``code_path``: a file or folder
    in the repository whose commit matters (the experiment file), default this package.
    """
    device = jax.devices()[0]
    return {
        "git": git_state(code_path),
        "command": list(sys.argv),
        "versions": package_versions(),
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": jax.device_count(),
            "local_count": jax.local_device_count(),
        },
        "process_count": jax.process_count(),
        "mesh": dict(mesh_shape) if mesh_shape is not None else None,
        "host": platform.node(),
    }


def metadata_markdown(info: dict) -> str:
    """``run_metadata`` as a two-column Markdown table (TensorBoard's Text tab renders tables)."""
    rows = []

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, inner in value.items():
                add(f"{key}.{sub}" if key else sub, inner)
            return
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        text = "-" if value is None else str(value).replace("|", "\\|")
        rows.append(f"| {key} | `{text}` |")

    add("", info)
    return "\n".join(["| field | value |", "|---|---|", *rows])
