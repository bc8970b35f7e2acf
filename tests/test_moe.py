"""Mixture of experts against slow, obviously-right references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_metrics
from flax import nnx

from research.config import ModelConfig
from research.models.accounting import count_params
from research.models.layers import SwiGLU
from research.models.moe import MoE
from research.run import train


def make_moe(**overrides) -> MoE:
    settings = (
        dict(
            vocab_size=10,
            d_model=16,
            n_heads=2,
            n_layers=1,
            n_experts=4,
            top_k=2,
            expert_hidden=24,
            capacity_factor=8.0,
        )
        | overrides
    )
    cfg = ModelConfig(**settings).resolved()
    return MoE(cfg, 0.3, 0.3, jnp.float32, nnx.Rngs(0))


# One compiled program per test instead of op-by-op dispatch: several times faster on CPU.
apply = nnx.jit(lambda moe, x: moe(x))


def naive_moe(moe: MoE, x: jax.Array) -> jax.Array:
    """A Python loop over tokens and their chosen experts."""
    tokens = np.asarray(x.reshape(-1, x.shape[-1]))
    _, _, experts, weights = moe.route(jnp.asarray(tokens))
    wg, wu, wd = (np.asarray(w[...]) for w in (moe.w_gate, moe.w_up, moe.w_down))
    out = np.zeros_like(tokens)
    for t, token in enumerate(tokens):
        for e, w in zip(np.asarray(experts[t]), np.asarray(weights[t]), strict=True):
            gate, up = token @ wg[e], token @ wu[e]
            out[t] += w * ((gate / (1 + np.exp(-gate))) * up) @ wd[e]
    return out.reshape(x.shape)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dispatch_matches_per_token_loop(dispatch, router):
    moe = make_moe(moe_dispatch=dispatch, router=router)
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    out, aux = apply(moe, x)
    np.testing.assert_allclose(out, naive_moe(moe, x), atol=1e-4)
    assert float(aux["dropped_fraction"]) == 0.0


def test_ragged_dot_dropless_matches_per_token_loop():
    """The GPU/TPU dropless path (ragged_dot), run here on CPU where it is only slow."""
    moe = make_moe(moe_dispatch="dropless", n_experts=5, top_k=2)
    x = jax.random.normal(jax.random.key(8), (2, 9, 16))
    tokens = x.reshape(-1, 16)
    _, _, experts, weights = moe.route(tokens)
    out = moe._dropless_ragged(tokens, experts, weights).reshape(x.shape)
    np.testing.assert_allclose(out, naive_moe(moe, x), atol=1e-4)


def naive_grouped_matmul(rows, weights, group_sizes):
    """Row by row: each row times its group's weights; rows past every group give zeros."""
    rows, weights = np.asarray(rows, np.float64), np.asarray(weights, np.float64)
    group_of = np.repeat(np.arange(len(group_sizes)), np.asarray(group_sizes))
    out = np.zeros((rows.shape[0], weights.shape[-1]))
    for i, g in enumerate(group_of):
        out[i] = rows[i] @ weights[g]
    return out


def test_grouped_matmul_value_and_gradients_match_a_row_loop():
    """The transposed-weights backward pass gives the gradients of the row loop, rows past the
    groups (experts held elsewhere) included: zero output and zero gradient."""
    from research.models.grouped_matmul import grouped_matmul

    rows = jax.random.normal(jax.random.key(0), (11, 6))
    weights = jax.random.normal(jax.random.key(1), (3, 6, 5))
    sizes = jnp.array([4, 0, 5], jnp.int32)  # an empty group; rows 9 and 10 in none
    cotangent = jax.random.normal(jax.random.key(2), (11, 5))
    out, vjp = jax.vjp(lambda r, w: grouped_matmul(r, w, sizes), rows, weights)
    d_rows, d_weights = vjp(cotangent)
    np.testing.assert_allclose(out, naive_grouped_matmul(rows, weights, sizes), atol=1e-5)
    # the loop's gradients by hand: d_rows[i] = g[i] W[group]^T, d_W[g] = sum_i rows[i]^T g[i]
    group_of = np.repeat(np.arange(3), np.asarray(sizes))
    want_rows, want_weights = np.zeros(rows.shape), np.zeros(weights.shape)
    for i, g in enumerate(group_of):
        want_rows[i] = np.asarray(cotangent[i]) @ np.asarray(weights[g]).T
        want_weights[g] += np.outer(rows[i], cotangent[i])
    np.testing.assert_allclose(d_rows, want_rows, atol=1e-5)
    np.testing.assert_allclose(d_weights, want_weights, atol=1e-5)


