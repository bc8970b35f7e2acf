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


def cross_entropy(
    logits: jax.Array, targets: jax.Array, z_loss: float = 0.0, weights: jax.Array | None = None
):
    """Mean token cross-entropy (nats) and the total loss with the optional z-loss on logits.

    ``weights`` (same shape as targets, 0 or 1): which targets count, e.g. not the padding of
    a packed sequence nor the first token of the next document; the mean is over those."""
    losses, log_z = token_losses(logits, targets)
    if weights is None:
        return jnp.mean(losses) + z_loss * jnp.mean(log_z**2), jnp.mean(losses)
    weights = weights.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    ce = jnp.sum(losses * weights) / count
    return ce + z_loss * jnp.sum(log_z**2 * weights) / count, ce


def packed_targets(batch) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """(inputs, targets, input segment ids, target weights) of a batch of sequences [..., T+1].

    A batch is a token array, or a dict of ``tokens`` and ``segment_ids`` (packed documents,
    segment 0 = padding): then a target counts only when it continues its input's document."""
    if not isinstance(batch, dict):
        return batch[..., :-1], batch[..., 1:], None, None
    tokens, segments = batch["tokens"], batch["segment_ids"]
    inputs_seg, targets_seg = segments[..., :-1], segments[..., 1:]
    weights = (inputs_seg == targets_seg) & (targets_seg > 0)
    return tokens[..., :-1], tokens[..., 1:], inputs_seg, weights
