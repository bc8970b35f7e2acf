"""Supported versions: no deprecated API in our code path, and the lowest-versions CI pins agree
with the lower bounds that setup.cfg declares."""

import configparser
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _pytest_warning_filters() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["pytest"]["ini_options"]["filterwarnings"]


def _install_requires() -> list[Requirement]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = setup["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


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


# The suite already errors on our deprecations (pyproject); .ci/lowest.sh runs this one.
@pytest.mark.slow
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


def test_lowest_versions_pins_are_the_declared_lower_bounds():
    """.ci/lowest-constraints.txt pins every dependency at its setup.cfg lower bound, and every
    dependency has an upper bound below its next breaking release."""
    pins = {}
    for line in (REPO / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name] = spec.version
    for requirement in _install_requires():
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        upper = [s for s in requirement.specifier if s.operator == "<"]
        assert len(lower) == 1 and upper, f"{requirement}: needs one '>=' and one '<' bound"
        assert pins.get(requirement.name) == lower[0], (
            f"{requirement.name}: setup.cfg says >={lower[0]}, the lowest-versions job pins "
            f"{pins.get(requirement.name)}; make them agree"
        )
