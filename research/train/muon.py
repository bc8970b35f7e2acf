"""Muon for the weight matrices, AdamW for everything else (embeddings, head, norms, biases).

Muon (Jordan et al. 2024, the modded-nanogpt speedruns) replaces a matrix's momentum by its
nearest semi-orthogonal matrix (a Newton-Schulz iteration) before the step, so every direction
of the matrix moves at the same rate. It is defined for matrices ``x @ W``; embeddings (a
lookup, not a product), the output head and vectors stay on AdamW, as in the speedruns.

Our attention weights are 3-D (``wq`` [d, heads, head_dim], ``wo`` [heads, head_dim, d]); Muon
must see the matrix the layer applies, [d, heads * head_dim] and [heads * head_dim, d], not
one matrix per head. ``optax.contrib.MuonDimensionNumbers`` says which axes are the reduction
(input) and output ones; every other axis (the stacked ``layers`` axis of ``scan_layers``, the
``expert`` axis of MoE) is a batch axis, orthogonalised independently. Axes are counted from
the end so the same rule fits stacked and unstacked layouts.

Sharding: the iteration is matmuls on the (sharded) momentum inside the jitted step, so XLA
partitions them with the collectives they need and the result equals the unsharded one
(tests/test_optimizer.py checks that on 8 devices).
"""

from __future__ import annotations

import jax
import optax
from optax.contrib import MuonDimensionNumbers

# Leaf name -> (reduction axes, output axes), counted from the end.
MATRIX_AXES: dict[str, MuonDimensionNumbers] = {
    "wq": MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "wk": MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "wv": MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "wo": MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1),
    "w_gate": MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
    "w_up": MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
    "w_down": MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
}


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", getattr(path[-1], "idx", "")))


def dimension_numbers(params):
    """Muon's view of each parameter: its MuonDimensionNumbers, or None (it stays on AdamW).

    The MoE router [d, experts] stays on AdamW: it is tiny and its logits' scale matters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: MATRIX_AXES.get(_leaf_name(path)), params
    )


def is_muon_param(params):
    """True for the leaves Muon updates (the labels ``make_muon`` partitions on)."""
    return jax.tree.map(
        lambda d: d is not None,
        dimension_numbers(params),
        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
    )


def make_muon(
    muon_schedule: optax.Schedule,
    adamw: optax.GradientTransformation,
    momentum: float,
    weight_decay: float,
    group_matrices: bool = False,
) -> optax.GradientTransformation:
    """optax.contrib.muon on the matrices, ``adamw`` (with its own schedule and decay mask)
    on the rest.

    optax.contrib.muon would also run its own Adam on the non-matrix leaves, but with one
    Nesterov flag and eps for both and no decay mask; so the split is ours (``optax.partition``)
    and optax's muon only ever sees matrices (its internal Adam gets an empty tree).
    ``group_matrices``: orthogonalise same-shape matrices as one batch (research/train/
    muon_groups.py), split over the data-parallel replicas."""

    def labels(params):
        return jax.tree.map(lambda m: "muon" if m else "adam", is_muon_param(params))

    if group_matrices:  # the same update, same-shape matrices batched (muon_groups.py)
        from research.train.muon_groups import grouped_muon_direction

        muon = optax.chain(
            grouped_muon_direction(dimension_numbers, momentum),
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(muon_schedule),
        )
        return optax.partition({"muon": muon, "adam": adamw}, labels)
    muon = optax.contrib.muon(
        learning_rate=muon_schedule,
        beta=momentum,
        weight_decay=weight_decay,
        nesterov=True,
        muon_weight_dimension_numbers=dimension_numbers,
    )
    return optax.partition({"muon": muon, "adam": adamw}, labels)
