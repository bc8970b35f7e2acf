"""The train state (params, optimizer state, step, RNG key), built straight into its shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import ExperimentConfig, ModelConfig
from research.models import Transformer
from research.runtime import run_once_options
from research.train.optimizer import make_optimizer
from research.train.shardings import abstract_params, optimizer_shardings, param_shardings
from research.train.zero import optimizer_layout


def build_model(model_cfg: ModelConfig, seed: int, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
    """Initialise parameters directly into their shardings (no full copy on one device first)."""
    graphdef, shardings = param_shardings(model_cfg, mesh)

    @jax.jit
    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, nnx.Rngs(seed))))

    platform = mesh.devices.flat[0].platform
    params = jax.jit(init, out_shardings=shardings, compiler_options=run_once_options(platform))()
    return graphdef, params


def init_train_state(cfg: ExperimentConfig, mesh: Mesh):
    """Fresh train state for a resolved config: (graphdef, state, tx, schedule)."""
    graphdef, params = build_model(cfg.model, cfg.train.seed, mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.width_mult)
    layout = optimizer_layout(params, mesh, cfg.train.shard_optimizer_update)
    opt_shardings = optimizer_shardings(tx, layout, mesh)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
    }
    # Scalars (step, optimizer counts, RNG key) live replicated on the mesh beside the params.
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        state,
    )
    return graphdef, state, tx, schedule


def abstract_train_state(cfg: ExperimentConfig, mesh: Mesh, tx) -> dict:
    """The train state ``init_train_state`` would build, as shapes, dtypes and shardings only
    (nothing allocated): what an ahead-of-time compile for a pod lowers the step against."""
    params = abstract_params(cfg.model, mesh)
    layout = optimizer_layout(params, mesh, cfg.train.shard_optimizer_update)
    opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        optimizer_shardings(tx, layout, mesh),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "params": params,
        "opt_state": opt,
        "rng": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
    }


def abstract_like(tree):
    """Shapes, dtypes and shardings of a tree: the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
