"""muP's coordinate check: how big activations and their changes are after a few Adam steps,
at several widths. Under muP each curve is flat in width; under the standard parametrisation
the changes grow with width (the LR that is right at one width is too big at the next).

Used by benchmarks/mup_coord_check.py (the plot in the README) and tests/test_mup.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.config import ModelConfig, OptimConfig
from research.models import Transformer
from research.models.layers import rope_tables
from research.models.loss import cross_entropy
from research.models.stack import run_blocks
from research.train.optimizer import make_optimizer

METRICS = ("hidden", "logits", "hidden_change", "logits_change")


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def coordinate_check(
    widths: list[int],
    mup_base_width: int,
    steps: int = 4,
    lr: float = 1e-2,
    n_layers: int = 2,
    n_heads: int = 4,
    seq_len: int = 32,
    batch: int = 8,
    vocab: int = 65,
    seed: int = 0,
) -> dict[int, dict[str, list[float]]]:
    """{width: {metric: [value after step 1..steps]}}: RMS of the last block's output
    (``hidden``), of the logits, and of their change since initialisation, on one fixed batch.
    ``mup_base_width`` 0: the standard parametrisation."""
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq_len + 1), 0, vocab)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = {}
    for width in widths:
        cfg = ModelConfig(
            vocab_size=vocab,
            d_model=width,
            n_layers=n_layers,
            n_heads=n_heads,
            seq_len=seq_len,
            tie_embeddings=False,
            mup_base_width=mup_base_width,
        ).resolved()
        graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(seed)))
        params = nnx.to_pure_dict(state)
        optim = OptimConfig(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0)
        tx, _ = make_optimizer(optim, steps, cfg.width_mult)

        def outputs(params, cfg=cfg, graphdef=graphdef):
            model = nnx.merge(graphdef, params)
            positions = jnp.arange(seq_len, dtype=jnp.int32)
            rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            x = model.embed[...][inputs]
            hidden, _ = run_blocks(model.blocks, cfg, x, positions, rope, None, 1)
            return hidden, model(inputs)

        @jax.jit
        def step(params, opt_state, outputs=outputs, tx=tx):
            loss = lambda p: cross_entropy(outputs(p)[1], targets, 0.0)[0]  # noqa: E731
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        hidden0, logits0 = jax.jit(outputs)(params)
        opt_state = tx.init(params)
        rows = {m: [] for m in METRICS}
        for _ in range(steps):
            params, opt_state = step(params, opt_state)
            hidden, logits = jax.jit(outputs)(params)
            values = (hidden, logits, hidden - hidden0, logits - logits0)
            for metric, value in zip(METRICS, values, strict=True):
                rows[metric].append(float(_rms(value)))
        results[width] = rows
    return results
