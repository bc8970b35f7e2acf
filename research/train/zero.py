"""ZeRO-1 (``train.shard_optimizer_update``): the optimizer update sharded over data-parallel
replicas while the parameters stay whole on each replica for the forward and backward passes.

With plain data parallelism every replica runs the whole update: Muon's Newton-Schulz matmuls
(as many FLOPs as the forward and backward at the quickstart's size) and AdamW's elementwise
work, on an optimizer state held whole on every device. Here each parameter gets an *update
sharding*: its own sharding plus one more dimension split over the ``data`` mesh axis. The
jitted step constrains the gradients to it (XLA turns the gradient all-reduce into a
reduce-scatter), the optimizer runs on each replica's slice, and the new parameters are
constrained back to their own sharding (an all-gather). The optimizer state lives in the
update sharding, so each replica keeps 1/data of it.

Which dimension: a Muon batch axis when the leaf has one (the ``layers`` axis of
``scan_layers``, MoE's ``expert`` axis), since Muon orthogonalises each slice along it on its
own and splitting it needs no communication; otherwise the largest dimension that divides. On a
matrix that is the long side, which Newton-Schulz's ``X @ X.T`` contracts: each replica computes
a partial product and XLA adds them (an all-reduce of a small square per iteration). Leaves with
no dividing free dimension (scalars, odd sizes) keep their own sharding.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.train.muon import dimension_numbers

AXIS = "data"


def _batch_axes(ndim: int, dims) -> set[int]:
    """Axes Muon treats as a batch (neither reduction nor output): independent matrices."""
    if dims is None:
        return set()
    used = set()
    for axes in (dims.reduction_axis, dims.output_axis):
        for axis in (axes,) if isinstance(axes, int) else axes:
            used.add(axis % ndim)
    return set(range(ndim)) - used


def _update_spec(shape: tuple[int, ...], spec: PartitionSpec, ways: int, dims) -> PartitionSpec:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if any(AXIS == e or (isinstance(e, tuple) and AXIS in e) for e in entries):
        return spec  # already split over data (a custom rule): nothing to add
    free = [i for i, size in enumerate(shape) if entries[i] is None and size % ways == 0]
    if not free:
        return spec
    batch = _batch_axes(len(shape), dims) & set(free)
    # Prefer a batch axis (exact, no communication), then the largest; ties: the leading one.
    axis = max(batch or free, key=lambda i: (shape[i], -i))
    entries[axis] = AXIS
    return PartitionSpec(*entries)


def update_shardings(params: Any, mesh: Mesh) -> Any:
    """The update sharding of every leaf of ``params`` (arrays or ``jax.ShapeDtypeStruct`` with
    a NamedSharding): its own sharding with one more dimension split over ``data``. On a mesh
    with ``data`` = 1 it is the parameters' own sharding."""
    ways = mesh.shape[AXIS]
    shardings = jax.tree.map(lambda x: x.sharding, params)
    if ways == 1:
        return shardings
    return jax.tree.map(  # a None (not a Muon matrix) in the second tree is passed as is
        lambda x, d: NamedSharding(mesh, _update_spec(x.shape, x.sharding.spec, ways, d)),
        params,
        dimension_numbers(params),
    )


def with_update_shardings(params: Any, mesh: Mesh) -> Any:
    """``params`` as shapes and dtypes with their update shardings: what ``optimizer_shardings``
    lays the optimizer state out by."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params,
        update_shardings(params, mesh),
    )


def optimizer_layout(params: Any, mesh: Mesh, shard_update: bool) -> Any:
    """The parameters whose shardings the optimizer state follows: their update shardings under
    ``train.shard_optimizer_update`` (each replica keeps a slice), else their own."""
    return with_update_shardings(params, mesh) if shard_update else params
