"""What the Hopper (Mosaic GPU) forward and backward share about their inputs: the cases both
take (float16/bfloat16, whole GQA groups, default positions, no segment ids) and how either
runs in JAX's Mosaic GPU interpreter. Each kernel adds its own limits (head dims, tiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.config import ConfigError

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_arange(pos, length: int) -> bool | None:
    """True / False for concrete positions (None: the default 0..n-1), None when they are
    traced and cannot be checked."""
    if pos is None:
        return True
    if isinstance(pos, jax.core.Tracer):
        return None
    values = np.asarray(pos)
    return values.shape == (length,) and bool(np.array_equal(values, np.arange(length)))


def shared_refusal(q, k, q_pos, kv_pos, q_seg, kv_seg) -> str | None:
    """Why neither Hopper kernel takes this case, or None. Positions must be None or concrete
    0..n-1: traced ones cannot be checked, so callers pass None for the defaults."""
    if q.ndim != 4 or k.ndim != 4:
        return f"q and k must be [batch, seq, heads, head_dim], got {q.shape} and {k.shape}"
    if jnp.dtype(q.dtype) not in DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}: the Hopper kernels take float16 or bfloat16"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads do not group onto {k.shape[2]} KV heads"
    if q_seg is not None or kv_seg is not None:
        return "segment ids (packed documents) are not in the Hopper kernels"
    for name, pos, length in (("q", q_pos, q.shape[1]), ("kv", kv_pos, k.shape[1])):
        plain = is_arange(pos, length)
        if plain is None:
            return f"{name} positions are traced: the Hopper kernels assume 0..n-1 (pass None)"
        if not plain:
            return f"custom {name} positions: the Hopper kernels assume 0..n-1"
    return None


def check_window(window: int, causal: bool) -> None:
    """A sliding window is a causal look-back of at least one position (or 0: off)."""
    if window < 0 or (window and not causal):
        raise ConfigError(
            f"window={window} (causal={causal}): a sliding window is a causal look-back of "
            "w >= 1 positions; pass causal=True with window >= 1, or window=0 (off)"
        )


def interpret_params(interpret):
    """None (compiled for a GPU) or the Mosaic GPU interpreter's parameters (``True``: the
    defaults; an ``InterpretGPUParams``: as given, e.g. with race detection)."""
    if interpret is None or interpret is False:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams() if interpret is True else interpret
