"""Flash attention (blockwise JAX, Pallas GPU and TPU kernels in interpret mode) against the
``xla`` reference: outputs and dq/dk/dv, every mask, uneven lengths, GQA, bf16; block skipping;
clear errors; the kernels lower for their real backends; the model trains the same with them."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_metrics

from research.kernels.flash_attention import (
    BlockSizes,
    blockwise_attention,
    common,
    flash_attention,
)
from research.kernels.gpu_target import abstract_gpu
from research.models.attention import attend, xla_attention
from research.run import train

SMALL = BlockSizes(32, 16, 16, 32)  # several blocks per axis even at these lengths


IMPLS = ["blockwise", "triton", "mosaic"]  # not "gpu"/"tpu": ids become pytest marker keywords


def _impl(name: str):
    if name == "blockwise":
        return functools.partial(blockwise_attention, block_q=32, block_kv=16)
    kernel = {"triton": "gpu", "mosaic": "tpu"}[name]
    return functools.partial(flash_attention, kernel=kernel, block_sizes=SMALL, interpret=True)


def _inputs(batch, length, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), d_out


def _packed_segments(batch, length, seed=0):
    """Three documents per row at random boundaries: [batch, length] ids 0, 1, 2."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, length), size=(batch, 2), replace=False), axis=1)
    idx = np.arange(length)
    return jnp.asarray((idx >= cuts[:, :1]).astype(np.int32) + (idx >= cuts[:, 1:]))


def _out_and_grads(fn, q, k, v, d_out, **kw):
    @jax.jit  # one compile instead of op-by-op dispatch of the loops
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (out, *vjp(d_out.astype(out.dtype)))

    return run(q, k, v, d_out)


# name: (batch, length, heads, kv_heads, head_dim, causal, window, segments, dtype)
CASES = {
    "causal-gqa-uneven": (1, 100, 4, 2, 32, True, 0, False, jnp.float32),
    "noncausal": (2, 64, 2, 2, 64, False, 0, False, jnp.float32),
    "window-mqa-uneven": (1, 90, 4, 1, 32, True, 20, False, jnp.float32),
    "segments-gqa": (2, 80, 4, 2, 32, True, 0, True, jnp.float32),
    "bf16-window-segments": (2, 72, 4, 2, 128, True, 24, True, jnp.bfloat16),
}


@functools.cache
def _case(case: str):
    """Inputs, masks, the reference's output and grads, and a control, computed once per case
    for all three implementations."""
    batch, length, heads, kv_heads, head_dim, causal, window, segments, dtype = CASES[case]
    q, k, v, d_out = _inputs(batch, length, heads, kv_heads, head_dim, dtype)
    pos = jnp.arange(length)
    seg = _packed_segments(batch, length) if segments else None
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              window=window, causal=causal)  # fmt: skip
    # The reference runs in float32 on the same (bf16-rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _out_and_grads(xla_attention, *f32, d_out, **kw)
    # A control: the other causality, no window or segments, differs from the reference by far
    # more than the tolerance, so a wrong or dropped mask cannot pass.
    loose = _out_and_grads(xla_attention, *f32, d_out, q_positions=pos, kv_positions=pos,
                           causal=not causal)  # fmt: skip
    return (q, k, v, d_out), kw, want, loose


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_xla_reference(impl, case):
    inputs, kw, want, loose = _case(case)
    got = _out_and_grads(_impl(impl), *inputs, **kw)
    dtype = inputs[0].dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, loose, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        scale = float(jnp.abs(b).max())
        err = float(jnp.abs(a.astype(jnp.float32) - b).max()) / scale
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
        assert float(jnp.abs(c - b).max()) / scale > 20 * tol, f"{name}: control too close"


