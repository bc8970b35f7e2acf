"""Weight-only quantization with qwix: int8 against a hand-written per-channel absmax
reference, int4 within a stated tolerance, and the memory it saves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import REPO_ROOT
from research.hf import load_hf

qwix = pytest.importorskip("qwix")

from research.infer.quantize import parameter_bytes, quantize_weights  # noqa: E402

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "hf" / "llama2"
# contraction axes of each quantized weight in its einsum (attention and the dense MLP)
CONTRACTED = {
    "wq": (0,),
    "wk": (0,),
    "wv": (0,),
    "wo": (0, 1),
    "w_gate": (0,),
    "w_up": (0,),
    "w_down": (0,),
}


@pytest.fixture(scope="module")
def imported():
    return load_hf(FIXTURE)


def test_int8_weights_are_per_channel_absmax_and_compute_as_their_dequantized_values(imported):
    """Each quantized weight is int8 with one scale per output channel, s = max |w| over the
    contracted axes / 127.5, within one step of the float weight; and the quantized model
    computes what a float model holding the dequantized weights computes."""
    tokens = jnp.asarray(np.load(FIXTURE / "reference.npz")["input_ids"][None])
    quantized = quantize_weights(imported.model(), 8)
    dequantized = {}
    for i in range(imported.config.n_layers):
        for module, names in (
            ("attn", ("wq", "wk", "wv", "wo")),
            ("mlp", ("w_gate", "w_up", "w_down")),
        ):
            for name in names:
                stored = getattr(getattr(quantized.blocks[i], module), name).value.array
                assert stored.qvalue.dtype == jnp.int8
                w = np.asarray(imported.params["blocks"][i][module][name])
                scale = np.abs(w).max(axis=CONTRACTED[name], keepdims=True) / 127.5
                np.testing.assert_allclose(np.asarray(stored.scale), scale, rtol=1e-6)
                value = np.asarray(stored.qvalue, np.float32) * np.asarray(stored.scale)
                assert np.all(np.abs(value - w) <= scale * (1 + 1e-6))
                dequantized[(i, module, name)] = value
    reference = jax.tree_util.tree_map_with_path(
        lambda path, w: dequantized.get(tuple(getattr(k, "key", k) for k in path[1:]), w),
        imported.params,
    )
    expected = nnx.merge(imported.graphdef, reference)(tokens)
    np.testing.assert_allclose(quantized(tokens), expected, atol=2e-5)


def test_int8_and_int4_quality_and_memory(imported):
    ref = np.load(FIXTURE / "reference.npz")
    tokens = jnp.asarray(ref["input_ids"][None])
    full = imported.model()
    int8, int4 = quantize_weights(full, 8), quantize_weights(full, 4)
    scale = np.abs(ref["logits"]).max()
    assert np.abs(np.asarray(int8(tokens)[0]) - ref["logits"]).max() < 0.03 * scale
    assert np.abs(np.asarray(int4(tokens)[0]) - ref["logits"]).max() < 0.5 * scale
    blocks = sum(x.nbytes for x in jax.tree.leaves(nnx.state(full.blocks)))
    saved8 = parameter_bytes(full) - parameter_bytes(int8)
    saved4 = parameter_bytes(full) - parameter_bytes(int4)
    assert 0.6 * blocks < saved8 < 0.75 * blocks  # 4 bytes -> 1 plus the scales and norms
    assert saved4 > saved8