def test_one_expert_top1_dropless_equals_dense_swiglu():
    moe = make_moe(n_experts=1, top_k=1, moe_dispatch="dropless")
    dense = SwiGLU(16, 24, 0.3, 0.3, jnp.float32, nnx.Rngs(5))
    dense.w_gate[...] = moe.w_gate[...][0]
    dense.w_up[...] = moe.w_up[...][0]
    dense.w_down[...] = moe.w_down[...][0]
    x = jax.random.normal(jax.random.key(2), (3, 5, 16))
    np.testing.assert_allclose(moe(x)[0], dense(x), atol=1e-5)


def test_capacity_mode_drops_exactly_the_overflow():
    moe = make_moe(top_k=1, capacity_factor=1.0, moe_dispatch="capacity")
    # Every token prefers expert 2: capacity is ceil(1.0 * 8 * 1 / 4) = 2 tokens.
    moe.router[...] = jnp.zeros((16, 4)).at[:, 2].set(1.0)
    x = jnp.abs(jax.random.normal(jax.random.key(3), (1, 8, 16))) + 0.1
    out, aux = apply(moe, x)
    expected = naive_moe(moe, x)
    np.testing.assert_allclose(out[0, :2], expected[0, :2], atol=1e-5)  # first come, kept
    np.testing.assert_allclose(out[0, 2:], 0.0, atol=1e-6)  # the rest dropped
    assert float(aux["dropped_fraction"]) == pytest.approx(6 / 8)


def naive_capacity_moe(moe: MoE, x: jax.Array) -> tuple[np.ndarray, float]:
    """Capacity dispatch as loops, per sequence: every token's first choice queues before any
    second choice, in token order; an expert keeps its first ceil(factor * tokens * k / experts)
    assignments. Returns the output and the fraction of assignments dropped."""
    batch, length, d = x.shape
    k, n = moe.top_k, moe.n_experts
    capacity = min(length, max(1, math.ceil(moe.capacity_factor * length * k / n)))
    _, _, experts, weights = moe.route(x)
    experts, weights = np.asarray(experts), np.asarray(weights)
    wg, wu, wd = (np.asarray(w[...]) for w in (moe.w_gate, moe.w_up, moe.w_down))
    out, dropped = np.zeros((batch, length, d), np.float32), 0
    for b in range(batch):
        taken = [0] * n
        for rank in range(k):
            for t in range(length):
                e = experts[b, t, rank]
                if taken[e] == capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                token = np.asarray(x[b, t])
                gate, up = token @ wg[e], token @ wu[e]
                out[b, t] += weights[b, t, rank] * ((gate / (1 + np.exp(-gate))) * up) @ wd[e]
    return out, dropped / (batch * length * k)


@pytest.mark.parametrize("top_k, factor", [(1, 0.75), (2, 0.5), (2, 1.0), (3, 0.6)])
def test_capacity_dispatch_matches_first_choices_first_loop(top_k, factor):
    moe = make_moe(moe_dispatch="capacity", top_k=top_k, capacity_factor=factor)
    x = jax.random.normal(jax.random.key(11), (2, 7, 16))
    out, aux = apply(moe, x)
    expected, dropped = naive_capacity_moe(moe, x)
    assert dropped > 0  # the case under test: some assignments overflow
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert float(aux["dropped_fraction"]) == pytest.approx(dropped)


def test_first_choices_beat_earlier_tokens_second_choices():
    """Two experts, capacity 1 (0.5 x 2 tokens x top-2 / 2 experts), crossed preferences: token
    t's input is the unit vector e_t and it prefers expert t, then the other. Each expert keeps
    its first-choice token; token 0's second choice must not take token 1's slot."""
    moe = make_moe(n_experts=2, top_k=2, capacity_factor=0.5, moe_dispatch="capacity")
    moe.router[...] = jnp.zeros((16, 2)).at[0, 0].set(2.0).at[1, 1].set(2.0)
    x = jnp.zeros((1, 2, 16)).at[0, 0, 0].set(1.0).at[0, 1, 1].set(1.0)
    assert np.asarray(moe.route(x)[2][0]).tolist() == [[0, 1], [1, 0]]
    out, aux = apply(moe, x)
    expected, dropped = naive_capacity_moe(moe, x)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert float(jnp.abs(out[0, 1]).sum()) > 0  # token 1 is served
    # one of each token's two assignments is dropped: half the assignments, though every token
    assert dropped == float(aux["dropped_fraction"]) == pytest.approx(0.5)