@pytest.mark.slow  # the default path (test_matches_xla_reference) runs dQ and dK/dV apart too
@pytest.mark.parametrize("case", ["segments-gqa", "window-mqa-uneven"])
def test_dq_and_dkv_kernels_take_their_own_blocks(case):
    """dK/dV with tiles unlike dQ's (each pass pads and classifies its own blocks)."""
    blocks = BlockSizes(32, 16, 16, 32, block_q_dkv=32, block_kv_dkv=16, num_stages_dkv=3)
    assert (blocks.dq.block_q, blocks.dkv.block_q, blocks.dkv.num_stages) == (16, 32, 3)
    inputs, kw, want, _ = _case(case)
    fn = functools.partial(flash_attention, kernel="gpu", block_sizes=blocks, interpret=True)
    got = _out_and_grads(fn, *inputs, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = float(jnp.abs(a - b).max()) / float(jnp.abs(b).max())
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


# The race detector interprets every grid point on two simulated cores: minutes under load on
# a 2-core CPU, so all of them run with --runslow.
RACE_CASES = [
    pytest.param("tiny-window-segments", marks=pytest.mark.slow),
    pytest.param("window-mqa-uneven", marks=pytest.mark.slow),
    pytest.param("segments-gqa", marks=pytest.mark.slow),
]


def _race_case(case: str):
    if case != "tiny-window-segments":
        return _case(case)
    q, k, v, d_out = _inputs(1, 40, 2, 1, 32, jnp.float32)
    pos, seg = jnp.arange(40), _packed_segments(1, 40)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              window=12, causal=True)  # fmt: skip
    return (q, k, v, d_out), kw, _out_and_grads(xla_attention, q, k, v, d_out, **kw), None


