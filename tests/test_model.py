"""Model properties checked against slow, obviously-right references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.config import ModelConfig
from research.infer.sampling import filter_logits
from research.models import Transformer
from research.models.accounting import count_params
from research.models.attention import xla_attention
from research.models.layers import apply_rope, rope_tables


def tiny_model(**overrides) -> Transformer:
    settings = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, seq_len=16) | overrides
    cfg = ModelConfig(**settings)
    return Transformer(cfg.resolved(), nnx.Rngs(0))


def naive_attention(q, k, v):
    """Loop-free but plainly written: repeat K/V per query head, causal mask, softmax."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    length = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_matches_naive_reference(n_kv):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 10, 4, 8))
    k = jax.random.normal(keys[1], (2, 10, n_kv, 8))
    v = jax.random.normal(keys[2], (2, 10, n_kv, 8))
    pos = jnp.arange(10)
    np.testing.assert_allclose(
        xla_attention(q, k, v, pos, pos), naive_attention(q, k, v), atol=1e-5
    )


def test_gqa_with_all_kv_heads_equals_mha():
    """n_kv_heads == n_heads through the grouped path equals the plain multi-head path."""
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 12, 4, 8)) for key in keys)
    pos = jnp.arange(12)
    mha = xla_attention(q, k, v, pos, pos)
    # Same computation forced through the grouped einsums: 2 KV heads each repeated twice
    # must equal 4 KV heads that are pairwise identical.
    k2, v2 = k[:, :, ::2], v[:, :, ::2]
    grouped = xla_attention(q, k2, v2, pos, pos)
    mha_repeated = xla_attention(q, jnp.repeat(k2, 2, axis=2), jnp.repeat(v2, 2, axis=2), pos, pos)
    np.testing.assert_allclose(grouped, mha_repeated, atol=1e-5)
    assert not np.allclose(mha, grouped)  # the check above is not vacuous


@pytest.mark.parametrize("n_kv", [4, 2])
def test_causality(n_kv):
    """Changing token t+1 never changes the logits at positions <= t."""
    model = tiny_model(n_kv_heads=n_kv)
    tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, 50)
    base = model(tokens)
    for t in (0, 5, 14):
        changed = tokens.at[0, t + 1].set((tokens[0, t + 1] + 1) % 50)
        out = model(changed)
        np.testing.assert_allclose(out[0, : t + 1], base[0, : t + 1], atol=1e-6)
        assert not np.allclose(out[0, t + 1], base[0, t + 1])


