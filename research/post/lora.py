"""LoRA adapters (Hu et al. 2021): the base weights stay frozen; each targeted projection W
trains a low-rank update, W + (alpha / rank) A B, with B = 0 at the start, so step 0 computes
exactly the base model.

Why our own ~150 lines and not a library's. flax.nnx.LoRA wraps a 2-D ``nnx.Linear``; our
projections are 3-D einsum weights (``wq`` [d, heads, head_dim], ``wo`` [heads, head_dim, d])
and MoE experts [experts, d, hidden], so it does not apply. qwix's ``LoraProvider`` /
``apply_lora_to_model`` does generalise to einsums (A over the contracted axes, B over the
rest, which is the shape rule used here), but it creates the adapters as module attributes
during a first call; our blocks run as pure functions (``nnx.merge`` of each block's state
under ``jax.checkpoint`` and ``jax.lax.scan``: research/models/stack.py), so the adapters it
creates there are lost (tried: ``nnx.state(model, nnx.LoRAParam)`` comes back empty, and the
next call fails for want of its RNG). Making it work would put LoRA code into the model, which
the design keeps free of training and parallelism concerns.

So LoRA here is a parameter view: ``merge(base, adapters)`` gives plain parameters that the
unchanged model, step, eval, sampling and HF export all read. The train state holds the
frozen ``base``, the trained ``adapters`` (the only leaves with gradients and optimizer
state, so Adam's moments scale with the adapters) and ``params`` = their merge after every
step, which every hook and every reader of a checkpoint (eval, generate, export, another
run's ``post.init_from``) takes as a plain model: a LoRA run exports merged weights by
construction. Costs: one merge per step (rank x the weights' size in FLOPs, small beside the
forward pass) and the frozen base kept twice (``base`` and ``params``) in memory and in each
checkpoint. No adapter dropout: the adapter is merged into the weight inside the step, so
there is no separate adapter input to drop.

Shapes: for W [*batch, *in, *out] (batch: the stacked ``layers`` axis and the ``expert``
axis; in: the contracted axes, two for ``wo``), A is [*batch, *in, rank] and B
[*batch, rank, *out]. A keeps W's sharding on its batch and input axes and B on its batch and
output axes; the rank axis is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from research.config import ConfigError, ModelConfig
from research.train.memory import MemoryReport, per_device_bytes

ALIASES = {
    "q": r"attn/wq$",
    "k": r"attn/wk$",
    "v": r"attn/wv$",
    "o": r"attn/wo$",
    "attn": r"attn/w[qkvo]$",
    "mlp": r"mlp/w_(gate|up|down)$",
}
ALIASES["all"] = f"({ALIASES['attn']}|{ALIASES['mlp']})"
BATCH_AXES = ("layers", "expert")  # leading axes a projection is repeated over
INPUT_AXES = {"wo": 2}  # axes each projection contracts (default 1): wo [heads, head_dim, d]


@dataclass(frozen=True)
class Target:
    """One adapted projection: its key path in the parameter dict and its axis layout."""

    path: tuple
    name: str  # "blocks/0/attn/wq"
    batch: int  # leading batch axes
    inputs: int  # contracted axes after them
    shape: tuple


def patterns(targets: str) -> list[str]:
    """``post.lora_targets`` as regexes (aliases expanded)."""
    items = [t.strip() for t in targets.split(",") if t.strip()]
    return [ALIASES.get(t, t) for t in items]


def full_paths(params: dict, full: str, targets: list[Target]) -> list[tuple]:
    """Paths of the parameters ``post.lora_full`` names (trained whole); a pattern matching no
    parameter, or an adapted one, is an error naming the parameters there are."""
    adapted = {t.path for t in targets}
    paths = list(traverse_util.flatten_dict(params))
    chosen = []
    for pattern in patterns(full):
        hits = [p for p in paths if re.search(pattern, "/".join(str(k) for k in p))]
        if not hits or any(p in adapted for p in hits):
            names = sorted(
                {re.sub(r"^(stacked_)?blocks/\d+/", "", "/".join(map(str, p))) for p in paths}
            )
            raise ConfigError(
                f"post.lora_full: {pattern!r} matches "
                + ("no parameter" if not hits else "a projection that has an adapter")
                + f"; parameters: {', '.join(names)}"
            )
        chosen += [p for p in hits if p not in chosen]
    return chosen


def candidates(model_cfg: ModelConfig) -> list[Target]:
    """Every projection of ``model_cfg`` that can take an adapter (nothing allocated)."""
    from research.models import Transformer

    state = nnx.state(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))
    found = []
    flat, _ = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, variable in flat:
        keys = tuple(getattr(p, "key", p) for p in path)
        name = "/".join(str(k) for k in keys)
        if not re.search(ALIASES["all"], name):
            continue
        axes = variable.get_metadata().get("logical_axes") or ()
        batch = 0
        while batch < len(axes) and axes[batch] in BATCH_AXES:
            batch += 1
        inputs = INPUT_AXES.get(str(keys[-1]), 1)
        found.append(Target(keys, name, batch, inputs, tuple(variable.shape)))
    return found


def select(model_cfg: ModelConfig, targets: str, rank: int) -> list[Target]:
    """The projections ``post.lora_targets`` names; a pattern that matches none of them, or a
    rank above a projection's smaller side, is an error naming what there is."""
    available = candidates(model_cfg)
    chosen = []
    for pattern in patterns(targets):
        hits = [t for t in available if re.search(pattern, t.name)]
        if not hits:
            kinds = sorted({re.sub(r"^.*?/\d+/", "", t.name) for t in available})
            layers = sorted({re.sub(r"/(attn|mlp)/.*$", "", t.name) for t in available})
            raise ConfigError(
                f"post.lora_targets: {pattern!r} matches no projection of this model. "
                f"Aliases: {', '.join(ALIASES)}; projections: {', '.join(kinds)} in "
                f"{', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''} "
                "(regexes are searched in paths such as "
                f"{available[0].name if available else 'blocks/0/attn/wq'})"
            )
        chosen += [t for t in hits if t not in chosen]
    for t in chosen:
        sides = (
            math.prod(t.shape[t.batch : t.batch + t.inputs]),
            math.prod(t.shape[t.batch + t.inputs :]),
        )
        if rank > min(sides):
            raise ConfigError(
                f"post.lora_rank={rank} is above {t.name}'s smaller side ({min(sides)}): such an "
                f"adapter is no longer low-rank; use post.lora_rank <= {min(sides)}"
            )
    return sorted(chosen, key=lambda t: t.name)


