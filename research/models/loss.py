"""The language-modelling loss: per-token cross-entropy in nats, with the optional z-loss.

Training (train/step.py) and evaluation (infer/evaluate.py) share it, so the two never drift.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy in nats, and the log-partition function (for the z-loss)."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked, log_z


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0):
    """Mean token cross-entropy (nats) and the total loss with the optional z-loss on logits."""
    losses, log_z = token_losses(logits, targets)
    ce = jnp.mean(losses)
    return ce + z_loss * jnp.mean(log_z**2), ce
