"""Weight-only post-training quantization with qwix (int8, int4) for inference.

qwix rather than AQT: qwix quantizes Flax NNX modules in place (``quantize_model`` with a PTQ
provider intercepts the einsums and stores each weight as an integer array with per-channel
scales), where AQT is built around Linen/Pax. The attention and dense-MLP weights of every
block are quantized; embeddings, the output head, norms and MoE experts stay as they are.
qwix is an optional dependency (``pip install '.[quant]'``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.config import ResearchError

BITS = {8: jnp.int8, 4: jnp.int4}


def quantize_weights(model: nnx.Module, bits: int = 8) -> nnx.Module:
    """A copy of ``model`` whose block weights are ``bits``-bit integers with per-channel
    scales; the original is untouched."""
    try:
        import qwix
    except ImportError:
        raise ResearchError(
            "quantization needs qwix: pip install 'research[quant]' (or pip install qwix)"
        ) from None
    if bits not in BITS:
        raise ResearchError(f"{bits}-bit weights: use one of {sorted(BITS)}")
    from research.infer.generation import init_caches

    cfg = model.cfg
    dense = [str(i) for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    # Blocks are called one by one on the KV-cache path, so qwix can swap their weights
    # (the training path's layer scan works on copies).
    path = r"blocks/\d+/attn"
    if dense:
        path += rf"|blocks/({'|'.join(dense)})/mlp"
    rule = qwix.QuantizationRule(module_path=path, weight_qtype=BITS[bits])
    tokens = jnp.zeros((1, 1), jnp.int32)
    caches = init_caches(model, 1, 1, jnp.float32)
    return qwix.quantize_model(
        model, qwix.PtqProvider([rule]), tokens, jnp.zeros((1, 1), jnp.int32), caches
    )


def parameter_bytes(model: nnx.Module) -> int:
    """Bytes of the model's state as stored (quantized weights count their integers and
    scales; int4 counts half a byte per value)."""
    total = 0
    for leaf in jax.tree.leaves(nnx.state(model)):
        bits = jnp.iinfo(leaf.dtype).bits if jnp.issubdtype(leaf.dtype, jnp.integer) else None
        total += leaf.size * bits // 8 if bits else leaf.nbytes
    return total
