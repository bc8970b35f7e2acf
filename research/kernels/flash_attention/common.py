"""What every flash-attention implementation shares: checks, padding, masks and block skipping.

Masking is by position, as in the ``xla`` reference: key j is visible to query i when
``0 <= kv_pos[j]`` and, if causal, ``kv_pos[j] <= q_pos[i]``, within ``window`` if set
(``kv_pos[j] > q_pos[i] - window``), and in the same segment (packed documents). Padding a
sequence to whole blocks gives the padded keys position -1, so they are never visible.

Each (query block, key block) pair is classified once from per-block summaries (min/max
position and segment): SKIP (nothing visible: not computed), FULL (everything visible: no
mask needed) or PARTIAL (apply the element mask). The summaries are small ([batch, blocks, 5]),
so the kernels recompute the class per pair instead of reading a quadratic table.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

SKIP, PARTIAL, FULL = 0, 1, 2
# A finite "minus infinity": exp2(MASK - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2_E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
KERNEL_HEAD_DIMS = (32, 64, 128, 256)
_BIG = 2**30


@dataclasses.dataclass(frozen=True)
class Pass:
    """One kernel's tiles and (Triton only) launch settings."""

    block_q: int
    block_kv: int
    num_warps: int | None  # None: 4 for head_dim <= 64, else 8
    num_stages: int  # software-pipelining depth of the streamed operand's loop


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query (q) and key (kv) sequence for the forward, dQ and dK/dV
    kernels, and the Triton warps and pipeline stages of each. The dK/dV fields default to the
    backward's (0 / None: same as block_q_bwd, block_kv_bwd, num_warps, num_stages)."""

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    num_warps: int | None = None  # Triton only; None: 4 for head_dim <= 64, else 8
    num_stages: int = 2  # Triton only: software-pipelining depth of the key loop
    block_q_dkv: int = 0
    block_kv_dkv: int = 0
    num_warps_dq: int | None = None
    num_stages_dq: int = 0
    num_warps_dkv: int | None = None
    num_stages_dkv: int = 0

    @property
    def forward(self) -> Pass:
        return Pass(self.block_q, self.block_kv, self.num_warps, self.num_stages)

    @property
    def dq(self) -> Pass:
        warps = self.num_warps_dq if self.num_warps_dq is not None else self.num_warps
        stages = self.num_stages_dq or self.num_stages
        return Pass(self.block_q_bwd, self.block_kv_bwd, warps, stages)

    @property
    def dkv(self) -> Pass:
        warps = self.num_warps_dkv if self.num_warps_dkv is not None else self.num_warps
        return Pass(
            self.block_q_dkv or self.block_q_bwd,
            self.block_kv_dkv or self.block_kv_bwd,
            warps,
            self.num_stages_dkv or self.num_stages,
        )

    @classmethod
    def for_backend(cls, backend: str) -> BlockSizes:
        """Defaults per backend: Triton keeps tiles in registers (64-wide backward tiles),
        Mosaic TPU wants large 128-multiples for the MXU and few grid steps (MaxText's splash
        attention runs 512-2048), plain JAX on CPU wants few, big blocks."""
        if backend == "tpu":
            return cls(512, 512, 512, 512)
        if backend == "cpu":
            return cls(512, 512, 512, 512)
        return cls(128, 64, 64, 64)


# Shared memory one Triton program may use: 227 KB on Hopper (H100/H200), 163 KB on A100.
SMEM_BYTES = 227 * 1024


def smem_bytes(kernel: str, p: Pass, head_dim: int, itemsize: int) -> int:
    """Shared memory a Triton program of ``kernel`` (fwd | dq | dkv) needs, estimated as Triton
    lays it out: the resident tiles once, the streamed ones once per pipeline stage, and the
    [bq, bk] probability tile that feeds the second matmul."""
    bq, bk, stages = p.block_q, p.block_kv, max(1, p.num_stages)
    if kernel == "fwd":  # q resident; k, v streamed
        tiles = bq * head_dim + stages * 2 * bk * head_dim
    elif kernel == "dq":  # q, dO resident; k, v streamed
        tiles = 2 * bq * head_dim + stages * 2 * bk * head_dim
    else:  # dkv: k, v resident; q, dO streamed (and their lse / delta rows)
        tiles = 2 * bk * head_dim + stages * 2 * bq * head_dim
    return (tiles + bq * bk) * itemsize


