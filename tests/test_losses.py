"""The training loss, the train step's gradients and the eval step (research/train/step.py)
against plain loops and a hand-written loss. Plain SGD at learning rate 1 makes a step's
parameter update exactly minus the gradient, so the update checks the whole loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.config import ModelConfig
from research.infer.evaluate import make_eval_step
from research.models import Transformer
from research.models.loss import cross_entropy
from research.train.step import make_train_step

VOCAB, LENGTH = 11, 6


def loop_cross_entropy(logits, targets) -> tuple[float, float]:
    """(mean -log softmax at the target, mean squared log-partition) by loops over tokens."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets)
    losses, squares = [], []
    for row, target in zip(logits.reshape(-1, logits.shape[-1]), targets.ravel(), strict=True):
        log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        losses.append(log_z - row[target])
        squares.append(log_z**2)
    return float(np.mean(losses)), float(np.mean(squares))


def test_cross_entropy_and_z_loss_match_a_loop():
    logits = 3 * jax.random.normal(jax.random.key(0), (2, 5, VOCAB))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, VOCAB)
    total, ce = cross_entropy(logits, targets, z_loss=0.01)
    want_ce, want_z = loop_cross_entropy(logits, targets)
    assert float(ce) == pytest.approx(want_ce, rel=1e-5)
    assert float(total) == pytest.approx(want_ce + 0.01 * want_z, rel=1e-5)


def setup(**overrides):
    settings = dict(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, seq_len=LENGTH)
    cfg = ModelConfig(**(settings | overrides)).resolved()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0)))))
    params = init()  # one compiled program: op-by-op initialisation is slow on CPU
    tx = optax.sgd(1.0)
    train_state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(1)),
    }
    return cfg, graphdef, params, tx, train_state


@pytest.mark.parametrize("moe", [False, True])
def test_train_step_descends_the_next_token_loss(moe):
    """Update = -grad of: next-token CE + z_loss x mean log Z^2 + the router losses (MoE), each
    with its own coefficient; the logged loss is the plain next-token CE. Two micro-batches:
    the gradient is their mean."""
    extra = dict(n_experts=4, top_k=2, expert_hidden=8, router_aux_loss=0.3, router_z_loss=0.07)
    cfg, graphdef, params, tx, state = setup(**(extra if moe else {}))
    batch = jax.random.randint(jax.random.key(2), (2, 3, LENGTH + 1), 0, VOCAB)
    z = 0.02

    def reference_loss(p, micro):
        logits, _, aux = nnx.merge(graphdef, p).forward(micro[:, :-1])
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, micro[:, 1:, None], axis=-1)[..., 0]
        loss = jnp.mean(log_z - picked) + z * jnp.mean(log_z**2)
        if moe:
            loss += 0.3 * aux["load_balance_loss"] + 0.07 * aux["router_z_loss"]
        return loss

    new_state, metrics = jax.jit(
        make_train_step(graphdef, tx, optax.constant_schedule(1.0), cfg, z)
    )(state, batch)
    grads = [jax.jit(jax.grad(reference_loss))(params, micro) for micro in batch]
    leaves = map(jax.tree.leaves, (new_state["params"], params, *grads))
    for new, old, *g in zip(*leaves, strict=True):
        np.testing.assert_allclose(new, old - (g[0] + g[1]) / 2, atol=1e-5)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(
        params, batch.reshape(-1, LENGTH + 1)[:, :-1]
    )
    want_ce, _ = loop_cross_entropy(logits, batch.reshape(-1, LENGTH + 1)[:, 1:])
    assert float(metrics["loss"]) == pytest.approx(want_ce, rel=1e-5)


def test_eval_step_counts_only_the_real_rows():
    """A last eval batch padded with zero rows: only the first ``rows`` rows' next-token losses
    are summed and counted."""
    cfg, graphdef, params, _, _ = setup()
    batch = jax.random.randint(jax.random.key(3), (4, LENGTH + 1), 0, VOCAB)
    batch = batch.at[3:].set(0)
    total, count = jax.jit(make_eval_step(graphdef))(params, batch, 3)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, batch[:3, :-1])
    want, _ = loop_cross_entropy(logits, batch[:3, 1:])
    assert int(count) == 3 * LENGTH
    assert float(total) == pytest.approx(want * 3 * LENGTH, rel=1e-5)
