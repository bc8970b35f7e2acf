"""Answers to the task's problems from the batched generator (research/infer/generation.py),
and task accuracy: greedy answers to held-out problems, checked by the task's reward."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from research.infer.generation import GenerationConfig, generate
from research.post.chat import END, render_prompt
from research.post.task import Problem, reward


def encode_prompts(tokenizer, problems: list[Problem]) -> list[np.ndarray]:
    """Each problem's prompt ids (any lengths: the generator pads them)."""
    return [tokenizer.encode(render_prompt(p.messages())) for p in problems]


def complete(
    graphdef,
    params,
    tokenizer,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    seeds: list[int],
    temperature: float = 0.0,
) -> list[np.ndarray]:
    """Each prompt's continuation, sampled with its own seed (greedy at temperature 0), up to
    and with the template's closing newline, or max_new_tokens long."""
    model = nnx.merge(graphdef, jax.device_get(params))
    end = tokenizer.encode(END)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_tokens=(int(end[0]),) if len(end) == 1 else (),
        vocab_limit=tokenizer.vocab_size,
    )
    new = generate(model, [[int(t) for t in p] for p in prompts], config, seeds=seeds)
    return [np.asarray(row, np.int32) for row in new]


def task_accuracy(
    graphdef, params, tokenizer, problems: list[Problem], max_new_tokens: int, batch: int = 100
) -> float:
    """Fraction of problems whose greedy answer is exactly right."""
    right = 0.0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        prompts = encode_prompts(tokenizer, chunk)
        new = complete(graphdef, params, tokenizer, prompts, max_new_tokens, [0] * len(chunk))
        right += sum(reward(tokenizer.decode(row), p) for row, p in zip(new, chunk, strict=True))
    return right / len(problems)
