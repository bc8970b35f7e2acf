"""Supported versions: no deprecated API in our code path."""

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest_warning_filters() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["pytest"]["ini_options"]["filterwarnings"]


# Applies pytest's `filterwarnings` (action:message:category:module) the way pytest reads the ini
# (message and module are regexes, later entries win), then trains the tiny model for two steps
# through the CLI: import, data, model, jitted step, eval, checkpoint, TensorBoard, sampling.
_TRAIN_WITH_FILTERS = textwrap.dedent(
    """
    import builtins, sys, warnings

    for spec in {filters!r}:
        action, message, category, module, lineno = (spec.split(":") + [""] * 4)[:5]
        warnings.filterwarnings(
            action, message, getattr(builtins, category or "Warning"), module, int(lineno or 0)
        )
    from research.cli import main

    sys.exit(main(["train", "tiny", "--set", "train.run_dir={run_dir}", "--set",
                   "train.steps=2", "--set", "train.eval_every=2", "--set",
                   "train.checkpoint_every=2", "--set", "log.progress=false"]))
    """
)


def test_a_tiny_training_run_calls_no_deprecated_api(tmp_path):
    """In a fresh interpreter, since a process warns once per call site and jit traces once: a
    warning raised while importing or tracing in an earlier test would not be raised again."""
    code = _TRAIN_WITH_FILTERS.format(filters=_pytest_warning_filters(), run_dir=tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "2").exists()