@pytest.mark.parametrize("case", RACE_CASES)
def test_mosaic_kernels_have_no_races_or_out_of_bounds_reads(case):
    """The TPU kernels under Pallas' TPU interpreter with its happens-before race detector, two
    simulated cores (the "parallel" grid axes split across them, as on a megacore chip),
    out-of-bounds reads raising, and unwritten memory reading as NaN."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(
        detect_races=True,
        num_cores_or_threads=2,
        out_of_bounds_reads="raise",
        uninitialized_memory="nan",
    )
    inputs, kw, want, _ = _race_case(case)
    fn = functools.partial(flash_attention, kernel="tpu", block_sizes=SMALL, interpret=params)
    got = _out_and_grads(fn, *inputs, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = float(jnp.abs(a - b).max()) / float(jnp.abs(b).max())
        assert err < 2e-5, f"{name}: relative error {err:.2e}"
    races = getattr(tpu_interpret, "races", None)  # set by the detector (jax 0.10)
    assert races is not None and not races.races_found


def test_triton_tiles_shrink_to_fit_shared_memory():
    """Hopper gives a program 227 KB: the defaults fit bf16 at every head_dim; float32 at
    head_dim 256 shrinks the streamed tile; what cannot fit is refused, naming the fix."""
    from research.kernels.flash_attention.common import SMEM_BYTES, fit_smem, smem_bytes

    gpu = BlockSizes.for_backend("gpu")
    for kernel, cfg in (("fwd", gpu.forward), ("dq", gpu.dq), ("dkv", gpu.dkv)):
        for head_dim in (64, 128, 256):
            assert fit_smem(kernel, cfg, head_dim, 2) == cfg  # bf16: unchanged
        assert smem_bytes(kernel, cfg, 256, 4) > SMEM_BYTES  # float32 at 256 does not fit
        fitted = fit_smem(kernel, cfg, 256, 4)
        assert smem_bytes(kernel, fitted, 256, 4) <= SMEM_BYTES and fitted != cfg
    # Forward at f32 x 256: q 128x256 resident (128 KB), k/v 2 stages x 2 x bk x 256 x 4.
    assert fit_smem("fwd", gpu.forward, 256, 4).block_kv == 16
    with pytest.raises(ValueError, match="use bfloat16 inputs, a smaller head_dim"):
        fit_smem("fwd", gpu.forward, 256, 4, limit=32 * 1024)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_blocks_are_not_computed(impl):
    """NaN values in keys no query may see: a kernel that computed those blocks (even masked,
    0 * NaN = NaN) would poison rows; skipping them keeps every visible row exact."""
    length = 64
    q, k, v, _ = _inputs(1, length, 2, 2, 32, jnp.float32)
    pos = jnp.arange(length)
    # The last 16 keys are empty slots (position -1): a whole block nobody sees.
    kv_pos = pos.at[48:].set(-1)
    bad_v = v.at[:, 48:].set(jnp.nan)
    fn = jax.jit(_impl(impl))  # both calls below share one compile
    out = fn(q, k, bad_v, pos, kv_pos)
    np.testing.assert_allclose(out, xla_attention(q, k, v, pos, kv_pos), atol=2e-5)
    # Causal: the last key block (NaN) lies in the future of the first query block (rows
    # 0..31), so those rows stay exact, while rows that legitimately see it turn NaN.
    out = fn(q, k, bad_v, pos, pos)
    want = xla_attention(q, k, v, pos, pos)
    np.testing.assert_allclose(out[:, :32], want[:, :32], atol=2e-5)
    assert bool(jnp.isnan(out[:, 48:]).all())


def test_block_classes_and_bands():
    """Causal with a window over 4x4 blocks of 16: skipped above the diagonal and beyond the
    window, unmasked strictly inside, masked on the edges; bands bound each row and column."""
    pos = jnp.arange(64)
    p = common.prepare_blocks(*(jnp.zeros((1, 64, 1, 8)),) * 3, pos, pos, None, None, 16, 16)
    kinds = np.asarray(common.kind_table(p.q_stats, p.kv_stats, True, 33, False))[0]
    s, m, f = common.SKIP, common.PARTIAL, common.FULL
    expected = [[m, s, s, s], [f, m, s, s], [m, f, m, s], [s, m, f, m]]
    np.testing.assert_array_equal(kinds, expected)
    lo, hi = common.visible_range(jnp.asarray(kinds)[None], axis=2)
    np.testing.assert_array_equal(lo[0], [0, 0, 0, 1])
    np.testing.assert_array_equal(hi[0], [1, 2, 3, 4])
    # The unmasked run inside each band (empty for row 0: it starts and ends at lo).
    full_lo, full_hi = common.full_run(jnp.asarray(kinds)[None], 2, lo, hi)
    np.testing.assert_array_equal(full_lo[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(full_hi[0], [0, 1, 2, 3])


def test_bad_inputs_are_clear_errors():
    q, k, v, _ = _inputs(1, 32, 2, 2, 48, jnp.float32)
    with pytest.raises(ValueError, match="head_dim.*blockwise"):
        flash_attention(q, k, v, interpret=True)
    q, k, v, _ = _inputs(1, 32, 3, 2, 32, jnp.float32)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        blockwise_attention(q, k, v, jnp.arange(32), jnp.arange(32))
    q, k, v, _ = _inputs(1, 32, 2, 2, 32, jnp.float32)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v, interpret=True)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, causal=False, window=8, interpret=True)
    with pytest.raises(ValueError, match="segment ids"):
        flash_attention(q, k, v, None, None, jnp.zeros((1, 32), jnp.int32), None, interpret=True)
    with pytest.raises(ValueError, match="cannot run compiled"):
        flash_attention(q, k, v, kernel="tpu", interpret=False)
    with pytest.raises(ValueError, match="not an attention implementation"):
        attend(q, k, v, jnp.arange(32), jnp.arange(32), implementation="flash")


@pytest.mark.parametrize("kernel,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_their_backend(kernel, platform):
    """No accelerator here: lower forward and backward to Triton / Mosaic IR (what a GPU or TPU
    compile starts from), with GQA, window, segments and an uneven length."""
    from research.kernels.flash_attention import _flash

    sds = jax.ShapeDtypeStruct
    q = sds((2, 300, 4, 128), jnp.bfloat16)
    kv = sds((2, 300, 2, 128), jnp.bfloat16)
    pos, seg = sds((300,), jnp.int32), sds((2, 300), jnp.int32)
    config = ((kernel, kernel), True, 64, BlockSizes.for_backend(kernel), False)

    def fwd_bwd(q, k, v, pos, seg):
        out, vjp = jax.vjp(lambda *a: _flash(*a, pos, pos, seg, seg, config), q, k, v)
        return out, vjp(out)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    target = abstract_gpu() if kernel == "gpu" else contextlib.nullcontext()
    with target:
        exported = jax.export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)
        text = exported(q, kv, kv, pos, seg).mlir_module()
    marker = "xla.gpu.triton" if kernel == "gpu" else "tpu_custom_call"
    assert text.count(marker) == 3  # forward, dq, dkv


@pytest.mark.parametrize("window,segments", [(64, False), (0, True)])
def test_auto_on_gpu_with_window_or_segments_runs_flash_not_the_quadratic_reference(
    window, segments
):
    """cuDNN takes plain causal attention only; a window or segment ids under `auto` on a GPU
    must run our kernel (linear memory), never the [T, S] reference."""
    from research.backend import target_backend

    sds = jax.ShapeDtypeStruct
    q = sds((2, 256, 4, 64), jnp.bfloat16)
    seg = sds((2, 256), jnp.int32) if segments else None

    def f(q, k, v, seg=None):
        pos = jnp.arange(256, dtype=jnp.int32)
        return attend(q, k, v, pos, pos, "auto", window, seg)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with target_backend("gpu"), abstract_gpu():
        exported = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)
        text = exported(q, q, q, *([seg] if segments else [])).mlir_module()
    assert "xla.gpu.triton" in text
    assert "256x256" not in text  # no score matrix materialised


# The kernels are checked against the reference op by op above; this whole run is slow.
@pytest.mark.slow
def test_model_trains_the_same_as_xla_with_pallas(tiny_config, tmp_path):
    """Under tensor=2 x data=4 (the kernel per device), scanned layers and a sliding window."""
    common_overrides = ("train.steps=3", "train.log_every=1", "train.sample_tokens=0",
                        "train.checkpoint_every=0", "model.head_dim=32", "model.n_layers=2",
                        "model.vocab_size=128", "mesh.data=4", "mesh.tensor=2",
                        "model.scan_layers=true", "model.attention_window=16")  # fmt: skip
    runs = {}
    for name in ("xla", "pallas"):
        cfg = tiny_config(*common_overrides, f"model.attention={name}",
                          f"train.run_dir={tmp_path / name}")  # fmt: skip
        runs[name] = read_metrics(train(cfg).run_dir)
    for step in range(1, 4):
        want, got = runs["xla"][step]["train/loss"], runs["pallas"][step]["train/loss"]
        assert got == pytest.approx(want, rel=2e-5)


def test_auto_takes_blockwise_for_long_contexts_off_gpu():
    from research.models.attention import resolve_implementation

    assert resolve_implementation("auto", jnp.float32, 64) == "xla"
    assert resolve_implementation("auto", jnp.float32, 16384) == "blockwise"
    assert resolve_implementation("pallas", jnp.bfloat16, 64) == "pallas"


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal-gqa-uneven", "bf16-window-segments"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiled_triton_kernel_matches_reference(case, head_dim):
    """On a GPU: the Triton kernels compiled (not interpreted), default block sizes, bf16."""
    batch, length, heads, kv_heads, _, causal, window, segments, _ = CASES[case]
    length *= 10  # several default-size blocks
    q, k, v, d_out = _inputs(batch, length, heads, kv_heads, head_dim, jnp.bfloat16)
    pos = jnp.arange(length)
    seg = _packed_segments(batch, length) if segments else None
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              window=window, causal=causal)  # fmt: skip
    got = _out_and_grads(functools.partial(flash_attention, kernel="gpu"), q, k, v, d_out, **kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _out_and_grads(xla_attention, *f32, d_out, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = float(jnp.abs(a.astype(jnp.float32) - b).max()) / float(jnp.abs(b).max())
        assert err < 2e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kv_heads", [4, 1])  # GQA: heads split; MQA: K/V on all
def test_pallas_runs_per_device_under_a_mesh(kv_heads):
    """Under a data=4 x tensor=2 mesh the kernel runs on each device's rows (and heads): same
    output and gradients as unsharded, and no all-gather of the inputs."""
    from jax.sharding import NamedSharding, PartitionSpec

    from research.config import MeshConfig
    from research.parallel.mesh import make_mesh, on_mesh

    q, k, v, _ = _inputs(8, 48, 4, kv_heads, 32, jnp.float32)
    pos = jnp.arange(48)

    def loss(q, k, v):
        out = attend(q, k, v, pos, pos, implementation="pallas")
        return jnp.sum(out * out), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (want_loss, want_out), want_grads = jax.jit(grad)(q, k, v)

    mesh = make_mesh(MeshConfig(data=4, tensor=2), jax.devices()[:8], batch_size=8)
    heads = "tensor" if kv_heads % 2 == 0 else None
    place = lambda x, h: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, h)))
    args = (place(q, "tensor"), place(k, heads), place(v, heads))
    sharded = jax.jit(on_mesh(grad, mesh))
    (got_loss, got_out), got_grads = sharded(*args)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(got_out.sharding.device_set) == 8
    assert "all-gather" not in sharded.lower(*args).compile().as_text()
