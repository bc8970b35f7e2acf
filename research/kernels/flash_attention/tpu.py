"""Flash attention for TPUs: Pallas kernels lowered through Mosaic, forward and backward.

Mosaic tiles the last two dimensions of every block, so q/k/v are moved to [batch, heads, seq,
head_dim] around the kernels. The key-block axis is a grid axis ("arbitrary": sequential, with
VMEM scratch carrying the online-softmax state). Block summaries and bands are scalar-prefetched
into SMEM: the index maps clamp each grid step into the band of visible blocks, so a skipped
block is neither fetched (same block index as the step before: no new DMA) nor computed.
Grouped-query attention maps query head h onto KV head h // group in the index maps; the dK/dV
kernel walks (group member, query block) as its two innermost axes into one accumulator.
Row statistics (lse out of the forward, lse and delta into the backward) are stored lane-dense
as [batch, heads, 1, seq] with the query block on the lanes: a [.., seq, 1] array is padded to
128 lanes in HBM and VMEM, 128x its bytes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from research.kernels.flash_attention import common, tiles
from research.kernels.flash_attention.common import (
    BAND_HI,
    BAND_LO,
    FULL,
    LOG2_E,
    N_COLUMNS,
    PARTIAL,
)

# Scoped VMEM the kernels may use: 512-wide tiles with their double buffers and float32
# accumulators need more than Mosaic's default (16 MiB on v5e); 32 MiB fits every generation's
# VMEM and compiles for v4, v5e, v5p and v6e (tests/test_tpu_compile.py).
VMEM_LIMIT_BYTES = 32 * 2**20


class _Stats:
    """Reads the flat SMEM block summaries: ``field(b, block, c)`` (c: common's columns)."""

    def __init__(self, ref, n_blocks: int, has_segments: bool):
        self.ref, self.n, self.has_segments = ref, n_blocks, has_segments

    def field(self, b, block, c):
        b = b if self.has_segments else 0
        return self.ref[(b * self.n + block) * N_COLUMNS + c]

    def stats(self, b, block):
        return [self.field(b, block, c) for c in range(5)]

    def band_block(self, b, block, step):
        """The step-th block of the band, clamped to its last block (0 for an empty band)."""
        lo, hi = self.field(b, block, BAND_LO), self.field(b, block, BAND_HI)
        return jnp.minimum(lo + step, jnp.maximum(hi - 1, 0)), lo + step < hi


def _when_visible(kind, in_band, step):
    """Run ``step(masked)`` for a partly or fully visible block; nothing for a skipped one."""

    @pl.when(in_band & (kind == PARTIAL))
    def _():
        step(True)

    @pl.when(in_band & (kind == FULL))
    def _():
        step(False)


def _mask(masked, refs, causal, window):
    """Element mask from (q_pos [bq,1], kv_pos [1,bk], q_seg [bq,1], kv_seg [1,bk]) refs."""
    if not masked:
        return None
    q_pos, kv_pos, q_seg, kv_seg = (None if r is None else r[...] for r in refs)
    return common.visible(q_pos, kv_pos, q_seg, kv_seg, causal, window)


def _split(refs, has_seg: bool, n_tensors: int):
    """Kernel refs -> (tensor refs, mask refs); segment refs are absent without segments."""
    n_mask = 4 if has_seg else 2
    mask_refs = list(refs[n_tensors : n_tensors + n_mask]) + [None] * (4 - n_mask)
    return refs[:n_tensors], mask_refs, refs[n_tensors + n_mask :]


def _row(col: jax.Array) -> jax.Array:
    """A [bq, 1] column of row statistics as the [1, bq] row it is stored as. Mosaic lowers a
    2-D transpose of whole (bq, 128) tiles; a (bq, 1) -> (1, bq) reshape needs a sublane
    gather, which v4 lacks."""
    return jnp.broadcast_to(col, (col.shape[0], 128)).T[:1]


def _column(ref) -> jax.Array:
    """A stored [1, bq] row of row statistics as the [bq, 1] column the tile math uses."""
    return ref[0][:, None]


def _fwd_kernel(qs_ref, ks_ref, *refs, causal, window, scale, nq, nk, has_seg):
    (q_ref, k_ref, v_ref), mask_refs, (o_ref, lse_ref, acc_ref, m_ref, l_ref) = _split(
        refs, has_seg, 3
    )
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_stats, kv_stats = _Stats(qs_ref, nq, has_seg), _Stats(ks_ref, nk, has_seg)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, common.MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)

    block, in_band = q_stats.band_block(b, i, j)
    kind = common.block_kind(q_stats.stats(b, i), kv_stats.stats(b, block), causal, window, has_seg)

    def step(masked: bool):
        ok = _mask(masked, mask_refs, causal, window)
        carry = (acc_ref[...], m_ref[...], l_ref[...])
        acc, m, denom = tiles.forward_step(q_ref[...], k_ref[...], v_ref[...], carry, scale, ok)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, denom

    _when_visible(kind, in_band, step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        out, lse = tiles.forward_finish(acc_ref[...], m_ref[...], l_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = _row(lse)


def _dq_kernel(qs_ref, ks_ref, *refs, causal, window, scale, sm_scale, nq, nk, has_seg):
    tensors, mask_refs, (dq_ref, acc_ref) = _split(refs, has_seg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = tensors
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_stats, kv_stats = _Stats(qs_ref, nq, has_seg), _Stats(ks_ref, nk, has_seg)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    block, in_band = q_stats.band_block(b, i, j)
    kind = common.block_kind(q_stats.stats(b, i), kv_stats.stats(b, block), causal, window, has_seg)

    def step(masked: bool):
        ok = _mask(masked, mask_refs, causal, window)
        acc_ref[...] = tiles.dq_step(
            q_ref[...], do_ref[...], _column(lse_ref), _column(delta_ref), k_ref[...],
            v_ref[...], acc_ref[...], scale, sm_scale, ok,
        )  # fmt: skip

    _when_visible(kind, in_band, step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(qs_ref, ks_ref, *refs, causal, window, scale, sm_scale, nq, nk, has_seg):
    tensors, mask_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = _split(refs, has_seg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = tensors
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_stats, kv_stats = _Stats(qs_ref, nq, has_seg), _Stats(ks_ref, nk, has_seg)
    first = (g == 0) & (i == 0)
    last = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    block, in_band = kv_stats.band_block(b, j, i)
    kind = common.block_kind(q_stats.stats(b, block), kv_stats.stats(b, j), causal, window, has_seg)

    def step(masked: bool):
        ok = _mask(masked, mask_refs, causal, window)
        dk_acc[...], dv_acc[...] = tiles.dkv_step(
            q_ref[...], do_ref[...], _column(lse_ref), _column(delta_ref), k_ref[...],
            v_ref[...], (dk_acc[...], dv_acc[...]), scale, sm_scale, ok,
        )  # fmt: skip

    _when_visible(kind, in_band, step)

    @pl.when(last)
    def _():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _heads_first(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


def _setup(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk, causal, window):
    """Padded, head-major tensors, the flat SMEM summaries and the mask operands."""
    p = common.prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
    q_stats, kv_stats = common.stats_with_bands(p, causal, window)
    mask_ops = [p.q_pos[:, None], p.kv_pos[None, :]]
    if p.q_seg is not None:
        mask_ops += [p.q_seg[:, :, None], p.kv_seg[:, None, :]]
    prefetch = [q_stats.reshape(-1), kv_stats.reshape(-1)]
    return p, prefetch, mask_ops


def _mask_specs(has_seg: bool, bq: int, bk: int, q_block, kv_block, b_of):
    """BlockSpecs of the mask operands given grid -> (q block, kv block, batch) functions."""
    specs = [
        pl.BlockSpec((bq, 1), lambda *a: (q_block(*a), 0)),
        pl.BlockSpec((1, bk), lambda *a: (0, kv_block(*a))),
    ]
    if has_seg:
        specs += [
            pl.BlockSpec((None, bq, 1), lambda *a: (b_of(*a), q_block(*a), 0)),
            pl.BlockSpec((None, 1, bk), lambda *a: (b_of(*a), 0, kv_block(*a))),
        ]
    return specs


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, interpret, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES
        ),
        interpret=interpret,
        name=name,
    )


def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, window, blocks, interpret):
    """Padded output [B, Tp, H, D] and base-2 log-sum-exp [B, H, Tp]."""
    bq, bk = blocks.block_q, blocks.block_kv
    p, prefetch, mask_ops = _setup(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk, causal, window)
    batch, t_pad, n_heads, head_dim = p.q.shape
    nq, nk, group = t_pad // bq, p.k.shape[1] // bk, n_heads // k.shape[2]
    has_seg = p.q_seg is not None
    q_stats = _Stats(None, nq, has_seg)

    def kv_block(b, h, i, j, qs, ks):
        q_stats.ref = qs
        return q_stats.band_block(b, i, j)[0]

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, head_dim),
        lambda b, h, i, j, *s: (b, jax.lax.div(h, group), kv_block(b, h, i, j, *s), 0),
    )
    in_specs = [q_spec, kv_spec, kv_spec] + _mask_specs(
        has_seg, bq, bk, lambda b, h, i, j, *_: i, kv_block, lambda b, *_: b
    )
    kernel = functools.partial(
        _fwd_kernel,
        causal=causal,
        window=window,
        scale=LOG2_E / math.sqrt(head_dim),
        nq=nq,
        nk=nk,
        has_seg=has_seg,
    )
    row = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    out, lse = _call(
        kernel,
        (batch, n_heads, nq, nk),
        in_specs,
        [q_spec, row],
        [
            jax.ShapeDtypeStruct((batch, n_heads, t_pad, head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, n_heads, 1, t_pad), jnp.float32),
        ],
        [pltpu.VMEM((bq, head_dim), jnp.float32)] + [pltpu.VMEM((bq, 1), jnp.float32)] * 2,
        ("parallel", "parallel", "parallel", "arbitrary"),
        interpret,
        "flash_attention_fwd",
    )(*prefetch, _heads_first(p.q), _heads_first(p.k), _heads_first(p.v), *mask_ops)
    return _heads_first(out), lse[:, :, 0]


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, *, causal, window,
             blocks, interpret):  # fmt: skip
    """dq, dk, dv (unpadded). ``lse`` and ``delta`` are [B, H, T] float32."""
    bq, bk = blocks.block_q_bwd, blocks.block_kv_bwd
    p, prefetch, mask_ops = _setup(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk, causal, window)
    batch, t_pad, n_heads, head_dim = p.q.shape
    n_kv = k.shape[2]
    nq, nk, group = t_pad // bq, p.k.shape[1] // bk, n_heads // n_kv
    has_seg = p.q_seg is not None
    sm_scale = 1.0 / math.sqrt(head_dim)
    consts = dict(
        causal=causal, window=window, scale=LOG2_E * sm_scale, sm_scale=sm_scale,
        nq=nq, nk=nk, has_seg=has_seg,
    )  # fmt: skip
    qh, kh, vh = _heads_first(p.q), _heads_first(p.k), _heads_first(p.v)
    doh = _heads_first(common.pad_seq(d_out.astype(q.dtype), t_pad, 1))
    lse = common.pad_seq(lse, t_pad, 2)[:, :, None]
    delta = common.pad_seq(delta, t_pad, 2)[:, :, None]
    q_stats, kv_stats = _Stats(None, nq, has_seg), _Stats(None, nk, has_seg)

    # dQ: grid (batch, head, q block, step along its band of kv blocks).
    def kv_block(b, h, i, j, qs, ks):
        q_stats.ref = qs
        return q_stats.band_block(b, i, j)[0]

    q_tile = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    row = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    kv_tile = pl.BlockSpec(
        (None, None, bk, head_dim),
        lambda b, h, i, j, *s: (b, jax.lax.div(h, group), kv_block(b, h, i, j, *s), 0),
    )
    dq = _call(
        functools.partial(_dq_kernel, **consts),
        (batch, n_heads, nq, nk),
        [q_tile, kv_tile, kv_tile, q_tile, row, row]
        + _mask_specs(has_seg, bq, bk, lambda b, h, i, j, *_: i, kv_block, lambda b, *_: b),
        q_tile,
        jax.ShapeDtypeStruct(qh.shape, q.dtype),
        [pltpu.VMEM((bq, head_dim), jnp.float32)],
        ("parallel", "parallel", "parallel", "arbitrary"),
        interpret,
        "flash_attention_dq",
    )(*prefetch, qh, kh, vh, doh, lse, delta, *mask_ops)

    # dK/dV: grid (batch, kv head, kv block, group member, step along its band of q blocks).
    def q_block(b, h, j, g, i, qs, ks):
        kv_stats.ref = ks
        return kv_stats.band_block(b, j, i)[0]

    q_rows = lambda b, h, j, g, i, *s: (b, h * group + g, q_block(b, h, j, g, i, *s), 0)  # noqa: E731
    q_spec = pl.BlockSpec((None, None, bq, head_dim), q_rows)
    q_cols = lambda b, h, j, g, i, *s: (b, h * group + g, 0, q_block(b, h, j, g, i, *s))  # noqa: E731
    row_spec = pl.BlockSpec((None, None, 1, bq), q_cols)
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, g, i, *_: (b, h, j, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, **consts),
        (batch, n_kv, nk, group, nq),
        [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        + _mask_specs(has_seg, bq, bk, q_block, lambda b, h, j, *_: j, lambda b, *_: b),
        [kv_spec, kv_spec],
        [jax.ShapeDtypeStruct(kh.shape, k.dtype)] * 2,
        [pltpu.VMEM((bk, head_dim), jnp.float32)] * 2,
        ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret,
        "flash_attention_dkv",
    )(*prefetch, qh, kh, vh, doh, lse, delta, *mask_ops)
    t, s = q.shape[1], k.shape[1]
    return _heads_first(dq)[:, :t], _heads_first(dk)[:, :s], _heads_first(dv)[:, :s]