def test_capacity_rounds_up_and_counts_every_choice():
    """3 tokens all choosing experts 0 then 1 (of 4), top-2, factor 1: capacity is
    ceil(3 x 2 / 4) = 2, so tokens 0 and 1 are served twice and token 2 not at all. (Rounding
    down, or leaving top_k out, gives capacity 1.)"""
    moe = make_moe(n_experts=4, top_k=2, capacity_factor=1.0, moe_dispatch="capacity")
    moe.router[...] = jnp.zeros((16, 4)).at[:, 0].set(2.0).at[:, 1].set(1.0)
    x = jnp.abs(jax.random.normal(jax.random.key(12), (1, 3, 16))) + 0.1
    out, aux = apply(moe, x)
    np.testing.assert_allclose(out[0, :2], naive_moe(moe, x)[0, :2], atol=1e-5)  # all served
    np.testing.assert_allclose(out[0, 2], 0.0, atol=1e-6)
    assert float(aux["dropped_fraction"]) == pytest.approx(2 / 6)


def test_gradients_reach_selected_experts_and_router():
    moe = make_moe(n_experts=4, top_k=2, moe_dispatch="capacity")
    x = jax.random.normal(jax.random.key(4), (2, 6, 16))
    graphdef, state = nnx.split(moe)
    params = nnx.to_pure_dict(state)

    def loss(p):
        out, aux = nnx.merge(graphdef, p)(x)
        return jnp.sum(out**2) + aux["load_balance_loss"]

    grads = jax.grad(loss)(params)
    _, _, experts, _ = moe.route(x.reshape(-1, 16))
    for expert in np.unique(np.asarray(experts)):
        assert float(jnp.abs(grads["w_gate"][expert]).sum()) > 0
        assert float(jnp.abs(grads["w_down"][expert]).sum()) > 0
    assert float(jnp.abs(grads["router"]).sum()) > 0


def test_aux_losses_are_minimal_for_uniform_routing():
    moe = make_moe(n_experts=4)
    tokens = jax.random.normal(jax.random.key(6), (32, 16))
    experts = jnp.stack([jnp.arange(32) % 4, (jnp.arange(32) + 1) % 4], axis=1)
    uniform_logits = jnp.full((32, 4), -jnp.log(4.0))  # logsumexp = 0: z-loss minimum
    uniform = moe._aux(uniform_logits, jax.nn.softmax(uniform_logits), experts, 0.0)
    assert float(uniform["load_balance_loss"]) == pytest.approx(1.0)
    assert float(uniform["router_z_loss"]) == pytest.approx(0.0, abs=1e-10)
    assert float(uniform["router_entropy"]) == pytest.approx(np.log(4), rel=1e-6)  # its maximum
    logits, probs, chosen, _ = moe.route(tokens * 5)
    skewed = moe._aux(logits, probs, chosen, 0.0)
    assert float(skewed["load_balance_loss"]) > 1.0
    assert float(skewed["router_z_loss"]) > 0.0
    assert 0.0 < float(skewed["router_entropy"]) < np.log(4)


def test_active_and_total_parameter_counts():
    cfg = ModelConfig(
        vocab_size=10,
        d_model=16,
        n_heads=2,
        n_layers=2,
        n_experts=4,
        top_k=2,
        expert_hidden=24,
        n_shared_experts=1,
    ).resolved()
    from research.models import Transformer

    model = Transformer(cfg, nnx.Rngs(0))
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    size = count_params(cfg)
    assert size.total_params == actual
    expert = 3 * 16 * 24
    assert size.total_params - size.active_params == 2 * (4 - 2) * expert


def test_fine_grained_experts_split_each_expert():
    cfg = ModelConfig(n_experts=8, top_k=2, expert_hidden=64, expert_granularity=4).resolved()
    assert (cfg.n_experts, cfg.top_k, cfg.expert_hidden) == (32, 8, 16)


# Whole sharded runs: with --runslow, to keep the default suite under 10 minutes (the MoE
# dispatch itself is checked per group above, which is what expert sharding relies on).
@pytest.mark.slow
@pytest.mark.parametrize("experts", [2, 4, 8])
def test_expert_parallel_loss_equals_unsharded(tiny_config, tmp_path, experts):
    common = (
        "model.n_experts=8",
        "model.top_k=2",
        "train.steps=3",
        "train.log_every=1",
        "train.sample_tokens=0",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "model.aux_free_bias_rate=0.01",
    )
    single = train(tiny_config(*common, "mesh.data=1", f"train.run_dir={tmp_path / 'one'}"))
    sharded = train(
        tiny_config(*common, f"mesh.expert={experts}", f"train.run_dir={tmp_path / 'ep'}")
    )
    a, b = read_metrics(single.run_dir), read_metrics(sharded.run_dir)
    for step in (1, 2, 3):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5)
        assert a[step]["moe/max_load"] == pytest.approx(b[step]["moe/max_load"], rel=1e-5)


