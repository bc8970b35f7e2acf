"""Parameter and update norms, global and per top-level module group, for TensorBoard.

A growing parameter norm, or an update/parameter ratio far from ~1e-3, shows a bad learning rate
or a diverging part of the model (embeddings, blocks, head) before the loss does. Pure JAX, so it
runs inside the jitted train step and only a handful of scalars leave the device.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import optax


def _group_name(key) -> str:
    """The name of a path's first key: a dict key, attribute name or sequence index."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _groups(tree) -> dict[str, list[jax.Array]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    groups: dict[str, list[jax.Array]] = defaultdict(list)
    for path, leaf in leaves:
        groups[_group_name(path[0]) if path else "params"].append(leaf)
    return dict(groups)


def tree_norms(params, updates=None) -> dict[str, jax.Array]:
    """L2 norms of ``params`` (and of ``updates``, e.g. new minus old params, if given).

    Returns ``norms/params``, ``norms/params/<group>`` for each top-level key of ``params``
    (``embed``, ``blocks``, ``lm_head``, ...), the same under ``norms/updates``, and
    ``norms/update_ratio`` (global update norm / global parameter norm). Works on any pytree
    (dicts, ``nnx.State``); norms are float32 scalars.
    """
    norms: dict[str, jax.Array] = {}
    trees = {"params": params} if updates is None else {"params": params, "updates": updates}
    for name, tree in trees.items():
        norms[f"norms/{name}"] = optax.tree.norm(tree).astype(jnp.float32)
        for group, leaves in sorted(_groups(tree).items()):
            norms[f"norms/{name}/{group}"] = optax.tree.norm(leaves).astype(jnp.float32)
    if updates is not None:
        norms["norms/update_ratio"] = norms["norms/updates"] / jnp.maximum(
            norms["norms/params"], jnp.finfo(jnp.float32).tiny
        )
    return norms
