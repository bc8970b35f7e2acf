"""Multi-head / grouped-query attention: one interface, several implementations.

``attend`` is the single entry point. ``xla`` is the plain-jnp reference (works everywhere, any
mask), ``cudnn`` is ``jax.nn.dot_product_attention``'s fused GPU kernel, ``pallas`` our flash
attention kernels (research/kernels/flash_attention: Triton on GPU, Mosaic on TPU, interpret
mode on CPU), ``hopper`` the same with the Mosaic GPU kernels for H100/H200 where they cover
the case (plain causal self-attention) and Triton for the rest, ``blockwise`` the same
algorithm in plain JAX with memory linear in the sequence, and ``auto`` picks the fastest
correct one for the backend and length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.backend import backend
from research.kernels.flash_attention import blockwise_attention, flash_attention
from research.kernels.flash_attention.common import KERNEL_HEAD_DIMS
from research.models.layers import RMSNorm, apply_rope, as_dtype, param
from research.parallel.mesh import per_shard

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise", "pallas", "hopper")
# From this length on, auto takes blockwise over xla off GPU: faster there and linear in memory
# (benchmarks/attention.py --cpu; figures in the README). Shorter contexts keep the reference.
BLOCKWISE_MIN_SEQ = 512


def resolve_implementation(name: str, dtype, seq_len: int = 0) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention='{name}' is not an attention implementation; "
            f"choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    if name != "auto":
        return name
    fused_ok = backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if fused_ok:
        return "cudnn"
    return "blockwise" if seq_len >= BLOCKWISE_MIN_SEQ else "xla"


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    window: int = 0,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
) -> jax.Array:
    """Reference attention. q [B,T,H,D], k/v [B,S,KV,D]; positions [T] and [S] (-1: empty slot),
    or [B,T] and [B,S]: each sequence its own positions (batched decoding of ragged prompts).

    Query heads are grouped onto their KV head by a reshape, so K/V are never repeated in memory.
    A key is visible when 0 <= its position <= the query's (``causal``), within ``window`` if
    set, and in the query's segment when segment ids ([B,T], [B,S]: packed documents) are given.
    """
    batch, q_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    # Fold the scale into q: a [T, d] multiply instead of one over the [T, S] scores.
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    query_pos, key_pos = q_positions[..., :, None], kv_positions[..., None, :]
    visible = key_pos >= 0
    if causal:
        visible &= key_pos <= query_pos
    if window:
        visible &= key_pos > query_pos - window
    if visible.ndim == 3:  # per-sequence positions: [B, 1, T, S]
        visible = visible[:, None]
    if q_segment_ids is not None:  # [B, 1, T, S]: broadcasts over heads (and groups)
        visible = visible & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    if n_kv == n_heads:  # plain multi-head: 4-D einsums lower to fewer transposes
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhts,bshd->bthd", probs, v)
    q = q.reshape(batch, q_len, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    if visible.ndim == 4:
        visible = visible[:, :, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, n_heads, head_dim)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    implementation: str = "auto",
    window: int = 0,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of q over k/v by position, with the chosen implementation.

    ``segment_ids`` [B, T] (self-attention, T == S): tokens attend only within their segment,
    for packed documents.
    """
    impl = resolve_implementation(implementation, q.dtype, k.shape[1])
    seg = (segment_ids, segment_ids)
    if impl == "pallas":
        return _flash_per_shard(q, k, v, q_positions, kv_positions, segment_ids, window)
    if impl == "hopper":
        # Self-attention (T == S) runs at positions 0..T-1, as cuDNN's path below assumes too:
        # the Mosaic GPU kernels take that case; the rest goes to Triton inside the call.
        plain = q.shape[1] == k.shape[1]
        return _flash_per_shard(q, k, v, q_positions, kv_positions, segment_ids, window,
                                kernel="hopper", default_positions=plain)  # fmt: skip
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_positions, kv_positions, *seg, window=window)
    plain_causal = q.shape[1] == k.shape[1] and not window and segment_ids is None
    if impl == "cudnn" and plain_causal:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "cudnn" and q.shape[1] == k.shape[1]:
        # cuDNN is used here for plain causal attention only: a window or packed segments run
        # our flash kernel (or blockwise), linear in memory, not the quadratic reference.
        if q.shape[-1] in KERNEL_HEAD_DIMS:
            return _flash_per_shard(q, k, v, q_positions, kv_positions, segment_ids, window)
        return blockwise_attention(q, k, v, q_positions, kv_positions, *seg, window=window)
    # The KV-cache path (ragged positions) always takes the reference: decoding is memory-bound.
    return xla_attention(q, k, v, q_positions, kv_positions, window, *seg)


def _flash_per_shard(
    q, k, v, q_positions, kv_positions, segment_ids, window, kernel=None, default_positions=False
):
    """The Pallas kernel on each device's batch rows and heads: a custom call is not partitioned
    by XLA. Query heads split over ``tensor`` when each device then holds whole GQA groups: the
    KV heads split too, or there is one KV head (MQA), which every device keeps."""
    tensor = jax.sharding.get_abstract_mesh().shape.get("tensor", 1)
    heads, kv_heads = q.shape[2], k.shape[2]
    split_kv = tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0
    split_q = split_kv or (tensor > 1 and heads % tensor == 0 and kv_heads == 1)
    q_axes = ("batch", "seq", "heads" if split_q else None, None)
    kv_axes = ("batch", "seq", "kv" if split_kv else None, None)
    args, axes = [q, k, v, q_positions, kv_positions], [q_axes, kv_axes, kv_axes, None, None]
    if segment_ids is not None:
        args.append(segment_ids)
        axes.append(("batch", "seq"))

    def per_device(q, k, v, q_positions, kv_positions, segment_ids=None):
        seg = (segment_ids, segment_ids)
        if default_positions:  # None: 0..n-1, which the Hopper kernels can be sure of
            q_positions = kv_positions = None
        return flash_attention(
            q, k, v, q_positions, kv_positions, *seg, window=window, kernel=kernel
        )

    return per_shard(per_device, tuple(axes), q_axes)(*args)


