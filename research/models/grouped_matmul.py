"""Grouped matmul (``jax.lax.ragged_dot``) whose backward pass multiplies by the transposed
weights in the forward pass's own form.

``ragged_dot``'s own derivative computes the rows' gradient as a ragged dot that contracts the
weights' last dimension. For Mixtral's down projection (rows [16384, 4096] against [8, 14336,
4096] per chip) XLA:TPU for v6e tiles that form past its scoped VMEM limit and refuses the
program (``E1001: CompileTimeScopedVmemOom``, 34.6 MiB of 32; raising the limit to 64 MiB makes
it pick tiles that need 74.2: the tiler misjudges this form, which XLA's error guide calls a
compiler bug). Here the weights are transposed first (a real copy, kept by an optimization
barrier so XLA cannot fold it back into the dot), so the gradient is a ragged dot of the same
form as the forward pass, which compiles wherever the forward pass does. The copy is one
layer's expert weights, held while that gradient is computed (README, TPU table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [m, k] (sorted by group) times weights [g, k, n]: row i uses the weights of its
    group, ``group_sizes`` [g] giving how many rows each group has (rows past their sum: 0)."""
    return jax.lax.ragged_dot(rows, weights, group_sizes)


def _forward(rows, weights, group_sizes):
    return grouped_matmul(rows, weights, group_sizes), (rows, weights, group_sizes)


def _backward(saved, grad):
    rows, weights, group_sizes = saved
    transposed = jax.lax.optimization_barrier(jnp.swapaxes(weights, 1, 2))  # [g, n, k]
    d_rows = jax.lax.ragged_dot(grad.astype(rows.dtype), transposed, group_sizes)
    # the weights' gradient (a ragged dot over the rows of each group) as JAX derives it
    _, weights_vjp = jax.vjp(lambda w: jax.lax.ragged_dot(rows, w, group_sizes), weights)
    (d_weights,) = weights_vjp(grad)
    return _sum_to_type(d_rows, rows), _sum_to_type(d_weights, weights), None


def _varying(x: jax.Array) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return mat.varying if mat is not None else frozenset()


def _sum_to_type(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Under ``shard_map`` an input that is the same on every device of a mesh axis (weights
    over the batch axes, rows over ``tensor``) was broadcast into the product, so its gradient
    is the sum over that axis: what JAX's own rule for ragged_dot inserts."""
    extra = tuple(sorted(_varying(cotangent) - _varying(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


grouped_matmul.defvjp(_forward, _backward)
