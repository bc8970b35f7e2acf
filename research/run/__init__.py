"""Runs assembled once: the Run builder, the standard hooks and `train`."""

from research.run.builder import Run, build_run, load_run_config, resolve_config
from research.run.training import TrainResult, train

__all__ = ["Run", "TrainResult", "build_run", "load_run_config", "resolve_config", "train"]