def check(cfg) -> list[Target]:
    """Every LoRA setting of ``cfg`` against its model, before anything is allocated."""
    from research.models import Transformer

    post = cfg.post
    targets = select(cfg.model, post.lora_targets, post.lora_rank)
    if post.lora_full:
        shapes = nnx.to_pure_dict(
            nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
        )
        full_paths(shapes, post.lora_full, targets)
    return targets


def _leaf(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _split_spec(sharding, t: Target) -> tuple:
    spec = tuple(sharding.spec) + (None,) * (len(t.shape) - len(sharding.spec))
    cut = t.batch + t.inputs
    return spec[:cut] + (None,), spec[: t.batch] + (None,) + spec[cut:]


def init_adapters(params: dict, targets: list[Target], rank: int, seed: int) -> dict:
    """A ~ N(0, 1 / fan_in) and B = 0 for each target, in the base weight's dtype, sharded as
    that weight's axes are (the rank axis replicated). A is drawn on the host from the seed
    (numpy: adapters are small, and it costs no compile); each device takes its slice."""
    made = {}
    for i, t in enumerate(targets):
        weight = _leaf(params, t.path)
        cut = t.batch + t.inputs
        a_shape, b_shape = t.shape[:cut] + (rank,), t.shape[: t.batch] + (rank,) + t.shape[cut:]
        fan_in = math.prod(t.shape[t.batch : cut])
        host_a = np.random.default_rng([seed, i]).standard_normal(a_shape) / math.sqrt(fan_in)
        host = {"a": host_a.astype(weight.dtype), "b": np.zeros(b_shape, weight.dtype)}
        specs = dict(zip("ab", _split_spec(weight.sharding, t), strict=True))
        made[t.path] = {
            k: jax.make_array_from_callback(
                v.shape,
                NamedSharding(weight.sharding.mesh, PartitionSpec(*specs[k])),
                lambda index, v=v: v[index],
            )
            for k, v in host.items()
        }
    return traverse_util.unflatten_dict(made)


def delta(a: jax.Array, b: jax.Array, weight_shape: tuple) -> jax.Array:
    """A B as a float32 array of the weight's shape: A [*batch, *in, r], B [*batch, r, *out]."""
    outputs = len(weight_shape) - (a.ndim - 1)
    batch = b.ndim - 1 - outputs
    lead = a.shape[:batch]
    a2 = a.astype(jnp.float32).reshape(*lead, -1, a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*lead, b.shape[batch], -1)
    return jnp.matmul(a2, b2).reshape(weight_shape)


def merge(base: dict, adapters: dict, scale: float) -> dict:
    """Plain parameters: each adapted weight W becomes W + scale A B (in W's dtype, the sum in
    float32), a parameter trained whole (``full``) its trained copy; every other leaf is
    ``base``'s own array."""
    flat = traverse_util.flatten_dict(adapters)
    merged = dict(traverse_util.flatten_dict(base))
    for path in {p[:-1] for p in flat}:
        if path + ("full",) in flat:
            merged[path] = flat[path + ("full",)]
            continue
        weight = merged[path]
        update = delta(flat[path + ("a",)], flat[path + ("b",)], weight.shape)
        merged[path] = (weight.astype(jnp.float32) + scale * update).astype(weight.dtype)
    return traverse_util.unflatten_dict(merged)


def scale_of(post) -> float:
    return post.lora_alpha / post.lora_rank


def train_state(cfg, state: dict, tx, mesh) -> dict:
    """The LoRA train state from a fresh full one: ``base`` (frozen), ``adapters``, optimizer
    state over the adapters only, and ``params`` = their merge (the base, as B = 0)."""
    from research.train.shardings import optimizer_shardings

    post = cfg.post
    targets = select(cfg.model, post.lora_targets, post.lora_rank)
    adapters = init_adapters(state["params"], targets, post.lora_rank, cfg.train.seed + 2)
    if post.lora_full:  # trained copies of these parameters (the base keeps its own)
        flat = traverse_util.flatten_dict(adapters)
        for path in full_paths(state["params"], post.lora_full, targets):
            flat[path + ("full",)] = jnp.copy(_leaf(state["params"], path))
        adapters = traverse_util.unflatten_dict(flat)
    opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, adapters, mesh))(adapters)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        opt_state,
    )
    base = state["params"]
    state = {**state, "opt_state": opt_state, "adapters": adapters}
    return start_from(state, base, scale_of(post))


