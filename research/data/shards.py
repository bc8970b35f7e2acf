"""`research prepare`: corpus -> deduplicated documents -> tokenizer -> train/val token shards.

Shards are numpy memmaps with JSON metadata (sizes, sha256s, the dedup report), written to a
temporary folder and renamed into place, and cached by a hash of the corpus content and the
settings: a second run with the same inputs returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from research.config import ConfigError, DataConfig
from research.data.corpus import DataError, cache_root, read_text, resolve_corpus, sha256_file
from research.data.documents import dedup_train, split_documents
from research.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    path: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        info = self.meta["splits"][split]
        return np.memmap(self.path / info["file"], dtype=info["dtype"], mode="r")

    def tokenizer(self):
        return load_tokenizer(self.path / "tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return info["bytes"] / info["tokens"]


def _cache_key(corpus_sha: str, cfg: DataConfig) -> str:
    settings = {
        "corpus_sha256": corpus_sha,
        "tokenizer": cfg.tokenizer,
        "bpe_vocab_size": cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
        "doc_separator": cfg.doc_separator,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _write_tokens(folder: Path, name: str, ids: np.ndarray, dtype: str) -> dict:
    path = folder / f"{name}.bin"
    ids.astype(dtype).tofile(path)
    return {"file": path.name, "dtype": dtype, "tokens": int(ids.size), "sha256": sha256_file(path)}


def _check_splits(cfg: DataConfig, train_docs: list, val_docs: list, documents: int) -> None:
    """Both splits must hold text after the split and dedup, or training has nothing to read."""
    if not val_docs:
        raise DataError(
            f"corpus '{cfg.corpus}' leaves no validation text: its last data.val_fraction="
            f"{cfg.val_fraction} is blank. Use a larger corpus or a larger data.val_fraction."
        )
    if not train_docs:
        why = "is blank" if not documents else f"all {documents} documents repeat validation ones"
        raise DataError(
            f"corpus '{cfg.corpus}' leaves no training text after dedup ({why}). Use a larger "
            "corpus, a smaller data.val_fraction, or another data.doc_separator."
        )


def prepare(cfg: DataConfig, verbose: bool = True) -> PreparedData:
    """Prepare (or fetch from the cache) the token shards for a data config."""
    problems = cfg.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    say = print if verbose else (lambda *_: None)
    text = read_text(resolve_corpus(cfg.corpus, cfg.cache_dir), cfg.doc_separator)
    corpus_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    out = cache_root(cfg.cache_dir) / "prepared" / _cache_key(corpus_sha, cfg)
    if (out / "meta.json").exists():
        return PreparedData(out, json.loads((out / "meta.json").read_text()))

    split_at = int(len(text) * (1.0 - cfg.val_fraction))
    train_text, val_text = text[:split_at], text[split_at:]
    val_docs = split_documents(val_text, cfg.doc_separator)
    train_docs, report = dedup_train(split_documents(train_text, cfg.doc_separator), val_docs)
    _check_splits(cfg, train_docs, val_docs, report.documents)
    say(
        f"prepare: {report.documents} train documents, dropped {report.duplicates_dropped} exact "
        f"duplicates and {report.val_overlap_dropped} that also occur in validation"
    )
    train_clean = cfg.doc_separator.join(train_docs)
    if cfg.tokenizer == "char":
        # Fit on all text so validation has no unknown characters (nanoGPT does the same).
        tokenizer = CharTokenizer.train(text)
        train_ids, val_ids = tokenizer.encode(train_clean), tokenizer.encode(val_text)
        train_bytes, val_bytes = len(train_clean.encode()), len(val_text.encode())
    else:
        tokenizer = BPETokenizer.train(iter(train_docs), cfg.bpe_vocab_size)
        sep = cfg.doc_separator
        train_ids = np.concatenate(tokenizer.encode_many([d + sep for d in train_docs]))
        val_ids = np.concatenate(tokenizer.encode_many([d + sep for d in val_docs]))
        train_bytes = sum(len((d + sep).encode()) for d in train_docs)
        val_bytes = sum(len((d + sep).encode()) for d in val_docs)
    dtype = "uint16" if tokenizer.vocab_size < 2**16 else "uint32"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        tokenizer.save(tmp / "tokenizer.json")
        meta = {
            "corpus": cfg.corpus,
            "corpus_sha256": corpus_sha,
            "tokenizer": cfg.tokenizer,
            "vocab_size": tokenizer.vocab_size,
            "dedup": asdict(report),
            "splits": {
                "train": {**_write_tokens(tmp, "train", train_ids, dtype), "bytes": train_bytes},
                "val": {**_write_tokens(tmp, "val", val_ids, dtype), "bytes": val_bytes},
            },
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"prepare: {meta['splits']['train']['tokens']:,} train / "
        f"{meta['splits']['val']['tokens']:,} val tokens, vocab {tokenizer.vocab_size} -> {out}"
    )
    return PreparedData(out, json.loads((out / "meta.json").read_text()))