def test_rope_depends_only_on_relative_position():
    q = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(4), (1, 1, 1, 16))

    def score(m, n):
        cos_m, sin_m = rope_tables(jnp.array([m]), 16, 10_000.0, 1.0)
        cos_n, sin_n = rope_tables(jnp.array([n]), 16, 10_000.0, 1.0)
        return float(jnp.sum(apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    # Rotation keeps norms.
    cos, sin = rope_tables(jnp.array([5]), 16, 10_000.0, 1.0)
    assert float(jnp.linalg.norm(apply_rope(q, cos, sin))) == pytest.approx(
        float(jnp.linalg.norm(q)), rel=1e-5
    )


def test_rope_scaling_interpolates_positions():
    cos_a, sin_a = rope_tables(jnp.array([8.0]), 16, 10_000.0, 4.0)
    cos_b, sin_b = rope_tables(jnp.array([2.0]), 16, 10_000.0, 1.0)
    np.testing.assert_allclose(cos_a, cos_b, atol=1e-6)
    np.testing.assert_allclose(sin_a, sin_b, atol=1e-6)


def test_param_count_matches_the_model():
    for tie in (True, False):
        model = tiny_model(tie_embeddings=tie, n_kv_heads=2)
        actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert count_params(model.cfg).total_params == actual


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny_model()
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tokens = jax.random.randint(jax.random.key(5), (4, 17), 0, 50)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = None
    for _ in range(150):
        params, opt_state, loss = step(params, opt_state)
        first = first if first is not None else float(loss)
    assert first > 3.5 and float(loss) < 0.1


def test_kv_cache_decoding_matches_full_forward():
    """Prefill + one-token steps through the ring-buffer cache give the full-sequence logits."""
    model = tiny_model(n_kv_heads=2)
    tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 50)
    full = model(tokens)
    caches = model.init_caches(batch=2, width=16)
    logits, caches = model(tokens[:, :5], jnp.arange(5), caches)
    outs = [logits]
    for t in range(5, 16):
        logits, caches = model(tokens[:, t : t + 1], jnp.array([t]), caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4)


def test_ring_buffer_cache_is_a_sliding_window():
    """Past the cache width, each layer attends to exactly the last W tokens (one layer, so
    this equals re-encoding the cropped window; deeper models see further, as in Mistral)."""
    model = tiny_model(n_layers=1)
    tokens = jax.random.randint(jax.random.key(7), (1, 12), 0, 50)
    caches = model.init_caches(batch=1, width=4)
    _, caches = model(tokens[:, :4], jnp.arange(4), caches)
    for t in range(4, 12):
        logits, caches = model(tokens[:, t : t + 1], jnp.array([t]), caches)
    window = model(tokens[:, 8:12])  # positions differ, but RoPE only sees relative ones
    np.testing.assert_allclose(logits[0, -1], window[0, -1], atol=1e-4)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_attention_window_trains_local_attention(implementation):
    """model.attention_window=W: one layer's logits at t see tokens t-W+1..t only, and the
    decoding ring buffer of width W gives the same logits as the full windowed forward pass."""
    model = tiny_model(n_layers=1, attention_window=4, attention=implementation)
    tokens = jax.random.randint(jax.random.key(8), (1, 16), 0, 50)
    changed = tokens.at[0, 2].set((tokens[0, 2] + 1) % 50)
    moved = jnp.any(jnp.abs(model(tokens) - model(changed)) > 1e-6, axis=-1)[0]
    np.testing.assert_array_equal(moved, (jnp.arange(16) >= 2) & (jnp.arange(16) < 6))
    caches = model.init_caches(batch=1, width=4)
    outs = []
    for t in range(16):
        logits, caches = model(tokens[:, t : t + 1], jnp.array([t]), caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), model(tokens), atol=1e-4)


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, 1.0, 2, 1.0)
    assert np.isfinite(np.asarray(top2[0, :2])).all() and np.isinf(np.asarray(top2[0, 2:])).all()
    nucleus = filter_logits(logits, 1.0, 0, 0.7)  # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(np.asarray(nucleus[0, :2])).all()
    assert np.isinf(np.asarray(nucleus[0, 2:])).all()
    everything = filter_logits(logits, 1.0, 0, 1.0)
    assert np.isfinite(np.asarray(everything)).all()


def test_sample_compiled_for_a_quick_compile_gives_the_same_tokens():
    """The end-of-training sample is compiled without LLVM's optimisations on CPU: the tokens
    must be those of the program compiled as usual."""
    from research.infer.sampling import generate

    model = tiny_model(n_layers=1)
    prompt, key = jnp.array([[3, 1, 4]]), jax.random.key(0)
    usual = generate(model, prompt, 8, key, temperature=0.0)
    quick = generate(model, prompt, 8, key, temperature=0.0, once=True)
    np.testing.assert_array_equal(quick, usual)


def test_parameters_initialised_by_the_quick_compile_equal_the_usual_ones():
    """build_model compiles its init without LLVM's optimisations on CPU (it runs once); the
    reference is the same init jitted as usual."""
    from research.config import MeshConfig
    from research.parallel.mesh import make_mesh
    from research.train.state import build_model

    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, seq_len=16).resolved()
    _, quick = build_model(cfg, 0, make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    usual = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0)))))()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), quick, usual)
