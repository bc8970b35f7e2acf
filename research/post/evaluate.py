"""Answers to the task's problems from the batched generator (research/infer/generation.py),
and task accuracy: greedy answers to held-out problems, checked by the task's reward."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from research.infer.generation import GenerationConfig, generate
from research.post.chat import END, render_prompt
from research.post.task import Problem, reward


def encode_prompts(tokenizer, problems: list[Problem], template=None) -> list[np.ndarray]:
    """Each problem's prompt ids (any lengths: the generator pads them), in our template or
    ``template`` (research/post/templates.py)."""
    if template is not None:
        return [template.prompt_ids(tokenizer, p.messages()) for p in problems]
    return [tokenizer.encode(render_prompt(p.messages())) for p in problems]


def stop_token(tokenizer, template=None) -> int | None:
    """Where an answer ends: our template's newline, or the template's end-of-turn token."""
    if template is not None:
        return template.end_of_turn(tokenizer)
    end = tokenizer.encode(END)
    return int(end[0]) if len(end) == 1 else None


def answer_text(tokenizer, row: np.ndarray, stop: int | None) -> str:
    """An answer's text without its stop token (what the task's reward reads)."""
    if stop is not None and len(row) and row[-1] == stop:
        row = row[:-1]
    return tokenizer.decode(row)


def complete(
    graphdef,
    params,
    tokenizer,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    seeds: list[int],
    temperature: float = 0.0,
    stop: int | None = None,
) -> list[np.ndarray]:
    """Each prompt's continuation, sampled with its own seed (greedy at temperature 0), up to
    and with the ``stop`` token (``stop_token``), or max_new_tokens long."""
    model = nnx.merge(graphdef, jax.device_get(params))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_tokens=() if stop is None else (stop,),
        vocab_limit=tokenizer.vocab_size,
    )
    new = generate(model, [[int(t) for t in p] for p in prompts], config, seeds=seeds)
    return [np.asarray(row, np.int32) for row in new]


def task_accuracy(
    graphdef,
    params,
    tokenizer,
    problems: list[Problem],
    max_new_tokens: int,
    batch: int = 100,
    template=None,
) -> float:
    """Fraction of problems whose greedy answer is exactly right."""
    right, stop = 0.0, stop_token(tokenizer, template)
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        prompts = encode_prompts(tokenizer, chunk, template)
        seeds = [0] * len(chunk)
        new = complete(graphdef, params, tokenizer, prompts, max_new_tokens, seeds, 0.0, stop)
        right += sum(
            reward(answer_text(tokenizer, row, stop), p) for row, p in zip(new, chunk, strict=True)
        )
    return right / len(problems)
