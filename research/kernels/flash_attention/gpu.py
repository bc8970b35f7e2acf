"""Flash attention for GPUs: Pallas kernels lowered through Triton, forward and backward.

Layout [batch, seq, heads, head_dim] is read in place (no transposes). Forward: one program per
(query block, batch, head) runs the online softmax over the band of key blocks that can be
visible, skipping fully masked blocks and leaving the mask out of fully visible ones. Backward:
one kernel for dQ (per query block, over key blocks) and one for dK/dV (per key block and KV
head, over the query heads of its group and their query blocks), so grouped-query attention
never materialises repeated K/V or per-query-head dK/dV.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from research.kernels.flash_attention import common, tiles
from research.kernels.flash_attention.common import (
    BAND_FULL_HI,
    BAND_FULL_LO,
    BAND_HI,
    BAND_LO,
    LOG2_E,
    N_COLUMNS,
)


def _three_loops(band, carry, body, reps: int = 1):
    """Fold ``body(t, carry, masked=, start=)`` over a band: masked blocks, the run of fully
    visible blocks (no mask), masked blocks; t counts ``reps`` steps per block from ``start``.
    Each loop body is branch-free, so Triton can pipeline its loads; blocks outside the band
    (fully masked) are never visited."""
    lo, full_lo, full_hi, hi = band
    for start, stop, masked in (
        (lo, full_lo, True),
        (full_lo, full_hi, False),
        (full_hi, hi, True),
    ):
        step = functools.partial(body, masked=masked, start=start)
        carry = jax.lax.fori_loop(0, (stop - start) * reps, step, carry)
    return carry


def _band(stats_ref, index):
    return [stats_ref[index, c] for c in (BAND_LO, BAND_FULL_LO, BAND_FULL_HI, BAND_HI)]


def _kv_band(mask_refs, i, init, tile_step, *, causal, window, block_kv):
    """Fold ``tile_step(carry, span, ok)`` over the key blocks of query block i's band; fully
    visible ones get ok=None (no mask computed)."""
    qs_ref, _, qpos_ref, kvpos_ref, qseg_ref, kvseg_ref = mask_refs
    has_seg = qseg_ref is not None
    q_pos = qpos_ref[...][:, None]
    q_seg = qseg_ref[...][:, None] if has_seg else None

    def body(t, carry, masked: bool, start):
        j = start + t
        span = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
        ok = None
        if masked:
            kv_seg = kvseg_ref[span][None, :] if has_seg else None
            ok = common.visible(q_pos, kvpos_ref[span][None, :], q_seg, kv_seg, causal, window)
        return tile_step(carry, span, ok)

    return _three_loops(_band(qs_ref, i), init, body)


def _query_block(nq: int, causal: bool):
    """Grid index -> query block. Causal: the last query blocks see the most keys, so they are
    launched first (the query-block axis is the grid's slowest, reversed) and the short ones
    fill the tail of the launch instead of leaving SMs idle behind one long block."""
    return (lambda i: nq - 1 - i) if causal else (lambda i: i)


def _fwd_kernel(*refs, causal, window, block_kv, scale, nq):
    mask_refs, (q_ref, k_ref, v_ref, o_ref, lse_ref) = refs[:6], refs[6:]
    q = q_ref[...]
    block_q, head_dim = q.shape
    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
    )

    def tile(carry, span, ok):
        return tiles.forward_step(q, k_ref[span, :], v_ref[span, :], carry, scale, ok)

    i = _query_block(nq, causal)(pl.program_id(2))
    carry = _kv_band(mask_refs, i, init, tile, causal=causal, window=window, block_kv=block_kv)
    out, lse = tiles.forward_finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _dq_kernel(*refs, causal, window, block_kv, scale, sm_scale, nq):
    mask_refs, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = refs[:6], refs[6:]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def tile(dq, span, ok):
        k, v = k_ref[span, :], v_ref[span, :]
        return tiles.dq_step(q, do, lse, delta, k, v, dq, scale, sm_scale, ok)

    init = jnp.zeros(q.shape, jnp.float32)
    i = _query_block(nq, causal)(pl.program_id(2))
    dq = _kv_band(mask_refs, i, init, tile, causal=causal, window=window, block_kv=block_kv)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    qs_ref, ks_ref, qpos_ref, kvpos_ref, qseg_ref, kvseg_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, causal, window, block_q, scale, sm_scale,
):  # fmt: skip
    j = pl.program_id(0)
    has_seg = qseg_ref is not None
    k, v = k_ref[...], v_ref[...]
    kv_pos = kvpos_ref[...][:, None]  # [bk, 1]: this kernel works on [bk, bq] tiles
    kv_seg = kvseg_ref[...][:, None] if has_seg else None
    group = q_ref.shape[1]
    band = _band(ks_ref, j)  # query blocks that can see this key block

    def body(t, carry, masked: bool, start):
        if group == 1:
            g, i = 0, start + t
        else:  # heads innermost: consecutive steps reuse the same query rows
            g, i = jax.lax.rem(t, jnp.int32(group)), start + jax.lax.div(t, jnp.int32(group))
        span = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        ok_t = None
        if masked:
            q_seg = qseg_ref[span][None, :] if has_seg else None
            ok_t = common.visible(qpos_ref[span][None, :], kv_pos, q_seg, kv_seg, causal, window)
        q, do = q_ref[span, g, :], do_ref[span, g, :]
        lse, delta = lse_ref[g, span][None, :], delta_ref[g, span][None, :]
        return tiles.dkv_step_transposed(q, do, lse, delta, k, v, carry, scale, sm_scale, ok_t)

    # Steps over (query block, group member) pairs, group members innermost.
    dk, dv = _three_loops(band, (jnp.zeros(k.shape, jnp.float32),) * 2, body, reps=group)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _common_specs(p: common.Prepared, batch: int, q_block, kv_block, q_map, kv_map, b_axis: int):
    """Specs for the stats, positions and segment ids. ``q_map`` / ``kv_map``: grid -> block index
    along the sequence (None: the whole sequence); ``b_axis``: the grid axis of the batch."""
    stat_b = (lambda *g: g[b_axis]) if p.q_seg is not None else (lambda *g: 0)
    nq, nk = p.q_stats.shape[1], p.kv_stats.shape[1]

    def seq_spec(block, index, batched: bool):
        if index is None:
            shape, idx = (block,), lambda *g: (0,)
        else:
            shape, idx = (block,), lambda *g: (index(*g),)
        if batched:
            return pl.BlockSpec((None, *shape), lambda *g: (g[b_axis], *idx(*g)))
        return pl.BlockSpec(shape, idx)

    seg = p.q_seg is not None
    return [
        pl.BlockSpec((None, nq, N_COLUMNS), lambda *g: (stat_b(*g), 0, 0)),
        pl.BlockSpec((None, nk, N_COLUMNS), lambda *g: (stat_b(*g), 0, 0)),
        seq_spec(q_block, q_map, False),
        seq_spec(kv_block, kv_map, False),
        seq_spec(q_block, q_map, True) if seg else None,
        seq_spec(kv_block, kv_map, True) if seg else None,
    ]


def _prologue(p: common.Prepared, causal: bool, window: int):
    q_stats, kv_stats = common.stats_with_bands(p, causal, window)
    return [q_stats, kv_stats, p.q_pos, p.kv_pos, p.q_seg, p.kv_seg]


def _params(cfg: common.Pass, head_dim: int):
    warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def _fitted(kernel: str, cfg: common.Pass, x: jax.Array) -> common.Pass:
    return common.fit_smem(kernel, cfg, x.shape[-1], jnp.dtype(x.dtype).itemsize)


def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, window, blocks, interpret):
    """Padded output [B, Tp, H, D] and base-2 log-sum-exp [B, H, Tp]."""
    cfg = _fitted("fwd", blocks.forward, q)
    bq, bk = cfg.block_q, cfg.block_kv
    p = common.prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    batch, t_pad, n_heads, head_dim = p.q.shape
    s_pad, group, nq = p.k.shape[1], n_heads // k.shape[2], t_pad // bq
    qi = _query_block(nq, causal)
    grid = (n_heads, batch, nq)  # query blocks slowest: see _query_block
    kernel = functools.partial(
        _fwd_kernel,
        causal=causal,
        window=window,
        block_kv=bk,
        scale=LOG2_E / math.sqrt(head_dim),
        nq=nq,
    )
    kv_spec = pl.BlockSpec((None, s_pad, None, head_dim), lambda h, b, i: (b, 0, h // group, 0))
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda h, b, i: (b, qi(i), h, 0))
    in_specs = _common_specs(p, batch, bq, s_pad, lambda h, b, i: qi(i), None, b_axis=1)
    in_specs += [q_spec, kv_spec, kv_spec]
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda h, b, i: (b, h, qi(i)))],
        out_shape=[
            jax.ShapeDtypeStruct(p.q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, n_heads, t_pad), jnp.float32),
        ],
        compiler_params=_params(cfg, head_dim),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*_prologue(p, causal, window), p.q, p.k, p.v)


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, *, causal, window,
             blocks, interpret):  # fmt: skip
    """dq, dk, dv (unpadded). ``lse`` and ``delta`` are [B, H, T] float32. The dQ and dK/dV
    kernels each get their own tiles, warps and stages (``blocks.dq``, ``blocks.dkv``)."""
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim)
    consts = dict(causal=causal, window=window, scale=LOG2_E * sm_scale, sm_scale=sm_scale)
    d_out = d_out.astype(q.dtype)
    t, s = q.shape[1], k.shape[1]
    dq = _dq(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, causal, window,
             _fitted("dq", blocks.dq, q), consts, interpret)  # fmt: skip
    dk, dv = _dkv(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, causal, window,
                  _fitted("dkv", blocks.dkv, q), consts, interpret)  # fmt: skip
    return dq[:, :t], dk[:, :s], dv[:, :s]


def _dq(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, causal, window, cfg, consts,
        interpret):  # fmt: skip
    bq, bk = cfg.block_q, cfg.block_kv
    p = common.prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    batch, t_pad, n_heads, head_dim = p.q.shape
    s_pad, group, nq = p.k.shape[1], n_heads // k.shape[2], t_pad // bq
    qi = _query_block(nq, causal)
    d_out = common.pad_seq(d_out, t_pad, 1)
    lse, delta = common.pad_seq(lse, t_pad, 2), common.pad_seq(delta, t_pad, 2)
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda h, b, i: (b, qi(i), h, 0))
    kv_all = pl.BlockSpec((None, s_pad, None, head_dim), lambda h, b, i: (b, 0, h // group, 0))
    row = pl.BlockSpec((None, None, bq), lambda h, b, i: (b, h, qi(i)))
    return pl.pallas_call(
        functools.partial(_dq_kernel, block_kv=bk, nq=nq, **consts),
        grid=(n_heads, batch, nq),  # query blocks slowest: see _query_block
        in_specs=_common_specs(p, batch, bq, s_pad, lambda h, b, i: qi(i), None, b_axis=1)
        + [q_tile, kv_all, kv_all, q_tile, row, row],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(p.q.shape, q.dtype),
        compiler_params=_params(cfg, head_dim),
        interpret=interpret,
        name="flash_attention_dq",
    )(*_prologue(p, causal, window), p.q, p.k, p.v, d_out, lse, delta)


def _dkv(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, causal, window, cfg, consts,
         interpret):  # fmt: skip
    """dK/dV: the query heads of a group are one axis, so a program sees all of them in place."""
    bq, bk = cfg.block_q, cfg.block_kv
    p = common.prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    batch, t_pad, n_heads, head_dim = p.q.shape
    s_pad, n_kv = p.k.shape[1], k.shape[2]
    group = n_heads // n_kv
    d_out = common.pad_seq(d_out, t_pad, 1)
    lse, delta = common.pad_seq(lse, t_pad, 2), common.pad_seq(delta, t_pad, 2)
    q5 = p.q.reshape(batch, t_pad, n_kv, group, head_dim)
    do5 = d_out.reshape(batch, t_pad, n_kv, group, head_dim)
    lse4 = lse.reshape(batch, n_kv, group, t_pad)
    delta4 = delta.reshape(batch, n_kv, group, t_pad)
    q_all = pl.BlockSpec((None, t_pad, None, group, head_dim), lambda j, b, h: (b, 0, h, 0, 0))
    rows = pl.BlockSpec((None, None, group, t_pad), lambda j, b, h: (b, h, 0, 0))
    kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, **consts),
        grid=(s_pad // bk, batch, n_kv),  # causal: the first key blocks see the most queries
        in_specs=_common_specs(p, batch, t_pad, bk, None, lambda j, b, h: j, b_axis=1)
        + [q_all, kv_tile, kv_tile, q_all, rows, rows],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(p.k.shape, k.dtype)] * 2,
        compiler_params=_params(cfg, head_dim),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*_prologue(p, causal, window), q5, p.k, p.v, do5, lse4, delta4)
