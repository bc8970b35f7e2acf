"""The per-tile arithmetic of flash attention, shared by the GPU and TPU kernels.

All values are 2-D tiles: q/do [bq, D], k/v [bk, D], row statistics [bq, 1] (2-D keeps the
Mosaic TPU layouts simple). Scores are kept in base 2 (``scale`` includes log2(e)), so every
exponential is an exp2; ``lse`` is the base-2 log-sum-exp saved by the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.kernels.flash_attention.common import MASK_VALUE

F32 = jnp.float32


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a.T @ b with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def forward_step(q, k, v, carry, scale: float, ok):
    """One key tile of the online softmax. carry = (acc [bq,D], m [bq,1], denom [bq,1]) in f32;
    ``ok`` is the element mask or None for a fully visible tile."""
    acc, m, denom = carry
    s = dot_nt(q, k) * scale
    if ok is not None:
        s = jnp.where(ok, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    w = jnp.exp2(s - m_new)
    if ok is not None:  # a row with nothing visible yet has m_new = MASK: keep its weights 0
        w = jnp.where(ok, w, 0.0)
    alpha = jnp.exp2(m - m_new)  # rescale what was accumulated under the old maximum
    acc = acc * alpha + dot_nn(w.astype(v.dtype), v)
    return acc, m_new, denom * alpha + jnp.sum(w, axis=1, keepdims=True)


def forward_finish(acc, m, denom):
    """Normalised output and base-2 log-sum-exp; rows with nothing visible give 0."""
    safe = jnp.where(denom > 0, denom, 1.0)
    return acc / safe, jnp.where(denom > 0, m + jnp.log2(safe), 0.0)


def probabilities(q, k, lse, scale: float, ok):
    """P = softmax(S) recomputed from the saved log-sum-exp, zero where masked."""
    w = jnp.exp2(dot_nt(q, k) * scale - lse)
    return w if ok is None else jnp.where(ok, w, 0.0)


def score_grad(w, do, v, delta, sm_scale: float, dtype):
    """dS = P * (dP - delta) * sm_scale, in the input dtype for the next matmuls."""
    return (w * (dot_nt(do, v) - delta) * sm_scale).astype(dtype)


def dkv_step(q, do, lse, delta, k, v, carry, scale: float, sm_scale: float, ok):
    """Accumulate dK, dV of one key tile over one query tile."""
    dk, dv = carry
    w = probabilities(q, k, lse, scale, ok)
    dv = dv + dot_tn(w.astype(do.dtype), do)
    ds = score_grad(w, do, v, delta, sm_scale, q.dtype)
    return dk + dot_tn(ds, q), dv


def dkv_step_transposed(q, do, lse, delta, k, v, carry, scale: float, sm_scale: float, ok_t):
    """``dkv_step`` in the key tile's orientation (FlashAttention-2's dK/dV loop): S^T = K Q^T
    against ``lse`` / ``delta`` as [1, bq] rows and ``ok_t`` [bk, bq], so P^T and dS^T come out
    of the matmuls ready for dV += P^T dO and dK += dS^T Q; only loaded tiles (q, dO) are read
    transposed, never a computed [bq, bk] tile (a register shuffle in Triton, every step)."""
    dk, dv = carry
    w_t = jnp.exp2(dot_nt(k, q) * scale - lse)
    if ok_t is not None:
        w_t = jnp.where(ok_t, w_t, 0.0)
    dv = dv + dot_nn(w_t.astype(do.dtype), do)
    ds_t = (w_t * (dot_nt(v, do) - delta) * sm_scale).astype(q.dtype)
    return dk + dot_nn(ds_t, q), dv


def dq_step(q, do, lse, delta, k, v, dq, scale: float, sm_scale: float, ok):
    """Accumulate dQ of one query tile over one key tile."""
    w = probabilities(q, k, lse, scale, ok)
    return dq + dot_nn(score_grad(w, do, v, delta, sm_scale, q.dtype), k)
