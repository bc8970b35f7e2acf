"""Blockwise attention in plain JAX: the online-softmax flash algorithm, linear memory.

The CPU fallback, and the implementation wherever no Pallas kernel fits. Queries and keys are
cut into blocks; each query block runs an online softmax over the band of key blocks that can
be visible to it (skipped blocks cost nothing, unmasked blocks skip the mask). A custom VJP
saves only the output and the log-sum-exp and recomputes probabilities block by block in the
backward pass, so no [T, S] array ever exists: memory is O(T) instead of O(T * S).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from research.kernels.flash_attention import common
from research.kernels.flash_attention.common import FULL, LOG2_E, MASK_VALUE, PARTIAL, SKIP


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    window: int = 0,
    block_q: int = 512,
    block_kv: int = 512,
) -> jax.Array:
    """q [B,T,H,D], k/v [B,S,KV,D], positions [T] / [S], segment ids [B,T] / [B,S] or None."""
    common.check_inputs(q, k, v, q_segment_ids, kv_segment_ids, window, causal, kernel=False)
    bq = common.fit_block(block_q, q.shape[1], minimum=8)
    bk = common.fit_block(block_kv, k.shape[1], minimum=8)
    return _attention(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal, window, bq, bk
    )


def _batch_kinds(p: common.Prepared, causal: bool, window: int) -> jax.Array:
    """One class per block pair for the whole batch (blocks are shared by all sequences)."""
    kinds = common.kind_table(p.q_stats, p.kv_stats, causal, window, p.q_seg is not None)
    all_skip = jnp.all(kinds == SKIP, axis=0)
    all_full = jnp.all(kinds == FULL, axis=0)
    return jnp.where(all_skip, SKIP, jnp.where(all_full, FULL, PARTIAL))


def _blocks(x: jax.Array, block: int, n_kv: int) -> jax.Array:
    """[B, T, H, D] -> [n_blocks, B, KV, H // KV, block, D]: a block is a leading-axis index."""
    b, t, h, d = x.shape
    x = x.reshape(b, t // block, block, n_kv, h // n_kv, d)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _unblocks(x: jax.Array) -> jax.Array:
    n, b, kv, g, block, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * block, kv * g, d)


def _row_blocks(x: jax.Array, block: int, n_kv: int) -> jax.Array:
    """[B, T, H] per-row values -> [n_blocks, B, KV, G, block]."""
    b, t, h = x.shape
    return x.reshape(b, t // block, block, n_kv, h // n_kv).transpose(1, 0, 3, 4, 2)


def _mask(p: common.Prepared, i, j, bq: int, bk: int, causal: bool, window: int):
    """Element mask of query block i against key block j, shaped [B or 1, 1, 1, bq, bk]."""
    q_pos = jax.lax.dynamic_slice_in_dim(p.q_pos, i * bq, bq)[:, None]
    kv_pos = jax.lax.dynamic_slice_in_dim(p.kv_pos, j * bk, bk)[None, :]
    q_seg = kv_seg = None
    if p.q_seg is not None:
        q_seg = jax.lax.dynamic_slice_in_dim(p.q_seg, i * bq, bq, axis=1)[:, :, None]
        kv_seg = jax.lax.dynamic_slice_in_dim(p.kv_seg, j * bk, bk, axis=1)[:, None, :]
    ok = common.visible(q_pos, kv_pos, q_seg, kv_seg, causal, window)
    ok = jnp.broadcast_to(ok, ok.shape[:-2] + (bq, bk))  # non-causal: [1, bk] so far
    return ok.reshape((-1, 1, 1, bq, bk))


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, bq, bk):
    """Returns the padded output [B, Tp, H, D] and log2-sum-exp [nq, B, KV, G, bq] (base 2)."""
    p = common.prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    n_kv, head_dim = k.shape[2], q.shape[3]
    scale = LOG2_E / math.sqrt(head_dim)
    kinds = _batch_kinds(p, causal, window)
    lo, hi = common.visible_range(kinds, axis=1)
    qb = _blocks(p.q, bq, n_kv)
    kb = _blocks(p.k, bk, n_kv)[:, :, :, 0]  # [nk, B, KV, bk, D]
    vb = _blocks(p.v, bk, n_kv)[:, :, :, 0]

    def q_block(i):
        qi = qb[i]

        def body(j, carry):
            def update(masked: bool):
                acc, m, denom = carry
                s = jnp.einsum("bkgtd,bksd->bkgts", qi, kb[j], preferred_element_type=jnp.float32)
                s = s * scale
                if masked:
                    ok = _mask(p, i, j, bq, bk, causal, window)
                    s = jnp.where(ok, s, MASK_VALUE)
                m_new = jnp.maximum(m, s.max(-1))
                w = jnp.exp2(s - m_new[..., None])
                if masked:
                    w = jnp.where(ok, w, 0.0)
                alpha = jnp.exp2(m - m_new)
                pv = jnp.einsum(
                    "bkgts,bksd->bkgtd",
                    w.astype(v.dtype),
                    vb[j],
                    preferred_element_type=jnp.float32,
                )
                return acc * alpha[..., None] + pv, m_new, denom * alpha + w.sum(-1)

            return jax.lax.switch(
                kinds[i, j], [lambda: carry, lambda: update(True), lambda: update(False)]
            )

        shape = qi.shape[:-1]
        init = (
            jnp.zeros(qi.shape, jnp.float32),
            jnp.full(shape, MASK_VALUE, jnp.float32),
            jnp.zeros(shape, jnp.float32),
        )
        acc, m, denom = jax.lax.fori_loop(lo[i], hi[i], body, init)
        safe = jnp.where(denom > 0, denom, 1.0)
        return (acc / safe[..., None]).astype(q.dtype), jnp.where(
            denom > 0, m + jnp.log2(safe), 0.0
        )

    out, lse = jax.lax.map(q_block, jnp.arange(qb.shape[0]))
    return _unblocks(out), lse, p, kinds


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, bq, bk):
    out, _, _, _ = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, bq, bk)
    return out[:, : q.shape[1]]


