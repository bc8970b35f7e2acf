"""Flash-attention forward for Hopper GPUs (H100/H200), written for Pallas Mosaic GPU.

The Triton kernel in ``gpu.py`` leaves Hopper's asynchronous units to the compiler; this one
uses them explicitly, FlashAttention-3 style. Each program (CTA) owns ``consumers`` query tiles
of ``block_q`` rows of one (batch, head) and runs ``consumers + 1`` warpgroups:

* a producer warpgroup streams K and V tiles by TMA (``copy_gmem_to_smem``) into a ring of
  ``stages`` SMEM slots, waiting on a "slot free" barrier before it overwrites a slot;
* each consumer warpgroup computes S = Q K^T with ``wgmma`` into an accumulator, runs the
  online softmax in base 2 in registers, and accumulates O += P V with a second ``wgmma``,
  then releases the slot. Key blocks above the causal diagonal, and with a sliding window
  those wholly below the band [q - window + 1, q], are never loaded; blocks that are entirely
  visible run without a mask, only the band's edges are masked.

Outputs follow ``gpu.forward``: the padded output [B, Tp, H, D] in q's dtype and the base-2
log-sum-exp [B, H, Tp] of the scores scaled by ``LOG2_E / sqrt(D)``, which the backward
kernels (Triton's or ``hopper_bwd``) recompute probabilities from.

Scope: float16/bfloat16, head_dim 64/128/256, causal or not, grouped-query attention, default
positions (0..T-1, 0..S-1), causal sliding windows, no segment ids. ``supports`` names what
is out of scope so callers can route it to the Triton kernel.

``interpret`` runs the kernel in JAX's Mosaic GPU interpreter on CPU (SMEM, warpgroups,
barriers, TMA and wgmma simulated, optionally with race detection). The interpreter cannot
feed a wgmma from registers or pre-initialise an accumulator, so interpreted runs always
take the ``registers_pv=False`` path (P staged through SMEM); the compiled default keeps P
in registers as FlashAttention-3 does.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from research.config import ConfigError
from research.kernels.flash_attention import hopper_scope
from research.kernels.flash_attention.common import (
    LOG2_E,
    MASK_VALUE,
    SMEM_BYTES,
    pad_seq,
)

HEAD_DIMS = (64, 128, 256)
WGMMA_ROWS = 64  # one warpgroup's wgmma covers 64 rows
_SWIZZLE = 128  # bytes: the widest swizzle, 64 two-byte elements per row segment
# Register split for warp specialisation (setmaxnreg): the producer only issues TMA copies.
_CONSUMER_REGS, _PRODUCER_REGS = 232, 40
_LN2 = math.log(2.0)
# Mosaic GPU's SMEM accounting: buffers aligned to 1 KB, plus CompilerParams'
# reduction_scratch_bytes (default 128 * 4 * 4) when the kernel reduces across warps.
_SMEM_ALIGN, _REDUCTION_SCRATCH = 1024, 128 * 4 * 4
# jax < 0.11's Mosaic GPU interpreter has no transposed wgmma operands and no layout_cast.
_OLD_INTERPRETER = jax.__version_info__ < (0, 11)
# The oldest jax the kernel was lowered with (0.8's plgpu.kernel takes other arguments).
_MIN_JAX = (0, 10)


@dataclasses.dataclass(frozen=True)
class HopperBlocks:
    """Tiles of the Hopper forward kernel.

    block_q: query rows per consumer warpgroup (a multiple of 64, wgmma's M).
    block_kv: keys per streamed K/V tile (a multiple of 64, for the 128-byte swizzle of P).
    stages: depth of the K/V SMEM ring (>= 2: one slot loads while another is consumed).
    consumers: consumer warpgroups per program (1 or 2); a program covers consumers*block_q rows.
    registers_pv: True feeds P to the P V wgmma from registers and accumulates O in place
        (FlashAttention-3); False stages P through SMEM into a fresh accumulator (what the
        interpreter can run; forced when interpreting).
    pingpong: with two consumers, a shared barrier makes them take turns (FlashAttention-3's
        ping-pong schedule): one runs its softmax while the other's wgmma use the tensor cores.
    """

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    consumers: int = 2
    registers_pv: bool = True
    pingpong: bool = True

    def __post_init__(self):
        problems = []
        if self.block_q <= 0 or self.block_q % WGMMA_ROWS:
            problems.append(f"block_q={self.block_q} must be a positive multiple of 64")
        if self.block_kv <= 0 or self.block_kv % 64 or self.block_kv > 256:
            problems.append(f"block_kv={self.block_kv} must be 64, 128, 192 or 256")
        if self.stages < 2:
            problems.append(f"stages={self.stages} must be >= 2")
        if self.consumers not in (1, 2):
            problems.append(f"consumers={self.consumers} must be 1 or 2")
        if problems:
            raise ConfigError("HopperBlocks: " + "; ".join(problems))

    @classmethod
    def for_head_dim(cls, head_dim: int) -> HopperBlocks:
        """Defaults: two consumer warpgroups (one computes softmax while the other's wgmma
        runs, as in FlashAttention-3) and 128-key tiles, 64-key tiles at head_dim 256 so the
        K/V ring fits in SMEM."""
        return cls(block_kv=64 if head_dim > 128 else 128)


def smem_bytes(blocks: HopperBlocks, head_dim: int, itemsize: int) -> int:
    """SMEM one program allocates, counted as Mosaic GPU lays it out: a Q tile per consumer
    (reused for its output), the K and V rings, P tiles when staged through SMEM and the lse
    rows, each buffer rounded up to 1 KB; the scratch Mosaic reserves for cross-warp
    reductions (2 KB); 8 bytes per barrier."""
    b = blocks

    def buffer(n_bytes: int) -> int:
        return -(-n_bytes // _SMEM_ALIGN) * _SMEM_ALIGN

    buffers = [
        b.consumers * b.block_q * head_dim * itemsize,
        b.stages * b.block_kv * head_dim * itemsize,
        b.stages * b.block_kv * head_dim * itemsize,
        0 if b.registers_pv else b.consumers * b.block_q * b.block_kv * itemsize,
        b.consumers * b.block_q * 4,
    ]
    barriers = b.consumers + 4 * b.stages + 1
    return sum(map(buffer, buffers)) + _REDUCTION_SCRATCH + 8 * barriers


def check_smem(blocks: HopperBlocks, head_dim: int, itemsize: int, limit: int = SMEM_BYTES):
    """Raise a ConfigError naming the footprint and what would shrink it if it exceeds the
    227 KB a Hopper program may use."""
    need = smem_bytes(blocks, head_dim, itemsize)
    if need > limit:
        raise ConfigError(
            f"the Hopper attention forward needs {need} bytes of shared memory with {blocks} at "
            f"head_dim={head_dim}, over the {limit} a Hopper SM gives one program: lower "
            "stages (min 2), block_kv or consumers, or use the Triton kernel (kernel='gpu')"
        )


def supports(q, k, q_pos, kv_pos, q_seg, kv_seg, window) -> str | None:
    """None when the Hopper forward handles these inputs, else why not (the caller should
    use the Triton kernel). Positions must be None or concrete 0..n-1: traced positions
    cannot be checked, so pass None for the defaults."""
    if jax.__version_info__ < _MIN_JAX:
        return f"jax {jax.__version__}: the Hopper kernel needs jax >= 0.10 (Mosaic GPU's API)"
    reason = hopper_scope.shared_refusal(q, k, q_pos, kv_pos, q_seg, kv_seg)
    if reason:
        return reason
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]}: the Hopper kernel takes {HEAD_DIMS}"
    return None


def _smem(shape, dtype):
    """SMEM tile laid out for TMA and wgmma: (8, 64)-element tiles, 128-byte swizzle."""
    elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(_SWIZZLE))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _kernel(
    q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, *scratch,
    blocks: HopperBlocks, causal: bool, window: int, kv_len: int, n_kv: int, group: int,
    n_q: int, scale: float, interpreted: bool,
):  # fmt: skip
    if blocks.registers_pv:
        q_smem, k_smem, v_smem, lse_smem, *bars = scratch
        p_smem = None
    else:
        q_smem, k_smem, v_smem, p_smem, lse_smem, *bars = scratch
    q_bar, k_bar, v_bar, k_free, v_free, turn = bars
    bq, bk, stages, consumers = blocks.block_q, blocks.block_kv, blocks.stages, blocks.consumers
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    # Causal: launch the longest query tiles first so short ones fill the tail of the grid.
    tile = (n_q - 1 - lax.axis_index("q_seq")) if causal else lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    pingpong = blocks.pingpong and consumers == 2

    def take_turns():
        """Rendezvous of the two consumers: each call is one phase of the ``turn`` barrier.
        Consumer 1 starts one phase behind, so their QK^T/softmax/PV alternate."""
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def kv_steps(q_end):
        """Key blocks that rows below q_end can see (causal: up to the diagonal)."""
        if not causal:
            return i32(n_kv)
        return jnp.minimum(lax.div(q_end + bk - 1, i32(bk)), n_kv)

    def kv_first(q_start):
        """First key block that rows from q_start on can see (window: the band's lower edge)."""
        if not window:
            return i32(0)
        return jnp.minimum(lax.div(jnp.maximum(q_start - window + 1, 0), i32(bk)), n_kv)

    # The stream is the key blocks any of the program's rows can see: from the first
    # consumer's first block to the last consumer's last; each releases what it cannot see.
    # Slots and barrier phases count stream steps (block - program_first), so every phase
    # is observed by producer and consumers alike.
    program_rows = tile * (consumers * bq)
    program_first = kv_first(program_rows)
    program_steps = kv_steps(program_rows + consumers * bq)
    n_stream = program_steps - program_first

    @pl.when(wg == consumers)
    def _producer():
        if not interpreted:
            plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
        kv_head = lax.div(h, i32(group))

        def load(step, carry):
            slot = lax.rem(step, i32(stages))
            rows = (b, pl.ds((program_first + step) * bk, bk), kv_head)

            @pl.when(step >= stages)  # the slot's previous tile must be consumed first
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(k_gmem.at[rows], k_smem.at[slot], k_bar.at[slot])

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(v_gmem.at[rows], v_smem.at[slot], v_bar.at[slot])
            return carry

        lax.fori_loop(0, n_stream, load, None)

        def drain(step, carry):
            slot = lax.rem(step, i32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            return carry

        # Observe the releases of the last tiles too, so every barrier phase is waited on
        # once by each party (the interpreter checks it; a persistent kernel would need it).
        lax.fori_loop(jnp.maximum(n_stream - stages, 0), n_stream, drain, None)

    @pl.when(wg < consumers)
    def _consumer():
        if not interpreted:
            plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
        q0 = (tile * consumers + wg) * bq
        q_tile, lse_row = q_smem.at[wg], lse_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_gmem.at[b, pl.ds(q0, bq), h], q_tile, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        first, steps = kv_first(q0), kv_steps(q0 + bq)
        # Blocks with every key visible to every row: below the diagonal, not padding and
        # (window) not below the band's lower edge for the tile's last row.
        full_hi = lax.div(q0 + 1, i32(bk)) if causal else i32(n_kv)
        full_hi = jnp.maximum(jnp.minimum(full_hi, jnp.minimum(steps, kv_len // bk)), first)
        full_lo = first
        if window:
            full_lo = jnp.clip(lax.div(jnp.maximum(q0 + bq - window, 0) + bk - 1, i32(bk)),
                               first, full_hi)  # fmt: skip

        def wgmma_layout(x, reduced: bool = False):
            if interpreted and _OLD_INTERPRETER:  # no layout_cast rule on CPU; layouts moot
                return x
            layout = plgpu.Layout.WGMMA
            return plgpu.layout_cast(x, layout.reduce(1) if reduced else layout)

        m = wgmma_layout(jnp.full((bq,), MASK_VALUE, jnp.float32), reduced=True)
        denom = wgmma_layout(jnp.zeros((bq,), jnp.float32), reduced=True)
        acc = wgmma_layout(jnp.zeros((bq, head_dim), jnp.float32))
        pl.when(wg == 1)(take_turns)

        def step(j, carry, masked: bool):
            acc, m, denom = carry
            slot = lax.rem(j - program_first, i32(stages))
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                take_turns()  # the other consumer goes on while this wgmma runs
                return s_ref[...]

            if interpreted and _OLD_INTERPRETER:  # cannot read a transposed wgmma operand
                s = jax.lax.dot_general(
                    q_tile[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                take_turns()
            else:
                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            ok = None
            if masked:
                shape = (bq, bk)
                rows = wgmma_layout(lax.broadcasted_iota(jnp.int32, shape, 0))
                cols = wgmma_layout(lax.broadcasted_iota(jnp.int32, shape, 1))
                key = cols + j * bk
                ok = key < kv_len
                if causal:
                    ok &= key <= rows + q0
                if window:
                    ok &= key > rows + q0 - window
                s = jnp.where(ok, s, MASK_VALUE)
            # s stays unscaled: the row maximum is scaled instead (scale > 0), and the exponent
            # s * scale - m is one FMA per score instead of a multiply and a subtract.
            m_new = jnp.maximum(m, s.max(axis=1) * scale)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            if masked:  # a row with nothing visible yet has m_new = MASK: keep its weights 0
                p = jnp.where(ok, p, 0.0)
            alpha = jnp.exp2(m - m_new)  # rescale what was summed under the old maximum
            denom = denom * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(dtype)
            if pingpong:  # softmax done: let the other consumer's wgmma go first
                plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_bar.at[slot])
            if pingpong:
                plgpu.barrier_wait(turn)
            if blocks.registers_pv and not interpreted:

                def pv_in_place(o_ref):
                    plgpu.wgmma(o_ref, p, v_smem.at[slot])

                acc = pl.run_state(pv_in_place)(plgpu.ACC.init(acc))
            else:
                p_tile = p_smem.at[wg]
                p_tile[...] = p
                plgpu.commit_smem()  # make the stores visible to the wgmma (async proxy)

                def pv(o_ref):
                    plgpu.wgmma(o_ref, p_tile, v_smem.at[slot])
                    return o_ref[...]

                acc = acc + pl.run_scoped(pv, plgpu.ACC((bq, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, denom

        def release(j, carry):  # tiles loaded for another consumer of this program
            slot = lax.rem(j - program_first, i32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turns()  # the two turns a computed step takes, so the phases stay matched
            take_turns()
            return carry

        if window and consumers > 1:  # blocks only an earlier consumer's rows can see
            lax.fori_loop(program_first, first, release, None)
        carry = (acc, m, denom)
        carry = lax.fori_loop(first, full_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
        acc, m, denom = lax.fori_loop(full_hi, steps, functools.partial(step, masked=True), carry)
        if causal and consumers > 1:  # blocks only a later consumer's rows can see
            lax.fori_loop(steps, program_steps, release, None)
        pl.when(wg == 0)(take_turns)  # the phase consumer 1 took at the start

        seen = denom > 0  # rows with no visible key give 0, as in tiles.forward_finish
        safe = jnp.where(seen, denom, 1.0)
        out = acc * lax.broadcast_in_dim(1.0 / safe, acc.shape, [0])
        q_tile[...] = out.astype(dtype)  # Q is no longer read: its tile stages the output
        lse_row[...] = jnp.where(seen, m + jnp.log(safe) / _LN2, 0.0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_gmem.at[b, pl.ds(q0, bq), h])
        plgpu.copy_smem_to_gmem(lse_row, lse_gmem.at[b, h, pl.ds(q0, bq)])
        plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, window, blocks, interpret):
    """Padded output [B, Tp, H, D] and base-2 log-sum-exp [B, H, Tp] float32 (Tp: T rounded
    up to consumers * block_q). ``blocks``: a HopperBlocks, or anything else (e.g. the Triton
    BlockSizes) for ``HopperBlocks.for_head_dim``. ``interpret``: False/None (compiled for a
    GPU), True or an InterpretGPUParams (run in the Mosaic GPU interpreter). Positions are
    not read: traced ones are taken to be 0..T-1 and 0..S-1 (check ``supports`` first),
    concrete ones are checked."""
    # Traced positions cannot be checked here: the caller vouches for 0..n-1 (it asked
    # ``supports`` with None for the defaults); concrete ones are checked.
    trusted = [None if isinstance(p, jax.core.Tracer) else p for p in (q_pos, kv_pos)]
    reason = supports(q, k, *trusted, q_seg, kv_seg, window)
    if reason:
        raise ConfigError(f"the Hopper attention forward cannot run this: {reason}")
    hopper_scope.check_window(window, causal)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ConfigError(f"v must match k: got v {v.shape} {v.dtype}, k {k.shape} {k.dtype}")
    params = hopper_scope.interpret_params(interpret)
    if not isinstance(blocks, HopperBlocks):
        blocks = HopperBlocks.for_head_dim(q.shape[-1])
    if params is not None and blocks.registers_pv:
        blocks = dataclasses.replace(blocks, registers_pv=False)
    batch, t, n_heads, head_dim = q.shape
    s, n_kv_heads = k.shape[1], k.shape[2]
    check_smem(blocks, head_dim, q.dtype.itemsize)
    rows = blocks.consumers * blocks.block_q
    t_pad, s_pad = -(-t // rows) * rows, -(-s // blocks.block_kv) * blocks.block_kv
    n_q, n_kv = t_pad // rows, s_pad // blocks.block_kv
    bq, bk, stages, c = blocks.block_q, blocks.block_kv, blocks.stages, blocks.consumers
    kernel = functools.partial(
        _kernel,
        blocks=blocks,
        causal=causal,
        window=window,
        kv_len=s,
        n_kv=n_kv,
        group=n_heads // n_kv_heads,
        n_q=n_q,
        scale=LOG2_E / math.sqrt(head_dim),
        interpreted=params is not None,
    )
    dtype = q.dtype
    scratch = [
        _smem((c, bq, head_dim), dtype),
        _smem((stages, bk, head_dim), dtype),
        _smem((stages, bk, head_dim), dtype),
        plgpu.SMEM((c, bq), jnp.float32),
        plgpu.Barrier(num_barriers=c),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=c, num_barriers=stages),
        plgpu.Barrier(num_arrivals=c, num_barriers=stages),
        plgpu.Barrier(num_arrivals=c),  # the consumers' turns (ping-pong)
    ]
    if not blocks.registers_pv:
        scratch.insert(3, _smem((c, bq, bk), dtype))
    call = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((batch, t_pad, n_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, n_heads, t_pad), jnp.float32),
        ],
        scratch_types=scratch,
        # Mosaic GPU launches the last grid axis fastest: query tiles slowest (causal: the
        # longest first, see _kernel), heads fastest (GQA: neighbours share K/V in L2).
        grid=(n_q, batch, n_heads),
        grid_names=("q_seq", "batch", "heads"),
        num_threads=c + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=params,
    )
    out, lse = call(*(pad_seq(x, n, 1) for x, n in ((q, t_pad), (k, s_pad), (v, s_pad))))
    return out, lse
