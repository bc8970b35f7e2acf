"""``flash_attention(kernel="hopper")`` and ``model.attention=hopper``: each pass takes the Mosaic
GPU kernel where it covers the case and the Triton kernel elsewhere, and the two kernels'
forward and backward compose through the custom VJP (one base-2 log-sum-exp)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.backend import target_backend
from research.kernels.flash_attention import flash_attention, hopper_bwd, hopper_route
from research.kernels.gpu_target import abstract_gpu
from research.models.attention import attend, xla_attention

sds = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"


def _shapes(head_dim=64, seq=256, dtype=jnp.bfloat16):
    return sds((1, seq, 4, head_dim), dtype), sds((1, seq, 2, head_dim), dtype)


@pytest.mark.parametrize(
    "head_dim,window,positions,segments,route",
    [
        (64, 0, None, None, ("hopper", "hopper")),
        (128, 0, None, None, ("hopper", "hopper")),
        (256, 0, None, None, ("hopper", "gpu")),  # the backward's accumulators overflow
        (64, 32, None, None, ("hopper", "hopper")),  # a causal sliding window
        (256, 32, None, None, ("hopper", "gpu")),
        (64, 0, "shifted", None, ("gpu", "gpu")),
        (64, 0, None, "packed", ("gpu", "gpu")),
    ],
)
def test_route_takes_mosaic_gpu_where_it_covers_the_case(
    head_dim, window, positions, segments, route
):
    q, kv = _shapes(head_dim)
    pos = jnp.arange(256) + 8 if positions else None
    seg = jnp.zeros((1, 256), jnp.int32) if segments else None
    got, why = hopper_route(q, kv, pos, pos, seg, seg, window)
    assert got == route
    assert (why is None) == (route == ("hopper", "hopper"))


def _custom_calls(fn, *args):
    with target_backend("gpu"), abstract_gpu():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("@mosaic_gpu_v2"), text.count(TRITON)


@pytest.mark.parametrize(
    "head_dim,window,calls",
    [(64, 0, (3, 0)), (256, 0, (1, 2)), (64, 32, (3, 0))],  # (Mosaic GPU, Triton) kernels
)
def test_forward_and_backward_lower_to_the_routed_kernels(head_dim, window, calls):
    q, kv = _shapes(head_dim)

    def fwd_bwd(q, k, v):
        attn = lambda *a: flash_attention(*a, kernel="hopper", window=window, interpret=False)  # noqa: E731
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(out)

    assert _custom_calls(fwd_bwd, q, kv, kv) == calls


def test_model_attention_hopper_runs_self_attention_on_mosaic_gpu():
    """The model passes positions as arrays; self-attention (T == S) is taken at 0..T-1, as
    the cuDNN path takes it, so the Mosaic GPU kernels run; a KV-cache step does not."""
    q, kv = _shapes(128)

    def train_like(q, k, v):
        pos = jnp.arange(q.shape[1], dtype=jnp.int32)
        out, vjp = jax.vjp(lambda *a: attend(*a, pos, pos, "hopper"), q, k, v)
        return out, vjp(out)

    assert _custom_calls(train_like, q, kv, kv) == (3, 0)


@pytest.mark.skipif(
    not hopper_bwd.INTERPRETER_WORKS,
    reason=f"jax {jax.__version__}'s Mosaic GPU interpreter cannot run the Hopper backward; "
    "jax >= 0.11 (the GPU machines') can",
)
def test_hopper_forward_feeds_hopper_backward_in_the_interpreter():
    keys = jax.random.split(jax.random.key(3), 4)
    shape, kv_shape = (1, 128, 2, 64), (1, 128, 1, 64)
    q = jax.random.normal(keys[0], shape).astype(jnp.float16)
    k, v = (jax.random.normal(key, kv_shape).astype(jnp.float16) for key in keys[1:3])
    d_out = jax.random.normal(keys[3], shape).astype(jnp.float16)
    assert hopper_route(q, k, None, None, None, None, 0)[0] == ("hopper", "hopper")

    def ours(q, k, v):
        return flash_attention(q, k, v, kernel="hopper", interpret=True)

    def reference(q, k, v):
        pos = jnp.arange(128)
        with jax.default_matmul_precision("highest"):
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            return xla_attention(*f32, pos, pos)

    out, vjp = jax.vjp(ours, q, k, v)
    ref_out, ref_vjp = jax.vjp(reference, q, k, v)
    grads, ref_grads = vjp(d_out), ref_vjp(d_out.astype(jnp.float32))
    for got, want in zip((out, *grads), (ref_out, *ref_grads), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max() + 1e-3
