"""Flash-attention backward for Hopper GPUs (H100/H200) in Mosaic GPU: TMA, wgmma, warpgroups.

Same contract as ``gpu.backward`` (the Triton kernel): dq, dk, dv unpadded from q [B,T,H,D],
k/v [B,S,KV,D], the forward's base-2 ``lse`` [B,H,T] (scores scaled by LOG2_E/sqrt(D)) and
``delta`` = rowsum(out * d_out) [B,H,T], both float32. Two kernels; each CTA has a producer
warpgroup (TMA copies into a ``stages``-deep shared-memory ring) and one or two consumer
warpgroups (the math: wgmma into register accumulators), each consumer with its own
resident tile, all sharing the one stream and releasing each slot through a barrier
(FlashAttention-3's split):

- dK/dV: ``consumers`` key tiles (of one KV head) per CTA, K and V resident; streams (query
  block, query head of the group) pairs: S^T = K Q^T, P^T = exp2(S^T - lse) with lse as a row
  vector, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q. The query heads
  of a group are summed inside the kernel (they are consecutive steps of the same stream), so
  grouped-query attention needs no per-query-head dK/dV in memory and no reduction pass.
- dQ: ``consumers`` query tiles (of one head) per CTA, Q, dO, lse, delta resident; streams key
  blocks: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.

Causal, with or without a sliding window (key j visible to query i when i - window < j <= i):
blocks that no query of the CTA can see are never loaded, the fully visible ones run without a
mask; only the band's edges (and a key block holding padding) are masked. In scope: float16 /
bfloat16, head_dim 64 / 128, causal or not, causal sliding windows, GQA, default positions
(0..T-1, 0..S-1); segment ids and custom positions are not (``supports`` says why, for routing
to ``gpu.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from research.config import ConfigError
from research.kernels.flash_attention import common, hopper_scope

HEAD_DIMS = (64, 128)
SMEM_BYTES = common.SMEM_BYTES  # 227 KB per CTA on H100/H200
# Registers a consumer warpgroup's thread can hold (set_max_registers tops out at 240 when a
# producer warpgroup shares the SM); accumulators above this would spill.
REGISTER_LIMIT = 240
_PRODUCER_REGISTERS = 24  # 2 x 240 + 24 registers x 128 threads fit the SM's 64K
_WG_THREADS = 128
_SMEM_ALIGN = 1024  # Mosaic GPU starts every SMEM buffer on a 1 KB boundary
_MIN_TILE = 64  # wgmma: 64 rows per warpgroup; 64 16-bit columns per 128-byte swizzled row


@dataclasses.dataclass(frozen=True)
class HopperBwdBlocks:
    """Tiles of the two kernels: ``block_q`` query rows and ``block_kv`` key rows per tile
    (multiples of 64: wgmma rows), ``stages`` slots in the TMA ring of the streamed operand,
    and ``consumers`` math warpgroups per CTA, each with its own resident tile (key rows for
    dK/dV, query rows for dQ) sharing the one stream: two halve the streamed loads per row and
    let one warpgroup's softmax overlap the other's matmuls (FlashAttention-3)."""

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2
    consumers: int = 2


def smem_bytes(kernel: str, blocks: HopperBwdBlocks, head_dim: int, itemsize: int) -> int:
    """Shared memory one CTA of ``kernel`` (dq | dkv) allocates, counted as Mosaic GPU lays it
    out (a test checks against its own count): each buffer rounded up to 1 KB, 8 bytes per
    barrier. dq: per consumer its q, dO, dS tiles and lse, delta rows; the k, v ring. dkv:
    per consumer its k, v, P^T, dS^T tiles; the q, dO ring with their lse, delta rows."""
    bq, bk, n, c = blocks.block_q, blocks.block_kv, blocks.stages, blocks.consumers

    def buffer(elements: int, size: int = itemsize) -> int:
        return -(-elements * size // _SMEM_ALIGN) * _SMEM_ALIGN

    if kernel == "dq":
        tiles = [c * bq * head_dim] * 2 + [n * bk * head_dim] * 2 + [c * bq * bk]
        rows, barriers = [c * bq] * 2, 4 * c + 3 * n
    else:
        tiles = [c * bk * head_dim] * 2 + [n * bq * head_dim] * 2 + [c * bk * bq] * 2
        rows, barriers = [n * bq] * 2, 2 * c + 5 * n
    return sum(map(buffer, tiles)) + sum(buffer(r, 4) for r in rows) + 8 * barriers


def accumulator_registers(kernel: str, blocks: HopperBwdBlocks, head_dim: int) -> int:
    """32-bit registers per consumer thread that the float32 accumulators alone take:
    dK, dV, S^T, dP^T for dkv; dQ, S, dP for dq."""
    bq, bk = blocks.block_q, blocks.block_kv
    if kernel == "dq":
        return (bq * head_dim + 2 * bq * bk) // _WG_THREADS
    return (2 * bk * head_dim + 2 * bk * bq) // _WG_THREADS


def check_blocks(blocks: HopperBwdBlocks, head_dim: int, itemsize: int) -> None:
    """Raise a ConfigError naming the problem and the fix when the tiles cannot run."""
    for name in ("block_q", "block_kv"):
        size = getattr(blocks, name)
        if size < _MIN_TILE or size % _MIN_TILE:
            raise ConfigError(
                f"HopperBwdBlocks.{name}={size}: wgmma tiles are multiples of {_MIN_TILE} rows; "
                "use 64 or 128"
            )
    if blocks.consumers not in (1, 2):
        raise ConfigError(
            f"HopperBwdBlocks.consumers={blocks.consumers}: one or two math warpgroups per CTA "
            "(three would leave under 168 registers each); use 1 or 2"
        )
    if blocks.stages < 2:
        raise ConfigError(
            f"HopperBwdBlocks.stages={blocks.stages}: the TMA ring needs at least 2 slots to "
            "overlap loads with compute; use stages=2"
        )
    for kernel in ("dkv", "dq"):  # registers first: no smaller ring fixes those
        regs = accumulator_registers(kernel, blocks, head_dim)
        if regs > REGISTER_LIMIT:
            raise ConfigError(
                f"the Hopper {kernel} kernel's float32 accumulators need {regs} registers per "
                f"thread at head_dim={head_dim} with {blocks}, over the {REGISTER_LIMIT} a "
                "consumer warpgroup can hold: use 64-row tiles, or the Triton kernel (gpu.py) "
                "for this head_dim"
            )
        need = smem_bytes(kernel, blocks, head_dim, itemsize)
        if need > SMEM_BYTES:
            raise ConfigError(
                f"the Hopper {kernel} kernel needs {need} bytes of shared memory at "
                f"head_dim={head_dim} with {blocks} ({itemsize}-byte inputs), over the "
                f"{SMEM_BYTES} a CTA may use: lower stages, block_q/block_kv or consumers, "
                "or use the Triton kernel (gpu.py)"
            )


def supports(q, k, q_pos, kv_pos, q_seg, kv_seg, window) -> str | None:
    """None if this kernel computes the case, else why not (route it to gpu.py's kernel)."""
    reason = hopper_scope.shared_refusal(q, k, q_pos, kv_pos, q_seg, kv_seg)
    if reason:
        return reason
    if q.shape[-1] not in (*HEAD_DIMS, 256):
        return f"head_dim {q.shape[-1]}: the Hopper backward takes {HEAD_DIMS}"
    try:
        check_blocks(HopperBwdBlocks(), q.shape[-1], jnp.dtype(q.dtype).itemsize)
    except ConfigError as e:
        return str(e)
    return None


# jax 0.10's Mosaic GPU interpreter cannot read a transposed SMEM wgmma operand nor run
# plgpu.load; 0.11's can.
INTERPRETER_WORKS = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def _interpret_params(interpret):
    """None (compiled) or the GPU interpreter's parameters."""
    if interpret is None or interpret is False:
        return None
    if not INTERPRETER_WORKS:
        raise ConfigError(
            f"jax {jax.__version__}'s Mosaic GPU interpreter cannot run the Hopper backward "
            "(no transposed SMEM wgmma operands, no plgpu.load): use jax >= 0.11, or the "
            "Triton kernel (gpu.py) in interpret mode"
        )
    return hopper_scope.interpret_params(interpret)


def _tile(shape, dtype):
    """A 16-bit SMEM tile laid out for TMA and wgmma: 8x64 tiles with 128-byte swizzle."""
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _barriers(n: int):
    return plgpu.Barrier(num_arrivals=1, num_barriers=n)


def _transposed(ref):
    """A [m, n] SMEM tile read as [n, m] by wgmma (plgpu.transpose_ref is deprecated in 0.11)."""
    return ref.transpose((1, 0))


def _matmuls(operands, shape):
    """Several independent a @ b from shared memory, all issued before any is read back, so
    the tensor cores run them back to back."""

    def run(*accs):
        for acc, (a, b) in zip(accs, operands, strict=True):
            plgpu.wgmma(acc, a, b)
        return tuple(acc[...] for acc in accs)

    return pl.run_scoped(run, *[plgpu.ACC(shape, jnp.float32)] * len(operands))


# jax 0.10 needs plgpu.load's index; 0.11 deprecates passing one (index the ref instead) and
# 0.12 has no such parameter.
_LOAD_INDEX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_TAKES_INDEX = _LOAD_INDEX is not None and _LOAD_INDEX.default is inspect.Parameter.empty


def _row(ref, dim: int):
    """A float32 vector from shared memory laid out to broadcast along ``dim`` of a wgmma
    result (dim 0: a row vector over its columns, dim 1: a column over its rows)."""
    layout = plgpu.Layout.WGMMA.reduce(dim)
    if _LOAD_TAKES_INDEX:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _iota(shape, dim: int):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _drain(empty_bar, n_steps, stages: int):
    """The producer observes the consumer's releases of the last ``stages`` steps too: every
    phase of a barrier is waited by each warpgroup that waits on it (the interpreter checks
    this when the barrier is freed), and the CTA then ends only after its consumer."""

    def wait(t, carry):
        plgpu.barrier_wait(empty_bar.at[lax.rem(t, stages)])
        return carry

    lax.fori_loop(jnp.maximum(n_steps - stages, 0), n_steps, wait, ())


def _loop_body(step, t, carry, *, masked, accs):
    step(t, masked, *accs)
    return carry


def _run_steps(step, skip, accs, ranges):
    """The consumer's share of the stream: ``ranges`` of (start, stop, kind) in stream order
    (the ring's slots are filled in that order), kind "skip" for steps its rows cannot see
    (waited and released only, so every phase of every barrier is observed), "masked" under
    the causal or padding mask, "full" fully visible. ``accs``: its accumulators."""
    for start, stop, kind in ranges:
        if kind == "skip":
            body = lambda t, carry: (skip(t), carry)[1]  # noqa: E731
        else:
            body = functools.partial(_loop_body, step, masked=kind == "masked", accs=accs)
        lax.fori_loop(start, stop, body, ())


def _registers(consumers: int, producer: bool):
    """Move registers from the producer warpgroup (it only issues TMA copies) to the
    consumers: with two consumers the 64K registers would otherwise split evenly (168 each)."""
    if consumers > 1:
        if producer:
            plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        else:
            plgpu.set_max_registers(REGISTER_LIMIT, action="increase")


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, pt_smem, dst_smem,
    kv_bar, q_bar, do_bar, lse_bar, delta_bar, empty_bar,
    *, causal, window, scale, sm_scale, kv_len, group, nq, stages, consumers,
):  # fmt: skip
    _, bk, head_dim = k_smem.shape  # [consumers, bk, D]: each consumer its own key rows
    bq = q_smem.shape[1]
    j, b, kv_head = lax.axis_index("kv_block"), lax.axis_index("batch"), lax.axis_index("kv_head")
    wg = lax.axis_index("wg")

    def band(c):
        """Consumer c's keys: their first row and the query blocks [lo, hi) that see any of
        them, of which [full_lo, full_hi) see all of them (no mask)."""
        first = (j * consumers + c) * bk
        lo, full_lo, full_hi, hi = (jnp.int32(0),) * 2 + (jnp.int32(nq),) * 2
        if causal:
            lo = jnp.minimum(lax.div(first, bq), nq)
            full_lo = jnp.clip(lax.div(first + bk - 1 + bq - 1, bq), lo, nq)
        if window:  # query q sees keys (q - window, q]: the last key's last query ends the band
            hi = jnp.clip(lax.div(first + bk - 1 + window - 1, bq) + 1, lo, nq)
            full_lo = jnp.minimum(full_lo, hi)
            full_hi = jnp.clip(lax.div(first + window, bq), full_lo, hi)
        padded = first + bk > kv_len  # a key tile holding padding is masked everywhere
        full_lo = jnp.where(padded, hi, full_lo)
        return first, lo, full_lo, jnp.maximum(full_hi, full_lo), hi

    # The CTA streams the query blocks its first consumer's keys can see through those its
    # last consumer's can: each consumer skips (waits and releases) the rest.
    lo, hi = band(0)[1], band(consumers - 1)[4]
    n_steps = (hi - lo) * group

    def block_of(t):  # step -> (query block, query head); the heads of a group innermost
        return lo + lax.div(t, group), kv_head * group + lax.rem(t, group)

    @pl.when(wg == consumers)
    def _producer():
        _registers(consumers, producer=True)
        for c in range(consumers):
            keys = pl.ds(band(c)[0], bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[c], kv_bar.at[2 * c])
            plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[c], kv_bar.at[2 * c + 1])

        def load(t, _):
            slot = lax.rem(t, stages)

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(empty_bar.at[slot])  # every consumer is done with this slot

            i, h = block_of(t)
            rows = pl.ds(i * bq, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], lse_bar.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])
            plgpu.copy_gmem_to_smem(
                delta_ref.at[b, h, rows], delta_smem.at[slot], delta_bar.at[slot]
            )
            return ()

        lax.fori_loop(0, n_steps, load, ())
        _drain(empty_bar, n_steps, stages)

    @pl.when(wg < consumers)
    def _consumer():
        _registers(consumers, producer=False)
        c = wg
        k_tile, v_tile, pt_tile, dst_tile = (x.at[c] for x in (k_smem, v_smem, pt_smem, dst_smem))
        first, own_lo, full_lo, full_hi, own_hi = band(c)
        plgpu.barrier_wait(kv_bar.at[2 * c])
        plgpu.barrier_wait(kv_bar.at[2 * c + 1])
        key_ids = first + _iota((bk, bq), 0)

        def skip(t):
            slot = lax.rem(t, stages)
            for bar in (q_bar, lse_bar, do_bar, delta_bar):
                plgpu.barrier_wait(bar.at[slot])
            plgpu.barrier_arrive(empty_bar.at[slot])

        def step(t, masked: bool, dk_acc, dv_acc):
            slot = lax.rem(t, stages)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_bar.at[slot])
            plgpu.barrier_wait(do_bar.at[slot])
            s_t, dp_t = _matmuls(((k_tile, _transposed(q_tile)), (v_tile, _transposed(do_tile))),
                                 (bk, bq))  # fmt: skip
            s_t = s_t * scale
            if masked:
                i, _ = block_of(t)
                ok = key_ids < kv_len
                query_ids = i * bq + _iota((bk, bq), 1)
                if causal:
                    ok &= key_ids <= query_ids
                if window:
                    ok &= key_ids > query_ids - window
                s_t = jnp.where(ok, s_t, common.MASK_VALUE)  # exp2 underflows to exactly 0
            plgpu.barrier_wait(lse_bar.at[slot])
            p_t = jnp.exp2(s_t - lax.broadcast_in_dim(_row(lse_smem.at[slot], 0), (bk, bq), [1]))
            pt_tile[...] = p_t.astype(pt_tile.dtype)
            plgpu.commit_smem()  # make the register stores visible to wgmma
            plgpu.wgmma(dv_acc, pt_tile, do_tile)  # runs while dS^T is computed
            plgpu.barrier_wait(delta_bar.at[slot])
            delta = lax.broadcast_in_dim(_row(delta_smem.at[slot], 0), (bk, bq), [1])
            dst_tile[...] = (p_t * (dp_t - delta)).astype(dst_tile.dtype)
            plgpu.commit_smem()
            plgpu.wgmma(dk_acc, dst_tile, q_tile)
            plgpu.wgmma_wait(0)  # P^T, dS^T and this slot are read: free them
            plgpu.barrier_arrive(empty_bar.at[slot])

        def accumulate(dk_acc, dv_acc):
            at = [(x - lo) * group for x in (own_lo, full_lo, full_hi, own_hi)]
            ranges = ((0, at[0], "skip"), (at[0], at[1], "masked"), (at[1], at[2], "full"),
                      (at[2], at[3], "masked"), (at[3], n_steps, "skip"))  # fmt: skip
            _run_steps(step, skip, (dk_acc, dv_acc), ranges)
            return dk_acc[...], dv_acc[...]

        acc = plgpu.ACC((bk, head_dim), jnp.float32)
        dk, dv = pl.run_scoped(accumulate, acc, acc)
        # K and V are no longer read: their tiles stage the results for the TMA store.
        k_tile[...] = (dk * sm_scale).astype(k_tile.dtype)
        v_tile[...] = dv.astype(v_tile.dtype)
        plgpu.commit_smem()
        keys = pl.ds(first, bk)
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[b, keys, kv_head])
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[b, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, ds_smem,
    res_bar, k_bar, v_bar, empty_bar,
    *, causal, window, scale, sm_scale, kv_len, group, nk, stages, consumers, n_ctas,
):  # fmt: skip
    _, bq, head_dim = q_smem.shape  # [consumers, bq, D]: each consumer its own query rows
    bk = k_smem.shape[1]
    i, b, h = lax.axis_index("q_block"), lax.axis_index("batch"), lax.axis_index("head")
    if causal:  # the grid's first axis is launched slowest: the longest query blocks first,
        i = n_ctas - 1 - i  # so the short ones fill the tail (dK/dV's longest come first anyway)
    wg = lax.axis_index("wg")
    kv_head = lax.div(h, group)

    def band(c):
        """Consumer c's queries: their first row and the key blocks [lo, hi) they see, of
        which [full_lo, full_hi) are fully visible to all of them (no mask)."""
        first = (i * consumers + c) * bq
        lo, full_lo = jnp.int32(0), jnp.int32(0)
        if causal:
            hi = jnp.minimum(lax.div(first + bq - 1, bk) + 1, nk)
            full_hi = jnp.minimum(lax.div(first + 1, bk), hi)
        else:
            hi, full_hi = jnp.int32(nk), jnp.int32(nk)
        if window:  # query q sees keys (q - window, q]: the first query's first key starts it
            lo = jnp.minimum(lax.div(jnp.maximum(first - window + 1, 0), bk), hi)
            full_lo = jnp.clip(lax.div(jnp.maximum(first + bq - window, 0) + bk - 1, bk), lo, hi)
        full_hi = jnp.minimum(full_hi, kv_len // bk)  # key tiles with padding: masked
        return first, lo, full_lo, jnp.maximum(full_hi, full_lo), hi

    # The CTA streams the key blocks from its first consumer's first to its last consumer's
    # last; slots and barrier phases count stream steps (block - lo).
    lo, hi = band(0)[1], band(consumers - 1)[4]
    n_steps = hi - lo

    @pl.when(wg == consumers)
    def _producer():
        _registers(consumers, producer=True)
        for c in range(consumers):
            rows = pl.ds(band(c)[0], bq)
            for r, (src, dst) in enumerate(
                ((q_ref.at[b, rows, h], q_smem), (do_ref.at[b, rows, h], do_smem),
                 (lse_ref.at[b, h, rows], lse_smem), (delta_ref.at[b, h, rows], delta_smem))
            ):  # fmt: skip
                plgpu.copy_gmem_to_smem(src, dst.at[c], res_bar.at[4 * c + r])

        def load(t, _):
            slot = lax.rem(t, stages)

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(empty_bar.at[slot])

            keys = pl.ds((lo + t) * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_bar.at[slot])
            return ()

        lax.fori_loop(0, n_steps, load, ())
        _drain(empty_bar, n_steps, stages)

    @pl.when(wg < consumers)
    def _consumer():
        _registers(consumers, producer=False)
        c = wg
        q_tile, do_tile, ds_tile = q_smem.at[c], do_smem.at[c], ds_smem.at[c]
        first, own_lo, full_lo, full_hi, own_hi = band(c)
        for r in range(4):
            plgpu.barrier_wait(res_bar.at[4 * c + r])
        lse = lax.broadcast_in_dim(_row(lse_smem.at[c], 1), (bq, bk), [0])
        delta = lax.broadcast_in_dim(_row(delta_smem.at[c], 1), (bq, bk), [0])
        query_ids = first + _iota((bq, bk), 0)

        def skip(t):
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(empty_bar.at[slot])

        def step(t, masked: bool, dq_acc):
            slot = lax.rem(t, stages)
            k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            s, dp = _matmuls(((q_tile, _transposed(k_tile)), (do_tile, _transposed(v_tile))),
                             (bq, bk))  # fmt: skip
            s = s * scale
            if masked:
                key_ids = (lo + t) * bk + _iota((bq, bk), 1)
                ok = key_ids < kv_len
                if causal:
                    ok &= key_ids <= query_ids
                if window:
                    ok &= key_ids > query_ids - window
                s = jnp.where(ok, s, common.MASK_VALUE)
            ds_tile[...] = (jnp.exp2(s - lse) * (dp - delta)).astype(ds_tile.dtype)
            plgpu.commit_smem()
            plgpu.wgmma(dq_acc, ds_tile, k_tile)
            plgpu.wgmma_wait(0)  # dS and this slot are read: free them
            plgpu.barrier_arrive(empty_bar.at[slot])

        def accumulate(dq_acc):
            at = [x - lo for x in (own_lo, full_lo, full_hi, own_hi)]
            ranges = ((0, at[0], "skip"), (at[0], at[1], "masked"), (at[1], at[2], "full"),
                      (at[2], at[3], "masked"), (at[3], n_steps, "skip"))  # fmt: skip
            _run_steps(step, skip, (dq_acc,), ranges)
            return dq_acc[...]

        dq = pl.run_scoped(accumulate, plgpu.ACC((bq, head_dim), jnp.float32))
        q_tile[...] = (dq * sm_scale).astype(q_tile.dtype)  # Q is no longer read
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, pl.ds(first, bq), h])
        plgpu.wait_smem_to_gmem(0)


