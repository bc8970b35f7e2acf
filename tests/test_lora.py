"""LoRA adapters (research/post/lora.py): each merged projection against LoRA's definition,
x W + (alpha / r) (x A) B, computed unmerged with numpy one batch index (layer, expert) at a
time; the adapted model at init being the base model bit for bit; the adapters' shardings on
fsdp/tensor meshes; bad targets as clear errors. Whole runs (frozen base, resume after a kill,
merged export): tests/test_post.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ConfigError, ExperimentConfig, MeshConfig, ModelConfig, validate
from research.parallel.mesh import make_mesh
from research.post import lora
from research.train.shardings import abstract_params, param_shardings

SHAPES = {  # unrolled layers; stacked layers with experts (two batch axes before W's own)
    "dense-gqa-relu2": dict(n_kv_heads=2, mlp_activation="relu2"),
    "scanned-moe": dict(scan_layers=True, n_experts=4, top_k=2, moe_every=2),
}


def model_config(**changes) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, vocab_size=48)
    return ModelConfig(**{**base, **changes}).resolved(vocab_size=48)


def one_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def random_adapters(params, targets, rank, seed=0):
    """Adapters as LoRA initialises them, then B set to random values (a trained adapter)."""
    adapters = lora.init_adapters(params, targets, rank, seed)
    rng = np.random.default_rng(seed + 1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jax.device_put((0.1 * rng.normal(size=x.shape)).astype(x.dtype), x.sharding)
            if path[-1].key == "b"
            else x
        ),
        adapters,
    )


@pytest.fixture(scope="module")
def built():
    """Each shape's config, graph and random parameters (numpy: the model's own init would
    cost a compile, and any values do here), built once for the module."""
    cache, rng = {}, np.random.default_rng(0)

    def get(shape):
        if shape not in cache:
            cfg = model_config(**SHAPES[shape])
            mesh = one_device_mesh()
            params = jax.tree.map(
                lambda x: jax.device_put(
                    (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), x.sharding
                ),
                abstract_params(cfg, mesh),
            )
            cache[shape] = (cfg, param_shardings(cfg, mesh)[0], params)
        return cache[shape]

    return get


merge = jax.jit(lora.merge, static_argnums=2)


def leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree, np.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_merged_projection_computes_x_w_plus_the_scaled_low_rank_path(shape, built):
    cfg, _, params = built(shape)
    targets = lora.select(cfg, "all", 4)
    names = {t.name.split("/", 2)[-1] for t in targets}
    assert {"attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w_up", "mlp/w_down"} <= names
    if cfg.scan_layers:  # stacked layers (1 batch axis), stacked experts (2)
        assert {t.batch for t in targets} == {1, 2}
    adapters = random_adapters(params, targets, 4)
    scale = 16.0 / 4
    merged = merge(params, adapters, scale)
    rng = np.random.default_rng(0)
    for t in targets:
        w, w_merged = leaf(params, t.path), leaf(merged, t.path)
        a, b = leaf(adapters, t.path + ("a",)), leaf(adapters, t.path + ("b",))
        for index in np.ndindex(*t.shape[: t.batch]):  # each stacked layer / expert alone
            x = rng.normal(size=(5, *t.shape[t.batch : t.batch + t.inputs]))
            want = np.tensordot(x, w[index], t.inputs) + scale * np.tensordot(
                np.tensordot(x, a[index], t.inputs), b[index], 1
            )
            got = np.tensordot(x, w_merged[index], t.inputs)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=t.name)
    adapted = {t.path for t in targets}
    flat_base = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, x), y in zip(flat_base, jax.tree.leaves(merged), strict=True):
        if tuple(p.key for p in path) not in adapted:  # embeddings, norms, router: as they were
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_at_init_the_adapted_model_is_the_base_model_exactly(built):
    cfg, graphdef, params = built("dense-gqa-relu2")
    adapters = lora.init_adapters(params, lora.select(cfg, "all", 4), 4, seed=3)
    assert all(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(adapters)[::2])  # A random
    merged = merge(params, adapters, 4.0)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 48
    logits = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    np.testing.assert_array_equal(np.asarray(logits(params)), np.asarray(logits(merged)))


def test_chosen_targets_and_layers():
    cfg = model_config(n_layers=3)
    names = [t.name for t in lora.select(cfg, "q,v", 2)]
    assert names == [f"blocks/{i}/attn/w{p}" for i in range(3) for p in "qv"]
    names = [t.name for t in lora.select(cfg, r"blocks/[02]/mlp/w_up", 2)]
    assert names == ["blocks/0/mlp/w_up", "blocks/2/mlp/w_up"]


def test_adapters_are_sharded_as_their_weights_axes_are(built):
    """fsdp=2, tensor=2 on the fake devices: A keeps the weight's input axes' sharding, B its
    output axes', the rank axis is replicated; the merge keeps the weight's sharding."""
    cfg, _, params = built("dense-gqa-relu2")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = jax.device_put(params, param_shardings(cfg, mesh)[1])
    targets = lora.select(cfg, "all", 4)
    adapters = random_adapters(params, targets, 4)
    merged = merge(params, adapters, 2.0)
    for t in targets:
        spec = tuple(leaf_sharding(params, t.path).spec)
        spec += (None,) * (len(t.shape) - len(spec))
        cut = t.batch + t.inputs
        a_spec = tuple(leaf_sharding(adapters, t.path + ("a",)).spec)
        b_spec = tuple(leaf_sharding(adapters, t.path + ("b",)).spec)
        assert a_spec == spec[:cut] + (None,), t.name
        assert b_spec == spec[: t.batch] + (None,) + spec[cut:], t.name
        assert leaf_sharding(merged, t.path).is_equivalent_to(leaf_sharding(params, t.path), 3)
    assert any(s is not None for t in targets for s in leaf_sharding(params, t.path).spec)


def leaf_sharding(tree, path):
    for key in path:
        tree = tree[key]
    return tree.sharding


def test_a_target_that_matches_nothing_names_the_projections():
    cfg = model_config()
    with pytest.raises(ConfigError, match=r"'attn/wqkv' matches no projection.*attn/wq"):
        lora.select(cfg, "attn/wqkv", 4)
    with pytest.raises(ConfigError, match=r"lora_rank=40 is above .*smaller side \(32\)"):
        lora.select(cfg, "all", 40)


@pytest.mark.parametrize(
    "post, message",
    [
        (dict(lora_rank=-1), "post.lora_rank"),
        (dict(lora_rank=4, lora_alpha=0.0), "post.lora_alpha"),
        (dict(lora_rank=4, lora_targets=" , "), "post.lora_targets is empty"),
        (dict(lora_rank=4, lora_targets="attn/w[q"), "not a regex"),
        (dict(lora_rank=4, lora_full="emb[ed"), r"post.lora_full: 'emb\[ed' is not a regex"),
    ],
)
def test_bad_lora_settings_are_config_errors(post, message):
    cfg = ExperimentConfig.from_dict({"post": post})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_parameters_trained_whole_replace_the_base_in_the_merge(built):
    """post.lora_full (PEFT's modules_to_save): the embedding trains as a whole copy; the merge
    takes that copy, the base keeps its own."""
    cfg, _, params = built("dense-gqa-relu2")
    targets = lora.select(cfg, "q", 2)
    paths = lora.full_paths(params, "embed|final_norm", targets)
    assert paths == [("embed",), ("final_norm", "scale")]
    adapters = random_adapters(params, targets, 2)
    adapters["embed"] = {"full": params["embed"] + 1.0}
    merged = merge(params, adapters, 1.0)
    np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(params["embed"]) + 1)
    with pytest.raises(ConfigError, match=r"'lm_head' matches no parameter; parameters: .*embed"):
        lora.full_paths(params, "lm_head", targets)
    with pytest.raises(ConfigError, match="a projection that has an adapter"):
        lora.full_paths(params, "attn/wq", targets)
