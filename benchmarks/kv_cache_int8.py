"""The int8 KV cache against a float one: quality (bits per byte on held-out text) and memory.

    python benchmarks/kv_cache_int8.py RUN_DIR [--windows 20 --length 64]

Scores validation windows of one of our runs through the KV-cache path (the keys and values
each position attends to are read back from the cache, so the int8 rounding counts), once with
a float32 cache and once with int8 (one absmax scale per cached head vector,
research/models/attention.py). Prints validation loss and bits per byte for both, their
difference, and the cache's bytes per token beside float32 and bfloat16's.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.infer.generation import init_caches
from research.models.loss import token_losses
from research.run import build_run, load_run_config


def score(model, windows: np.ndarray, cache_dtype) -> float:
    """Mean next-token loss (nats) of the windows [N, L+1], through a KV cache of that dtype."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, window):
        model = nnx.merge(graphdef, state)
        tokens = window[None, :-1]
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        caches = init_caches(model, 1, tokens.shape[1], cache_dtype)
        logits, _ = model(tokens, positions, caches)
        return jnp.mean(token_losses(logits, window[None, 1:])[0])

    return float(np.mean([loss(state, jnp.asarray(w)) for w in windows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    run = build_run(load_run_config(Path(args.run_dir)), "generate")
    model = nnx.merge(run.graphdef, run.state["params"])
    tokens = np.asarray(run.data.tokens("val"))
    starts = np.linspace(0, len(tokens) - args.length - 2, args.windows).astype(int)
    windows = np.stack([tokens[s : s + args.length + 1] for s in starts])
    tokenizer = run.data.tokenizer()
    n_bytes = sum(len(tokenizer.decode(w[1:].tolist()).encode()) for w in windows)
    bits_per_byte = windows[:, 1:].size / n_bytes / math.log(2)
    cfg = model.cfg
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads  # head vectors cached per token
    print(f"host: {platform.node()} {platform.processor()}, jax {jax.__version__}")
    print(f"{args.windows} windows of {args.length} tokens from {args.run_dir}'s validation split")
    print("| KV cache | bytes per token | val loss | bits per byte |")
    print("|---|---|---|---|")
    base = None
    for name, dtype, nbytes in (
        ("float32", jnp.float32, per_token * cfg.head_dim * 4),
        ("bfloat16", None, per_token * cfg.head_dim * 2),
        ("int8", jnp.int8, per_token * (cfg.head_dim + 4)),
    ):
        if dtype is None:
            print(f"| {name} | {nbytes} | (not scored) | |")
            continue
        loss = score(model, windows, dtype)
        bpb = loss * bits_per_byte
        delta = "" if base is None else f" ({bpb - base:+.5f})"
        base = bpb if base is None else base
        print(f"| {name} | {nbytes} | {loss:.5f} | {bpb:.5f}{delta} |")


if __name__ == "__main__":
    main()