def test_expert_weights_are_sharded_over_the_expert_axis():
    from research.config import MeshConfig
    from research.parallel.mesh import make_mesh
    from research.train.state import build_model

    cfg = ModelConfig(
        vocab_size=16, d_model=16, n_heads=2, n_layers=1, n_experts=8, expert_hidden=32
    ).resolved()
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    _, params = build_model(cfg, 0, mesh)
    w_gate = params["blocks"][0]["mlp"]["w_gate"]
    assert w_gate.sharding.spec[0] == "expert"
    assert w_gate.addressable_shards[0].data.shape == (2, 16, 32)  # 8 experts / 4 ways


def test_gather_rows_gradient_matches_plain_indexing():
    from research.models.moe import gather_rows

    x = jax.random.normal(jax.random.key(0), (5, 3))
    index = jnp.array([2, 0, 5, 4, 2])  # 5 is the zero row; row 2 is copied twice
    inverse = jnp.array([[1, 5], [5, 5], [0, 4], [5, 5], [3, 5]])

    def through(fn):
        return jax.grad(lambda v: jnp.sum(jnp.sin(fn(v))))(x)

    plain = through(lambda v: jnp.concatenate([v, jnp.zeros((1, 3))])[index])
    np.testing.assert_allclose(through(lambda v: gather_rows(v, index, inverse)), plain, atol=1e-6)


def test_aux_free_bias_moves_towards_equal_load():
    from research.models.moe import update_router_biases

    params = {"blocks": {0: {"mlp": {"router_bias": jnp.zeros(4)}}, 1: {"mlp": {}}}}
    load = jnp.array([[0.55, 0.25, 0.15, 0.05]])
    updated = update_router_biases(params, [0], load, rate=0.1)
    bias = np.asarray(updated["blocks"][0]["mlp"]["router_bias"])
    np.testing.assert_allclose(bias, [-0.1, 0.0, 0.1, 0.1])  # mean load is 0.25
    assert updated["blocks"][1] == {"mlp": {}}


