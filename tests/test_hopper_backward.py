"""The Mosaic GPU (Hopper) flash-attention backward: dq/dk/dv in the GPU interpreter against
jax.vjp of the float32 ``xla`` reference (lse and delta from the same reference), no races,
CUDA lowering over the whole scope, and clear refusals of what it does not do."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError
from research.kernels.flash_attention import common, hopper_bwd, tiles
from research.kernels.flash_attention.hopper_bwd import HopperBwdBlocks
from research.models.attention import xla_attention

needs_interpreter = pytest.mark.skipif(
    not hopper_bwd.INTERPRETER_WORKS,
    reason=f"jax {jax.__version__}'s Mosaic GPU interpreter cannot run wgmma on a transposed "
    "SMEM operand (to_range has no TransposeTransform) nor plgpu.load; jax >= 0.11 can",
)


@pytest.mark.skipif(hopper_bwd.INTERPRETER_WORKS, reason="this jax's interpreter runs it")
def test_an_interpreter_that_cannot_run_it_is_refused_clearly():
    q = jnp.zeros((1, 64, 1, 64), jnp.float16)
    row = jnp.zeros((1, 1, 64), jnp.float32)
    with pytest.raises(ConfigError, match="use jax >= 0.11, or the Triton kernel"):
        _backward(q, q, q, q, row, row, True, interpret=True)


def _inputs(batch, t, s, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, s, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, s, kv_heads, head_dim)).astype(dtype)
    d_out = jax.random.normal(keys[3], q.shape).astype(dtype)
    return q, k, v, d_out


@functools.partial(jax.jit, static_argnums=(4, 5))  # one compile, not op-by-op dispatch
def _reference(q, k, v, d_out, causal, window=0):
    """lse (base 2, LOG2_E/sqrt(D)-scaled scores), delta = rowsum(out * dO) and dq, dk, dv of
    the float32 reference at full matmul precision."""
    t, s, heads, head_dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    q_pos, kv_pos = jnp.arange(t), jnp.arange(s)
    q, k, v, d_out = (x.astype(jnp.float32) for x in (q, k, v, d_out))
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(
            lambda q, k, v: xla_attention(q, k, v, q_pos, kv_pos, causal=causal, window=window),
            q, k, v,
        )  # fmt: skip
        grads = vjp(d_out)
        k_all = jnp.repeat(k, heads // k.shape[2], axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k_all) * (common.LOG2_E / math.sqrt(head_dim))
        if causal:
            seen = common.visible(q_pos[:, None], kv_pos[None, :], None, None, True, window)
            scores = jnp.where(seen, scores, -jnp.inf)
        lse = jax.nn.logsumexp(scores * math.log(2), axis=-1) / math.log(2)
        delta = jnp.einsum("bthd,bthd->bht", out, d_out)
    return lse, delta, grads


def test_reference_lse_is_the_forward_kernels():
    """The lse these tests feed the backward is the one the forward kernels save (their shared
    tile arithmetic, tiles.py: base 2, LOG2_E/sqrt(D)-scaled scores), so the contract is
    checked, not just self-consistent."""
    q, k, v, d_out = _inputs(1, 32, 32, 1, 1, 64, jnp.float32)
    lse, _, _ = _reference(q, k, v, d_out, True)
    pos = jnp.arange(32)
    init = (jnp.zeros((32, 64)), jnp.full((32, 1), common.MASK_VALUE), jnp.zeros((32, 1)))
    ok = common.visible(pos[:, None], pos[None, :], None, None, True, 0)
    scale = common.LOG2_E / math.sqrt(64)

    @jax.jit
    def forward_lse(q, k, v):
        with jax.default_matmul_precision("highest"):
            return tiles.forward_finish(*tiles.forward_step(q, k, v, init, scale, ok))[1]

    saved = forward_lse(q[0, :, 0], k[0, :, 0], v[0, :, 0])
    np.testing.assert_allclose(np.asarray(saved[:, 0]), np.asarray(lse[0, 0]), atol=1e-5, rtol=0)


def _backward(q, k, v, d_out, lse, delta, causal, blocks=None, interpret=True, window=0):
    return hopper_bwd.backward(
        q, k, v, None, None, None, None, lse, d_out, delta,
        causal=causal, window=window, blocks=blocks, interpret=interpret,
    )  # fmt: skip


# name: (batch, t, s, heads, kv_heads, head_dim, dtype, causal, blocks[, window]). Defaults: two
# consumer warpgroups, a 2-slot ring; at 256 rows a consumer also skips, masks and runs full
# tiles. A window over two tiles and not a multiple of one (full blocks inside the band, band
# edges on both sides) with ragged rows; the one under a tile is in
# test_sliding_window_never_reads_blocks_outside_the_band (one beyond T: test_hopper_fwd's).
ONE_CONSUMER = HopperBwdBlocks(consumers=1)
RING3 = HopperBwdBlocks(stages=3)
CASES = {
    "causal-gqa-f16": (1, 256, 256, 2, 1, 64, jnp.float16, True, None),
    "noncausal-bf16-d128-1wg": (1, 128, 128, 2, 2, 128, jnp.bfloat16, False, ONE_CONSUMER),
    # uneven lengths (padding on both axes), more keys than queries, a 3-slot ring
    "causal-uneven-bf16": (1, 136, 200, 1, 1, 64, jnp.bfloat16, True, RING3),
    "window150-ragged-bf16-ring3": (1, 250, 250, 1, 1, 64, jnp.bfloat16, True, RING3, 150),
}  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_gradients_in_the_interpreter(case):
    batch, t, s, heads, kv_heads, head_dim, dtype, causal, blocks, *window = CASES[case]
    window = window[0] if window else 0
    q, k, v, d_out = _inputs(batch, t, s, heads, kv_heads, head_dim, dtype)
    lse, delta, want = _reference(q, k, v, d_out, causal, window)
    got = _backward(q, k, v, d_out, lse, delta, causal, blocks, window=window)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # of the largest gradient entry
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w)
        np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), rtol=0, err_msg=name)
    if causal:
        # The first query sees only key 0: P = 1 there, dP = delta, so its dq is 0.
        assert np.abs(np.asarray(got[0][:, 0], np.float32)).max() < 1e-3 * np.abs(want[0]).max()
        if s > t:  # keys after the last query are seen by nobody: dk = dv = 0 exactly
            assert not np.asarray(got[1][:, t:]).any() and not np.asarray(got[2][:, t:]).any()


@needs_interpreter
def test_no_races_in_the_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    q, k, v, d_out = _inputs(1, 128, 128, 2, 1, 64, jnp.float16)
    lse, delta, _ = _reference(q, k, v, d_out, True)
    params = InterpretGPUParams(detect_races=True)
    blocks = HopperBwdBlocks(consumers=2)  # two consumers share each slot of the ring
    jax.block_until_ready(_backward(q, k, v, d_out, lse, delta, True, blocks, interpret=params))
    assert not interpret_pallas_call.get_races().races_found


@needs_interpreter
def test_sliding_window_never_reads_blocks_outside_the_band():
    """Window 40 (under a 64-row tile), two consumers, T = 256. NaN in keys/values 0..63 and
    in queries/dO 192..255: dq of rows 128..191 (their CTA's key band starts at block 1) and
    dk, dv of keys 64..127 (their CTA's query band ends at block 2) match the reference, so
    the poisoned blocks never reached their matmuls (masked, they would: 0 * NaN = NaN);
    the blocks that do see them are NaN. No races."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    q, k, v, d_out = _inputs(1, 256, 256, 1, 1, 64, jnp.float16, seed=1)
    lse, delta, (dq, dk, dv) = _reference(q, k, v, d_out, True, 40)
    nan_rows = lambda x, rows: x.at[:, rows].set(jnp.nan)  # noqa: E731
    late, early = slice(192, 256), slice(0, 64)
    args = (nan_rows(q, late), nan_rows(k, early), nan_rows(v, early), nan_rows(d_out, late))
    params = InterpretGPUParams(detect_races=True)
    got = _backward(*args[:3], args[3], lse, delta, True, HopperBwdBlocks(), params, window=40)
    assert not interpret_pallas_call.get_races().races_found
    got_dq, got_dk, got_dv = (np.asarray(g, np.float32) for g in got)
    for name, g, w in (("dq", got_dq[:, 128:192], dq[:, 128:192]),
                       ("dk", got_dk[:, 64:128], dk[:, 64:128]),
                       ("dv", got_dv[:, 64:128], dv[:, 64:128])):  # fmt: skip
        w = np.asarray(w)
        np.testing.assert_allclose(g, w, atol=2e-3 * np.abs(w).max(), rtol=0, err_msg=name)
    assert np.isnan(got_dq[:, 192:]).all() and np.isnan(got_dk[:, :64]).all()


SDS = jax.ShapeDtypeStruct


# Every head_dim x dtype x causality with GQA (4 query heads per KV head) and the default two
# consumer warpgroups; plain multi-head attention (a group of 1) with one consumer per head_dim.
GRID = [
    (d, dt, c, 2, 2) for d in hopper_bwd.HEAD_DIMS for dt in ("bfloat16", "float16") for c in (1, 0)
] + [(d, "bfloat16", 1, 8, 1) for d in hopper_bwd.HEAD_DIMS]


# A sliding window (causal) at head_dim 128; test_hopper_route lowers one at 64 in bfloat16.
GRID += [(128, "float16", 1000, 2, 2)]


@pytest.mark.parametrize("head_dim,dtype,causal,kv_heads,consumers", GRID)
def test_lowers_for_cuda_at_a_realistic_shape(head_dim, dtype, causal, kv_heads, consumers):
    """The whole Python side of Mosaic GPU (layouts, wgmma shapes, SMEM transforms, barriers)
    runs for both kernels; only PTX compilation needs the GPU. ``causal`` > 1: a causal
    sliding window of that many positions."""
    dtype, window = jnp.dtype(dtype), causal if causal > 1 else 0
    causal = bool(causal)
    batch, t = 2, 2048
    q = SDS((batch, t, 8, head_dim), dtype)
    k = SDS((batch, t, kv_heads, head_dim), dtype)
    row = SDS((batch, 8, t), jnp.float32)

    def grads(q, k, v, d_out, lse, delta):
        blocks = HopperBwdBlocks(consumers=consumers)
        return _backward(q, k, v, d_out, lse, delta, causal, blocks, False, window)

    lowered = jax.jit(grads).trace(q, k, k, q, row, row).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "flash_attention_dkv_hopper" in text and "flash_attention_dq_hopper" in text
    assert [o.shape for o in lowered.out_info] == [q.shape, k.shape, k.shape]


def test_tiles_over_shared_memory_or_registers_are_refused_clearly():
    with pytest.raises(
        ConfigError, match=r"shared memory.*lower stages, block_q/block_kv or consumers"
    ):
        hopper_bwd.check_blocks(HopperBwdBlocks(stages=5), head_dim=128, itemsize=2)
    # head_dim 256: SMEM would fit with one consumer, the dK + dV accumulators would not
    one = HopperBwdBlocks(consumers=1)
    assert hopper_bwd.smem_bytes("dkv", one, 256, 2) <= hopper_bwd.SMEM_BYTES
    with pytest.raises(ConfigError, match=r"320 registers per thread at head_dim=256"):
        hopper_bwd.check_blocks(one, head_dim=256, itemsize=2)
    with pytest.raises(ConfigError, match="multiples of 64"):
        hopper_bwd.check_blocks(HopperBwdBlocks(block_q=32), head_dim=64, itemsize=2)


@pytest.mark.parametrize("kernel", ["dkv", "dq"])
def test_smem_count_is_mosaic_gpus_own(monkeypatch, kernel):
    """Our count is what Mosaic GPU allocates (so the refusal boundary is its): shrink its SMEM
    bound to 1 byte and read its own count from the error it raises while lowering."""
    import re

    from jax.experimental.mosaic.gpu import core as mosaic_core

    monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 1)
    blocks = HopperBwdBlocks(block_q=128, stages=3)
    q = SDS((1, 1024, 4, 64), jnp.bfloat16)
    row = SDS((1, 4, 1024), jnp.float32)
    pick = {"dq": 0, "dkv": 1}[kernel]

    def grad(q, k, v, d_out, lse, delta):
        return _backward(q, k, v, d_out, lse, delta, True, blocks, interpret=False)[pick]

    with pytest.raises(ValueError, match="exceeds available shared memory") as error:
        jax.jit(grad).trace(q, q, q, q, row, row).lower(lowering_platforms=("cuda",))
    theirs = int(re.search(r"smem_bytes=(\d+)", str(error.value)).group(1))
    assert theirs == hopper_bwd.smem_bytes(kernel, blocks, 64, 2)


def test_supports_names_what_is_out_of_scope():
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    ok = hopper_bwd.supports
    assert ok(q, q, None, None, None, None, 0) is None
    assert ok(q, q, jnp.arange(128), jnp.arange(128), None, None, 0) is None
    assert ok(q, q, None, None, None, None, 16) is None  # a (causal) sliding window
    seg = jnp.zeros((1, 128), jnp.int32)
    assert "segment" in ok(q, q, None, None, seg, seg, 0)
    assert "custom q positions" in ok(q, q, jnp.arange(128) + 5, None, None, None, 0)
    assert "float16 or bfloat16" in ok(q.astype(jnp.float32), q, None, None, None, None, 0)
    wide = jnp.zeros((1, 128, 2, 256), jnp.bfloat16)
    assert "320 registers per thread at head_dim=256" in ok(wide, wide, None, None, None, None, 0)
    narrow = jnp.zeros((1, 128, 2, 32), jnp.bfloat16)
    assert "head_dim 32" in ok(narrow, narrow, None, None, None, None, 0)
    traced = jax.jit(lambda p: jnp.int32(ok(q, q, p, None, None, None, 0) is None))
    assert traced(jnp.arange(128)) == 0  # positions unknowable under jit: refused
    with pytest.raises(ConfigError, match="window=8 .causal=False.*causal=True"):
        hopper_bwd.backward(q, q, q, None, None, None, None, None, q, None,
                            causal=False, window=8, blocks=None, interpret=False)  # fmt: skip
