"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model.

Each round the draft proposes ``k`` tokens one at a time; the target scores all of them in one
forward pass; the longest acceptable prefix is kept plus one token from the target, so every
round yields 1..k+1 tokens for one target pass. Greedy: a draft token is accepted when it is the
target's argmax, so the output is exactly the target's own greedy output. Sampling: token x
drafted with probability q(x) is accepted with probability min(1, p(x) / q(x)), and on
rejection the replacement is drawn from max(0, p - q) renormalised: every emitted token is
distributed exactly as the target's p (``accept_tokens``). Caches roll back by position: slots
past the accepted prefix are marked empty, and are overwritten by the next round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.infer.generation import init_caches
from research.infer.sampling import filter_logits
from research.models.transformer import compute_dtype


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _probs(logits, temperature, top_k, top_p):
    if temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1)


def accept_tokens(p: jax.Array, q: jax.Array, drafted: jax.Array, key: jax.Array):
    """The standard rule. p [k+1, V]: target probabilities at each drafted position and one
    past; q [k, V]: the draft's; drafted [k]. Returns (accepted count a, next token): the
    output is drafted[:a] then the next token (from the residual, or p[k] if all accepted)."""
    k = drafted.shape[0]
    u_key, r_key = jax.random.split(key)
    u = jax.random.uniform(u_key, (k,))
    p_x = jnp.take_along_axis(p[:k], drafted[:, None], axis=-1)[:, 0]
    q_x = jnp.take_along_axis(q, drafted[:, None], axis=-1)[:, 0]
    ok = u * q_x < p_x  # u < p/q without dividing by a zero q (greedy: one-hot p, q)
    accepted = jnp.argmin(jnp.concatenate([ok, jnp.array([False])]))  # first rejection
    residual = jnp.maximum(p[accepted] - jnp.concatenate([q, jnp.zeros_like(p[:1])])[accepted], 0)
    # All accepted: q's row is the zero pad, so the residual is p[k] itself.
    mass = residual.sum()
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p[accepted])
    token = jax.random.categorical(r_key, jnp.log(residual))
    return accepted, token.astype(jnp.int32)


@partial(jax.jit, static_argnums=(4, 5, 6))
def _accept(logits, q, drafted, key, temperature, top_k, top_p):
    return accept_tokens(_probs(logits, temperature, top_k, top_p), q, drafted, key)


@partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _draft(graphdef, params, caches, last, position, k, temperature, top_k, top_p, key=None):
    """Feed the pending token and k drafted ones (k + 1 steps, so the cache holds them all);
    returns (drafted [k], q [k, V], caches)."""
    model = nnx.merge(graphdef, params)

    def step(carry, i):
        token, caches = carry
        logits, caches = model(token[None, None], (position + i)[None, None], caches)
        logits = logits[0, -1]
        q = _probs(logits, temperature, top_k, top_p)
        if temperature == 0.0:
            nxt = jnp.argmax(logits).astype(jnp.int32)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q)).astype(jnp.int32)
        return (nxt, caches), (nxt, q)

    (_, caches), (drafted, q) = jax.lax.scan(step, (last, caches), jnp.arange(k + 1))
    return drafted[:k], q[:k], caches


@partial(jax.jit, static_argnums=(0,))
def _score(graphdef, params, caches, tokens, start):
    """Target logits for tokens [T] at positions start.. (one pass), and the caches."""
    model = nnx.merge(graphdef, params)
    positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
    logits, caches = model(tokens[None], positions[None], caches)
    return logits[0], caches


@jax.jit
def _rollback(caches, last_valid):
    """Mark every slot holding a position after ``last_valid`` empty."""
    return [c | {"pos": jnp.where(c["pos"] > last_valid, -1, c["pos"])} for c in caches]


def speculative_generate(
    target: nnx.Module,
    draft: nnx.Module,
    prompt: list[int],
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[list[int], SpeculativeStats]:
    """Up to ``max_new_tokens`` new tokens after ``prompt`` (one sequence), and the draft's
    acceptance statistics. Target and draft must share the vocabulary."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(
            f"target vocab {target.cfg.vocab_size} != draft vocab {draft.cfg.vocab_size}"
        )
    # Cache width bucketed: a new width would compile every piece again.
    width = -(-(len(prompt) + max_new_tokens + k + 2) // 128) * 128
    t_def, t_params = nnx.split(target)
    d_def, d_params = nnx.split(draft)
    t_params, d_params = nnx.to_pure_dict(t_params), nnx.to_pure_dict(d_params)
    t_cache = init_caches(target, 1, width, compute_dtype(target.cfg.compute_dtype))
    d_cache = init_caches(draft, 1, width, compute_dtype(draft.cfg.compute_dtype))
    # Prefill everything but the last prompt token (the first round's pending token) in
    # chunks of k + 1, the verify pass's shape: one compiled program for both. The last chunk
    # is padded and the padding's positions rolled back.
    body = list(prompt[:-1])
    for start in range(0, len(body), k + 1):
        chunk = body[start : start + k + 1]
        chunk = jnp.asarray(chunk + [chunk[-1]] * (k + 1 - len(chunk)), jnp.int32)
        _, t_cache = _score(t_def, t_params, t_cache, chunk, jnp.int32(start))
        _, d_cache = _score(d_def, d_params, d_cache, chunk, jnp.int32(start))
    if body:
        t_cache = _rollback(t_cache, jnp.int32(len(body) - 1))
        d_cache = _rollback(d_cache, jnp.int32(len(body) - 1))
    key = jax.random.key(seed)
    out: list[int] = []
    stats = SpeculativeStats()
    last, n = int(prompt[-1]), len(prompt)  # pending token sits at position n - 1
    sampling = (float(temperature), int(top_k), float(top_p))
    while len(out) < max_new_tokens:
        key, d_key, a_key = jax.random.split(key, 3)
        pos = jnp.int32(n - 1)
        drafted, q, d_cache = _draft(
            d_def, d_params, d_cache, jnp.int32(last), pos, k, *sampling, d_key
        )
        tokens = jnp.concatenate([jnp.asarray([last], jnp.int32), drafted])
        logits, t_cache = _score(t_def, t_params, t_cache, tokens, pos)
        accepted, nxt = _accept(logits, q, drafted, a_key, *sampling)
        accepted = int(accepted)
        new = np.asarray(drafted[:accepted]).tolist() + [int(nxt)]
        stats.rounds, stats.drafted, stats.accepted = (
            stats.rounds + 1,
            stats.drafted + k,
            stats.accepted + accepted,
        )
        out.extend(new)
        n += accepted + 1
        last = new[-1]
        # Both caches keep positions < n - 1: the new pending token is not in them yet.
        t_cache = _rollback(t_cache, jnp.int32(n - 2))
        d_cache = _rollback(d_cache, jnp.int32(n - 2))
    return out[:max_new_tokens], stats
