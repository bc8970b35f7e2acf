"""Architecture switches (QK-norm, QKV bias, logit soft-cap, ReLU^2) and packed documents,
each against a plainly written reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ModelConfig
from research.models import Transformer
from research.models.accounting import count_params
from research.models.layers import document_positions
from research.models.loss import cross_entropy, packed_targets, token_losses


def tiny(**overrides) -> Transformer:
    settings = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, seq_len=16) | overrides
    return Transformer(ModelConfig(**settings).resolved(), nnx.Rngs(0))


OPTIONS = [
    dict(qk_norm=True),
    dict(qkv_bias=True),
    dict(mlp_activation="relu2"),
    dict(logit_softcap=5.0),
    dict(qk_norm=True, qkv_bias=True, mlp_activation="relu2", n_kv_heads=2, tie_embeddings=False),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_param_count_matches_the_model(options):
    model = tiny(**options)
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(model.cfg).total_params == built


def test_relu_squared_mlp_matches_formula():
    mlp = tiny(mlp_activation="relu2").blocks[0].mlp
    assert mlp.w_up.shape == (32, 128)  # default width 4 d, a multiple of 64
    x = jax.random.normal(jax.random.key(0), (1, 3, 32))
    expected = (np.maximum(x @ mlp.w_up[...], 0) ** 2) @ mlp.w_down[...]
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_logit_softcap_bounds_logits_and_is_tanh_of_the_uncapped():
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    plain, capped = tiny(init_std=2.0), tiny(init_std=2.0, logit_softcap=3.0)
    raw = plain(tokens)
    assert float(jnp.abs(raw).max()) > 3.0  # the cap is exercised
    np.testing.assert_allclose(capped(tokens), 3.0 * np.tanh(raw / 3.0), rtol=1e-5, atol=1e-5)


def test_qk_norm_and_qkv_bias_match_a_hand_written_attention_input():
    """With QK-norm every query/key head vector has RMS 1 (times the learned scale) before RoPE;
    the biases add to the projections."""
    attn = tiny(qk_norm=True, qkv_bias=True).blocks[0].attn
    attn.bq[...] = jnp.full(attn.bq.shape, 0.5)
    attn.q_norm.scale[...] = jnp.full(attn.q_norm.scale.shape, 2.0)
    x = jax.random.normal(jax.random.key(2), (1, 4, 32))
    q = jnp.einsum("btd,dhk->bthk", x, attn.wq[...]) + 0.5
    q_normed = 2.0 * q / np.sqrt(np.mean(np.square(q), axis=-1, keepdims=True) + 1e-6)
    seen = {}
    original = attn.q_norm.__class__.__call__

    def spy(self, value):
        out = original(self, value)
        seen.setdefault("q", out)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn.q_norm.__class__, "__call__", spy)
        tiny_rope = (jnp.ones((4, 4)), jnp.zeros((4, 4)))  # identity rotation
        attn(x, jnp.arange(4), tiny_rope)
    np.testing.assert_allclose(seen["q"], q_normed, rtol=1e-5, atol=1e-5)


def test_document_positions_restart_at_each_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    np.testing.assert_array_equal(document_positions(segments), expected)


@pytest.mark.parametrize("attention", ["xla", "blockwise", "pallas"])
def test_packed_documents_compute_as_if_alone(attention):
    """A packed row's logits for each document equal that document run alone, in every
    attention implementation (segment masks and restarted RoPE positions)."""
    # head_dim 32: the smallest the Pallas kernels take
    model = tiny(attention=attention, qk_norm=True, d_model=64, n_heads=2, n_layers=1)
    graphdef, state = nnx.split(model)
    model = jax.jit(
        lambda t, segment_ids=None: nnx.merge(graphdef, state)(t, segment_ids=segment_ids)
    )
    tokens = jax.random.randint(jax.random.key(3), (1, 16), 0, 50)
    bounds = [(0, 5), (5, 13), (13, 16)]
    segment_ids = jnp.concatenate([jnp.full((b - a,), i + 1) for i, (a, b) in enumerate(bounds)])
    packed = model(tokens, segment_ids=segment_ids[None])
    for a, b in bounds:
        alone = model(tokens[:, a:b])
        np.testing.assert_allclose(packed[:, a:b], alone, atol=2e-5)
    unpacked = model(tokens)
    assert not np.allclose(packed[:, 5:13], unpacked[:, 5:13], atol=1e-3)  # masks matter


def test_packed_loss_counts_only_targets_within_a_document():
    tokens = jnp.arange(9)[None]
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0]])
    inputs, targets, input_segments, weights = packed_targets(
        {"tokens": tokens, "segment_ids": segments}
    )
    # 0->1, 1->2 (doc 1); 3->4, 4->5, 5->6 (doc 2); not 2->3 (crosses), not into padding
    np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 1, 1, 0, 0])
    logits = jax.random.normal(jax.random.key(4), (1, 8, 12))
    _, ce = cross_entropy(logits, targets, 0.0, weights)
    losses, _ = token_losses(logits, targets)
    np.testing.assert_allclose(ce, np.mean(np.asarray(losses)[0][[0, 1, 3, 4, 5]]), rtol=1e-6)
