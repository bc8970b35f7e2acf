"""Start a post-training run from another run's parameters (params only: no optimizer state),
or from an imported Hugging Face model folder (its weights and its tokenizer.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from research.config import ConfigError, ExperimentConfig, ModelConfig, load_run_config
from research.hf.load import is_hf_folder, load_hf, load_tokenizer, read_hf_config
from research.storage import run_path
from research.train.checkpoint import Checkpointer

# How this run computes, not what the model is: kept from the run's own config on an HF start.
RUNTIME_FIELDS = ("seq_len", "dropout", "attention", "remat", "param_dtype", "compute_dtype")


def hf_model_config(folder: str | Path, base: ModelConfig) -> ModelConfig:
    """The HF model's architecture, with ``base``'s runtime fields (RUNTIME_FIELDS)."""
    from research.hf.config_map import model_config_from_hf

    hf = model_config_from_hf(read_hf_config(Path(folder)), base.param_dtype, base.compute_dtype)
    return dataclasses.replace(hf, **{k: getattr(base, k) for k in RUNTIME_FIELDS})


def hf_start(cfg: ExperimentConfig, folder: str | Path) -> ExperimentConfig:
    """A copy of ``cfg`` that starts from the HF model in ``folder``: post.init_from set and
    model.* the HF architecture (this config's seq_len, dtypes and attention kept)."""
    out = ExperimentConfig.from_dict(cfg.to_dict())
    out.model = hf_model_config(folder, cfg.model)
    out.post.init_from = str(folder)
    return out


def post_tokenizer(cfg: ExperimentConfig, data_tokenizer):
    """The tokenizer post-training data is encoded with: an HF start's own tokenizer.json,
    else the run's (``data_tokenizer``, a callable: prepared data's tokenizer)."""
    folder = cfg.post.init_from
    if folder and is_hf_folder(folder):
        tokenizer = load_tokenizer(Path(folder), cfg.model.vocab_size)
        if tokenizer is None:
            raise ConfigError(
                f"post.init_from={folder} has no tokenizer.json: its token ids cannot be "
                "matched to text; add the tokenizer that came with the weights"
            )
        return tokenizer
    return data_tokenizer()


def _check_hf(cfg: ExperimentConfig, folder: str, what: str) -> None:
    if what != "post.init_from":
        raise ConfigError(
            f"{what}={folder} is a Hugging Face model folder; only post.init_from may be one "
            "(train or import it into a run folder first)"
        )
    mine, theirs = cfg.model, hf_model_config(folder, cfg.model).resolved()
    diff = [
        f"model.{k}={getattr(theirs, k)!r} (here {getattr(mine, k)!r})"
        for k in mine.__dataclass_fields__
        if getattr(mine, k) != getattr(theirs, k)
    ]
    if diff:
        raise ConfigError(
            f"post.init_from={folder} is another model than this config's: set "
            f"{'; '.join(diff[:6])}, or build the config with research.post.init.hf_start"
        )
    if cfg.train.eval_batches and cfg.train.eval_every:
        raise ConfigError(
            f"post.init_from={folder} brings its own tokenizer, but validation loss reads "
            "data.corpus with data.tokenizer's ids; set train.eval_batches=0 (post.eval_data's "
            "task accuracy uses the HF tokenizer)"
        )


def check_compatible(cfg: ExperimentConfig, other_dir: str, what: str) -> ExperimentConfig | None:
    """The other run's config, if it reads the same tokens as ``cfg`` (same data settings);
    None for an HF folder whose architecture is ``cfg``'s model."""
    if is_hf_folder(other_dir):
        _check_hf(cfg, other_dir, what)
        return None
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
    shardings (an HF folder: its imported weights); a run of another model shape is an error
    naming the differences."""
    other = check_compatible(cfg, run_dir, what)
    if other is None:  # an HF folder of this architecture (checked)
        hf = load_hf(run_dir, param_dtype=cfg.model.param_dtype)
        return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), hf.params, abstract_params)
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
    checkpointer = Checkpointer(run_path(run_dir) / "checkpoints", read_only=True)
    restored = checkpointer.restore_latest({"params": abstract_params}, params_only=True)
    checkpointer.close()
    if restored is None:
        raise ConfigError(f"{what}={run_dir} has no readable checkpoint; train it first")
    return restored.state["params"]
