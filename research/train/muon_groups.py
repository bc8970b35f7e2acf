"""Muon with same-shape matrices orthogonalised together (``optim.muon_group_matrices``).

optax.contrib.muon runs the Newton-Schulz iteration leaf by leaf: at the quickstart's size
that is 24 chains of small matmuls (128 x 128 and 128 x 512), which XLA's CPU backend runs far
below its speed on bigger ones. Here every Muon matrix is laid out as optax does it
([batch, reduction, output], research/train/muon.py's dimension numbers), matrices of one shape
are concatenated into one batch, and optax's own ``scale_by_muon`` (momentum, Nesterov,
Newton-Schulz, per matrix) runs once per group; the results are cut back into the leaves.
Each matrix is still orthogonalised on its own, so the update is optax.contrib.muon's
(tests/test_optimizer.py compares them), only the float order of the matmuls differs.

On a mesh with a ``data`` axis, each group's batch is split over it when it divides: every
data-parallel replica orthogonalises its share of whole matrices (no communication inside the
iteration) and the results are gathered, instead of every replica doing all of them. The
matrix dims are left to XLA, so an fsdp/tensor split of the parameters carries over.

The optimizer state keeps optax's per-leaf layout (``MuonState`` with the momentum shaped like
the parameters), so shardings, checkpoints and ``optax.tree_map_params`` see the usual tree.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

# Each group is [matrices, reduction, output].
_STACKED = MuonDimensionNumbers(reduction_axis=1, output_axis=2)


def _axes(spec, ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in ((spec,) if isinstance(spec, int) else spec))


def _layout(shape: tuple[int, ...], dims: MuonDimensionNumbers):
    """(the transpose to [batch..., reduction..., output...], its [batch, red, out] shape)."""
    ndim = len(shape)
    red, out = _axes(dims.reduction_axis, ndim), _axes(dims.output_axis, ndim)
    batch = tuple(a for a in range(ndim) if a not in red + out)
    order = batch + red + out
    sizes = [math.prod(shape[a] for a in axes) for axes in (batch, red, out)]
    return order, tuple(sizes)


def _split_over_data(x: jax.Array) -> jax.Array:
    """Split a group's matrices over the ``data`` mesh axis where it divides them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return x
    ways = dict(mesh.shape)["data"]
    if ways == 1 or x.shape[0] % ways:
        return x
    # The matrix dims stay as XLA lays them out (fsdp/tensor splits, where there are any).
    free = PartitionSpec.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(x, PartitionSpec("data", free, free))


def grouped_muon_direction(
    dimension_numbers, beta: float, nesterov: bool = True
) -> optax.GradientTransformation:
    """Muon's orthogonalised momentum, width-scaled as optax.contrib.muon does
    (sqrt(max(1, fan_out / fan_in))), computed one group of same-shape matrices at a time.
    ``dimension_numbers(params)``: each leaf's MuonDimensionNumbers (every leaf is a matrix)."""
    inner = optax.contrib.scale_by_muon(
        beta=beta,
        nesterov=nesterov,
        weight_dimension_numbers=lambda groups: {key: _STACKED for key in groups},
    )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        dims = treedef.flatten_up_to(dimension_numbers(updates))
        mus = treedef.flatten_up_to(state.mu)
        layouts = [_layout(x.shape, d) for x, d in zip(leaves, dims, strict=True)]
        groups: dict[tuple, list[int]] = {}
        for i, (x, (_, (_, red, out))) in enumerate(zip(leaves, layouts, strict=True)):
            groups.setdefault((red, out, str(x.dtype)), []).append(i)

        def stack(arrays):
            return {
                f"{red}x{out}x{dtype}": _split_over_data(
                    jnp.concatenate(
                        [arrays[i].transpose(layouts[i][0]).reshape(layouts[i][1]) for i in members]
                    )
                )
                for (red, out, dtype), members in groups.items()
            }

        stacked_mu = stack(mus)
        direction, new = inner.update(stack(leaves), state._replace(mu=stacked_mu))

        def unstack(stacked):
            flat = [None] * len(leaves)
            for (red, out, dtype), members in groups.items():
                group = stacked[f"{red}x{out}x{dtype}"]
                ends = list(itertools.accumulate(layouts[i][1][0] for i in members))
                parts = jnp.split(group, ends[:-1])
                for i, part in zip(members, parts, strict=True):
                    order, _ = layouts[i]
                    shape = tuple(leaves[i].shape[a] for a in order)
                    inverse = tuple(sorted(range(len(order)), key=lambda k: order[k]))
                    flat[i] = part.reshape(shape).transpose(inverse)
            return treedef.unflatten(flat)

        scale = {
            f"{red}x{out}x{dtype}": math.sqrt(max(1.0, out / red)) for (red, out, dtype) in groups
        }
        direction = {key: value * scale[key] for key, value in direction.items()}
        return unstack(direction), new._replace(mu=unstack(new.mu))

    return optax.GradientTransformation(inner.init, update_fn)
