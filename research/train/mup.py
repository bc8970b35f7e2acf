"""muP's per-layer learning rates for Adam (Yang et al. 2022, "Tensor Programs V", table 3).

With width multiplier m = d_model / mup_base_width, Adam's step on a hidden weight matrix (fan-in
growing with width) is scaled by 1/m, so its effect on the layer's output stays the same size
at every width; embeddings, the head, norms and biases keep the base LR (their fan-in is fixed;
the head's logits are divided by m in the model instead). Together with the init and output
multipliers in the model (research/models/), the LR tuned at the base width is the LR at
every width. Muon needs none of this: its orthogonalised step, scaled by sqrt(fan_out/fan_in),
already has a width-independent spectral size; so under ``optim.optimizer=muon`` only the AdamW
side (embeddings, head, vectors, the MoE router) is touched, and there the router is the only
hidden matrix.
"""

from __future__ import annotations

import jax
import optax

from research.train.muon import MATRIX_AXES

HIDDEN_MATRICES = (*MATRIX_AXES, "router")


def lr_multipliers(params, width_mult: float):
    """1 / width_mult for the hidden matrices, 1 for everything else."""

    def multiplier(path, _) -> float:
        name = str(getattr(path[-1], "key", getattr(path[-1], "idx", "")))
        return 1.0 / width_mult if name in HIDDEN_MATRICES else 1.0

    return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_hidden_updates(width_mult: float) -> optax.GradientTransformation:
    """Multiplies each update by its muP LR multiplier (after Adam and its weight decay, so the
    decay is scaled with the LR, as a per-group LR in PyTorch would)."""

    def scale(updates, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, lr_multipliers(updates, width_mult))

    return optax.stateless(scale)
