"""Muon + AdamW: which parameters Muon takes, that it orthogonalises the matrix each layer applies
(checked against a plain numpy Newton-Schulz), and that sharding does not change the update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.config import ConfigError, MeshConfig, ModelConfig, OptimConfig, load_experiment
from research.models import Transformer
from research.parallel.mesh import make_mesh
from research.train.muon import is_muon_param, make_muon
from research.train.optimizer import make_optimizer
from research.train.shardings import optimizer_shardings
from research.train.state import build_model

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, optax's default


def newton_schulz(matrix: np.ndarray, steps: int = 5) -> np.ndarray:
    """The reference: Muon's quintic iteration in float64 on one 2-D matrix, written out."""
    x = matrix / (np.linalg.norm(matrix) + 1e-8)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def tiny(**overrides) -> ModelConfig:
    settings = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, seq_len=16) | overrides
    return ModelConfig(**settings).resolved()


def params_of(cfg: ModelConfig) -> dict:
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))


def flat(tree) -> dict[str, object]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_embeddings=False, qk_norm=True, qkv_bias=True),
        dict(scan_layers=True, mlp_activation="relu2"),
        dict(n_experts=4, top_k=2),
    ],
    ids=["unrolled", "scanned", "moe"],
)
def test_muon_takes_the_weight_matrices_and_adamw_the_rest(overrides):
    labels = flat(is_muon_param(params_of(tiny(**overrides))))
    muon = {path.rsplit("/", 1)[-1] for path, on in labels.items() if on}
    adam = {path.rsplit("/", 1)[-1] for path, on in labels.items() if not on}
    assert muon <= {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert {"wq", "wk", "wv", "wo", "w_up", "w_down"} <= muon
    assert not muon & adam
    assert {"embed", "scale"} <= adam
    if "n_experts" in overrides:
        assert "router" in adam
    if overrides.get("qkv_bias"):
        assert {"lm_head", "bq", "bk", "bv"} <= adam


def first_update(params, grads, lr: float = 0.1):
    """The first step of make_muon with a constant LR, no decay, SGD on the non-matrices."""
    tx = make_muon(optax.constant_schedule(lr), optax.sgd(lr), momentum=0.95, weight_decay=0.0)
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def test_muon_orthogonalises_the_matrix_the_layer_applies():
    """wq [d, heads, head_dim] is updated as one [d, heads*head_dim] matrix and wo
    [heads, head_dim, d] as one [heads*head_dim, d] matrix: the update is -lr * NS(G) on that
    matrix (the first Nesterov step's momentum is a positive multiple of G, and NS normalises
    scale away), times Muon's shape factor sqrt(max(1, fan_out / fan_in))."""
    cfg = tiny(n_heads=2)  # head_dim 16: per-head and whole-matrix results differ clearly
    params = params_of(cfg)
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params
    )
    updates = first_update(params, grads)
    d, lr = cfg.d_model, 0.1
    for name, rows in (("wq", d), ("wo", cfg.n_heads * cfg.head_dim), ("w_up", d)):
        g = np.asarray(grads["blocks"][0]["attn" if name != "w_up" else "mlp"][name], np.float64)
        u = np.asarray(updates["blocks"][0]["attn" if name != "w_up" else "mlp"][name])
        matrix = g.reshape(rows, -1)
        factor = np.sqrt(max(1.0, matrix.shape[1] / matrix.shape[0]))
        expected = -lr * factor * newton_schulz(matrix)
        np.testing.assert_allclose(u.reshape(rows, -1), expected, rtol=2e-4, atol=2e-6)
        if name == "wq":  # and not head by head: that would be a different update
            per_head = np.stack([newton_schulz(g[:, h]) for h in range(cfg.n_heads)], 1)
            assert not np.allclose(u, -lr * per_head, atol=1e-3)
    # The non-matrices got plain SGD: -lr * grad.
    np.testing.assert_allclose(updates["embed"], -lr * grads["embed"], rtol=1e-6)


