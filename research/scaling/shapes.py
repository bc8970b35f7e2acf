"""Model shapes for a target parameter count: the one documented rule sweeps use.

Rule (Kaplan et al. 2020 found loss nearly flat in the depth/width ratio over a wide range, so
one fixed aspect ratio is a fair way to grow a model):

- non-embedding parameters of a block are ~12 d^2 (attention 4 d^2, SwiGLU MLP 3 d x 8/3 d);
- depth grows as N^(1/3): ``n_layers = round((N / (12 a^2))^(1/3))`` with aspect ratio
  ``a = d_model / n_layers`` (default 32 for CPU-sized models, 64 for GPU-sized ones);
- width then solves 12 L d^2 = N, rounded to a multiple of ``head_dim`` (so heads = d / head_dim);
- the MLP keeps the SwiGLU default width (8/3 d rounded up to a multiple of 64).

The parameter count a run reports is always the exact one from ``count_params`` on the shape
chosen here, never the target.
"""

from __future__ import annotations

import dataclasses

from research.config import ConfigError, ModelConfig
from research.models.accounting import ModelSize, count_params


def shape_for_params(
    target: float,
    base: ModelConfig,
    aspect_ratio: float = 32.0,
    head_dim: int = 16,
    vocab_size: int | None = None,
) -> tuple[ModelConfig, ModelSize]:
    """A copy of ``base`` reshaped to about ``target`` non-embedding parameters, and its size."""
    if target <= 0:
        raise ConfigError(f"target parameter count must be positive, got {target}")
    if aspect_ratio <= 0 or head_dim <= 0:
        raise ConfigError("aspect_ratio and head_dim must be positive")
    n_layers = max(1, round((target / (12 * aspect_ratio**2)) ** (1 / 3)))
    width = (target / (12 * n_layers)) ** 0.5
    d_model = max(head_dim, head_dim * round(width / head_dim))
    cfg = dataclasses.replace(
        base,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // head_dim,
        n_kv_heads=0,
        head_dim=0,
        mlp_hidden=0,
        expert_hidden=0,
    ).resolved(vocab_size=vocab_size)
    return cfg, count_params(cfg)
