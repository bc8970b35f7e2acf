"""Building blocks: parameters with logical axes, RMSNorm, rotary embeddings, the MLPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def as_dtype(w, dtype):
    """``w`` in ``dtype``, untouched when it already is: a quantization library may hand a
    weight wrapper (qwix's WithAux) that einsum understands but astype would unpack."""
    return w if w.dtype == dtype else w.astype(dtype)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, std: float, dtype) -> nnx.Param:
    """A normally initialised parameter that carries its logical axis names for sharding."""
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, axis_name: str | None = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype: bf16 variance loses the small terms.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    scaling: float,
    llama3: tuple[float, float, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [..., T, head_dim // 2]; scaling > 1 interpolates positions linearly, or,
    with ``llama3`` = (low_freq_factor, high_freq_factor, original_context), per frequency as
    Llama 3.1 does: wavelengths longer than the original context / low_freq_factor are divided
    by ``scaling``, those shorter than original / high_freq_factor kept, a linear ramp between."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if llama3 is None:
        positions = positions.astype(jnp.float32) / scaling
    else:
        low, high, original = llama3
        wavelength = 2 * jnp.pi / inv_freq
        ramp = jnp.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - ramp) * inv_freq / scaling + ramp * inv_freq
        positions = positions.astype(jnp.float32)
    angles = positions[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (first half, second half) of x [B, T, H, D] by the position angles.

    rotate_half(x) = (-x2, x1) is written as a reverse and a sign flip over a [2, D/2] view:
    slicing the halves apart costs a pad per slice in the backward pass on CPU.
    """
    *lead, dim = x.shape
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*lead, 2, dim // 2)
    rotated = (pairs[..., ::-1, :] * jnp.array([[-1.0], [1.0]], jnp.float32)).reshape(x.shape)
    cos = jnp.concatenate([cos, cos], axis=-1)[..., None, :]  # broadcast over heads
    sin = jnp.concatenate([sin, sin], axis=-1)[..., None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's position within its document, [B, T] int32: packed sequences restart RoPE
    positions at every segment boundary, so a document sees the positions it would alone."""
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - first


def make_mlp(cfg, std: float, out_std: float, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The dense MLP that ``cfg.mlp_activation`` names."""
    if cfg.mlp_activation == "relu2":
        return ReluSquared(cfg.d_model, cfg.mlp_hidden, std, out_std, param_dtype, rngs)
    return SwiGLU(cfg.d_model, cfg.mlp_hidden, std, out_std, param_dtype, rngs)


class ReluSquared(nnx.Module):
    """out = W_down relu(x W_up)^2: ungated, one matrix fewer than SwiGLU for the same width
    (Primer, So et al. 2021; the MLP of the modded-nanogpt speedruns)."""

    def __init__(self, d_model: int, hidden: int, std: float, out_std: float, param_dtype, rngs):
        self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), std, param_dtype)
        self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), out_std, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        up = jax.nn.relu(jnp.einsum("btd,dh->bth", x, as_dtype(self.w_up[...], dtype)))
        return jnp.einsum("bth,hd->btd", up * up, as_dtype(self.w_down[...], dtype))


class SwiGLU(nnx.Module):
    """out = W_down (silu(x W_gate) * x W_up)."""

    def __init__(self, d_model: int, hidden: int, std: float, out_std: float, param_dtype, rngs):
        # Separate gate and up matrices: slicing one fused output costs a pad + add in backward.
        self.w_gate = param(rngs, (d_model, hidden), ("embed", "mlp"), std, param_dtype)
        self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), std, param_dtype)
        self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), out_std, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jnp.einsum("btd,dh->bth", x, as_dtype(self.w_gate[...], dtype))
        up = jnp.einsum("btd,dh->bth", x, as_dtype(self.w_up[...], dtype))
        return jnp.einsum("bth,hd->btd", jax.nn.silu(gate) * up, as_dtype(self.w_down[...], dtype))
