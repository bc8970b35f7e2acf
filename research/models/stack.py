"""Running the stack of blocks for training: per-block rematerialisation and scan over layers.

Both keep the parameter tree exactly as the unrolled model has it (``blocks/0``, ``blocks/1``,
...), so checkpoints, sharding rules and optimizer state do not depend on these switches.

- ``remat``: ``none`` keeps every activation for the backward pass; ``full`` keeps only each
  block's input and recomputes the block; ``save-dots`` keeps the outputs of matmuls against
  weights (projections, MLP) and recomputes the cheap element-wise ops and attention scores.
- ``scan_layers``: the blocks' parameters are stacked inside the jitted step and one compiled
  block runs under ``jax.lax.scan``. The program is ~4.5x smaller, but stacking (and slicing
  the gradients apart) inside every step costs more compile time than the scan saves on CPU
  (benchmarks/parallel_memory.py); keeping parameters stacked would fix that. With MoE every
  ``moe_every``-th layer differs, so the scan runs over groups of ``moe_every`` layers (each
  group the same structure) and unrolls inside a group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.parallel.mesh import constrain

REMAT_POLICIES = {
    "full": None,  # jax.checkpoint without a policy saves nothing but the inputs
    "save-dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

BOUNDARY_AXES = ("batch", "seq", "embed")  # activations between blocks


def block_function(block: nnx.Module, remat: str, moe_groups: int) -> Callable:
    """A pure function (block state, x, positions, rope, key) -> (x, router stats or None)."""
    graphdef = nnx.graphdef(block)

    def apply(state, x, positions, rope, key):
        x, _, aux = nnx.merge(graphdef, state)(x, positions, rope, None, key, moe_groups)
        return constrain(x, BOUNDARY_AXES), aux

    if remat == "none":
        return apply
    return jax.checkpoint(apply, policy=REMAT_POLICIES[remat])


def run_blocks(
    blocks: Sequence[nnx.Module],
    cfg,
    x: jax.Array,
    positions: jax.Array,
    rope,
    dropout_key,
    moe_groups: int,
) -> tuple[jax.Array, list[dict]]:
    """x through every block; returns x and the MoE router statistics in layer order."""
    x = constrain(x, BOUNDARY_AXES)
    period = cfg.moe_every if cfg.n_experts else 1
    functions = [block_function(blocks[j], cfg.remat, moe_groups) for j in range(period)]

    def key_for(layer):
        return None if dropout_key is None else jax.random.fold_in(dropout_key, layer)

    if not cfg.scan_layers:
        stats = []
        for i, block in enumerate(blocks):
            x, aux = functions[i % period](nnx.state(block), x, positions, rope, key_for(i))
            if aux is not None:
                stats.append(aux)
        return x, stats

    n_groups = len(blocks) // period
    # stacked[j]: the states of layers j, j + period, j + 2 * period, ... with a leading axis.
    stacked = [
        jax.tree.map(
            lambda *leaves: jnp.stack(leaves),
            *[nnx.state(blocks[g * period + j]) for g in range(n_groups)],
        )
        for j in range(period)
    ]

    def body(x, inputs):
        states, group = inputs
        auxes = []
        for j in range(period):
            x, aux = functions[j](states[j], x, positions, rope, key_for(group * period + j))
            auxes.append(aux)
        return x, auxes

    x, auxes = jax.lax.scan(body, x, (stacked, jnp.arange(n_groups)))
    by_layer = [
        (g * period + j, jax.tree.map(lambda a, g=g: a[g], aux))
        for j, aux in enumerate(auxes)
        if aux is not None
        for g in range(n_groups)
    ]
    return x, [aux for _, aux in sorted(by_layer, key=lambda item: item[0])]