class Attention(nnx.Module):
    def __init__(self, cfg, param_dtype, std: float, out_std: float, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.implementation = cfg.attention
        self.window = cfg.attention_window
        # muP: scores as q.k / head_dim (not / sqrt(head_dim)) beyond the base width, where
        # head_dim grows with d_model; folded into q, so every attention kernel gets it.
        self.q_scale = 1.0 / math.sqrt(cfg.width_mult)
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", None), std, param_dtype)
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv", None), std, param_dtype)
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv", None), std, param_dtype)
        self.wo = param(rngs, (h, hd, d), ("heads", None, "embed"), out_std, param_dtype)
        if cfg.qkv_bias:
            zeros = jnp.zeros
            self.bq = nnx.Param(zeros((h, hd), param_dtype), logical_axes=("heads", None))
            self.bk = nnx.Param(zeros((kv, hd), param_dtype), logical_axes=("kv", None))
            self.bv = nnx.Param(zeros((kv, hd), param_dtype), logical_axes=("kv", None))
        if cfg.qk_norm:  # one scale over head_dim, shared by the heads
            self.q_norm = RMSNorm(hd, cfg.norm_eps, param_dtype, axis_name=None)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, param_dtype, axis_name=None)

    def __call__(self, x, positions, rope, cache=None, segment_ids=None):
        """x [B,T,d], positions [T], segment_ids [B,T] (packed documents) or None. With a KV
        cache (ring buffer of the last W positions) the new keys are written at slot
        ``position % W``; returns (output, updated cache)."""
        dtype = x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, as_dtype(self.wq[...], dtype))
        k = jnp.einsum("btd,dhk->bthk", x, as_dtype(self.wk[...], dtype))
        v = jnp.einsum("btd,dhk->bthk", x, as_dtype(self.wv[...], dtype))
        if hasattr(self, "bq"):
            q = q + self.bq[...].astype(dtype)
            k = k + self.bk[...].astype(dtype)
            v = v + self.bv[...].astype(dtype)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_scale != 1.0:
            q = q * jnp.asarray(self.q_scale, q.dtype)
        if cache is None:
            out = attend(
                q, k, v, positions, positions, self.implementation, self.window, segment_ids
            )
        else:
            width = cache["k"].shape[1]
            slots = positions % width
            # positions [T]: one for the batch; [B, T]: per sequence (cache["pos"] is [B, W])
            if positions.ndim == 1:
                at, pos_at = (slice(None), slots), slots
            else:
                at = pos_at = (jnp.arange(x.shape[0])[:, None], slots)
            cache = {**cache, "pos": cache["pos"].at[pos_at].set(positions)}
            for name, value in (("k", k), ("v", v)):
                cache.update(_cache_write(cache, name, value, at))
            # RoPE is relative, so a ring buffer of width W is exact sliding-window attention;
            # a cache wider than the model's window still sees only the window.
            window = min(self.window, width) if self.window else width
            keys, values = _cache_read(cache, "k", dtype), _cache_read(cache, "v", dtype)
            out = xla_attention(q, keys, values, positions, cache["pos"], window=window)
        return jnp.einsum("bthk,hkd->btd", out, as_dtype(self.wo[...], dtype)), cache


def init_kv_cache(cfg, batch: int, width: int, dtype) -> dict:
    """An empty per-layer cache; slot positions of -1 mark empty slots."""
    shape = (batch, width, cfg.n_kv_heads, cfg.head_dim)
    return {**kv_cache_arrays(shape, dtype), "pos": jnp.full((width,), -1, jnp.int32)}


def kv_cache_arrays(shape: tuple[int, int, int, int], dtype) -> dict:
    """Zeroed K and V of ``shape`` [B, W, kv heads, head_dim] in ``dtype``. int8: each cached
    head vector is stored as int8 with its own float32 absmax scale (``k_scale``/``v_scale``
    [B, W, kv heads]), which halves a bf16 cache (quality: README, benchmarks/quantize.py)."""
    arrays = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if jnp.dtype(dtype) == jnp.int8:
        arrays |= {"k_scale": jnp.zeros(shape[:3], jnp.float32)}
        arrays |= {"v_scale": jnp.zeros(shape[:3], jnp.float32)}
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"KV cache dtype {jnp.dtype(dtype)}: use a float dtype or int8")
    return arrays


def _cache_write(cache: dict, name: str, value: jax.Array, at) -> dict:
    """The cache entries of ``name`` with ``value`` [B, T, kv, hd] written at ``at``."""
    if f"{name}_scale" not in cache:
        return {name: cache[name].at[at].set(value.astype(cache[name].dtype))}
    value = value.astype(jnp.float32)
    scale = jnp.max(jnp.abs(value), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    quantized = jnp.clip(jnp.round(value / safe), -127, 127).astype(jnp.int8)
    return {
        name: cache[name].at[at].set(quantized),
        f"{name}_scale": cache[f"{name}_scale"].at[at].set(scale),
    }


def _cache_read(cache: dict, name: str, dtype) -> jax.Array:
    if f"{name}_scale" not in cache:
        return cache[name].astype(dtype)
    return (cache[name].astype(jnp.float32) * cache[f"{name}_scale"][..., None]).astype(dtype)