def _attention_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, bq, bk):
    out, lse, _, _ = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, bq, bk)
    out = out[:, : q.shape[1]]
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _attention_bwd(causal, window, bq, bk, res, d_out):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    p = common.prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    n_kv, head_dim = k.shape[2], q.shape[3]
    sm_scale = 1.0 / math.sqrt(head_dim)
    scale = LOG2_E * sm_scale
    kinds = _batch_kinds(p, causal, window)
    lo, hi = common.visible_range(kinds, axis=0)  # the band of query blocks per key block
    t_pad = p.q.shape[1]
    d_out = common.pad_seq(d_out, t_pad, 1)
    # delta_i = sum_d o_id * do_id = sum_j P_ij dP_ij: the softmax-gradient correction per row.
    delta = jnp.sum(out.astype(jnp.float32) * d_out[:, : q.shape[1]].astype(jnp.float32), -1)
    delta = _row_blocks(common.pad_seq(delta, t_pad, 1), bq, n_kv)
    qb, dob = _blocks(p.q, bq, n_kv), _blocks(d_out.astype(q.dtype), bq, n_kv)
    kb = _blocks(p.k, bk, n_kv)[:, :, :, 0]
    vb = _blocks(p.v, bk, n_kv)[:, :, :, 0]
    f32 = jnp.float32

    def kv_block(dq, j):
        kj, vj = kb[j], vb[j]

        def body(i, carry):
            def update(masked: bool):
                dk, dv, dq = carry
                qi, doi = qb[i], dob[i]
                s = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=f32) * scale
                w = jnp.exp2(s - lse[i][..., None])
                if masked:
                    w = jnp.where(_mask(p, i, j, bq, bk, causal, window), w, 0.0)
                dv = dv + jnp.einsum(
                    "bkgts,bkgtd->bksd", w.astype(q.dtype), doi, preferred_element_type=f32
                )
                dp = jnp.einsum("bkgtd,bksd->bkgts", doi, vj, preferred_element_type=f32)
                ds = (w * (dp - delta[i][..., None]) * sm_scale).astype(q.dtype)
                dq_i = jnp.einsum("bkgts,bksd->bkgtd", ds, kj, preferred_element_type=f32)
                dk = dk + jnp.einsum("bkgts,bkgtd->bksd", ds, qi, preferred_element_type=f32)
                return dk, dv, dq.at[i].add(dq_i)

            return jax.lax.switch(
                kinds[i, j], [lambda: carry, lambda: update(True), lambda: update(False)]
            )

        zeros = jnp.zeros(kj.shape, f32)
        dk, dv, dq = jax.lax.fori_loop(lo[j], hi[j], body, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qb.shape, f32), jnp.arange(kb.shape[0]))
    dq = _unblocks(dq)[:, : q.shape[1]].astype(q.dtype)
    dk = _unblocks(dk[:, :, :, None])[:, : k.shape[1]].astype(k.dtype)
    dv = _unblocks(dv[:, :, :, None])[:, : v.shape[1]].astype(v.dtype)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
