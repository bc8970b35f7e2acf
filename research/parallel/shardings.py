"""Shardings of the train state: optimizer moments live where their parameters live (FSDP shards
them too); scalars such as step counts are replicated."""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
    """The sharding of every leaf of ``tx.init(params)``, for ``jax.jit(out_shardings=...)``.

    Without it the jitted init picks its own layout (replicated), and the jitted step keeps
    it: the Adam moments, twice the parameters, would sit whole on every device."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: replicated,
    )