def test_aux_free_bias_updates_each_layer_of_a_stacked_model():
    """scan_layers keeps MoE layers 1 and 3 as rows 0 and 1 of stack 1: same update per layer."""
    from research.config import ModelConfig
    from research.models.moe import update_router_biases
    from research.models.stack import stack_layers

    cfg = ModelConfig(n_layers=4, n_experts=4, moe_every=2)
    params = {"blocks": {i: {"mlp": {"router_bias": jnp.full(4, float(i))}} for i in range(4)}}
    loads = jnp.array([[0.55, 0.25, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    expected = stack_layers(update_router_biases(params, [1, 3], loads, 0.1), cfg)
    updated = update_router_biases(stack_layers(params, cfg), [1, 3], loads, 0.1)
    bias = np.asarray(updated["stacked_blocks"][1]["mlp"]["router_bias"])
    np.testing.assert_allclose(bias, [[0.9, 1.0, 1.1, 1.1], [3.1, 3.1, 2.9, 2.9]])
    for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_weights_are_the_renormalised_top_k_scores(router):
    """The per-token loops take their weights from route(): check route() itself, in numpy."""
    moe = make_moe(n_experts=4, top_k=2, router=router)
    x = jax.random.normal(jax.random.key(13), (1, 5, 16))
    _, _, experts, weights = moe.route(x)
    logits = np.asarray(x[0], np.float64) @ np.asarray(moe.router[...], np.float64)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    if router == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    top = np.argsort(-scores, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(experts[0]), top)
    picked = np.take_along_axis(scores, top, axis=-1)
    np.testing.assert_allclose(weights[0], picked / picked.sum(-1, keepdims=True), rtol=1e-5)


def test_aux_free_bias_changes_selection_not_weights():
    moe = make_moe(n_experts=4, top_k=1, router="sigmoid", router_renormalize=False)
    x = jax.random.normal(jax.random.key(9), (1, 6, 16))
    _, _, before, weights_before = moe.route(x)
    moe.router_bias[...] = jnp.zeros(4).at[3].set(10.0)  # expert 3 now always wins
    _, probs, after, weights_after = moe.route(x)
    assert (np.asarray(after) == 3).all()
    scores = jax.nn.sigmoid(x @ moe.router[...])
    np.testing.assert_allclose(weights_after[..., 0], scores[..., 3], rtol=1e-6)  # unbiased


def test_moe_training_logs_router_statistics(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(
        tiny_config(
            "model.n_experts=4",
            "model.top_k=2",
            "train.steps=10",
            "train.log_every=5",
            "train.sample_tokens=0",
        )
    )
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    for tag in (
        "moe/load_balance_loss",
        "moe/router_z_loss",
        "moe/dropped_fraction",
        "moe/router_entropy",
        "moe/max_load",
    ):
        assert tag in events.Tags()["tensors"], tag
    layers = [t for t in events.Tags()["histograms"] if t.startswith("moe/expert_load/layer_")]
    assert layers, events.Tags()["histograms"]  # one histogram per MoE layer
    for tag in layers:
        loads = events.Histograms(tag)
        assert loads[-1].step == 10  # the accumulator keeps only the newest histogram
        assert sum(loads[-1].histogram_value.bucket) == pytest.approx(1.0)
    assert "moe/expert_load_heatmap" in events.Tags()["images"]  # drawn at the last step


def _sharded_dropless_value_and_grads(moe: MoE, x, mesh=None):
    """MoE output and the gradients of a fixed projection of it (w.r.t. x and the experts),
    jitted on ``mesh`` (its expert weights and the batch placed by their logical axes) or on
    one device."""
    from jax.sharding import NamedSharding

    from research.parallel.mesh import batch_sharding, logical_to_spec, on_mesh

    graphdef, state = nnx.split(moe)
    probe = jax.random.normal(jax.random.key(11), x.shape)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] * probe)

    def value_and_grads(state, x):
        out = nnx.merge(graphdef, state)(x)[0]
        return out, jax.grad(loss, argnums=(0, 1))(state, x)

    if mesh is None:
        out, (g_state, g_x) = jax.jit(value_and_grads)(state, x)
    else:

        def place(variable):
            axes = variable.get_metadata().get("logical_axes") or (None,) * variable.ndim
            spec = logical_to_spec(axes, variable.shape, mesh)
            return variable.replace(jax.device_put(variable[...], NamedSharding(mesh, spec)))

        state = jax.tree.map(place, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        x = jax.device_put(x, batch_sharding(mesh))
        out, (g_state, g_x) = jax.jit(on_mesh(value_and_grads, mesh))(state, x)
    grads = {name: np.asarray(g_state[name][...]) for name in ("w_gate", "w_up", "w_down")}
    return np.asarray(out), grads | {
        "x": np.asarray(g_x),
        "router": np.asarray(g_state["router"][...]),
    }


@pytest.mark.parametrize("path", ["blocked", "ragged"])
@pytest.mark.parametrize(
    "layout",
    [
        dict(fsdp=2, tensor=2, expert=2),  # fsdp gather, tensor psum, expert gather/scatter
        pytest.param(dict(data=2, fsdp=2, expert=2), marks=pytest.mark.slow),
        pytest.param(dict(expert=8), marks=pytest.mark.slow),
    ],
    ids=["fsdp2-tp2-ep2", "dp2-fsdp2-ep2", "ep8"],
)
def test_sharded_dropless_equals_unsharded_and_the_token_loop(path, layout):
    """Dropless dispatch per shard (shard_map: local experts, all-gather / reduce-scatter over
    the expert axis, psum over tensor) gives the unsharded output and gradients, and both the
    routed experts' per-token loop. ``ragged``: the TPU/GPU path (ragged_dot), run on CPU."""
    from research.backend import target_backend
    from research.config import MeshConfig
    from research.parallel.mesh import make_mesh

    moe = make_moe(moe_dispatch="dropless", n_experts=8, top_k=2, d_model=16, expert_hidden=24)
    x = jax.random.normal(jax.random.key(3), (8, 6, 16))
    mesh = make_mesh(MeshConfig(**({"data": 1} | layout)))
    assert math.prod(mesh.shape.values()) == 8
    with target_backend("tpu" if path == "ragged" else "cpu"):
        one, one_grads = _sharded_dropless_value_and_grads(moe, x)
        sharded, sharded_grads = _sharded_dropless_value_and_grads(moe, x, mesh)
    np.testing.assert_allclose(one, naive_moe(moe, x), atol=1e-4)
    np.testing.assert_allclose(sharded, one, atol=1e-5)
    for name, grad in one_grads.items():
        np.testing.assert_allclose(sharded_grads[name], grad, atol=1e-5, err_msg=name)
