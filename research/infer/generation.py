"""Batched generation: many prompts of different lengths at once, with a KV cache.

Prompts are left-padded to a shape bucket and each sequence gets its own positions (its first
real token is position 0, pads are negative and invisible), so every sequence computes exactly
what it would alone. Prefill and the decode loop are jitted once per bucket of shapes (batch,
padded prompt length, cache width, decode steps), not once per prompt length. Decoding runs as
one ``lax.while_loop`` that stops when every sequence has hit a stop token or its own
``max_new_tokens``. Sampling: temperature, top-k, top-p, one key per request (seeded), so a
request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.infer.sampling import filter_logits
from research.models.attention import kv_cache_arrays
from research.models.transformer import compute_dtype


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32  # per request unless generate() is given a list
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_tokens: tuple[int, ...] = ()  # a sequence ends after emitting one (it is returned)
    seed: int = 0  # request i samples with key(seed + i) unless seeds are given
    bucket: int = 16  # prompt lengths and decode lengths round up to a multiple of this
    vocab_limit: int = 0  # > 0: ids from here on are never sampled (a padded vocabulary)
    cache_dtype: str = ""  # "": the compute dtype; "int8": int8 with per-head-vector scales
    pad_id: int = 0  # what left padding is filled with (never attended to)


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def generate(
    model: nnx.Module,
    prompts: list[list[int]],
    config: GenerationConfig = GenerationConfig(),
    max_new_tokens: list[int] | None = None,
    seeds: list[int] | None = None,
    ledger=None,
) -> list[list[int]]:
    """The new tokens of each prompt (stop token included when one ended it).

    ``max_new_tokens``: one limit per request (default ``config.max_new_tokens`` for all);
    ``seeds``: one sampling seed per request (default ``config.seed + i``); ``ledger``: an
    ``InferenceLedger`` that records prefill and decode apart (tokens, seconds, energy)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n = len(prompts)
    limits = list(max_new_tokens or [config.max_new_tokens] * n)
    seeds = list(seeds if seeds is not None else [config.seed + i for i in range(n)])
    if len(limits) != n or len(seeds) != n:
        raise ValueError("max_new_tokens and seeds need one entry per prompt")
    prompt_len = _round_up(max(len(p) for p in prompts), config.bucket)
    steps = _round_up(max(limits), config.bucket)
    tokens = np.full((n, prompt_len), config.pad_id, np.int32)
    pads = np.zeros(n, np.int32)
    for i, p in enumerate(prompts):
        pads[i] = prompt_len - len(p)
        tokens[i, pads[i] :] = p
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    graphdef, state = nnx.split(model)
    cache_dtype = config.cache_dtype or compute_dtype(model.cfg.compute_dtype)
    params, pads = nnx.to_pure_dict(state), jnp.asarray(pads)
    with _phase(ledger, "prefill", sum(len(p) for p in prompts)) as done:
        logits, caches = done(
            _prefill(graphdef, params, jnp.asarray(tokens), pads, steps, jnp.dtype(cache_dtype))
        )
    with _phase(ledger, "decode") as done:
        out, lengths = done(
            _decode(
                graphdef,
                params,
                logits,
                caches,
                pads,
                jnp.asarray(limits, jnp.int32),
                keys,
                steps,
                _Sampling.of(config),
            )
        )
        out, lengths = np.asarray(out), np.asarray(lengths)
        done.tokens = int(lengths.sum())
    return [out[i, : lengths[i]].tolist() for i in range(n)]


class _Done:
    """Blocks on a phase's outputs so its time is the device's, not the dispatch's."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def __call__(self, outputs):
        return jax.block_until_ready(outputs)


@contextmanager
def _phase(ledger, name: str, tokens: int = 0):
    done = _Done(tokens)
    if ledger is None:
        yield done
        return
    with ledger.phase(name) as record:
        yield done
        record.tokens = done.tokens


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_k: int
    top_p: float
    stop_tokens: tuple[int, ...]
    vocab_limit: int

    @classmethod
    def of(cls, c: GenerationConfig) -> _Sampling:
        return cls(
            float(c.temperature),
            int(c.top_k),
            float(c.top_p),
            tuple(c.stop_tokens),
            int(c.vocab_limit),
        )

    def pick(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        """One token per row of logits [B, V], row b sampled with keys[b]."""
        if self.vocab_limit:
            logits = logits.at[:, self.vocab_limit :].set(-jnp.inf)
        if self.temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, self.temperature, self.top_k, self.top_p)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def init_caches(model: nnx.Module, batch: int, width: int, dtype) -> list[dict]:
    """Per-layer caches with per-sequence slot positions ([B, W]; -1: empty)."""
    cfg = model.cfg
    shape = (batch, width, cfg.n_kv_heads, cfg.head_dim)
    return [
        {**kv_cache_arrays(shape, dtype), "pos": jnp.full((batch, width), -1, jnp.int32)}
        for _ in range(cfg.n_layers)
    ]


def prefill(model, tokens, pads, caches):
    """Run the left-padded prompts [B, P] through the model: (last logits [B, V], caches)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :] - pads[:, None]
    logits, caches = model(tokens, positions, caches)
    return logits[:, -1], caches


def decode_step(model, token, position, caches):
    """One token per sequence ([B] tokens at [B] positions): (logits [B, V], caches)."""
    logits, caches = model(token[:, None], position[:, None], caches)
    return logits[:, -1], caches


@partial(jax.jit, static_argnums=(0, 4, 5))
def _prefill(graphdef, params, tokens, pads, steps, cache_dtype):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = tokens.shape
    caches = init_caches(model, batch, prompt_len + steps, cache_dtype)
    return prefill(model, tokens, pads, caches)


@partial(jax.jit, static_argnums=(0, 7, 8), donate_argnums=(3,))
def _decode(graphdef, params, logits, caches, pads, limits, keys, steps, sampling: _Sampling):
    model = nnx.merge(graphdef, params)
    batch = logits.shape[0]
    prompt_len = caches[0]["k"].shape[1] - steps
    stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[3]
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, logits, caches, done, out, lengths = carry
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        token = sampling.pick(logits, step_keys)
        token = jnp.where(done, 0, token)
        out = out.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops) | (lengths >= limits)
        position = prompt_len - pads + step
        logits, caches = decode_step(model, token, position, caches)
        return step + 1, logits, caches, done, out, lengths

    out = jnp.zeros((batch, steps), jnp.int32)
    carry = (jnp.int32(0), logits, caches, limits <= 0, out, jnp.zeros(batch, jnp.int32))
    _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths
