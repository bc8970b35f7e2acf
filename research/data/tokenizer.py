"""Tokenizers: characters, or byte-level BPE trained with HF ``tokenizers``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from research.data.corpus import DataError


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as error:
            raise DataError(
                f"character {error} is not in the tokenizer's vocabulary (the characters of the "
                "training text); use only characters the corpus contains"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"type": "char", "chars": self.chars}))


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def train(cls, text_iter, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        )
        tok.train_from_iterator(text_iter, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, path: Path) -> None:
        self._tok.save(str(path))


def load_tokenizer(path: Path) -> CharTokenizer | BPETokenizer:
    data = json.loads(Path(path).read_text())
    if data.get("type") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(str(path)))
