"""Sampling with a KV cache: temperature, top-k and top-p (nucleus) filtering.

The cache is a ring buffer as wide as the training context, so generation can run past it: in
every layer each new token attends to the last ``seq_len`` positions (sliding-window attention,
as in Mistral's rolling cache), so relative positions never exceed what training saw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.runtime import run_once_options


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Scale by temperature, then keep the top_k tokens and the smallest set with mass >= top_p."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0.0 < top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest logit still inside the nucleus; everything below it is dropped.
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1)
        logits = jnp.where(logits < cutoff[..., None], -jnp.inf, logits)
    return logits


def sample_token(logits, key, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _generate(
    graphdef, params, prompt, max_new_tokens, key, temperature, top_k, top_p, width, vocab_limit
):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt.shape
    caches = model.init_caches(batch, width)
    logits, caches = model(prompt, jnp.arange(prompt_len, dtype=jnp.int32), caches)

    def step(carry, index):
        last_logits, caches, key = carry
        key, sub = jax.random.split(key)
        if vocab_limit:  # ids past the tokenizer's (a vocab padded for sharding) never come
            last_logits = last_logits.at[:, vocab_limit:].set(-jnp.inf)
        token = sample_token(last_logits, sub, temperature, top_k, top_p)
        position = (prompt_len + index)[None].astype(jnp.int32)
        logits, caches = model(token[:, None], position, caches)
        return (logits[:, -1], caches, key), token

    _, tokens = jax.lax.scan(step, (logits[:, -1], caches, key), jnp.arange(max_new_tokens))
    return tokens.T


_STATIC = (0, 3, 5, 6, 7, 8, 9)
_generate_fast = jax.jit(_generate, static_argnums=_STATIC)
# A short sample on CPU: compiled for a quick compile rather than a fast run (research.runtime).
_generate_once_cpu = jax.jit(
    _generate, static_argnums=_STATIC, compiler_options=run_once_options("cpu")
)


def generate(
    model: nnx.Module,
    prompt: jax.Array,
    max_new_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_limit: int = 0,
    once: bool = False,
) -> jax.Array:
    """Sample max_new_tokens continuations of prompt [B, P]; returns the new tokens [B, N].
    ``vocab_limit``: the tokenizer's vocabulary size when the model's is padded beyond it.
    ``once``: a short sample in a process that samples once (the text printed after
    training): compiled quickly rather than for speed; the same tokens."""
    # The cache holds what a token may see: the model's attention window, else its context.
    width = model.cfg.attention_window or model.cfg.seq_len
    prompt = jnp.asarray(prompt, jnp.int32)[:, -width:]
    graphdef, state = nnx.split(model)
    once_cpu = once and jax.default_backend() == "cpu"
    return (_generate_once_cpu if once_cpu else _generate_fast)(
        graphdef,
        nnx.to_pure_dict(state),
        prompt,
        max_new_tokens,
        key,
        float(temperature),
        int(top_k),
        float(top_p),
        width,
        int(vocab_limit),
    )


def sample_text(
    graphdef: nnx.GraphDef,
    params,
    tokenizer,
    prompt: str,
    n_tokens: int,
    seed: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
    once: bool = False,
) -> str:
    """The prompt and ``n_tokens`` sampled after it, as text (params: host or global arrays).
    ``once``: see ``generate`` (the sample printed after training)."""
    model = nnx.merge(graphdef, jax.device_get(params))
    prompt_ids = tokenizer.encode(prompt)[None, :]
    new = generate(
        model,
        prompt_ids,
        n_tokens,
        jax.random.key(seed),
        temperature,
        top_k,
        top_p,
        tokenizer.vocab_size,
        once=once,
    )
    return prompt + tokenizer.decode(np.asarray(new[0]))