def fit_smem(kernel: str, p: Pass, head_dim: int, itemsize: int, limit: int = SMEM_BYTES) -> Pass:
    """``p`` shrunk until ``kernel``'s shared memory fits in ``limit``: first the pipeline depth
    (down to 2), then the streamed block, then the resident block (down to 16), halving each.
    A fit that needs tiles below 16 is an error naming the settings that would help."""
    import dataclasses as dc

    streamed = "block_kv" if kernel in ("fwd", "dq") else "block_q"
    resident = "block_q" if streamed == "block_kv" else "block_kv"
    while smem_bytes(kernel, p, head_dim, itemsize) > limit:
        if p.num_stages > 2:
            p = dc.replace(p, num_stages=p.num_stages - 1)
        elif getattr(p, streamed) > 16:
            p = dc.replace(p, **{streamed: getattr(p, streamed) // 2})
        elif getattr(p, resident) > 16:
            p = dc.replace(p, **{resident: getattr(p, resident) // 2})
        else:
            raise ValueError(
                f"the {kernel} kernel needs {smem_bytes(kernel, p, head_dim, itemsize)} bytes "
                f"of shared memory even with 16-row tiles at head_dim={head_dim} "
                f"({itemsize}-byte inputs), over the {limit} available: use bfloat16 inputs, "
                "a smaller head_dim, or attention='blockwise'"
            )
    return p


def check_inputs(q, k, v, q_segment_ids, kv_segment_ids, window: int, causal: bool, kernel: bool):
    """Raise a ValueError naming the problem and the fix for anything the kernels cannot do."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"flash attention takes q, k, v as [batch, seq, heads, head_dim]; got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    batch, _, n_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must both be [batch={batch}, kv_seq, kv_heads, head_dim={head_dim}]; got "
            f"k {k.shape}, v {v.shape}"
        )
    if n_heads % k.shape[2]:
        raise ValueError(
            f"{n_heads} query heads cannot be grouped onto {k.shape[2]} KV heads; "
            "n_heads must be a multiple of n_kv_heads"
        )
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or jnp.dtype(q.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        raise ValueError(
            f"flash attention needs q, k, v of one dtype among bfloat16, float16, float32; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}: cast them first"
        )
    if kernel and head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"the Pallas kernels support head_dim in {KERNEL_HEAD_DIMS}, got {head_dim}; "
            "use attention='blockwise' (any head_dim) or pad the heads"
        )
    if window < 0 or (window and not causal):
        raise ValueError(
            f"window={window}: a sliding window is a causal look-back of w >= 1 positions; "
            "use window=0 (off) or causal=True"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give segment ids for both queries and keys, or for neither")
    if q_segment_ids is not None and (
        q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]
    ):
        raise ValueError(
            f"segment ids must be [batch, seq] like q {q.shape[:2]} and k {k.shape[:2]}; got "
            f"{q_segment_ids.shape} and {kv_segment_ids.shape}"
        )


def fit_block(block: int, length: int, minimum: int = 16) -> int:
    """The block size to use for a sequence: no bigger than the sequence rounded up to a power
    of two (a 100-token sequence runs as one 128 block, not a padded 512 one)."""
    return max(minimum, min(block, 1 << max(0, length - 1).bit_length()))


def pad_seq(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    extra = length - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def visible(q_pos, kv_pos, q_seg, kv_seg, causal: bool, window: int):
    """Element mask, broadcasting q_* against kv_* (shapes [..., Tq, 1] and [..., 1, Tk])."""
    ok = kv_pos >= 0
    if causal:
        ok &= kv_pos <= q_pos
        if window:
            ok &= kv_pos > q_pos - window
    if q_seg is not None:
        ok &= q_seg == kv_seg
    return ok


def block_stats(positions: jax.Array, segments: jax.Array | None, block: int, batch: int):
    """Per block [batch, n_blocks, 5] int32: min valid position, max position, min segment,
    max segment, min raw position (>= 0 iff every slot of the block is a real token)."""
    pos = positions.reshape(-1, block)
    valid = pos >= 0
    pmin = jnp.min(jnp.where(valid, pos, _BIG), axis=1)
    pmax = jnp.max(pos, axis=1)
    raw = jnp.min(pos, axis=1)
    if segments is None:
        seg = jnp.zeros((batch, pos.shape[0], 2), jnp.int32)
    else:
        s = segments.reshape(batch, -1, block)
        smin = jnp.min(jnp.where(valid, s, _BIG), axis=2)
        smax = jnp.max(jnp.where(valid, s, -_BIG), axis=2)
        seg = jnp.stack([smin, smax], axis=-1)
    pos_stats = jnp.broadcast_to(jnp.stack([pmin, pmax], -1), (batch, pos.shape[0], 2))
    raw = jnp.broadcast_to(raw[None, :, None], (batch, pos.shape[0], 1))
    return jnp.concatenate([pos_stats, seg, raw], axis=-1).astype(jnp.int32)


def block_kind(qs, ks, causal: bool, window: int, has_segments: bool):
    """SKIP / PARTIAL / FULL for query blocks ``qs`` against key blocks ``ks``: sequences of the
    five stats (scalars in a kernel, broadcastable arrays outside)."""
    q_pmin, q_pmax, q_smin, q_smax = qs[0], qs[1], qs[2], qs[3]
    k_pmin, k_pmax, k_smin, k_smax, k_raw = ks[0], ks[1], ks[2], ks[3], ks[4]
    skip = k_pmax < 0
    full = k_raw >= 0
    if causal:
        skip |= k_pmin > q_pmax
        full &= k_pmax <= q_pmin
        if window:
            skip |= k_pmax <= q_pmin - window
            full &= k_pmin > q_pmax - window
    if has_segments:
        skip |= (k_smax < q_smin) | (k_smin > q_smax)
        full &= (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def kind_table(q_stats, kv_stats, causal: bool, window: int, has_segments: bool):
    """[batch, n_q_blocks, n_kv_blocks] classes of every block pair."""
    qs = [q_stats[:, :, None, i] for i in range(5)]
    ks = [kv_stats[:, None, :, i] for i in range(5)]
    shape = (q_stats.shape[0], q_stats.shape[1], kv_stats.shape[1])
    return jnp.broadcast_to(block_kind(qs, ks, causal, window, has_segments), shape)


def visible_range(kinds: jax.Array, axis: int):
    """First and one-past-last non-SKIP block along ``axis`` (0, 0 when there is none), so the
    kernels loop only over the band of blocks that can contribute."""
    any_visible = kinds != SKIP
    n = kinds.shape[axis]
    idx = jnp.arange(n).reshape([-1 if a == axis % kinds.ndim else 1 for a in range(kinds.ndim)])
    lo = jnp.min(jnp.where(any_visible, idx, n), axis=axis)
    hi = jnp.max(jnp.where(any_visible, idx + 1, 0), axis=axis)
    lo = jnp.minimum(lo, hi)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Inputs padded to whole blocks, with positions, segments and the block summaries."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_pos: jax.Array  # [Tp] int32, -1 on padding
    kv_pos: jax.Array  # [Sp]
    q_seg: jax.Array | None  # [B, Tp]
    kv_seg: jax.Array | None  # [B, Sp]
    q_stats: jax.Array  # [B or 1, nq, 5]
    kv_stats: jax.Array  # [B or 1, nk, 5]


def prepare_blocks(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_kv: int) -> Prepared:
    """Pad the sequence axes of q/k/v (and positions, segments) to multiples of the blocks."""
    t_pad = -(-q.shape[1] // block_q) * block_q
    s_pad = -(-k.shape[1] // block_kv) * block_kv
    q_pos = pad_seq(q_pos.astype(jnp.int32), t_pad, 0, -1)
    kv_pos = pad_seq(kv_pos.astype(jnp.int32), s_pad, 0, -1)
    if q_seg is not None:
        q_seg = pad_seq(q_seg.astype(jnp.int32), t_pad, 1, -1)
        kv_seg = pad_seq(kv_seg.astype(jnp.int32), s_pad, 1, -1)
    stat_batch = 1 if q_seg is None else q.shape[0]
    return Prepared(
        q=pad_seq(q, t_pad, 1),
        k=pad_seq(k, s_pad, 1),
        v=pad_seq(v, s_pad, 1),
        q_pos=q_pos,
        kv_pos=kv_pos,
        q_seg=q_seg,
        kv_seg=kv_seg,
        q_stats=block_stats(q_pos, q_seg, block_q, stat_batch),
        kv_stats=block_stats(kv_pos, kv_seg, block_kv, stat_batch),
    )


# Columns of the widened block summaries: the 5 stats, then the band on the other axis.
BAND_LO, BAND_FULL_LO, BAND_FULL_HI, BAND_HI = 5, 6, 7, 8
N_COLUMNS = 9


def full_run(kinds: jax.Array, axis: int, lo: jax.Array, hi: jax.Array):
    """The first contiguous run [full_lo, full_hi) of FULL blocks along ``axis`` (lo, lo when
    there is none). Kernels split their loop there: masked, unmasked, masked, with no branch
    in the loop body (a branch around the loads defeats Triton's software pipelining)."""
    n = kinds.shape[axis]
    shape = [-1 if a == axis % kinds.ndim else 1 for a in range(kinds.ndim)]
    idx = jnp.arange(n).reshape(shape)
    full = kinds == FULL
    start = jnp.min(jnp.where(full, idx, n), axis=axis)
    after = jnp.expand_dims(start, axis)
    end = jnp.min(jnp.where((idx > after) & ~full, idx, n), axis=axis)
    end = jnp.minimum(end, hi)
    has_run = start < end
    return (
        jnp.where(has_run, start, lo).astype(jnp.int32),
        jnp.where(has_run, end, lo).astype(jnp.int32),
    )


def stats_with_bands(p: Prepared, causal: bool, window: int):
    """Block summaries widened to N_COLUMNS: the 5 stats, then the band [lo, hi) of blocks on
    the other axis that can be visible (kv blocks for a q block, q blocks for a kv block) and
    the run of fully visible blocks inside it."""
    kinds = kind_table(p.q_stats, p.kv_stats, causal, window, p.q_seg is not None)

    def widen(stats, axis):
        lo, hi = visible_range(kinds, axis)
        full_lo, full_hi = full_run(kinds, axis, lo, hi)
        return jnp.concatenate([stats, jnp.stack([lo, full_lo, full_hi, hi], -1)], -1)

    return widen(p.q_stats, 2), widen(p.kv_stats, 1)
