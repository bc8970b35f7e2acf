"""Split text into documents and drop exact duplicates (by content hash)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class DedupReport:
    documents: int
    duplicates_dropped: int
    val_overlap_dropped: int  # train documents that also occur in validation (contamination)


def split_documents(text: str, separator: str) -> list[str]:
    return [doc for doc in text.split(separator) if doc.strip()]


def _key(doc: str) -> bytes:
    return hashlib.sha256(doc.strip().encode("utf-8")).digest()


def dedup_train(train_docs: list[str], val_docs: list[str]) -> tuple[list[str], DedupReport]:
    """Keep the first copy of each train document and drop any that also appear in validation.

    Validation is left untouched so its loss stays comparable with other codebases' splits.
    """
    val_keys = {_key(doc) for doc in val_docs}
    seen: set[bytes] = set()
    kept, duplicates, overlap = [], 0, 0
    for doc in train_docs:
        key = _key(doc)
        if key in seen:
            duplicates += 1
        elif key in val_keys:
            overlap += 1
        else:
            kept.append(doc)
        seen.add(key)
    return kept, DedupReport(len(train_docs), duplicates, overlap)
