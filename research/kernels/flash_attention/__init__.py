"""Flash attention: Pallas kernels for GPU (Triton; Mosaic GPU on Hopper) and TPU (Mosaic), and
plain-JAX blockwise.

``flash_attention`` is the entry point for the kernels: a custom VJP whose forward saves the
log-sum-exp and whose backward recomputes probabilities tile by tile (dQ and dK/dV kernels).
``kernel="hopper"`` takes the Mosaic GPU kernels (hopper_fwd, hopper_bwd) for each pass whose
case they cover and the Triton kernel for the rest; both save the same base-2 log-sum-exp, so
a Hopper forward may feed a Triton backward. ``blockwise_attention`` is the same algorithm in
plain JAX for CPUs and anything else.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from research.backend import backend as target_backend
from research.kernels.flash_attention import common, gpu, hopper_bwd, hopper_fwd, tpu
from research.kernels.flash_attention.blockwise import blockwise_attention
from research.kernels.flash_attention.common import BlockSizes

__all__ = ["BlockSizes", "blockwise_attention", "flash_attention", "hopper_route"]
_FORWARD = {"gpu": gpu.forward, "tpu": tpu.forward, "hopper": hopper_fwd.forward}
_BACKWARD = {"gpu": gpu.backward, "tpu": tpu.backward, "hopper": hopper_bwd.backward}
_BACKEND = {"gpu": "gpu", "tpu": "tpu", "hopper": "gpu"}


def hopper_route(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, window: int):
    """The kernels ``kernel="hopper"`` runs: ("hopper" or "gpu") for the forward and for the
    backward, and why a pass falls back to Triton (None where neither does). Positions must be
    None (0..n-1) or concrete: traced ones cannot be checked, so they take Triton."""
    args = (q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, window)
    reasons = (hopper_fwd.supports(*args), hopper_bwd.supports(*args))
    route = tuple("gpu" if reason else "hopper" for reason in reasons)
    why = "; ".join(f"{p}: {r}" for p, r in zip(("forward", "backward"), reasons, strict=True) if r)
    return route, why or None


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    window: int = 0,
    block_sizes: BlockSizes | None = None,
    kernel: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of q [B,T,H,D] over k/v [B,S,KV,D] (KV divides H: grouped-query attention).

    Positions ([T], [S]; default 0..T-1, 0..S-1) and segment ids ([B,T], [B,S]) mask as in the
    ``xla`` reference. ``kernel``: "gpu" (Triton), "hopper" (Mosaic GPU on H100/H200 where it
    covers the case, see ``hopper_route``; Triton elsewhere) or "tpu" (Mosaic); default the
    backend's, and on CPU the GPU kernel in interpret mode (``interpret`` defaults to True on
    CPU only).
    """
    backend = target_backend()
    kernel = kernel or ("tpu" if backend == "tpu" else "gpu")
    if kernel not in _BACKEND:
        raise ValueError(
            f"kernel='{kernel}': choose 'gpu' (Triton), 'hopper' (Mosaic GPU) or 'tpu' (Mosaic)"
        )
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and _BACKEND[kernel] != backend:
        raise ValueError(
            f"the {kernel} kernel cannot run compiled on a {backend} backend; pass "
            "interpret=True (slow, for tests) or use blockwise_attention"
        )
    common.check_inputs(q, k, v, q_segment_ids, kv_segment_ids, window, causal, kernel=True)
    passes = (kernel, kernel)
    if kernel == "hopper":
        segs = (q_segment_ids, kv_segment_ids)
        passes, _ = hopper_route(q, k, q_positions, kv_positions, *segs, window)
        kernel = "gpu"  # the Triton tiles below, for a pass that falls back
    blocks = block_sizes or BlockSizes.for_backend(kernel)
    minimum = 16 if kernel == "gpu" else 8  # Triton's dot needs 16-row tiles
    fit_q = functools.partial(common.fit_block, length=q.shape[1], minimum=minimum)
    fit_kv = functools.partial(common.fit_block, length=k.shape[1], minimum=minimum)
    blocks = dataclasses.replace(
        blocks,
        block_q=fit_q(blocks.block_q),
        block_kv=fit_kv(blocks.block_kv),
        block_q_bwd=fit_q(blocks.block_q_bwd),
        block_kv_bwd=fit_kv(blocks.block_kv_bwd),
        block_q_dkv=fit_q(blocks.dkv.block_q),
        block_kv_dkv=fit_kv(blocks.dkv.block_kv),
    )
    if q_positions is None:
        q_positions = jnp.arange(q.shape[1], dtype=jnp.int32)
    if kv_positions is None:
        kv_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
    config = (passes, causal, window, blocks, interpret)
    if kernel == "tpu" and q.dtype == jnp.float16:
        # Mosaic cannot load float16 tiles on TPU (the compiler rejects the kernel): compute in
        # float32, exact for float16 inputs; the casts' gradients cast dq/dk/dv back.
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        out = _flash(*f32, q_positions, kv_positions, q_segment_ids, kv_segment_ids, config)
        return out.astype(q.dtype)
    return _flash(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, config):
    return _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, config)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, config):
    (forward, _), causal, window, blocks, interpret = config
    out, lse = _FORWARD[forward](
        q, k, v, q_pos, kv_pos, q_seg, kv_seg,
        causal=causal, window=window, blocks=blocks, interpret=interpret,
    )  # fmt: skip
    out, lse = out[:, : q.shape[1]], lse[:, :, : q.shape[1]]
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _flash_bwd(config, res, d_out):
    (_, backward), causal, window, blocks, interpret = config
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    # delta_i = sum_d O_id dO_id (= sum_j P_ij dP_ij): one memory-bound pass, left to XLA.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    dq, dk, dv = _BACKWARD[backward](
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, d_out, delta,
        causal=causal, window=window, blocks=blocks, interpret=interpret,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
