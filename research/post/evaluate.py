"""Task accuracy: greedy answers to held-out problems, checked by the task's reward."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from research.infer.sampling import generate
from research.post.chat import render_prompt
from research.post.task import Problem, reward


def encode_prompts(tokenizer, problems: list[Problem]) -> np.ndarray:
    """[len(problems), P] prompt ids; the task's prompts all have the same length."""
    return np.stack([tokenizer.encode(render_prompt(p.messages())) for p in problems])


def complete(
    graphdef,
    params,
    tokenizer,
    prompts: np.ndarray,
    max_new_tokens: int,
    key,
    temperature: float = 0.0,
) -> np.ndarray:
    """Sampled (or greedy, temperature 0) continuations [B, max_new_tokens] of same-length
    prompts, as one batch. (A small stand-in: it should move to the batched generator of
    research/infer/ once that lands.)"""
    model = nnx.merge(graphdef, jax.device_get(params))
    return np.asarray(
        generate(model, prompts, max_new_tokens, key, temperature, vocab_limit=tokenizer.vocab_size)
    )


def task_accuracy(
    graphdef, params, tokenizer, problems: list[Problem], max_new_tokens: int, batch: int = 100
) -> float:
    """Fraction of problems whose greedy answer is exactly right."""
    right = 0.0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        new = complete(
            graphdef,
            params,
            tokenizer,
            encode_prompts(tokenizer, chunk),
            max_new_tokens,
            jax.random.key(0),
        )
        right += sum(reward(tokenizer.decode(row), p) for row, p in zip(new, chunk, strict=True))
    return right / len(problems)