def test_muon_on_sharded_matrices_equals_the_unsharded_result():
    """fsdp=4 x tensor=2 on 8 devices: the Muon + AdamW update of a sharded state equals the
    one computed on one device, and the optimizer state lives sharded like its parameters."""
    cfg = tiny(n_kv_heads=4)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    _, params = build_model(cfg, 0, mesh)
    wq = params["blocks"][0]["attn"]["wq"]
    assert {"fsdp", "tensor"} <= {a for a in wq.sharding.spec if a}  # really split both ways
    grads = jax.tree.map(
        lambda p: jax.device_put(
            jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), p.sharding
        ),
        params,
    )
    tx, _ = make_optimizer(
        OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_steps=0), total_steps=10
    )

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates)

    state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)
    mu = flat(state)
    sharded_mu = [k for k, v in mu.items() if k.endswith("attn/wq") and v.ndim == 3]
    assert sharded_mu and all(mu[k].sharding == wq.sharding for k in sharded_mu)
    sharded = jax.jit(step)(params, grads, state)

    one = jax.devices()[0]
    local = jax.tree.map(lambda x: jax.device_put(np.asarray(x), one), (params, grads))
    unsharded = jax.jit(step)(*local, tx.init(local[0]))
    for (path, a), b in zip(flat(sharded).items(), flat(unsharded).values(), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(n_layers=2), marks=pytest.mark.slow),  # fast twin: tests/test_zero.py
        pytest.param(
            dict(n_layers=2, scan_layers=True, n_experts=4, top_k=2, moe_every=2),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["dense", "moe-scan"],
)
def test_grouped_muon_equals_optax_muon(overrides):
    """optim.muon_group_matrices (same-shape matrices orthogonalised as one batch, the batch
    split over data=2 replicas) gives optax.contrib.muon's updates and momentum, step by step,
    in a state of the same layout."""
    from research.parallel.mesh import on_mesh

    params = params_of(tiny(**overrides))
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    config = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_steps=0)
    reference, _ = make_optimizer(config, total_steps=10)
    grouped, _ = make_optimizer(OptimConfig(**{**vars(config), "muon_group_matrices": True}), 10)
    ref_state, state = reference.init(params), grouped.init(params)
    step = jax.jit(on_mesh(lambda g, s, p: grouped.update(g, s, p), mesh))
    reference_step = jax.jit(reference.update)
    for i in range(3):
        keys = jax.random.split(jax.random.key(i), len(jax.tree.leaves(params)))
        grads = jax.tree.unflatten(
            jax.tree.structure(params),
            [
                jax.random.normal(k, p.shape)
                for k, p in zip(keys, jax.tree.leaves(params), strict=True)
            ],
        )
        expected, ref_state = reference_step(grads, ref_state, params)
        updates, state = step(grads, state, params)
        for (path, a), b in zip(flat(updates).items(), flat(expected).values(), strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=path
            )
    # the momentum keeps the parameters' layout (what shardings and checkpoints rely on)
    momentum = {
        k.split(".mu/", 1)[1]: v
        for k, v in flat(state).items()
        if "muon/.inner_state/[0]/.mu/" in k
    }
    for path, on in flat(is_muon_param(params)).items():
        assert not on or momentum[path].shape == flat(params)[path].shape, path


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean 'muon'"):
        load_experiment("tiny", ["optim.optimizer=moun"]).validate()


def test_muon_run_state_has_the_parameter_layout():
    """The train state built for a muon run holds momentum for exactly the Muon leaves."""
    cfg = tiny()
    params = params_of(cfg)
    tx, _ = make_optimizer(OptimConfig(optimizer="muon"), total_steps=5)
    state = tx.init(params)
    moments = [leaf for leaf in jax.tree.leaves(state) if isinstance(leaf, jnp.ndarray)]
    n_muon = sum(flat(is_muon_param(params)).values())
    assert n_muon and len(moments) > n_muon


@pytest.mark.slow
def test_quickstart_recipe_reaches_the_target_loss(tmp_path):
    """The quickstart (Muon recipe, 360 steps) ends at val loss <= 1.88 on the whole split:
    the figure the nanoGPT race (benchmarks/nanogpt_race.py) is about."""
    from research.run import train

    cfg = load_experiment(
        "shakespeare_char",
        [f"train.run_dir={tmp_path}", "log.progress=false", "train.sample_tokens=0"],
    )
    assert train(cfg).val_loss <= 1.88


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_no_warmup_starts_at_the_peak_lr(schedule):
    """warmup_steps=0 means the first step already uses optim.lr (optax's warmup-constant
    schedule with no warmup stayed at 0: nothing trained)."""
    from research.train.optimizer import learning_rate_schedule

    cfg = OptimConfig(lr=1e-2, schedule=schedule, warmup_steps=0)
    assert float(learning_rate_schedule(cfg, 10)(0)) == pytest.approx(1e-2)
