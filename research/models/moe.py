"""Mixture-of-experts MLP: a float32 router picks top-k SwiGLU experts per token.

Two dispatch modes compute the same function when nothing is dropped:
- ``capacity``: each expert takes at most C = capacity_factor * tokens * k / n_experts tokens
  (top-1 choices first, then top-2, ..., in token order); the rest are dropped and counted.
  Experts run as one batched matmul over an [experts, C, d] buffer: fast wherever matmuls are.
- ``dropless``: nothing is dropped. On GPU/TPU assignments are sorted by expert and run through
  ``jax.lax.ragged_dot`` (a grouped matmul; research/models/grouped_matmul.py gives it a
  backward pass XLA:TPU can tile). XLA's CPU lowering of ragged_dot computes every
  row against every expert, so on CPU each expert's assignments are padded to whole blocks
  and run as dense batched matmuls instead (MegaBlocks' layout).

Balancing: the Switch/GShard load-balancing loss, the router z-loss, and DeepSeek-V3's
auxiliary-loss-free bias (added to the scores for selection only, nudged after every step
towards equal load by the train step).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.backend import backend
from research.models.grouped_matmul import grouped_matmul
from research.models.layers import SwiGLU, param
from research.parallel.expert_shard import sharded_dropless


class RouterBias(nnx.Variable):
    """Per-expert selection bias: state updated from the load, not by gradients."""


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """rows of x at ``index`` (index == len(x) gives a zero row), differentiated by gathers.

    ``inverse`` [len(x), r] lists, for every row of x, the output rows that copied it (padded
    with len(index)). Routing is a partial permutation, so the backward pass is a gather and a
    sum over r instead of XLA's scatter-add, which runs serially on CPU.
    """
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[index]


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(saved, grad):
    index, inverse = saved
    padded = jnp.concatenate([grad, jnp.zeros((1, grad.shape[1]), grad.dtype)])
    return padded[inverse].sum(axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _queue_position(expert_of: jax.Array, n_experts: int) -> jax.Array:
    """For each assignment, how many earlier assignments chose the same expert."""
    one_hot = jax.nn.one_hot(expert_of, n_experts, dtype=jnp.int32)
    return jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)


def resolve_dispatch(name: str) -> str:
    if name != "auto":
        return name
    return "capacity" if backend() == "cpu" else "dropless"


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


class MoE(nnx.Module):
    def __init__(self, cfg, std: float, out_std: float, param_dtype, rngs: nnx.Rngs):
        n, d, h = cfg.n_experts, cfg.d_model, cfg.expert_hidden
        self.n_experts, self.top_k = n, cfg.top_k
        self.router_kind, self.renormalize = cfg.router, cfg.router_renormalize
        self.dispatch, self.capacity_factor = cfg.moe_dispatch, cfg.capacity_factor
        self.router = param(rngs, (d, n), ("embed", None), std, jnp.float32)
        self.router_bias = RouterBias(jnp.zeros((n,), jnp.float32), logical_axes=(None,))
        self.w_gate = param(rngs, (n, d, h), ("expert", "embed", "mlp"), std, param_dtype)
        self.w_up = param(rngs, (n, d, h), ("expert", "embed", "mlp"), std, param_dtype)
        self.w_down = param(rngs, (n, h, d), ("expert", "mlp", "embed"), out_std, param_dtype)
        self.shared = (
            SwiGLU(d, h * cfg.n_shared_experts, std, out_std, param_dtype, rngs)
            if cfg.n_shared_experts
            else None
        )
        # Qwen2-MoE: how much of the shared experts' output each token takes, sigmoid(x w).
        self.shared_gate = (
            param(rngs, (d, 1), ("embed", None), std, param_dtype)
            if cfg.n_shared_experts and cfg.shared_expert_gate
            else None
        )

    def route(self, tokens: jax.Array):
        """Router in float32 over [..., d] tokens: (logits, normalised probabilities, chosen
        experts, their weights), each with the tokens' leading shape."""
        logits = tokens.astype(jnp.float32) @ self.router[...]
        if self.router_kind == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
            probs = scores
        else:
            scores = jax.nn.sigmoid(logits)
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        biased = scores + jax.lax.stop_gradient(self.router_bias[...])
        _, experts = jax.lax.top_k(biased, self.top_k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if self.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return logits, probs, experts, weights

    def __call__(self, x: jax.Array, batch_shards: int = 1) -> tuple[jax.Array, dict]:
        """x [B, T, d]. Capacity mode routes each sequence as its own group (capacity is per
        sequence), so dispatch stays on the device that holds it and results do not depend on
        how the batch is sharded. Dropless is exact for any grouping: ``batch_shards`` (how many
        ways the batch is split) keeps each shard's dispatch local while blocks stay large."""
        logits, probs, experts, weights = self.route(x)
        if resolve_dispatch(self.dispatch) == "dropless":
            # On a mesh each device dispatches its own tokens (shard_map); off it, the CPU path
            # still splits the batch into ``batch_shards`` groups so blocks stay local.
            groups = batch_shards if jax.sharding.get_abstract_mesh().empty else 1
            out = sharded_dropless(
                functools.partial(self._dropless_local, groups=groups),
                x,
                experts,
                weights,
                self._expert_weights(x.dtype),
            )
            dropped = jnp.float32(0.0)
        else:
            out, dropped = jax.vmap(self._capacity)(x, experts, weights)
            dropped = jnp.mean(dropped)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                gate = jnp.einsum("btd,do->bto", x, self.shared_gate[...].astype(x.dtype))
                shared = jax.nn.sigmoid(gate) * shared
            out = out + shared
        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        return out, self._aux(flat(logits), flat(probs), flat(experts), dropped)

    def _expert_weights(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(w[...].astype(dtype) for w in (self.w_gate, self.w_up, self.w_down))

    def _dropless_local(self, x, experts, weights, expert_weights, first, groups: int = 1):
        """Dropless MoE of [b, t, d] tokens through the experts ``first, first + 1, ...`` held
        in ``expert_weights``; assignments to other experts contribute nothing (they are summed
        in by the devices holding those experts)."""
        n_local = expert_weights[0].shape[0]
        local = experts - first
        held = (local >= 0) & (local < n_local)
        local = jnp.where(held, local, n_local)  # n_local: not here
        weights = jnp.where(held, weights, 0).astype(x.dtype)
        if backend() == "cpu":
            grouped = lambda a: a.reshape(groups, -1, a.shape[-1])  # noqa: E731
            run = functools.partial(self._dropless_blocked, expert_weights=expert_weights)
            out = jax.vmap(run)(*map(grouped, (x, local, weights)))
        else:  # ragged_dot has no batching rule: one group per device
            flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
            out = self._dropless_ragged(*map(flat, (x, local, weights)), expert_weights)
        return out.reshape(x.shape)

    def _experts_swiglu(self, hidden_in, matmul, block_expert=None, weights=None):
        """SwiGLU of each expert; ``block_expert`` picks the expert of each block of rows."""
        dtype = hidden_in.dtype
        if weights is None:
            weights = self._expert_weights(dtype)
        weights = list(weights)
        if block_expert is not None:
            weights = [jnp.take(w, block_expert, axis=0) for w in weights]
        gate, up = matmul(hidden_in, weights[0]), matmul(hidden_in, weights[1])
        return matmul(jax.nn.silu(gate) * up, weights[2])

    def _run_slots(
        self, tokens, slot_of, n_blocks: int, block: int, block_expert=None, expert_weights=None
    ):
        """Copy each assignment (k-major order) into its slot of [n_blocks, block, d], run the
        experts blockwise, and copy the results back; slot n_blocks * block means dropped."""
        n_assign, d = slot_of.shape[0], tokens.shape[-1]
        n_tokens = tokens.shape[0]
        k = n_assign // n_tokens
        slots = n_blocks * block
        assignment_of = jnp.full((slots + 1,), n_assign).at[slot_of].set(jnp.arange(n_assign))
        assignment_of = assignment_of[:slots]  # n_assign: an empty slot
        token_of_slot = jnp.where(assignment_of < n_assign, assignment_of % n_tokens, n_tokens)
        expert_in = gather_rows(tokens, token_of_slot, slot_of.reshape(k, n_tokens).T)
        expert_out = self._experts_swiglu(
            expert_in.reshape(n_blocks, block, d),
            lambda a, w: jnp.einsum("ecd,edh->ech", a, w),
            block_expert,
            expert_weights,
        ).reshape(slots, d)
        per_assignment = gather_rows(expert_out, slot_of, assignment_of[:, None])
        return per_assignment.reshape(k, n_tokens, d)

    def _dropless_ragged(self, tokens, experts, weights, expert_weights=None):
        """Sorted by expert and run through ``ragged_dot``; expert ids past the weights held
        (``len(w_gate)``) sort last, outside every group, and give zeros."""
        if expert_weights is None:
            expert_weights = self._expert_weights(tokens.dtype)
        n_tokens, k = experts.shape
        n = expert_weights[0].shape[0]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sorted_tokens = tokens[order // k]
        group_sizes = jnp.bincount(flat, length=n).astype(jnp.int32)
        out_sorted = self._experts_swiglu(
            sorted_tokens,
            lambda a, w: grouped_matmul(a, w, group_sizes),  # TPU-safe backward (its doc)
            weights=expert_weights,
        )
        grouped = jnp.arange(n_tokens * k)[:, None] < jnp.sum(group_sizes)
        out_sorted = jnp.where(grouped, out_sorted, 0)
        per_assignment = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
        per_assignment = per_assignment.reshape(n_tokens, k, -1)
        return jnp.einsum("tkd,tk->td", per_assignment, weights.astype(per_assignment.dtype))

    def _dropless_blocked(self, tokens, experts, weights, expert_weights=None):
        """Dropless with dense matmuls: each expert's assignments are padded to whole blocks
        (MegaBlocks' layout), at most n_experts * (block - 1) padding rows in all. XLA's CPU
        ragged_dot computes every row against every expert; this does the work once. Expert
        ids past the weights held are dropped."""
        if expert_weights is None:
            expert_weights = self._expert_weights(tokens.dtype)
        n_tokens, k = experts.shape
        n, n_assign = expert_weights[0].shape[0], n_tokens * k
        block = int(min(128, max(8, n_assign // (2 * n))))
        n_blocks = -(-(n_assign + n * (block - 1)) // block)  # enough for any split
        by_rank = experts.T.reshape(-1)
        counts = jnp.bincount(by_rank, length=n)
        padded = (counts + block - 1) // block * block
        padded_start = jnp.cumsum(padded) - padded
        held = by_rank < n
        slot = padded_start[jnp.minimum(by_rank, n - 1)] + _queue_position(by_rank, n)
        slot_of = jnp.where(held, slot, n_blocks * block)
        block_starts = jnp.arange(n_blocks) * block
        block_expert = jnp.minimum(
            jnp.searchsorted(jnp.cumsum(padded), block_starts, side="right"), n - 1
        )
        per_assignment = self._run_slots(
            tokens, slot_of, n_blocks, block, block_expert, expert_weights
        )
        return jnp.einsum("ktd,tk->td", per_assignment, weights.astype(per_assignment.dtype))

    def _capacity(self, tokens, experts, weights):
        n_tokens, k = experts.shape
        n = self.n_experts
        capacity = expert_capacity(n_tokens, k, n, self.capacity_factor)
        # Priority: every token's first choice before any second choice, in token order.
        by_rank = experts.T.reshape(-1)  # [k * tokens]
        position = _queue_position(by_rank, n)
        keep = position < capacity
        slot_of = jnp.where(keep, by_rank * capacity + position, n * capacity)
        per_assignment = self._run_slots(tokens, slot_of, n, capacity)
        combined = jnp.einsum("ktd,tk->td", per_assignment, weights.astype(per_assignment.dtype))
        dropped = jnp.mean(~keep, dtype=jnp.float32)  # not 1 - mean(keep): -4e-8 under jit
        return combined, dropped

    def _aux(self, logits, probs, experts, dropped) -> dict:
        n = self.n_experts
        counts = jnp.sum(jax.nn.one_hot(experts, n, dtype=jnp.float32), axis=(0, 1))
        load = counts / jnp.sum(counts)  # fraction of assignments per expert
        importance = jnp.mean(probs, axis=0)  # mean router probability per expert
        entropy = -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))
        return {
            "load_balance_loss": n * jnp.sum(load * importance),  # 1.0 when uniform
            "router_z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
            "expert_load": load,
            "dropped_fraction": dropped,
            "router_entropy": entropy,
        }


def update_router_biases(params: dict, moe_layers: list[int], loads: jax.Array, rate: float):
    """DeepSeek-V3's bias step: raise under-loaded experts' bias, lower over-loaded ones'.

    ``loads``: [len(moe_layers), experts]. Either parameter layout: ``blocks/i`` (unrolled) or
    ``stacked_blocks/j`` (scan_layers: layer i is row i // len(stacks) of stack i % len(stacks))."""
    step = rate * jnp.sign(jnp.mean(loads, axis=-1, keepdims=True) - loads)
    stacked = "stacked_blocks" in params
    key = "stacked_blocks" if stacked else "blocks"
    period = len(params[key]) if stacked else 1
    # (entry of params[key], row within a stacked entry) of every MoE layer
    where = [(layer % period, layer // period) if stacked else (layer, 0) for layer in moe_layers]
    blocks = dict(params[key])
    for entry in sorted({e for e, _ in where}):
        rows = [r for r, (e, _) in enumerate(where) if e == entry]
        block = dict(blocks[entry])
        mlp = dict(block["mlp"])
        if stacked:  # all this stack's MoE layers at once, each at its group's row
            groups = np.asarray([where[r][1] for r in rows])
            mlp["router_bias"] = mlp["router_bias"].at[groups].add(step[np.asarray(rows)])
        else:
            mlp["router_bias"] = mlp["router_bias"] + step[rows[0]]
        block["mlp"] = mlp
        blocks[entry] = block
    return {**params, key: blocks}
