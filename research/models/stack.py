"""Running the stack of blocks for training: per-block rematerialisation and scan over layers.

- ``remat``: ``none`` keeps every activation for the backward pass; ``full`` keeps only each
  block's input and recomputes the block; ``save-dots`` keeps the outputs of matmuls against
  weights (projections, MLP) and recomputes the cheap element-wise ops and attention scores.
  It does not change the parameter tree.
- ``scan_layers``: the model keeps its blocks' parameters stacked, a leading ``layers`` axis on
  every array, and one compiled block runs under ``jax.lax.scan`` over them. The parameter tree
  differs from the unrolled model's: ``stacked_blocks/j`` instead of ``blocks/i``.
  ``stack_layers`` / ``unstack_layers`` convert between the two (checkpoints, comparisons).
  With MoE every ``moe_every``-th layer differs, so there are ``moe_every`` stacks
  (``stacked_blocks/j`` holds layers j, j + moe_every, ...), the scan runs over groups of
  ``moe_every`` layers and unrolls inside a group. The parameters are stacked once at init,
  not inside every step, so the scan saves compile time instead of adding copies (compile
  times: benchmarks/parallel_memory.py and the README).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from research.parallel.mesh import constrain

if TYPE_CHECKING:
    from research.config import ModelConfig

REMAT_POLICIES = {
    "full": None,  # jax.checkpoint without a policy saves nothing but the inputs
    "save-dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

BOUNDARY_AXES = ("batch", "seq", "embed")  # activations between blocks
LAYER_AXIS = "layers"  # the logical axis of a stacked parameter's leading dimension


def layer_period(cfg: ModelConfig) -> int:
    """How many different block structures repeat along the depth (moe_every for MoE, else 1)."""
    return cfg.moe_every if cfg.n_experts else 1


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose variables are the modules' stacked along a new
    leading axis, with logical axis ``layers`` (unsharded) prepended to their axes."""
    graphdef = nnx.graphdef(modules[0])

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = variables[0].get_metadata().get("logical_axes") or (None,) * variables[0].ndim
        value = jnp.stack([v[...] for v in variables])
        return variables[0].replace(value, logical_axes=(LAYER_AXIS, *axes))

    states = [nnx.state(m) for m in modules]
    return nnx.merge(
        graphdef,
        jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)),
    )


def layer_of(stacked: Sequence[nnx.Module], index: int) -> nnx.Module:
    """Layer ``index`` of a stacked model as a plain block (its slice of the stacked state)."""
    period = len(stacked)
    graphdef, state = nnx.split(stacked[index % period])
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index // period], state))


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Parameters (a pure dict, as ``nnx.to_pure_dict`` gives) of the unrolled model, in the
    layout of the same model with ``scan_layers=true``."""
    if "blocks" not in params:
        raise ValueError("stack_layers takes the unrolled layout (a 'blocks' entry)")
    period = layer_period(cfg)
    blocks = params["blocks"]
    n_groups = len(blocks) // period
    stacked = {
        j: jax.tree.map(
            lambda *leaves: jnp.stack(leaves), *[blocks[g * period + j] for g in range(n_groups)]
        )
        for j in range(period)
    }
    rest = {k: v for k, v in params.items() if k != "blocks"}
    return {**rest, "stacked_blocks": stacked}


def unstack_layers(params: dict) -> dict:
    """The inverse of ``stack_layers``: the unrolled model's layout (``blocks/i``)."""
    if "stacked_blocks" not in params:
        raise ValueError("unstack_layers takes the scan_layers layout (a 'stacked_blocks' entry)")
    stacked = params["stacked_blocks"]
    period = len(stacked)
    n_groups = jax.tree.leaves(stacked[0])[0].shape[0]
    blocks = {
        g * period + j: jax.tree.map(lambda a, g=g: a[g], stacked[j])
        for g in range(n_groups)
        for j in range(period)
    }
    rest = {k: v for k, v in params.items() if k != "stacked_blocks"}
    return {**rest, "blocks": dict(sorted(blocks.items()))}


def block_function(block: nnx.Module, remat: str, batch_shards: int) -> Callable:
    """A pure function (block state, x, positions, rope, key, segment ids) -> (x, router stats
    or None)."""
    graphdef = nnx.graphdef(block)

    def apply(state, x, positions, rope, key, segment_ids):
        block = nnx.merge(graphdef, state)
        x, _, aux = block(x, positions, rope, None, key, batch_shards, segment_ids)
        return constrain(x, BOUNDARY_AXES), aux

    if remat == "none":
        return apply
    return jax.checkpoint(apply, policy=REMAT_POLICIES[remat])


def run_blocks(
    blocks: Sequence[nnx.Module],
    cfg: ModelConfig,
    x: jax.Array,
    positions: jax.Array,
    rope,
    dropout_key,
    batch_shards: int,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, list[dict]]:
    """x through every block; returns x and the MoE router statistics in layer order.

    ``blocks``: the model's blocks, or with ``cfg.scan_layers`` its ``moe_every`` stacks."""
    x = constrain(x, BOUNDARY_AXES)
    period = layer_period(cfg)
    functions = [block_function(blocks[j], cfg.remat, batch_shards) for j in range(period)]

    def key_for(layer):
        return None if dropout_key is None else jax.random.fold_in(dropout_key, layer)

    if not cfg.scan_layers:
        stats = []
        for i, block in enumerate(blocks):
            state = nnx.state(block)
            x, aux = functions[i % period](state, x, positions, rope, key_for(i), segment_ids)
            if aux is not None:
                stats.append(aux)
        return x, stats

    n_groups = cfg.n_layers // period
    stacked = [nnx.state(blocks[j]) for j in range(period)]  # already stacked: no copy here

    def body(x, inputs):
        states, group = inputs
        auxes = []
        for j in range(period):
            key = key_for(group * period + j)
            x, aux = functions[j](states[j], x, positions, rope, key, segment_ids)
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
