"""Shardings of the train state: optimizer moments live where their parameters live (FSDP shards
them too); scalars such as step counts are replicated."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import ModelConfig
from research.parallel.mesh import logical_to_spec


def _abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    from research.models import Transformer

    return nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))


def _shardings_of(abstract_state: nnx.State, mesh: Mesh) -> dict:
    def sharding_of(path, variable):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, name))

    shardings = jax.tree_util.tree_map_with_path(
        sharding_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.to_pure_dict(shardings)


def param_shardings(model_cfg: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, dict]:
    """The model's graph and each parameter's sharding, from its logical axes and the rules;
    nothing is allocated. A dimension that does not split over its mesh axes is an error."""
    graphdef, abstract_state = _abstract_model(model_cfg)
    return graphdef, _shardings_of(abstract_state, mesh)


def abstract_params(model_cfg: ModelConfig, mesh: Mesh) -> dict:
    """Shapes, dtypes and shardings of the parameters, as jax.ShapeDtypeStruct."""
    _, abstract_state = _abstract_model(model_cfg)  # traced once for shapes and shardings
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        _shardings_of(abstract_state, mesh),
    )


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
    """The sharding of every leaf of ``tx.init(params)``, for ``jax.jit(out_shardings=...)``.

    Without it the jitted init picks its own layout (replicated), and the jitted step keeps
    it: the Adam moments, twice the parameters, would sit whole on every device."""
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = optax.transforms.MaskedNode  # a partitioned optimizer's "not mine" placeholder
    return optax.tree_map_params(
        tx,
        lambda leaf, sharding: leaf if isinstance(leaf, masked) else sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, masked),
    )
