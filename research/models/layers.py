"""Building blocks: parameters with logical axes, RMSNorm, rotary embeddings, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, std: float, dtype) -> nnx.Param:
    """A normally initialised parameter that carries its logical axis names for sharding."""
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype: bf16 variance loses the small terms.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, scaling: float
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [..., T, head_dim // 2]; scaling > 1 interpolates positions linearly."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = (positions.astype(jnp.float32) / scaling)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (first half, second half) of x [B, T, H, D] by the position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class SwiGLU(nnx.Module):
    """out = W_down (silu(x W_gate) * x W_up); gate and up share one matmul."""

    def __init__(self, d_model: int, hidden: int, std: float, out_std: float, param_dtype, rngs):
        self.w_in = param(rngs, (d_model, 2, hidden), ("embed", None, "mlp"), std, param_dtype)
        self.w_out = param(rngs, (hidden, d_model), ("mlp", "embed"), out_std, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = jnp.einsum("btd,dkh->btkh", x, self.w_in[...].astype(x.dtype))
        hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        return jnp.einsum("bth,hd->btd", hidden, self.w_out[...].astype(x.dtype))
