"""The Hopper (Mosaic GPU) flash-attention forward, without a GPU.

Values: the kernel runs in JAX's Mosaic GPU interpreter (SMEM, warpgroups, barriers, TMA and
wgmma simulated on CPU) and is compared with ``xla_attention`` in float32. Compilation: the
whole scope lowers for CUDA (``lowering_platforms=("cuda",)``: Mosaic GPU's layouts, wgmma
shapes and SMEM transforms are all checked in Python); tests/test_gpu_compile.py takes it on to
SASS for a compile-only H100 where jax's CUDA plugin and a ptxas are installed.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError
from research.kernels.flash_attention import hopper_fwd
from research.kernels.flash_attention.common import LOG2_E
from research.kernels.flash_attention.hopper_fwd import HopperBlocks
from research.models.attention import xla_attention

# jax 0.10's GPU interpreter compiles each simulated warpgroup anew at every grid point
# (about a second each), so only the smallest cases run there; jax >= 0.11 runs them all.
OLD_JAX = jax.__version_info__ < (0, 11)
SLOW_INTERPRETER = pytest.mark.skipif(
    OLD_JAX,
    reason="jax < 0.11: the Mosaic GPU interpreter recompiles per grid point (seconds per case); "
    "this case runs under jax >= 0.11",
)


def _inputs(batch, t, s, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, s, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, s, kv_heads, head_dim), dtype)
    return q, k, v


def _forward(q, k, v, causal, blocks, interpret=True, window=0):
    return hopper_fwd.forward(
        q, k, v, None, None, None, None,
        causal=causal, window=window, blocks=blocks, interpret=interpret,
    )  # fmt: skip


def _reference(q, k, v, causal, window=0):
    """Output and base-2 log-sum-exp of the scaled scores, in float32 at full precision."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    t, s = q.shape[1], k.shape[1]
    q_pos, kv_pos = jnp.arange(t), jnp.arange(s)
    with jax.default_matmul_precision("highest"):
        out = xla_attention(*f32, q_pos, kv_pos, causal=causal, window=window)
        group = q.shape[2] // k.shape[2]
        kk = jnp.repeat(f32[1], group, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", f32[0], kk) * (LOG2_E / math.sqrt(q.shape[-1]))
    if causal:
        seen = kv_pos[None, :] <= q_pos[:, None]
        if window:
            seen &= kv_pos[None, :] > q_pos[:, None] - window
        scores = jnp.where(seen[None, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores * math.log(2), axis=-1) / math.log(2)
    return out, lse


def _check(q, k, v, causal, blocks, interpret=True, window=0):
    out, lse = _forward(q, k, v, causal, blocks, interpret, window)
    t = q.shape[1]
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    ref_out, ref_lse = _reference(q, k, v, causal, window)
    tol = 3e-3 if q.dtype == jnp.float16 else 2e-2  # P is rounded to the input dtype
    np.testing.assert_allclose(out[:, :t].astype(jnp.float32), ref_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse[:, :, :t], ref_lse, atol=1e-4, rtol=1e-5)
    return out, lse


def test_matches_reference_causal_gqa_two_consumers_without_races():
    """Causal, 2 query heads on 1 KV head (1 on jax 0.10), two consumer warpgroups in
    ping-pong sharing a 2-slot K/V ring that is reused, the first consumer releasing the tiles
    only the second needs; the interpreter's happens-before race detector finds nothing."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    heads = 1 if OLD_JAX else 2  # jax 0.10: half the grid points, half the recompiles
    q, k, v = _inputs(1, 256, 256, heads, 1, 64, jnp.float16)
    blocks = HopperBlocks(block_q=64, block_kv=64, stages=2, consumers=2)
    out, _ = _check(q, k, v, True, blocks, interpret=InterpretGPUParams(detect_races=True))
    assert not gpu_callbacks.get_races().races_found
    # The first query sees only the first key: its output is that key's value row.
    np.testing.assert_allclose(out[0, 0], v[0, 0, [0] * heads], atol=1e-3)


@SLOW_INTERPRETER
@pytest.mark.parametrize("dtype, causal", [(jnp.float16, True), (jnp.bfloat16, False)])
def test_matches_reference_one_consumer(dtype, causal):
    """One consumer, more key blocks per query tile than the ring holds (slots are reused)."""
    q, k, v = _inputs(1, 256, 256, 1, 1, 64, dtype, seed=1)
    _check(q, k, v, causal, HopperBlocks(block_q=64, block_kv=64, stages=2, consumers=1))


@SLOW_INTERPRETER
def test_pads_ragged_lengths_and_never_sees_padded_keys():
    """T=S=200 pad to whole tiles; non-causal, only the key mask keeps the padded keys out."""
    q, k, v = _inputs(1, 200, 200, 2, 2, 64, jnp.float16, seed=2)
    out, lse = _check(q, k, v, False, HopperBlocks(block_q=64, block_kv=128, consumers=2))
    assert out.shape == (1, 256, 2, 64) and lse.shape == (1, 2, 256)


@SLOW_INTERPRETER
def test_head_dim_128_three_stages_without_pingpong():
    """Cross-attention (T=128, S=256) through a reused 3-slot ring, consumers not in turns."""
    q, k, v = _inputs(1, 128, 256, 2, 1, 128, jnp.bfloat16, seed=3)
    blocks = HopperBlocks(block_q=64, block_kv=64, stages=3, consumers=2, pingpong=False)
    _check(q, k, v, False, blocks)


# name: (t, dtype, window, blocks). A window over two 64-key tiles and not a multiple of one
# (fully visible blocks inside the band), one beyond T (the causal band) with ragged rows; the
# window below a tile is the next test's.
WINDOW_CASES = {
    "w150-bf16": (256, jnp.bfloat16, 150, HopperBlocks(block_q=64, block_kv=64)),
    "w300-f16-over-t-ragged-1wg": (200, jnp.float16, 300,
                                   HopperBlocks(block_q=64, block_kv=64, consumers=1)),
}  # fmt: skip


@SLOW_INTERPRETER
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_sliding_window_matches_reference(case):
    t, dtype, window, blocks = WINDOW_CASES[case]
    q, k, v = _inputs(1, t, t, 1, 1, 64, dtype, seed=4)
    _check(q, k, v, True, blocks, window=window)


@SLOW_INTERPRETER
def test_sliding_window_never_reads_key_blocks_below_the_band_and_has_no_races():
    """Window 40 (under a tile), NaN values in key block 0: rows 128.. (the second program:
    its band starts at block 1) match the reference, so that block never reached their P V
    (loaded and masked it would: P = 0, but 0 * NaN = NaN); the first rows see it, so are NaN.
    Two consumers: the second releases the blocks only the first sees; no races."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    q, k, v = _inputs(1, 256, 256, 1, 1, 64, jnp.float16, seed=5)
    poisoned = v.at[:, :64].set(jnp.nan)
    blocks = HopperBlocks(block_q=64, block_kv=64)
    params = InterpretGPUParams(detect_races=True)
    out, lse = _forward(q, k, poisoned, True, blocks, interpret=params, window=40)
    assert not gpu_callbacks.get_races().races_found
    ref_out, ref_lse = _reference(q, k, v, True, window=40)
    assert np.isnan(np.asarray(out[:, :64], np.float32)).all()
    np.testing.assert_allclose(out[:, 128:].astype(jnp.float32), ref_out[:, 128:], atol=3e-3)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-4, rtol=1e-5)  # lse never reads V


def test_race_detector_flags_a_read_before_the_tma_barrier():
    """The race detector does flag a consumer that reads SMEM without waiting for the TMA's
    barrier, so the no-race assertion above can fail."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_gmem, o_gmem, x_smem, o_smem, barrier):
        @pl.when(jax.lax.axis_index("wg") == 1)
        def _producer():
            plgpu.copy_gmem_to_smem(x_gmem, x_smem, barrier.at[0])

        @pl.when(jax.lax.axis_index("wg") == 0)
        def _consumer():  # no barrier_wait: races with the copy
            o_smem[...] = x_smem[...] * 2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem)
            plgpu.wait_smem_to_gmem(0)

    racy = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
        scratch_types=[plgpu.SMEM((64, 64), jnp.float32)] * 2 + [plgpu.Barrier(num_barriers=1)],
        num_threads=2,
        thread_name="wg",
        interpret=InterpretGPUParams(detect_races=True),
    )
    try:
        jax.block_until_ready(racy(jnp.ones((64, 64), jnp.float32)))
    except Exception as error:  # jax 0.12 raises at the race; 0.10 and 0.11 record it
        assert "RACE DETECTED" in str(error)
        gpu_callbacks.reset_gpu_interpret_mode_state()
        return
    assert gpu_callbacks.get_races().races_found


SCOPE = [
    (head_dim, causal, dtype, group)
    for head_dim in hopper_fwd.HEAD_DIMS
    for causal in (True, False)
    for dtype in (jnp.float16, jnp.bfloat16)
    for group in (1, 4)
]


def _lowers(head_dim, causal, dtype, group, window=0, **changes):
    q, k, v = (
        jax.ShapeDtypeStruct((2, 2048, 8, head_dim), dtype),
        jax.ShapeDtypeStruct((2, 2048, 8 // group, head_dim), dtype),
        jax.ShapeDtypeStruct((2, 2048, 8 // group, head_dim), dtype),
    )
    blocks = dataclasses.replace(HopperBlocks.for_head_dim(head_dim), **changes)

    def fwd(q, k, v):
        return _forward(q, k, v, causal, blocks, interpret=False, window=window)

    lowered = jax.jit(fwd).trace(q, k, v).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text(), (head_dim, causal, dtype, group, changes)


@pytest.mark.parametrize("head_dim", hopper_fwd.HEAD_DIMS)
def test_whole_scope_lowers_for_cuda(head_dim):
    """Every (head_dim, causal, dtype, GQA) case at T=2048 with the default tiles lowers to a
    Mosaic GPU custom call (P fed to wgmma from registers, two consumers in ping-pong: the
    compiled default); P staged through SMEM (the interpreted path), one consumer and a
    sliding window lower too."""
    for d, causal, dtype, group in SCOPE:
        if d == head_dim:
            _lowers(head_dim, causal, dtype, group)
    _lowers(head_dim, True, jnp.bfloat16, 4, registers_pv=False)
    _lowers(head_dim, True, jnp.float16, 1, consumers=1, pingpong=False)
    _lowers(head_dim, True, jnp.bfloat16, 4, window=1000)  # a sliding window
    if head_dim == 64:  # the interpreted path (P through SMEM), one consumer, a window
        _lowers(head_dim, True, jnp.float16, 1, window=100, consumers=1, registers_pv=False)


def test_smem_footprint_is_refused_with_the_fix():
    """head_dim 256 with 128-key tiles and 3 stages needs ~420 KB of SMEM: a clear error."""
    too_big = HopperBlocks(block_kv=128, stages=3)
    assert hopper_fwd.smem_bytes(too_big, 256, 2) > 227 * 1024
    q, k, v = _inputs(1, 128, 128, 2, 1, 256, jnp.float16)
    with pytest.raises(ConfigError, match="shared memory.*lower stages"):
        _forward(q, k, v, True, too_big, interpret=False)
    for head_dim in hopper_fwd.HEAD_DIMS:  # the defaults fit, in both P paths
        for registers_pv in (True, False):
            blocks = dataclasses.replace(
                HopperBlocks.for_head_dim(head_dim), registers_pv=registers_pv
            )
            hopper_fwd.check_smem(blocks, head_dim, 2)


@pytest.mark.parametrize("registers_pv", [True, False])
def test_smem_count_is_mosaic_gpus_own(monkeypatch, registers_pv):
    """Our count is exactly what Mosaic GPU allocates: shrink its SMEM bound so it reports
    its own count in the error."""
    import re

    from jax.experimental.mosaic.gpu import core as mosaic_core

    monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 1)
    blocks = HopperBlocks(block_kv=128, stages=3, registers_pv=registers_pv)
    q = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
    fwd = jax.jit(lambda q, k, v: _forward(q, k, v, True, blocks, interpret=False))
    with pytest.raises(ValueError, match="exceeds available shared memory") as error:
        fwd.trace(q, q, q).lower(lowering_platforms=("cuda",))
    theirs = int(re.search(r"smem_bytes=(\d+)", str(error.value)).group(1))
    assert theirs == hopper_fwd.smem_bytes(blocks, 64, 2)


def test_supports_names_what_is_out_of_scope():
    q, k, _ = _inputs(1, 64, 64, 2, 1, 64, jnp.float16)
    assert hopper_fwd.supports(q, k, None, None, None, None, 0) is None
    assert hopper_fwd.supports(q, k, jnp.arange(64), jnp.arange(64), None, None, 0) is None
    seg = jnp.zeros((1, 64), jnp.int32)
    assert hopper_fwd.supports(q, k, None, None, None, None, 16) is None  # a causal window
    reasons = {
        "segment": hopper_fwd.supports(q, k, None, None, seg, seg, 0),
        "positions": hopper_fwd.supports(q, k, jnp.arange(64) + 5, None, None, None, 0),
        "float16 or bfloat16": hopper_fwd.supports(
            q.astype(jnp.float32), k.astype(jnp.float32), None, None, None, None, 0
        ),
        "head_dim": hopper_fwd.supports(q[..., :32], k[..., :32], None, None, None, None, 0),
    }
    for word, reason in reasons.items():
        assert reason is not None and word in reason, (word, reason)
    seen = []
    jax.jit(lambda p: seen.append(hopper_fwd.supports(q, k, p, None, None, None, 0)) or p)(
        jnp.arange(64)
    )
    assert "traced" in seen[0]  # cannot be checked under jit: callers pass None
    # forward itself takes traced positions on trust (the glue fills in the defaults)
    lower = jax.jit(
        lambda q, k, p: hopper_fwd.forward(
            q, k, k, p, p, None, None, causal=True, window=0, blocks=None, interpret=False
        )
    )
    lower.trace(q, k, jnp.arange(64)).lower(lowering_platforms=("cuda",))
    with pytest.raises(ConfigError, match="window=8 .causal=False.*causal=True"):
        hopper_fwd.forward(
            q, k, k, None, None, None, None, causal=False, window=8, blocks=None, interpret=True
        )


def test_bad_tiles_are_config_errors():
    with pytest.raises(ConfigError, match="block_q=96.*multiple of 64"):
        HopperBlocks(block_q=96)
    with pytest.raises(ConfigError, match="stages=1"):
        HopperBlocks(stages=1)