def start_from(state: dict, base: dict, scale: float) -> dict:
    """``state`` with a new frozen ``base`` (post.init_from's parameters) and ``params`` their
    merge with the adapters: separate buffers, as the jitted step donates both."""
    shardings = jax.tree.map(lambda x: x.sharding, base)
    merged = jax.jit(merge, static_argnums=2, out_shardings=shardings)
    return {**state, "base": base, "params": merged(base, state["adapters"], scale)}


def count(tree) -> int:
    """Elements in a tree of arrays."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def nbytes(tree) -> int:
    """Bytes of a tree of arrays (global sizes, all shards together)."""
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def memory(report: MemoryReport, state: dict) -> MemoryReport:
    """``report`` with a LoRA run's state as it is: the base held twice (frozen ``base`` and
    the merged ``params``) beside the adapters, and optimizer moments of the adapters only
    (the report made before LoRA counted a full optimizer). Gradients stay full-size: the
    step differentiates through the merged weights."""
    return dataclasses.replace(
        report,
        params_bytes=per_device_bytes([state["base"], state["params"], state["adapters"]]),
        optimizer_bytes=per_device_bytes(state["opt_state"]),
    )


def summary(state: dict) -> str:
    """One line: what trains and what its optimizer state costs."""
    adapters, total = count(state["adapters"]), count(state["base"])
    flat = traverse_util.flatten_dict(state["adapters"])
    n, whole = sum(p[-1] == "a" for p in flat), sum(p[-1] == "full" for p in flat)
    return (
        f"LoRA: {adapters:,} trained parameters ({100 * adapters / total:.2f}% of the {total:,} "
        f"frozen): adapters on {n} projections"
        + (f", {whole} trained whole" if whole else "")
        + f"; optimizer state {nbytes(state['opt_state']) / 2**20:.2f} MiB"
    )
