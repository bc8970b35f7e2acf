"""One train step: loss, gradients (with accumulation over microbatches), optimizer update."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.models.loss import cross_entropy, packed_targets
from research.models.moe import update_router_biases
from research.train.norms import tree_norms


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    model_cfg,
    z_loss: float,
    batch_shards: int = 1,
    objective=None,
    params_view=None,
    update_shardings: tuple[Any, Any] | None = None,
):
    """train_step(state, batch [accum, micro_batch, seq+1]) -> (state, metrics).

    The batch is a token array or a dict of ``tokens`` and ``segment_ids`` (packed documents:
    see ``packed_targets``). ``batch_shards``: how many ways the batch is sharded (MoE dispatch
    runs per shard). ``objective(model, micro_batch, key) -> (loss, metrics with "loss")``
    replaces the language-modelling loss (post-training: DPO, GRPO, distillation); its metrics
    are averaged over microbatches and logged beside the standard ones.

    ``params_view(frozen, trainable) -> params`` (LoRA, research/post/lora.py): the state's
    ``adapters`` train instead of its ``params``, which become the view of the frozen ``base``
    and the updated adapters after each step.

    ``update_shardings`` (ZeRO-1, research/train/zero.py): (update shardings, the parameters'
    own); the gradients are constrained to the first, so each data-parallel replica runs the
    optimizer on its slice, and the new parameters go back to the second (an all-gather)."""
    moe_layers = model_cfg.moe_layers
    trained = "params" if params_view is None else "adapters"

    def loss_fn(params, micro_batch, key, frozen=None):
        if params_view is not None:
            params = params_view(frozen, params)
        model = nnx.merge(graphdef, params)
        if objective is not None:
            loss, extra = objective(model, micro_batch, key)
            return loss, (extra.pop("loss"), {}, extra)
        inputs, targets, segment_ids, weights = packed_targets(micro_batch)
        logits, _, aux = model.forward(
            inputs,
            dropout_key=key if model_cfg.dropout else None,
            batch_shards=batch_shards,
            segment_ids=segment_ids,
        )
        loss, ce = cross_entropy(logits, targets, z_loss, weights)
        if aux:
            loss = (
                loss
                + model_cfg.router_aux_loss * aux["load_balance_loss"]
                + model_cfg.router_z_loss * aux["router_z_loss"]
            )
        return loss, (ce, aux, {})

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def to_update_layout(grads):  # a reduce-scatter instead of an all-reduce
        if update_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, update_shardings[0])

    def train_step(state: dict[str, Any], batch: jax.Array):
        step_key = jax.random.fold_in(state["rng"], state["step"])
        accum = jax.tree.leaves(batch)[0].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        trainable, frozen = state[trained], state.get("base")
        if accum == 1:  # skip the scan: it costs compile time and nothing else here
            (_, (ce, aux, extra)), grads = grad_fn(trainable, first, step_key, frozen)
        else:

            def micro(carry, inputs):
                index, micro_batch = inputs
                (_, stats), g = grad_fn(
                    trainable, micro_batch, jax.random.fold_in(step_key, index), frozen
                )
                return jax.tree.map(jnp.add, carry, (to_update_layout(g), stats)), None

            (_, stats_shape), grads_shape = jax.eval_shape(
                grad_fn, trainable, first, step_key, frozen
            )
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, stats_shape))
            (grads, (ce, aux, extra)), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
            grads, ce, aux, extra = jax.tree.map(lambda x: x / accum, (grads, ce, aux, extra))
        grads = to_update_layout(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        params = optax.apply_updates(trainable, updates)
        if update_shardings is not None:  # gathered: every replica holds all of each again
            params = jax.lax.with_sharding_constraint(params, update_shardings[1])
        if aux and model_cfg.aux_free_bias_rate and params_view is None:
            params = update_router_biases(
                params, moe_layers, aux["expert_load"], model_cfg.aux_free_bias_rate
            )
        metrics = {
            **tree_norms(params, updates),  # parameter and update norms, per module
            "loss": ce,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            **{f"moe/{k}": v for k, v in aux.items()},
            **extra,
        }
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if params_view is not None:
            new_state |= {"adapters": params, "params": params_view(frozen, params)}
        return new_state, metrics

    return train_step
