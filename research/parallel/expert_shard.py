"""Dropless MoE dispatch run per shard: each device sorts and multiplies only its own tokens.

XLA does not partition a sort or a ``ragged_dot`` over the batch, so a dropless MoE written
over the global batch makes every device dispatch every routed row (Mixtral-8x7B on v6e-256:
347 GiB of temporaries per chip). Here the dispatch runs under ``jax.shard_map`` over the
context mesh, on each device's block:
- tokens are split like the batch (``data``, ``fsdp``, ``expert``);
- expert weights keep their ``expert`` and ``tensor`` (``mlp``) split; FSDP's ``embed`` split is
  gathered on the way in (what FSDP does for every layer) and reduce-scattered on the way back;
- expert parallelism with local experts: the tokens of the devices in an ``expert`` group are
  gathered, each device runs them through its own experts only (other assignments are dropped
  locally), and a reduce-scatter sums the groups' partial outputs back onto each device's rows;
- tensor parallelism as in Megatron's MLP: each device holds a slice of every expert's hidden
  units, and the partial outputs are summed (``psum`` over ``tensor``).
Temporaries then scale with the local batch (times the expert-group size), not the global one.
Off a mesh, or on one device, the local function runs on everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from research.parallel.mesh import ACTIVATION_RULES, LOGICAL_RULES, _spec

# fn(tokens [b, t, d], experts [b, t, k], weights [b, t, k], (w_gate, w_up, w_down), first
# expert held) -> [b, t, d]: the dropless MoE of the given experts; assignments to experts
# outside [first, first + len(w_gate)) contribute nothing.
LocalDropless = Callable[..., jax.Array]


def _axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return tuple(spec_entry) if isinstance(spec_entry, tuple) else (spec_entry,)


def sharded_dropless(
    fn: LocalDropless,
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    expert_weights: tuple[jax.Array, jax.Array, jax.Array],
) -> jax.Array:
    """``fn`` applied per shard of the context mesh (see the module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return fn(x, experts, weights, expert_weights, 0)
    sizes = dict(mesh.shape)
    token_spec = _spec(("batch", "seq", None), x.shape, sizes, ACTIVATION_RULES)
    w_gate, w_up, w_down = expert_weights
    up_spec = _spec(("expert", None, "mlp"), w_gate.shape, sizes, LOGICAL_RULES)
    down_spec = _spec(("expert", "mlp", None), w_down.shape, sizes, LOGICAL_RULES)
    token_axes = _axes(token_spec[0])
    expert_axes = _axes(up_spec[0])  # () or ("expert",)
    tensor_axes = _axes(up_spec[2])
    n_local = w_gate.shape[0] // math.prod(sizes[a] for a in expert_axes)

    def local(x, experts, weights, w_gate, w_up, w_down):
        gathered = [a for a in expert_axes if a in token_axes]
        if gathered:  # every device of an expert group sees the group's tokens
            x, experts, weights = (
                jax.lax.all_gather(a, gathered[0], axis=0, tiled=True)
                for a in (x, experts, weights)
            )
        first = jax.lax.axis_index(expert_axes[0]) * n_local if expert_axes else 0
        out = fn(x, experts, weights, (w_gate, w_up, w_down), first)
        if tensor_axes:  # each device summed over its slice of the hidden units
            out = jax.lax.psum(out, tensor_axes)
        if gathered:  # sum the experts' partial outputs, each device keeping its own rows
            out = jax.lax.psum_scatter(out, gathered[0], scatter_dimension=0, tiled=True)
        elif expert_axes:  # tokens replicated over the expert axis: sum in place
            out = jax.lax.psum(out, expert_axes)
        return out

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, up_spec, up_spec, down_spec),
        out_specs=token_spec,
    )(x, experts, weights, w_gate, w_up, w_down)