def _kernel_call(body, out_type, scratch, grid, grid_names, consumers, interpret, name):
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=consumers + 1,  # consumer warpgroups 0.., then the producer
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
        kernel_name=name,
    )


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta, *, causal, window,
             blocks, interpret):  # fmt: skip
    """dq, dk, dv (unpadded) of attention with default positions. ``lse`` (base 2) and
    ``delta`` are [B, H, T] float32. ``blocks``: a HopperBwdBlocks (anything else, such as the
    Triton kernel's BlockSizes, means the defaults: its tiles do not carry over to wgmma).
    ``interpret``: False / None compiled, True or an InterpretGPUParams for the interpreter.
    Positions are not read: the caller checks ``supports`` first."""
    reason = supports(q, k, None, None, q_seg, kv_seg, window)
    if reason:
        raise ConfigError(f"the Hopper backward cannot run this case: {reason}")
    hopper_scope.check_window(window, causal)
    del q_pos, kv_pos
    cfg = blocks if isinstance(blocks, HopperBwdBlocks) else HopperBwdBlocks()
    batch, t, n_heads, head_dim = q.shape
    s, n_kv = k.shape[1], k.shape[2]
    check_blocks(cfg, head_dim, jnp.dtype(q.dtype).itemsize)
    bq, bk, stages, n_wg = cfg.block_q, cfg.block_kv, cfg.stages, cfg.consumers
    # Whole CTAs: a dQ CTA covers n_wg query tiles, a dK/dV CTA n_wg key tiles.
    t_pad, s_pad = -(-t // (n_wg * bq)) * n_wg * bq, -(-s // (n_wg * bk)) * n_wg * bk
    # Padded queries have q = dO = lse = delta = 0, so they add exactly 0 to dK and dV.
    qp, dop = common.pad_seq(q, t_pad, 1), common.pad_seq(d_out.astype(q.dtype), t_pad, 1)
    kp, vp = common.pad_seq(k, s_pad, 1), common.pad_seq(v, s_pad, 1)
    lse = common.pad_seq(lse.astype(jnp.float32), t_pad, 2)
    delta = common.pad_seq(delta.astype(jnp.float32), t_pad, 2)
    sm_scale = 1.0 / math.sqrt(head_dim)
    consts = dict(causal=causal, window=window, scale=common.LOG2_E * sm_scale,
                  sm_scale=sm_scale, kv_len=s, group=n_heads // n_kv, stages=stages,
                  consumers=n_wg)  # fmt: skip
    dtype = q.dtype
    f32 = jnp.float32
    ring = [_barriers(stages) for _ in range(5)]  # per slot: 4 loads done, then the slot freed
    ring[-1] = plgpu.Barrier(num_arrivals=n_wg, num_barriers=stages)

    dkv = _kernel_call(
        functools.partial(_dkv_kernel, nq=-(-t // bq), **consts),  # streams only real rows
        out_type=[jax.ShapeDtypeStruct(kp.shape, dtype)] * 2,
        scratch=[
            _tile((n_wg, bk, head_dim), dtype),
            _tile((n_wg, bk, head_dim), dtype),
            _tile((stages, bq, head_dim), dtype),
            _tile((stages, bq, head_dim), dtype),
            plgpu.SMEM((stages, bq), f32),
            plgpu.SMEM((stages, bq), f32),
            _tile((n_wg, bk, bq), dtype),
            _tile((n_wg, bk, bq), dtype),
            _barriers(2 * n_wg),
            *ring,
        ],
        grid=(s_pad // (n_wg * bk), batch, n_kv),
        grid_names=("kv_block", "batch", "kv_head"),
        consumers=n_wg,
        interpret=interpret,
        name="flash_attention_dkv_hopper",
    )
    dk, dv = dkv(qp, kp, vp, dop, lse, delta)

    dq_call = _kernel_call(
        functools.partial(_dq_kernel, nk=-(-s // bk), n_ctas=t_pad // (n_wg * bq), **consts),
        out_type=jax.ShapeDtypeStruct(qp.shape, dtype),
        scratch=[
            _tile((n_wg, bq, head_dim), dtype),
            _tile((n_wg, bq, head_dim), dtype),
            plgpu.SMEM((n_wg, bq), f32),
            plgpu.SMEM((n_wg, bq), f32),
            _tile((stages, bk, head_dim), dtype),
            _tile((stages, bk, head_dim), dtype),
            _tile((n_wg, bq, bk), dtype),
            _barriers(4 * n_wg),
            *ring[2:],
        ],
        grid=(t_pad // (n_wg * bq), batch, n_heads),
        grid_names=("q_block", "batch", "head"),
        consumers=n_wg,
        interpret=interpret,
        name="flash_attention_dq_hopper",
    )
    dq = dq_call(qp, kp, vp, dop, lse, delta)
    return dq[:, :t], dk[:, :s], dv[:, :s]
