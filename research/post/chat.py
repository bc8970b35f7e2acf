"""Chat data: JSONL of conversations, our chat template, assistant-only loss masks, packing.

One conversation per line: ``{"messages": [{"role": "user", "content": "..."}, {"role":
"assistant", "content": "..."}]}`` (roles system | user | assistant). The template is ours and
plain text, so a character tokenizer can read it::

    System: {content}\\n      (optional)
    User: {content}\\n
    Assistant: {content}\\n

Only the assistant's content and its closing newline are trained on; the "Assistant: " prefix
and every other turn are prompt. Generation stops at the newline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research.config import ResearchError

ROLES = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
END = "\n"


class ChatDataError(ResearchError, ValueError):
    """Chat or preference data that cannot be trained on; the message names the line and fix."""


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path} does not exist; make it with `python -m research.post.task`")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ChatDataError(f"{path}:{number} is not JSON ({error})") from None
        if not isinstance(row, dict):
            raise ChatDataError(f"{path}:{number} holds a {type(row).__name__}, not an object")
        rows.append((number, row))
    if not rows:
        raise ChatDataError(f"{path} holds no examples")
    return rows


def check_messages(messages, where: str) -> list[dict]:
    """The conversation if it can be trained on, else a ChatDataError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list of turns")
    for turn in messages:
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise ChatDataError(
                f"{where}: each turn is {{'role': ..., 'content': ...}}, got {turn!r}"
            )
        if turn["role"] not in ROLES:
            raise ChatDataError(f"{where}: role {turn['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(turn["content"], str) or END in turn["content"]:
            raise ChatDataError(
                f"{where}: content must be a string without a newline (the template ends each "
                f"turn with one), got {turn['content']!r}"
            )
    if not any(turn["role"] == "assistant" for turn in messages):
        raise ChatDataError(
            f"{where}: the conversation has no assistant turn, so it has nothing to train on; "
            "add the assistant's reply or drop the line"
        )
    return messages


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every conversation of a chat JSONL file, checked (see ``check_messages``)."""
    return [
        check_messages(row.get("messages"), f"{path}:{number}")
        for number, row in _read_jsonl(Path(path))
    ]


@dataclass
class Pair:
    prompt: list[dict]  # the conversation so far, ending with a user turn
    chosen: str
    rejected: str


def load_pairs(path: str | Path) -> list[Pair]:
    """Preference pairs: ``{"prompt": [turns], "chosen": "...", "rejected": "..."}`` per line."""
    pairs = []
    for number, row in _read_jsonl(Path(path)):
        where = f"{path}:{number}"
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ChatDataError(f"{where}: a pair needs 'chosen' and 'rejected' strings")
        if chosen == rejected:
            raise ChatDataError(
                f"{where}: chosen and rejected responses are identical ({chosen!r}), so the pair "
                "says nothing about preference; drop it or fix the rejected answer"
            )
        check_messages([*prompt, {"role": "assistant", "content": chosen}], where)
        check_messages([*prompt, {"role": "assistant", "content": rejected}], where)
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


def render_prompt(messages: list[dict]) -> str:
    """The template's text of a conversation so far, ready for the assistant to answer."""
    return "".join(ROLES[t["role"]] + t["content"] + END for t in messages) + ROLES["assistant"]


def encode(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, mask): mask is 1 on the tokens of assistant content (and its newline)."""
    ids, mask = [], []
    for turn in messages:
        head = tokenizer.encode(ROLES[turn["role"]])
        body = tokenizer.encode(turn["content"] + END)
        ids += [head, body]
        trained = turn["role"] == "assistant"
        mask += [np.zeros(len(head), np.int32), np.full(len(body), int(trained), np.int32)]
    return np.concatenate(ids).astype(np.int32), np.concatenate(mask)


def pack(examples: list[tuple[np.ndarray, np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """Pack (ids, mask) examples greedily, in order, into rows of ``length`` tokens.

    Returns ``tokens``, ``segment_ids`` (1, 2, ... per example in a row; 0 = padding) and
    ``loss_mask`` arrays [rows, length]: the batch format packed_targets reads."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for index, (ids, mask) in enumerate(examples):
        if len(ids) > length:
            raise ChatDataError(
                f"example {index} is {len(ids)} tokens, longer than a packed row of {length} "
                "(model.seq_len + 1); raise model.seq_len or shorten the conversation"
            )
        if used + len(ids) > length:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    out = {
        k: np.zeros((len(rows), length), np.int32) for k in ("tokens", "segment_ids", "loss_mask")
    }
    for r, row in enumerate(rows):
        at = 0
        for segment, (ids, mask) in enumerate(row, 1):
            out["tokens"][r, at : at + len(ids)] = ids
            out["segment_ids"][r, at : at + len(ids)] = segment
            out["loss_mask"][r, at : at + len(ids)] = mask
            at += len(ids)
    return out
