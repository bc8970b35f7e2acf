"""A task a CPU can learn, with answers a program can check: adding two n-digit numbers.

``python -m research.post.task --out data/post/addition`` writes (no network needed):

- ``corpus.txt``: pretraining text, one sum per line in the raw form ``047+385=432``, plus one
  line holding every printable character (so the character vocabulary covers any template);
- ``sft.jsonl``: demonstrations as chat conversations (``User: 047+385`` -> ``432``);
- ``pairs.jsonl``: preference pairs, the correct answer vs a plausible wrong one (off by one
  to ten, or a digit changed);
- ``problems.jsonl``: training problems without answers (GRPO's prompts);
- ``heldout.jsonl``: problems that appear in none of the files above, and
  ``heldout_pairs.jsonl``: preference pairs on them (the reward model's held-out accuracy).

Operands are zero-padded, so every prompt has the same length and a batch samples together.
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    digits: int

    @property
    def question(self) -> str:
        return f"{self.a:0{self.digits}d}+{self.b:0{self.digits}d}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def messages(self, answer: str | None = None) -> list[dict]:
        turns = [{"role": "user", "content": self.question}]
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
        return turns


def reward(completion: str, problem: Problem) -> float:
    """Exact match: 1.0 if the completion (up to its newline) is the sum, else 0.0."""
    return float(completion.split("\n", 1)[0].strip() == problem.answer)


def problem_from_row(row: dict, digits: int) -> Problem:
    return Problem(int(row["a"]), int(row["b"]), digits)


def wrong_answer(problem: Problem, rng: np.random.Generator) -> str:
    """A plausible mistake: off by 1-10 (a missed carry is off by 10), or one digit changed."""
    right = problem.a + problem.b
    if rng.random() < 0.5:
        wrong = right + int(rng.choice([-10, -1, 1, 10, *rng.integers(-9, 10, 2)]))
        if wrong >= 0 and wrong != right:
            return str(wrong)
    text = list(str(right))
    i = int(rng.integers(len(text)))
    text[i] = str((int(text[i]) + int(rng.integers(1, 10))) % 10)
    wrong_text = "".join(text).lstrip("0") or "0"
    return wrong_text if wrong_text != str(right) else str(right + 1)


def split_problems(digits: int, n_heldout: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): every pair (a, b) once, shuffled, split."""
    size = 10**digits
    rng = np.random.default_rng(seed)
    order = rng.permutation(size * size)
    problems = [Problem(int(i // size), int(i % size), digits) for i in order]
    return problems[n_heldout:], problems[:n_heldout]


def write_task(
    out: Path,
    digits: int = 2,
    n_corpus: int = 6000,
    n_sft: int = 2000,
    n_pairs: int = 2000,
    n_heldout: int = 500,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the four files (see the module docstring); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = split_problems(digits, n_heldout, seed)
    rng = np.random.default_rng(seed + 1)
    pick = lambda n: [train[int(i)] for i in rng.integers(len(train), size=n)]  # noqa: E731
    alphabet = "".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c")
    corpus = "\n".join([alphabet, *(f"{p.question}={p.answer}" for p in pick(n_corpus))]) + "\n"
    (out / "corpus.txt").write_text(corpus)
    paths = {"corpus": out / "corpus.txt"}
    rows = {
        "sft": [{"messages": p.messages(p.answer)} for p in pick(n_sft)],
        "pairs": [
            {"prompt": p.messages(), "chosen": p.answer, "rejected": wrong_answer(p, rng)}
            for p in pick(n_pairs)
        ],
        "problems": [{"a": p.a, "b": p.b} for p in pick(n_pairs)],
        "heldout_pairs": [
            {"prompt": p.messages(), "chosen": p.answer, "rejected": wrong_answer(p, rng)}
            for p in heldout
        ],
        "heldout": [{"a": p.a, "b": p.b, "messages": p.messages(p.answer)} for p in heldout],
    }
    for name, lines in rows.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in lines))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/post/addition")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_task(Path(args.out), args.digits, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
