"""Start a post-training run from another run's parameters (params only: no optimizer state)."""

from __future__ import annotations

from pathlib import Path

from research.config import ConfigError, ExperimentConfig, load_run_config
from research.train.checkpoint import Checkpointer


def check_compatible(cfg: ExperimentConfig, other_dir: str, what: str) -> ExperimentConfig:
    """The other run's config, if it reads the same tokens as ``cfg`` (same data settings)."""
    other = load_run_config(other_dir)
    if other.data != cfg.data:
        raise ConfigError(
            f"{what} {other_dir} was trained on other data or another tokenizer "
            f"({other.data} vs this run's {cfg.data}); its token ids would mean other things. "
            f"Use the same data.* settings as {other_dir}."
        )
    return other


def load_params(cfg: ExperimentConfig, run_dir: str, abstract_params, what: str = "post.init_from"):
    """The newest parameters of ``run_dir`` restored into ``abstract_params``' shapes and
    shardings; a run of another model shape is an error naming the differences."""
    other = check_compatible(cfg, run_dir, what)
    mine, theirs = cfg.model, other.model.resolved(vocab_size=cfg.model.vocab_size)
    if mine != theirs:
        diff = [
            f"model.{k}: {getattr(theirs, k)!r} there, {getattr(mine, k)!r} here"
            for k in mine.__dataclass_fields__
            if getattr(mine, k) != getattr(theirs, k)
        ]
        raise ConfigError(
            f"{what}={run_dir} holds another model ({'; '.join(diff[:5])}); set the same "
            "model.* values as that run"
        )
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", read_only=True)
    restored = checkpointer.restore_latest({"params": abstract_params}, params_only=True)
    checkpointer.close()
    if restored is None:
        raise ConfigError(f"{what}={run_dir} has no readable checkpoint; train it first")
    return restored.state["params"]
